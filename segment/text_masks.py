"""Masks from a text prompt: GroundingDINO finds the named objects, SAM / SAM 2 cuts each box out.

The Grounded-SAM recipe (IDEA-Research/Grounded-Segment-Anything, ``grounded_sam_demo.py``): boxes whose score
passes ``box_threshold`` and whose phrase passes ``text_threshold`` are given to SAM as box prompts, one
single-mask prediction each. Defaults 0.35 / 0.25 as in GroundingDINO's README example (IDEA-Research/GroundingDINO;
Grounded-SAM's demo uses a box threshold of 0.3). Unlike ``dataset_tools.segmenters.TextSegmenter`` (the
union, filtered by a motion zone, for video mining) the objects stay apart here: the ``Text to Mask`` node and
``erasekit-run --prompt`` both call ``text_masks``, then keep each object or their union.

Images are RGB uint8 ``H×W×3`` numpy arrays; masks bool ``N×H×W`` (True = object).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..jobs import require

BOX_THRESHOLD = 0.35  # GroundingDINO README.md (BOX_TRESHOLD / TEXT_TRESHOLD)
TEXT_THRESHOLD = 0.25
FEATURE = "Text to Mask (GroundingDINO + SAM 2)"


@dataclass
class TextMasks:
    """The objects a prompt found in one image, best detection score first."""

    masks: np.ndarray  # bool N×H×W
    scores: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    boxes: list = field(default_factory=list)

    def __len__(self):
        return int(self.masks.shape[0])

    def union(self):
        """bool H×W: every object found (all False when none was)."""
        return self.masks.any(axis=0)


class TextMasker:
    """A loaded GroundingDINO + SAM pair: ``masker(image, "car. person.")`` → ``TextMasks``."""

    def __init__(self, detector, sam):
        self.detector = detector
        self.sam = sam

    def __call__(self, image, prompt, box_threshold=BOX_THRESHOLD, text_threshold=TEXT_THRESHOLD):
        return text_masks(self.detector, self.sam, image, prompt, box_threshold, text_threshold)


def text_masks(detector, sam, image, prompt, box_threshold=BOX_THRESHOLD, text_threshold=TEXT_THRESHOLD):
    """One SAM mask per GroundingDINO detection of ``prompt`` in ``image`` (masks SAM leaves empty are dropped)."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    detections = sorted(detector.detect(image, prompt, box_threshold, text_threshold), key=lambda d: -d.score)
    if not detections:
        return TextMasks(np.zeros((0, height, width), bool))
    masks = sam.segment_boxes(image, [d.box for d in detections])
    keep = [i for i in range(len(detections)) if masks[i].any()]
    return TextMasks(masks[keep] if keep else np.zeros((0, height, width), bool),
                     [detections[i].score for i in keep], [detections[i].label for i in keep],
                     [detections[i].box for i in keep])


def load_text_masker(grounding_dino, sam, device="cpu"):
    """GroundingDINO (a transformers folder) and SAM / SAM 2 (a transformers folder or a Meta checkpoint) from
    local paths; needs the ``transformers`` package."""
    require("transformers", "dataset", FEATURE)
    from ..dataset_tools.segmenters import load_grounding_dino, load_sam

    return TextMasker(load_grounding_dino(grounding_dino, device), load_sam(sam, device))
