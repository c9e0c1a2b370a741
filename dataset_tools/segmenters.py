"""Detector and segmenter adapters from local weights: GroundingDINO (text → boxes), SAM and SAM 2
(boxes or points → masks). Used by video pairing (object masks) and paste synthesis (mask proposals).

Weights are transformers folders (``config.json`` + weights + processor files, as ``save_pretrained``
writes them: ``model_type`` ``grounding-dino``, ``sam`` or ``sam2``). Nothing is downloaded.

Images are RGB uint8 ``H×W×3`` numpy arrays; masks come back as bool ``N×H×W`` arrays (True = object);
boxes are ``(x0, y0, x1, y1)`` in pixels of the image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAM_TYPES = ("sam", "sam2")
DINO_TYPES = ("grounding-dino", "mm-grounding-dino")


def _check_image(image):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 H×W×3 RGB array, got dtype {image.dtype} shape {image.shape}")
    return image


def _model_type(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("model_type"), path
    if path.is_file():
        raise ValueError(
            f"{path.name} is a single checkpoint file; EraseKit loads SAM, SAM 2 and GroundingDINO from "
            "transformers folders (config.json + model.safetensors + processor files, e.g. facebook/sam2.1-hiera-large, "
            "facebook/sam-vit-base, IDEA-Research/grounding-dino-tiny on Hugging Face)"
        )
    raise ValueError(f"{path} has no config.json: not a transformers model folder")


def _torch_device(device):
    import torch

    return torch.device(device)


@dataclass
class Detection:
    box: tuple  # (x0, y0, x1, y1) pixels
    score: float
    label: str


class GroundingDino:
    """Open-vocabulary detector: ``detect(image, "car. person.")`` → list of :class:`Detection`."""

    def __init__(self, model, processor, device="cpu"):
        self.model = model.eval()
        self.processor = processor
        self.device = _torch_device(device)
        self.model.to(self.device)

    @staticmethod
    def normalize_prompt(text):
        """GroundingDINO expects lower-case phrases each ended by a period: "Car, Person" → "car. person."."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the detection prompt must name at least one object class, got {text!r}")
        phrases = [p.strip().lower() for p in text.replace(",", ".").split(".") if p.strip()]
        return " ".join(f"{p}." for p in phrases)

    def detect(self, image, text, box_threshold=0.35, text_threshold=0.25):
        import torch

        image = _check_image(image)
        prompt = self.normalize_prompt(text)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
            target_sizes=[image.shape[:2]],
        )[0]
        labels = result["text_labels"] if "text_labels" in result else result["labels"]
        height, width = image.shape[:2]
        found = []
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), labels):
            x0, y0, x1, y1 = (min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height)))
            if x1 > x0 and y1 > y0:
                found.append(Detection((x0, y0, x1, y1), float(score), str(label)))
        return found


def load_grounding_dino(path, device="cpu"):
    """GroundingDINO from a transformers folder (IDEA-Research/grounding-dino-tiny layout)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    kind, path = _model_type(path)
    if kind not in DINO_TYPES:
        raise ValueError(f"{path} holds a {kind!r} model, not GroundingDINO ({' or '.join(DINO_TYPES)})")
    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(path))
    return GroundingDino(model, AutoProcessor.from_pretrained(str(path)), device)


class Sam:
    """SAM or SAM 2 (transformers): ``segment_boxes`` for prompts, ``propose_masks`` for everything."""

    def __init__(self, model, processor, kind, device="cpu"):
        self.model = model.eval()
        self.processor = processor
        self.kind = kind
        self.device = _torch_device(device)
        self.model.to(self.device)

    def _post_process(self, pred_masks, inputs):
        if self.kind == "sam2":
            return self.processor.post_process_masks(pred_masks.cpu(), inputs["original_sizes"].cpu())[0]
        return self.processor.image_processor.post_process_masks(
            pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]

    def _embed(self, inputs):
        import torch

        with torch.no_grad():
            return self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))

    def segment_boxes(self, image, boxes):
        """One mask per box: bool ``N×H×W`` (``N = len(boxes)``; an empty list gives ``0×H×W``)."""
        import torch

        image = _check_image(image)
        height, width = image.shape[:2]
        boxes = [list(map(float, b)) for b in boxes]
        if not boxes:
            return np.zeros((0, height, width), bool)
        for box in boxes:
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"a box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
        inputs = self.processor(images=image, input_boxes=[boxes], return_tensors="pt")
        embeddings = self._embed(inputs)
        with torch.no_grad():
            outputs = self.model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].to(self.device),
                                 multimask_output=False)
        masks = self._post_process(outputs.pred_masks, inputs)  # N×1×H×W
        return masks[:, 0].numpy().astype(bool)

    def propose_masks(self, image, points_per_side=16, score_threshold=0.7, min_area_fraction=0.001,
                      max_overlap=0.7, batch_size=64):
        """Every object SAM finds from a grid of point prompts (SAM's automatic mask generation, simplified).

        For each grid point the best of SAM's three masks is kept when its predicted IoU ≥
        ``score_threshold`` and it covers ≥ ``min_area_fraction`` of the image; duplicates (mask IoU >
        ``max_overlap``) are dropped, best score first. Returns (bool ``N×H×W``, scores ``N``), best first.
        """
        import torch

        image = _check_image(image)
        height, width = image.shape[:2]
        if points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        offsets = (np.arange(points_per_side) + 0.5) / points_per_side
        points = [[[float(x * width), float(y * height)]] for y in offsets for x in offsets]
        inputs = self.processor(images=image, input_points=[points], input_labels=[[[1]] * len(points)],
                                return_tensors="pt")
        embeddings = self._embed(inputs)
        candidates, scores = [], []
        for start in range(0, len(points), batch_size):
            with torch.no_grad():
                outputs = self.model(
                    image_embeddings=embeddings,
                    input_points=inputs["input_points"][:, start:start + batch_size].to(self.device),
                    input_labels=inputs["input_labels"][:, start:start + batch_size].to(self.device),
                    multimask_output=True,
                )
            iou = outputs.iou_scores[0].cpu()  # points × 3
            best = iou.argmax(dim=1)
            chosen = outputs.pred_masks[:, torch.arange(len(best)), best][:, :, None]  # 1×points×1×h×w
            masks = self._post_process(chosen, inputs)[:, 0].numpy().astype(bool)
            for mask, score in zip(masks, iou[torch.arange(len(best)), best].tolist()):
                if score >= score_threshold and mask.mean() >= min_area_fraction:
                    candidates.append(mask)
                    scores.append(score)
        kept, kept_scores = [], []
        for index in np.argsort(scores)[::-1]:
            mask = candidates[index]
            if all(mask_iou(mask, other) <= max_overlap for other in kept):
                kept.append(mask)
                kept_scores.append(scores[index])
        stack = np.stack(kept) if kept else np.zeros((0, height, width), bool)
        return stack, np.asarray(kept_scores, np.float32)


def mask_iou(a, b):
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def load_sam(path, device="cpu"):
    """SAM or SAM 2 from a transformers folder (facebook/sam-vit-*, facebook/sam2.1-hiera-* layouts)."""
    from transformers import AutoModel, AutoProcessor

    kind, path = _model_type(path)
    if kind not in SAM_TYPES:
        raise ValueError(f"{path} holds a {kind!r} model, not SAM or SAM 2 ({' or '.join(SAM_TYPES)})")
    return Sam(AutoModel.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path)), kind, device)


class TextSegmenter:
    """GroundingDINO boxes for a text prompt, cut out by SAM / SAM 2: the paper's object masks.

    ``segmenter(image, zone)`` → bool mask of the detected objects that lie in ``zone`` (where the video's
    background model saw motion; None = anywhere), or None when nothing of the prompt is there.
    """

    def __init__(self, detector, sam, text, box_threshold=0.35, text_threshold=0.25, min_zone_overlap=0.5):
        self.detector = detector
        self.sam = sam
        self.text = GroundingDino.normalize_prompt(text)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.min_zone_overlap = min_zone_overlap
        self.name = f"grounding_dino+{sam.kind}"

    def __call__(self, image, zone=None):
        detections = self.detector.detect(image, self.text, self.box_threshold, self.text_threshold)
        if not detections:
            return None
        masks = self.sam.segment_boxes(image, [d.box for d in detections])
        union = np.zeros(image.shape[:2], bool)
        for mask in masks:
            area = np.count_nonzero(mask)
            if area == 0:
                continue
            if zone is not None and np.count_nonzero(mask & zone) < self.min_zone_overlap * area:
                continue  # a parked car, not the moving object the background model saw
            union |= mask
        return union if union.any() else None


def load_text_segmenter(grounding_dino, sam, text, device="cpu", box_threshold=0.35, text_threshold=0.25):
    return TextSegmenter(load_grounding_dino(grounding_dino, device), load_sam(sam, device), text,
                         box_threshold, text_threshold)
