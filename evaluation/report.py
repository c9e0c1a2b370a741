"""What ``erasekit-eval`` writes: a CSV row per image, a summary table (printed and as Markdown), and one PNG with
each metric's distribution and the worst five images side by side. Pictures are drawn with PIL (the approach of
train/curves.py), so matplotlib is not needed. Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..dataset_tools import triplets

# metric key → (column title, higher is better)
METRICS = {
    "psnr": ("PSNR (dB)", True), "ssim": ("SSIM", True), "psnr_masked": ("PSNR in mask (dB)", True),
    "psnr_unmasked": ("PSNR outside mask (dB)", True), "lpips": ("LPIPS", False), "remove": ("ReMOVE", True),
}
DATASET_METRICS = {"fid": ("FID", False), "cmmd": ("CMMD", False)}


def write_atomic(path, data):
    """``data`` (bytes) to ``path`` whole, through ``.<name>.partial`` beside it."""
    triplets.write_atomic(path, data, f".{Path(path).name}.partial")


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.6g}"
    return str(value)


def per_image_csv(rows, keys):
    """CSV text: ``id``, each metric in ``keys``, ``note``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *keys, "note"])
    for row in rows:
        writer.writerow([row["id"], *(_format(row.get(k)) for k in keys), row.get("note", "")])
    return buffer.getvalue()


def summarize(rows, keys):
    """``{key: (mean over finite values, finite count, infinite count)}`` of the per-image metrics."""
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), float) and not math.isnan(row[key])]
        finite = [v for v in values if math.isfinite(v)]
        summary[key] = (float(np.mean(finite)) if finite else math.nan, len(finite), len(values) - len(finite))
    return summary


def summary_markdown(summary, dataset_values, counts, notes):
    """The summary table: per-image means, dataset-level metrics, then what was not scored and why."""
    lines = ["| metric | value | images |", "| --- | --- | --- |"]
    for key, (mean, finite, infinite) in summary.items():
        arrow = "↑" if METRICS[key][1] else "↓"
        extra = f" (+{infinite} identical: ∞)" if infinite else ""
        lines.append(f"| {METRICS[key][0]} {arrow} | {_format(mean)} | {finite}{extra} |")
    for key, value in dataset_values.items():
        lines.append(f"| {DATASET_METRICS[key][0]} ↓ | {_format(value)} | {counts['scored']} |")
    text = "\n".join(lines) + "\n"
    text += f"\n{counts['scored']} images scored, {counts['missing']} without a result, {counts['failed']} failed.\n"
    for note in notes:
        text += f"\n- {note}"
    return text + ("\n" if notes else "")


# ------------------------------------------------------------------------------------------------ picture
def _histogram(draw, box, values, title, font):
    """Bars of ``values`` (finite ones) in ``box`` = (left, top, right, bottom), with the range and the mean."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    finite = [v for v in values if math.isfinite(v)]
    draw.text((left + 4, top - 14), f"{title}  (n={len(finite)}, mean {np.mean(finite):.4g})" if finite else
              f"{title}  (no finite values)", fill="black", font=font)
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    bins = 12
    counts, _ = np.histogram(finite, bins=bins, range=(lo, hi if hi > lo else lo + 1e-9))
    width = (right - left - 8) / bins
    for i, count in enumerate(counts):
        height = (bottom - top - 8) * count / max(counts.max(), 1)
        x0 = left + 4 + i * width
        draw.rectangle([x0 + 1, bottom - 4 - height, x0 + width - 1, bottom - 4], fill=(60, 90, 170))
    draw.text((left, bottom + 2), f"{lo:.4g}", fill="black", font=font)
    label = f"{hi:.4g}"
    draw.text((right - 6 * len(label), bottom + 2), label, fill="black", font=font)


def _thumb(image, side):
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    scale = side / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.LANCZOS if scale < 1 else Image.NEAREST)
    canvas = Image.new("RGB", (side, side), (235, 235, 235))
    canvas.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    return canvas


def render_report(rows, keys, worst, load_row, worst_key, thumb=160):
    """PIL picture: a histogram per metric, then the ``worst`` rows (by ``worst_key``) as photo | mask | result |
    reference, each loaded by ``load_row(row)`` → ``{"photo", "mask", "result", "reference"}`` (None = absent)."""
    font = ImageFont.load_default()
    columns = ("photo", "mask", "result", "reference")
    width = max(4 * (thumb + 8) + 16, 640)
    plot_w, plot_h, per_row = 300, 110, max(1, (width - 16) // 310)
    plot_rows = math.ceil(len(keys) / per_row) if keys else 0
    height = 16 + plot_rows * (plot_h + 40) + 24 + len(worst) * (thumb + 24) + 8
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for index, key in enumerate(keys):
        x = 8 + (index % per_row) * 310
        y = 30 + (index // per_row) * (plot_h + 40)
        _histogram(draw, (x, y, x + plot_w, y + plot_h), [r[key] for r in rows if isinstance(r.get(key), float)],
                   METRICS[key][0], font)
    y = 16 + plot_rows * (plot_h + 40)
    if worst:
        draw.text((8, y), f"worst {len(worst)} by {METRICS[worst_key][0]}: " + " | ".join(columns), fill="black",
                  font=font)
    y += 20
    for row in worst:
        images = load_row(row)
        draw.text((8, y), f"{row['id']}  {METRICS[worst_key][0]} {_format(row.get(worst_key))}", fill="black", font=font)
        for column, name in enumerate(columns):
            x = 8 + column * (thumb + 8)
            if images.get(name) is not None:
                picture.paste(_thumb(images[name], thumb), (x, y + 14))
            else:
                draw.rectangle([x, y + 14, x + thumb, y + 14 + thumb], outline=(200, 200, 200))
                draw.text((x + 8, y + 20), f"no {name}", fill="gray", font=font)
        y += thumb + 24
    return picture


def worst_rows(rows, key, count=5):
    """The ``count`` rows worst by ``key`` (lowest where higher is better), finite values only."""
    scored = [r for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return sorted(scored, key=lambda r: r[key], reverse=not METRICS[key][1])[:count]


def save_png(picture, path):
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
