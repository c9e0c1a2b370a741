"""Loss history → a loss-curve picture (PNG / ComfyUI IMAGE) and TensorBoard logs."""
import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)


def smooth(values, factor=0.9):
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = factor * average + (1 - factor) * float(value)
        out.append(average / (1 - factor**i))
    return out


def render_loss_curve(history, width=640, height=360, title="training loss"):
    """PIL RGB picture of ``history`` = [(step, loss), …]: raw losses (light) and their EMA (dark), log-free axes."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.text((left, 4), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    if not history:
        draw.text((left + 8, top + 8), "no steps yet", fill="gray", font=font)
        return image
    steps = [float(s) for s, _ in history]
    losses = [float(v) for _, v in history]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-8
    s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def point(step, value):
        x = left + (step - s0) / (s1 - s0) * (right - left)
        y = bottom - (value - lo) / (hi - lo) * (bottom - top)
        return x, y

    for series, colour in ((losses, (170, 190, 235)), (smooth(losses), (20, 60, 170))):
        points = [point(s, v) for s, v in zip(steps, series)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=2)
    draw.text((4, top - 4), f"{hi:.4g}", fill="black", font=font)
    draw.text((4, bottom - 8), f"{lo:.4g}", fill="black", font=font)
    draw.text((left, bottom + 6), f"step {int(s0)}", fill="black", font=font)
    label = f"step {int(steps[-1])}"
    draw.text((right - 6 * len(label), bottom + 6), label, fill="black", font=font)
    return image


def loss_curve_array(history, **kwargs):
    """The loss curve as a float32 ``[H, W, 3]`` array in [0, 1] (one ComfyUI IMAGE item)."""
    return np.asarray(render_loss_curve(history, **kwargs), np.float32) / 255.0


def save_loss_curve(history, path, **kwargs):
    """Write the loss curve PNG atomically; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    render_loss_curve(history, **kwargs).save(tmp)
    os.replace(tmp, path)
    return path


class TensorBoardLog:
    """Scalars and images for TensorBoard under ``logdir``; inactive (with one warning) without tensorboard."""

    def __init__(self, logdir):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is an optional extra
            log.warning("TensorBoard logging is off: %s (pip install tensorboard)", error)
            return
        self.writer = SummaryWriter(log_dir=os.fspath(logdir))

    def scalars(self, values, step):
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), int(step))

    def image(self, tag, array_hwc, step):
        """``array_hwc``: uint8 or float [0, 1] H×W×3."""
        if self.writer is not None:
            array = np.asarray(array_hwc)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            self.writer.add_image(tag, array, int(step), dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
