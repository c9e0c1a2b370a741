"""Metrics with learned weights, from local files only: LPIPS, FID, CMMD and ReMOVE.

Nothing here downloads. Each metric is built from a weights path (an option of ``erasekit-eval``) or, for LPIPS and
FID, from the file torch's hub cache would hold after the library's own download (``~/.cache/torch/hub/
checkpoints``); without it the metric is not computed and ``WeightsNotFound`` says which file to get from where.
Well-kept implementations do the work: torchmetrics' LPIPS and FID (FID with torch-fidelity's Inception), the
official CMMD estimator (google-research/google-research ``cmmd/``) on a transformers CLIP, and ReMOVE on
segment-anything's SAM as its authors' code does (chandrasekaraditya/ReMOVE). Pickled weights are opened with
``torch.load(weights_only=True)`` first, so a file that holds more than tensors is refused.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..jobs import require

EXTRA = "eval"
HUB_CHECKPOINTS = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"

# torchvision backbones of LPIPS (torchmetrics' _LPIPS ``net_type`` → torchvision weights enum name)
LPIPS_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
                   "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14-336 (the whole repository as a folder)"
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
# CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID"): Gaussian RBF bandwidth and display scale of cmmd/distance.py
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0
# ReMOVE (Chandrasekar et al., CVPR 2024 workshops): margin of the square crop around the mask (crop.py)
REMOVE_MARGIN = 16


class WeightsNotFound(FileNotFoundError):
    """A learned metric's weights are not on this machine; the message names the file and where to get it."""


def _weights_file(path, what, url, option):
    """``path`` as a Path; ``WeightsNotFound`` naming where to get it when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"{what} weights not found at {path}: download {url} and give its path "
                              f"(erasekit-eval {option} FILE); EraseKit downloads nothing")
    return path


def _not_plain_weights(path, what, error):
    return ValueError(f"{path} is not a plain weights file for {what} ({error})")


def _check_weights(path, what, url, option):
    path = _weights_file(path, what, url, option)
    import torch

    try:
        torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise _not_plain_weights(path, what, error) from None
    return path


def to_tensor(images):
    """uint8 ``[N,H,W,3]`` (or one ``H×W×3``) → float ``[N,3,H,W]`` in [0, 1]."""
    import torch

    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ LPIPS
def lpips_weights_url(net):
    """Where torchvision downloads the backbone's ImageNet weights from."""
    import torchvision.models

    return getattr(torchvision.models, LPIPS_BACKBONES[net][1]).DEFAULT.url


class Lpips:
    """LPIPS (Zhang et al., CVPR 2018) through torchmetrics: its linear heads ship inside torchmetrics; the
    torchvision backbone comes from ``weights`` (default: torch's hub cache). Lower is more similar."""

    def __init__(self, weights=None, net="alex", device="cpu"):
        require("torchmetrics", EXTRA, "LPIPS")
        import torch
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS network {net!r} is not one of {', '.join(LPIPS_BACKBONES)}")
        url = lpips_weights_url(net)
        name = url.rsplit("/", 1)[-1]  # the file name torch's hub cache holds
        weights = _check_weights(weights or HUB_CHECKPOINTS / name, f"LPIPS ({LPIPS_BACKBONES[net][0]} backbone)", url,
                                "--lpips-weights")
        previous = torch.hub.get_dir()
        with tempfile.TemporaryDirectory() as hub:  # torchvision finds the file where its download would put it
            (Path(hub) / "checkpoints").mkdir()
            (Path(hub) / "checkpoints" / name).symlink_to(weights.resolve())
            torch.hub.set_dir(hub)
            try:
                self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device).eval()
            finally:
                torch.hub.set_dir(previous)
        self.device = device

    def __call__(self, result, target):
        """LPIPS distance of two uint8 H×W×3 images."""
        import torch

        with torch.no_grad():
            value = self.metric(to_tensor(result).to(self.device), to_tensor(target).to(self.device))
        self.metric.reset()
        return float(value)


# ------------------------------------------------------------------------------------------------ FID
class Fid:
    """FID (Heusel et al., 2017) through torchmetrics with torch-fidelity's Inception-v3 weights from ``weights``
    (default: torch's hub cache), on the 2048 pool3 features as everyone reports it. Needs two images per set."""

    def __init__(self, weights=None, device="cpu", features=2048):
        require("torchmetrics", EXTRA, "FID")
        require("torch_fidelity", EXTRA, "FID")
        from torchmetrics.image.fid import FrechetInceptionDistance

        weights = _check_weights(weights or HUB_CHECKPOINTS / INCEPTION_FILE, "FID (Inception-v3)", INCEPTION_URL,
                                "--fid-weights")
        self.metric = FrechetInceptionDistance(feature=features, normalize=True,
                                               feature_extractor_weights_path=str(weights)).to(device)
        self.device = device
        self.counts = [0, 0]

    def add(self, image, real):
        """Add one uint8 H×W×3 image to the real (references) or the generated (results) set."""
        import torch

        with torch.no_grad():
            self.metric.update(to_tensor(image).to(self.device), real=real)
        self.counts[0 if real else 1] += 1

    def compute(self):
        if min(self.counts) < 2:
            return math.nan
        return float(self.metric.compute())


# ------------------------------------------------------------------------------------------------ CMMD
def mmd(x, y, sigma=CMMD_SIGMA, scale=CMMD_SCALE):
    """The minimum-variance MMD estimate with a Gaussian RBF kernel, as google-research ``cmmd/distance.py``."""
    import torch

    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    gamma = 1.0 / (2 * sigma ** 2)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)

    def kernel_mean(a, a_sq, b, b_sq):
        return torch.exp(-gamma * (-2 * a @ b.T + a_sq[:, None] + b_sq[None, :])).mean()

    return float(scale * (kernel_mean(x, x_sq, x, x_sq) + kernel_mean(y, y_sq, y, y_sq)
                          - 2 * kernel_mean(x, x_sq, y, y_sq)))


class ClipEmbedder:
    """CLIP image embeddings for CMMD from a local transformers folder (the paper: ViT-L/14 at 336 px)."""

    def __init__(self, folder, device="cpu"):
        require("transformers", EXTRA, "CMMD")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsNotFound(f"CMMD's CLIP model not found at {folder} (a transformers folder with config.json): "
                                  f"download {CLIP_URL} and give its folder (erasekit-eval --clip FOLDER)")
        import json

        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder)).to(device).eval()
        self.size = int(self.model.config.image_size)
        processor = folder / "preprocessor_config.json"
        settings = json.loads(processor.read_text()) if processor.is_file() else {}
        # OpenAI CLIP's normalisation (clip/clip.py _transform), what every released CLIP folder states
        self.mean = np.asarray(settings.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), np.float32)
        self.std = np.asarray(settings.get("image_std", [0.26862954, 0.26130258, 0.27577711]), np.float32)
        self.device = device

    def prepare(self, image):
        """cmmd/io_util.py: centre crop to a square, bicubic resize to the model's size; then CLIP's normalisation."""
        picture = Image.fromarray(np.asarray(image))
        width, height = picture.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        picture = picture.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
        return (np.asarray(picture, np.float32) / 255.0 - self.mean) / self.std

    def __call__(self, image):
        """The L2-normalised projected embedding of one uint8 H×W×3 image."""
        import torch

        pixels = torch.from_numpy(self.prepare(image)).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            embedding = self.model(pixel_values=pixels).image_embeds[0].double()
        return (embedding / embedding.norm()).cpu().numpy()


# ------------------------------------------------------------------------------------------------ ReMOVE
def bounding_square(mask, margin=REMOVE_MARGIN):
    """ReMOVE's crop (crop.py ``find_smallest_bounding_square``): ``(x, y, size)`` of the square around the mask,
    ``margin`` px wider on each side where the image allows, else by the smallest distance to a border; None for
    an empty mask. Like the original, the square may run past the right or bottom edge (slicing then stops there)."""
    rows, cols = np.nonzero(np.asarray(mask, bool))
    if rows.size == 0:
        return None
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    size = max(right - left + 1, bottom - top + 1)
    height, width = mask.shape
    if left - margin >= 0 and top - margin >= 0 and bottom + margin <= height and right + margin <= width:
        pad = margin
    else:
        pad = max(min(left, top, height - bottom, width - right), 0)
    return int(left - pad), int(top - pad), int(size + 2 * pad)


def remove_from_features(features, mask_grid):
    """Cosine similarity of the mean feature inside vs outside the mask: ``features`` ``[C,h,w]``, ``mask_grid``
    bool ``h×w`` (predictor.py ``get_aggregate_features`` then main.py's ``cosine_similarity``)."""
    import torch

    features = torch.as_tensor(features).double()
    grid = torch.as_tensor(np.asarray(mask_grid, bool))
    if not grid.any() or grid.all():
        return math.nan
    inside, outside = features[:, grid].mean(1), features[:, ~grid].mean(1)
    return float(torch.nn.functional.cosine_similarity(inside[None], outside[None])[0])


class Remove:
    """ReMOVE (reference-free): how alike SAM's image-encoder features are inside the erased region and around it;
    higher is better. From a segment-anything checkpoint (sam_vit_h_4b8939.pth in the paper)."""

    def __init__(self, checkpoint, device="cpu", crop=True):
        require("segment_anything", EXTRA, "ReMOVE")
        from segment_anything import SamPredictor

        from ..dataset_tools.segmenters import build_segment_anything, load_state_dict

        what = "ReMOVE (segment-anything SAM)"
        checkpoint = _weights_file(checkpoint, what, SAM_URL, "--sam")
        try:
            state = load_state_dict(checkpoint)
        except ValueError as error:
            raise _not_plain_weights(checkpoint, what, error) from None
        self.predictor = SamPredictor(build_segment_anything(state).to(device))
        self.crop = crop

    def __call__(self, result, mask):
        """ReMOVE of a uint8 H×W×3 result and its bool mask (``nan`` for an empty mask)."""
        import torch

        result, mask = np.asarray(result), np.asarray(mask, bool)
        if self.crop:
            box = bounding_square(mask)
            if box is None:
                return math.nan
            x, y, size = box
            result, mask = result[y:y + size, x:x + size], mask[y:y + size, x:x + size]
        with torch.no_grad():
            self.predictor.set_image(np.ascontiguousarray(result))
            features = self.predictor.get_image_embedding()[0].cpu()
        height, width = features.shape[1:]
        # main.py: the mask as an 8-bit image, resized to the feature grid (PIL's default filter), // 255
        grid = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height))) // 255
        return remove_from_features(features, grid > 0)
