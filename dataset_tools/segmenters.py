"""Detector and segmenter adapters from local weights: GroundingDINO (text → boxes), SAM and SAM 2
(boxes or points → masks). Used by video pairing (object masks) and paste synthesis (mask proposals).

Weights are transformers folders (``config.json`` + weights + processor files, as ``save_pretrained``
writes them: ``model_type`` ``grounding-dino``, ``sam`` or ``sam2``), or for SAM / SAM 2 the original
checkpoint files ComfyUI users keep in models/sams and models/sam2. Nothing is downloaded.

Images are RGB uint8 ``H×W×3`` numpy arrays; masks come back as bool ``N×H×W`` arrays (True = object);
boxes are ``(x0, y0, x1, y1)`` in pixels of the image.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..jobs import require

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


def _transformers(feature, *names):
    """The transformers classes ``names`` a feature needs; MissingExtra with the pip line when the installed
    transformers is missing or too old (ComfyUI itself asks for less than SAM 2 and GroundingDINO need)."""
    module = require("transformers", "dataset", feature, names=names)
    return [getattr(module, name) for name in names]


def _segment_anything(feature, module="segment_anything"):
    return require(module, "dataset", feature, package="segment-anything")


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
    AutoModelForZeroShotObjectDetection, AutoProcessor = _transformers(
        "GroundingDINO", "AutoModelForZeroShotObjectDetection", "AutoProcessor")

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
        SamPredictor = _segment_anything("SAM checkpoints from models/sams").SamPredictor
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
      runs through the ``segment-anything`` package (``pip install segment-anything``);
    - a SAM 2 / SAM 2.1 checkpoint as ComfyUI users keep them in models/sam2 (``sam2_hiera_tiny.pt``,
      ``sam2.1_hiera_large.pt`` or a ``.safetensors`` of the same keys): the variant is read from the weights
      and the image model runs as a transformers ``Sam2Model`` (the video-memory weights are not used).
    """
    path = Path(path)
    if path.is_file():
        state = load_state_dict(path)
        if is_sam2_checkpoint(state):
            model, version = build_sam2_from_checkpoint(state)
            Sam2ImageProcessor, Sam2Processor = _transformers("SAM 2 checkpoints", "Sam2ImageProcessor", "Sam2Processor")

            # Meta's SAM2Transforms: a plain resize to 1024×1024 and ImageNet normalisation, the defaults here
            processor = Sam2Processor(image_processor=Sam2ImageProcessor())
            backend = _TransformersSam(model, processor, "sam2", _torch_device(device))
            backend.version = version
            return Sam(backend)
        return Sam(_SegmentAnythingSam(build_segment_anything(state), _torch_device(device)))
    AutoModel, AutoProcessor = _transformers("SAM transformers folders", "AutoModel", "AutoProcessor")

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
        if is_sam2_checkpoint(state):
            raise ValueError("this is a SAM 2 checkpoint (sam2_hiera_*.pt): load it with load_sam")
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

    modeling = _segment_anything("SAM checkpoints from models/sams (or use a transformers SAM folder)",
                                 "segment_anything.modeling")
    ImageEncoderViT, MaskDecoder, PromptEncoder = modeling.ImageEncoderViT, modeling.MaskDecoder, modeling.PromptEncoder
    OriginalSam, TwoWayTransformer = modeling.Sam, modeling.TwoWayTransformer
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


# Meta's SAM 2 names → transformers Sam2Model names, applied in order to each key ({n} = a number);
# the list read backwards with the pairs swapped turns transformers names back into Meta's.
SAM2_KEY_RENAMES = [
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.{n}.conv.", "vision_encoder.neck.convs.{n}."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("patch_embed.proj.", "patch_embed.projection."),
    (".mlp.layers.0.", ".mlp.proj_in."),
    (".mlp.layers.1.", ".mlp.proj_out."),
    ("blocks.{n}.norm", "blocks.{n}.layer_norm"),
    ("transformer.layers.{n}.norm", "transformer.layers.{n}.layer_norm"),
    ("transformer.norm_final_attn.", "transformer.layer_norm_final_attn."),
    (".out_proj.", ".o_proj."),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    ("_head.layers.0.", "_head.proj_in."),
    ("_head.layers.1.", "_head.layers.0."),
    ("_head.layers.2.", "_head.proj_out."),
    ("mlps.{n}.layers.0.", "mlps.{n}.proj_in."),
    ("mlps.{n}.layers.1.", "mlps.{n}.layers.0."),
    ("mlps.{n}.layers.2.", "mlps.{n}.proj_out."),
    ("no_mem_embed", "no_memory_embedding"),
]
# The image model's parts of a SAM 2 checkpoint; the rest (memory attention/encoder, object pointers) is video.
SAM2_IMAGE_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
# What the weights do not show (attention heads, windows, global-attention blocks), per Hiera variant as
# Meta's configs give it, keyed by what they do show: (first stage width, blocks per stage).
SAM2_VARIANTS = {
    (96, (1, 2, 7, 2)): {"name": "tiny", "heads": [1, 2, 4, 8], "windows": [8, 4, 14, 7], "global": [5, 7, 9]},
    (96, (1, 2, 11, 2)): {"name": "small", "heads": [1, 2, 4, 8], "windows": [8, 4, 14, 7], "global": [7, 10, 13]},
    (112, (2, 3, 16, 3)): {"name": "base_plus", "heads": [2, 4, 8, 16], "windows": [8, 4, 14, 7],
                           "global": [12, 16, 20]},
    (144, (2, 6, 36, 4)): {"name": "large", "heads": [2, 4, 8, 16], "windows": [8, 4, 16, 8], "global": [23, 33, 43]},
}
SAM2_IMAGE_SIZE = 1024  # every released SAM 2 / 2.1 checkpoint; the decoder has 8 heads in all of them
SAM2_DECODER_HEADS = 8


def _rename_pattern(fragment):
    return re.compile(re.escape(fragment).replace(re.escape("{n}"), r"(\d+)"))


def rename_sam2_key(key, reverse=False):
    """A Meta SAM 2 key as transformers names it (``reverse=True``: the other way)."""
    pairs = [(hf, meta) for meta, hf in reversed(SAM2_KEY_RENAMES)] if reverse else SAM2_KEY_RENAMES
    for source, target in pairs:
        key = _rename_pattern(source).sub(target.replace("{n}", r"\1"), key)
    return key


def is_sam2_checkpoint(state):
    return any(k.startswith("image_encoder.trunk.") for k in state)


def sam2_config(state):
    """(transformers ``Sam2Config``, variant name, "2" or "2.1") of a Meta SAM 2 checkpoint's state dict."""
    Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig = _transformers(
        "SAM 2 checkpoints", "Sam2Config", "Sam2HieraDetConfig", "Sam2MaskDecoderConfig", "Sam2PromptEncoderConfig",
        "Sam2VisionConfig")

    trunk = "image_encoder.trunk."
    blocks = sorted({int(k[len(trunk) + 7:].split(".")[0]) for k in state if k.startswith(trunk + "blocks.")})
    # a block with its own projection widens the features: it opens the next stage
    openers = [i for i in blocks if f"{trunk}blocks.{i}.proj.weight" in state]
    bounds = [0, *openers, len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    widths = [int(state[f"{trunk}blocks.{start}.mlp.layers.0.weight"].shape[1]) for start in bounds[:-1]]
    key = (widths[0], stages)
    if len(stages) != 4 or key not in SAM2_VARIANTS:
        known = ", ".join(f"{v['name']} {list(s)}" for (_, s), v in SAM2_VARIANTS.items())
        raise ValueError(f"unknown SAM 2 image encoder (width {widths[0]}, blocks per stage {list(stages)}); "
                         f"known: {known}")
    variant = SAM2_VARIANTS[key]
    backbone = Sam2HieraDetConfig(
        hidden_size=widths[0], image_size=[SAM2_IMAGE_SIZE, SAM2_IMAGE_SIZE], blocks_per_stage=list(stages),
        embed_dim_per_stage=widths, num_attention_heads_per_stage=variant["heads"],
        window_size_per_stage=variant["windows"], global_attention_blocks=variant["global"],
        window_positional_embedding_background_size=list(state[trunk + "pos_embed"].shape[2:]))
    grid = SAM2_IMAGE_SIZE // 4
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
        fpn_hidden_size=int(state["image_encoder.neck.convs.0.conv.weight"].shape[0]))
    decoder = "sam_mask_decoder."
    layers = decoder + "transformer.layers."
    hidden = int(state["sam_prompt_encoder.no_mask_embed.weight"].shape[1])
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(
            hidden_size=hidden, image_size=SAM2_IMAGE_SIZE, patch_size=16,
            mask_input_channels=int(state["sam_prompt_encoder.mask_downscaling.3.weight"].shape[0])),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=hidden, mlp_dim=int(state[layers + "0.mlp.layers.0.weight"].shape[0]),
            num_hidden_layers=len({k[len(layers):].split(".")[0] for k in state if k.startswith(layers)}),
            num_attention_heads=SAM2_DECODER_HEADS,
            iou_head_hidden_dim=int(state[decoder + "iou_prediction_head.layers.0.weight"].shape[0])))
    # SAM 2.1 added the occlusion embedding and temporal object-pointer encoding (video only)
    version = "2.1" if "no_obj_embed_spatial" in state or "obj_ptr_tpos_proj.weight" in state else "2"
    return config, variant["name"], version


def sam2_state_to_transformers(state):
    """The image-model weights of a Meta SAM 2 checkpoint, named as transformers ``Sam2Model`` names them."""
    import torch

    renamed = {rename_sam2_key(k): v for k, v in state.items() if k.startswith(SAM2_IMAGE_PREFIXES)}
    points = [k for k in renamed if re.fullmatch(r"prompt_encoder\.point_embeddings\.\d+\.weight", k)]
    if points:  # Meta keeps the four point-type embeddings apart; transformers stacks them
        points.sort(key=lambda k: int(k.split(".")[2]))
        renamed["prompt_encoder.point_embed.weight"] = torch.cat([renamed.pop(k) for k in points], dim=0)
    gaussian = "prompt_encoder.shared_embedding.positional_embedding"
    if gaussian in renamed:
        renamed["shared_image_embedding.positional_embedding"] = renamed[gaussian]
    return renamed


def build_sam2_from_checkpoint(state):
    """A transformers ``Sam2Model`` with a Meta SAM 2 checkpoint's weights (loaded strictly) and its version."""
    (Sam2Model,) = _transformers("SAM 2 checkpoints", "Sam2Model")

    try:
        config, _, version = sam2_config(state)
    except KeyError as error:
        raise ValueError(f"incomplete SAM 2 checkpoint: it has no {error}") from None
    model = Sam2Model(config)
    missing, unexpected = model.load_state_dict(sam2_state_to_transformers(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"SAM 2 checkpoint does not fit its architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval(), version


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
