"""CLIP scoring of instances, as SmartEraser's Syn4Removal pipeline does it.

Dataset_pipeline/First_seg_instances_labels.py: the instance is put on a white background *in its whole
image* (``img * mask + 1 * (1 - mask)``, no crop), resized (short side 224, bicubic), centre-cropped to 224,
normalised with CLIP's mean/std, and scored against the text ``"a photo of {class}"``. The score is
``logits_per_text`` of CLIP ViT-L/14, i.e. ``exp(logit_scale) * cosine`` (≈ 100 × cosine): the
"official logit scale" that the filter ``score >= min(0.2, best_in_class - 0.02)`` is applied to.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..jobs import require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "a photo of {}"


def white_background(image, mask):
    """uint8 H×W×3 + bool H×W → float tensor 3×H×W in [0, 1]: the instance, white everywhere else."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    keep = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
    return pixels * keep + (1.0 - keep)


def preprocess(pixels, size=224):
    """The official transform, torchvision's ``Resize(size, bicubic, antialias)`` on the short side,
    ``CenterCrop(size)`` and ``Normalize`` on a 3×H×W float tensor, done with torch alone (torchvision's tensor
    path is this interpolate call, its sizes and crop offsets as computed here)."""
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    resized = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
    if resized != (height, width):
        pixels = F.interpolate(pixels[None], size=resized, mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    pixels = pixels[:, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean) / std


class ClipScorer:
    """Scores (image, mask, class name) triples with a transformers ``CLIPModel``."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = int(model.config.vision_config.image_size)
        self._text_cache = {}

    @classmethod
    def from_folder(cls, folder, device="cpu"):
        """Load a local transformers CLIP folder (e.g. clip-vit-large-patch14); never downloads."""
        transformers = require("transformers", "dataset", "CLIP scoring", names=("CLIPModel", "CLIPTokenizer"))
        CLIPModel, CLIPTokenizer = transformers.CLIPModel, transformers.CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a transformers CLIP folder (no config.json). Public weights: "
                "https://huggingface.co/openai/clip-vit-large-patch14"
            )
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, device)

    @torch.no_grad()
    def _text_embeds(self, class_name):
        if class_name not in self._text_cache:
            tokens = self.tokenizer([PROMPT.format(class_name)], padding=True, return_tensors="pt").to(self.device)
            embeds = self.model.get_text_features(**tokens)
            if not torch.is_tensor(embeds):  # transformers 5 may return a model output
                embeds = embeds.pooler_output
            self._text_cache[class_name] = F.normalize(embeds.float(), dim=-1)[0]
        return self._text_cache[class_name]

    @torch.no_grad()
    def score(self, images, masks, class_names, batch_size=8):
        """Official-scale scores (``logits_per_text``), one float per instance."""
        if not len(images) == len(masks) == len(class_names):
            raise ValueError(
                f"score needs as many masks and class names as images, got {len(images)}, {len(masks)}, {len(class_names)}"
            )
        scale = self.model.logit_scale.exp().float()
        scores = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            batch = torch.stack(
                [preprocess(white_background(i, m), self.image_size) for i, m in zip(images[start:stop], masks[start:stop])]
            ).to(self.device)
            image_embeds = self.model.get_image_features(pixel_values=batch)
            if not torch.is_tensor(image_embeds):
                image_embeds = image_embeds.pooler_output
            image_embeds = F.normalize(image_embeds.float(), dim=-1)
            text_embeds = torch.stack([self._text_embeds(name) for name in class_names[start:stop]])
            scores.extend((scale * (image_embeds * text_embeds).sum(-1)).cpu().tolist())
        return scores
