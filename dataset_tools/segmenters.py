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
            f"{path.name} is a single checkpoint file; this model loads from a transformers folder "
            "(config.json + model.safetensors + processor files, e.g. IDEA-Research/grounding-dino-tiny, "
            "facebook/sam2.1-hiera-large on Hugging Face)"
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


class _TransformersSam:
    """SamModel / Sam2Model with their processor: one image embedding, then batches of prompts."""

    def __init__(self, model, processor, kind, device):
        self.model = model.eval().to(device)
        self.processor = processor
        self.kind = kind
        self.device = device

    def set_image(self, image, boxes=None, points=None):
        kwargs = {}
        if boxes is not None:
            kwargs["input_boxes"] = [boxes]
        if points is not None:
            kwargs["input_points"] = [[[p] for p in points]]
            kwargs["input_labels"] = [[[1]] * len(points)]
        self.inputs = self.processor(images=image, return_tensors="pt", **kwargs)
        import torch

        with torch.no_grad():
            self.embeddings = self.model.get_image_embeddings(self.inputs["pixel_values"].to(self.device))

    def _masks(self, pred_masks):
        if self.kind == "sam2":
            return self.processor.post_process_masks(pred_masks.cpu(), self.inputs["original_sizes"].cpu())[0]
        return self.processor.image_processor.post_process_masks(
            pred_masks.cpu(), self.inputs["original_sizes"].cpu(), self.inputs["reshaped_input_sizes"].cpu())[0]

    def predict(self, start, stop, use_boxes, multimask):
        """Masks (bool N×K×H×W) and predicted IoUs (N×K) for prompts [start, stop) given to set_image."""
        import torch

        prompts = ({"input_boxes": self.inputs["input_boxes"][:, start:stop].to(self.device)} if use_boxes else
                   {"input_points": self.inputs["input_points"][:, start:stop].to(self.device),
                    "input_labels": self.inputs["input_labels"][:, start:stop].to(self.device)})
        with torch.no_grad():
            outputs = self.model(image_embeddings=self.embeddings, multimask_output=multimask, **prompts)
        return self._masks(outputs.pred_masks).numpy().astype(bool), outputs.iou_scores[0].cpu().numpy()


class _SegmentAnythingSam:
    """The original segment-anything model (a models/sams checkpoint) through its own SamPredictor."""

    kind = "sam"

    def __init__(self, model, device):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(model.eval().to(device))
        self.device = device

    def set_image(self, image, boxes=None, points=None):
        import torch

        self.predictor.set_image(image)
        size = image.shape[:2]
        transform = self.predictor.transform
        self.boxes = None if boxes is None else transform.apply_boxes_torch(
            torch.tensor(boxes, dtype=torch.float32, device=self.device), size)
        self.points = None if points is None else transform.apply_coords_torch(
            torch.tensor(points, dtype=torch.float32, device=self.device)[:, None], size)

    def predict(self, start, stop, use_boxes, multimask):
        import torch

        with torch.no_grad():
            if use_boxes:
                masks, scores, _ = self.predictor.predict_torch(None, None, boxes=self.boxes[start:stop],
                                                                multimask_output=multimask)
            else:
                points = self.points[start:stop]
                labels = torch.ones(points.shape[:2], dtype=torch.int64, device=self.device)
                masks, scores, _ = self.predictor.predict_torch(points, labels, multimask_output=multimask)
        return masks.cpu().numpy().astype(bool), scores.cpu().numpy()


class Sam:
    """SAM or SAM 2: ``segment_boxes`` for prompts, ``propose_masks`` for every object in a picture."""

    def __init__(self, backend):
        self.backend = backend
        self.kind = backend.kind

    def segment_boxes(self, image, boxes):
        """One mask per box: bool ``N×H×W`` (``N = len(boxes)``; an empty list gives ``0×H×W``)."""
        image = _check_image(image)
        height, width = image.shape[:2]
        boxes = [list(map(float, b)) for b in boxes]
        if not boxes:
            return np.zeros((0, height, width), bool)
        for box in boxes:
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"a box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
        self.backend.set_image(image, boxes=boxes)
        masks, _ = self.backend.predict(0, len(boxes), use_boxes=True, multimask=False)
        return masks[:, 0]

    def propose_masks(self, image, points_per_side=16, score_threshold=0.7, min_area_fraction=0.001,
                      max_overlap=0.7, batch_size=64):
        """Every object SAM finds from a grid of point prompts (SAM's automatic mask generation, simplified).

        For each grid point the best of SAM's three masks is kept when its predicted IoU ≥
        ``score_threshold`` and it covers ≥ ``min_area_fraction`` of the image; duplicates (mask IoU >
        ``max_overlap``) are dropped, best score first. Returns (bool ``N×H×W``, scores ``N``), best first.
        """
        image = _check_image(image)
        height, width = image.shape[:2]
        if points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        offsets = (np.arange(points_per_side) + 0.5) / points_per_side
        points = [[float(x * width), float(y * height)] for y in offsets for x in offsets]
        self.backend.set_image(image, points=points)
        candidates, scores = [], []
        for start in range(0, len(points), batch_size):
            masks, iou = self.backend.predict(start, min(len(points), start + batch_size), use_boxes=False,
                                              multimask=True)
            best = iou.argmax(axis=1)
            for mask, score in zip(masks[np.arange(len(best)), best], iou[np.arange(len(best)), best]):
                if score >= score_threshold and mask.mean() >= min_area_fraction:
                    candidates.append(mask)
                    scores.append(float(score))
        kept, kept_scores = [], []
        for index in np.argsort(scores, kind="stable")[::-1]:
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
    """SAM or SAM 2 from local weights.

    - a transformers folder (facebook/sam-vit-*, facebook/sam2.1-hiera-* layouts; ``model_type`` sam/sam2);
    - a segment-anything checkpoint as ComfyUI users keep them in models/sams (``sam_vit_b_01ec64.pth``,
      ``.pth``/``.pt``/``.safetensors``): the architecture is read from the weights' shapes and the model
      runs through the ``segment-anything`` package (``pip install segment-anything``).
    """
    path = Path(path)
    if path.is_file():
        return Sam(_SegmentAnythingSam(build_segment_anything(load_state_dict(path)), _torch_device(device)))
    from transformers import AutoModel, AutoProcessor

    kind, path = _model_type(path)
    if kind not in SAM_TYPES:
        raise ValueError(f"{path} holds a {kind!r} model, not SAM or SAM 2 ({' or '.join(SAM_TYPES)})")
    backend = _TransformersSam(AutoModel.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path)),
                               kind, _torch_device(device))
    return Sam(backend)


def load_state_dict(path):
    """Tensors of a checkpoint file (safetensors, or a pickle read with ``weights_only=True``)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path.name} is not a readable PyTorch checkpoint: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # SAM 2 checkpoints wrap the weights
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path.name} holds no state dict")
    return state


def segment_anything_config(state):
    """Architecture of an original SAM checkpoint, read from its tensor shapes."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        if any(k.startswith("image_encoder.trunk.") for k in state):
            raise ValueError("this is a SAM 2 checkpoint (sam2_hiera_*.pt); EraseKit loads SAM 2 from transformers "
                             "folders (e.g. facebook/sam2.1-hiera-large), not from the original checkpoints")
        raise ValueError(f"not a segment-anything checkpoint: it has no {key}")
    embed_dim, _, patch, _ = state[key].shape
    grid = state["image_encoder.pos_embed"].shape[1]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    spans = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    windows = [(span + 1) // 2 for span in spans if span != 2 * grid - 1]
    decoder = "mask_decoder.transformer.layers."
    return {
        "embed_dim": int(embed_dim), "patch_size": int(patch), "img_size": int(grid * patch), "depth": depth,
        "num_heads": int(embed_dim // head_dim),
        "global_attn_indexes": [i for i, span in enumerate(spans) if span == 2 * grid - 1],
        "window_size": windows[0] if windows else 14,
        "prompt_embed_dim": int(state["image_encoder.neck.0.weight"].shape[0]),
        "mask_in_chans": int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        "decoder_depth": len({k[len(decoder):].split(".")[0] for k in state if k.startswith(decoder)}),
        "decoder_mlp_dim": int(state[decoder + "0.mlp.lin1.weight"].shape[0]),
        "iou_head_hidden_dim": int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
    }


def build_segment_anything(state, config=None):
    """A segment-anything ``Sam`` of the checkpoint's architecture with its weights loaded (strictly);
    ``state=None`` with a ``config`` gives a randomly initialised model of that architecture."""
    from functools import partial

    import torch

    try:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam as OriginalSam
        from segment_anything.modeling import TwoWayTransformer
    except ImportError:
        raise ValueError("SAM checkpoints from models/sams need the segment-anything package: "
                         "pip install segment-anything (or use a transformers SAM folder)") from None
    c = config or segment_anything_config(state)
    grid = c["img_size"] // c["patch_size"]
    model = OriginalSam(
        image_encoder=ImageEncoderViT(
            depth=c["depth"], embed_dim=c["embed_dim"], img_size=c["img_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["num_heads"], patch_size=c["patch_size"],
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=c["global_attn_indexes"],
            window_size=c["window_size"], out_chans=c["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=c["prompt_embed_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(c["img_size"], c["img_size"]), mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=c["prompt_embed_dim"],
                                          mlp_dim=c["decoder_mlp_dim"], num_heads=8),
            transformer_dim=c["prompt_embed_dim"], iou_head_depth=3, iou_head_hidden_dim=c["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


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
