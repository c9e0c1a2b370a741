"""Instance sources and the Syn4Removal instance filters.

An instance is one object mask in one photo, with a class name, and an id made from the content of its files
(two different files never share an id, whatever their names; the same files always get the same one). Sources:
- COCO-format instance annotations (polygons, compressed or uncompressed RLE; crowd regions skipped),
- a folder of image + mask pairs (``x.jpg`` + ``x_mask.png`` side by side, or ``images|paste|source/`` next
  to ``masks|mask/`` with equal stems); a sub-folder name is the class, else ``class_name``.
- masks proposed by SAM / SAM 2 (``segmenters.Sam.propose_masks``, transformers folders) for a folder of
  photos; the proposals are saved as PNG masks so workers and resumed runs reload them.

Every instance is checked when it is collected: its mask is read and must be non-empty and of its photo's size
(read from the photo's header), so a bad file is left out (and named) once, before any sample is planned on it.
Skipped files go to a ``jobs.Skips`` (reason → count and the first names).

Filters (Dataset_pipeline/Second_instances_filter.py): keep an instance when its CLIP score is
≥ min(0.2, best score of its class − 0.02), its mask covers [0.05, 0.95] of its image, and its class keeps
≥ 6 instances; class statistics (mean/variance of area and score) are taken over the kept instances.
Each filter can be switched off; ``FilterReport`` says which ran.
"""
import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..erasers.layout import mask_box
from ..jobs import content_hash, require
from .imageio import IMAGE_EXTENSIONS, UNREADABLE, read_mask, read_rgb

MIN_CLIP = 0.2
CLIP_TOLERANCE = 0.02
MIN_AREA = 0.05
MAX_AREA = 0.95
MIN_CLASS_INSTANCES = 6
OBSTACLE_MAX_AREA = 0.4

EMPTY_ANNOTATIONS = "empty annotation file"
BAD_ANNOTATIONS = "unreadable annotation file"
MISSING_MASK = "image without a mask"
EMPTY_MASK = "empty mask"
SIZE_MISMATCH = "mask size differs from image"
MISSING_IMAGE = "image missing"


def image_size(path):
    """(width, height) from an image file's header (nothing decoded), or None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def files_id(*paths):
    """A short id of what some files hold together (their ``jobs.content_hash`` values)."""
    digest = hashlib.sha256("".join(content_hash(p) for p in paths).encode()).hexdigest()
    return digest[:10]


def _name(path, root):
    """``path`` relative to ``root`` (how skips name a file), or its file name."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


@dataclass
class Instance:
    id: str
    class_name: str
    image: str
    area: float  # mask area / image area
    mask_file: str = None  # folder source
    coco: dict = None  # {"annotations": path, "id": ann id}: mask rebuilt from the annotation file
    score: float = None  # CLIP score on the official logit scale

    def to_json(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ClassStats:
    count: int
    mean_area: float
    var_area: float
    mean_score: float = None
    var_score: float = None


@dataclass
class FilterReport:
    clip: bool
    area: bool
    class_count: bool
    thresholds: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)


# ---- COCO --------------------------------------------------------------------------------------------
_COCO_CACHE = {}


def load_coco(path):
    """pycocotools ``COCO`` of ``path`` (cached per process), or ValueError with the skip reason."""
    path = str(path)
    if path not in _COCO_CACHE:
        COCO = require("pycocotools.coco", "dataset", "COCO instance annotations", package="pycocotools").COCO

        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
        if text is None:
            raise FileNotFoundError(f"COCO annotation file {path} does not exist")
        if not text.strip():
            raise ValueError(EMPTY_ANNOTATIONS)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(BAD_ANNOTATIONS) from None
        if not isinstance(data, dict) or not data.get("images"):
            raise ValueError(EMPTY_ANNOTATIONS)
        data.setdefault("annotations", [])
        data.setdefault("categories", [])
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()
        _COCO_CACHE[path] = coco
    return _COCO_CACHE[path]


def _coco_rle(coco, ann):
    info = coco.imgs[ann["image_id"]]
    return coco.annToRLE(ann), int(info["height"]), int(info["width"])


def coco_mask(annotations, ann_id):
    """bool H×W mask of annotation ``ann_id`` (polygon or RLE)."""
    coco = load_coco(annotations)
    return coco.annToMask(coco.anns[int(ann_id)]).astype(bool)


def coco_instances(annotations, image_root, skips=None):
    """Instances of a COCO annotation file; images are looked up under ``image_root`` and must exist with the size
    the file gives them (checked once per image, from its header)."""
    mask_utils = require("pycocotools.mask", "dataset", "COCO instance annotations", package="pycocotools")

    try:
        coco = load_coco(annotations)
    except ValueError as error:
        _count(skips, str(error), Path(annotations).name)
        return []
    file_id = content_hash(annotations)[:8]  # ann ids are unique only within their file
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco.dataset["categories"]}
    checked = {}
    found = []
    for ann in sorted(coco.dataset["annotations"], key=lambda a: a["id"]):
        if ann.get("iscrowd", 0) or not ann.get("segmentation"):
            continue
        rle, height, width = _coco_rle(coco, ann)
        area = float(mask_utils.area(rle)) / float(height * width)
        info = coco.imgs[ann["image_id"]]
        image = Path(image_root) / info["file_name"]
        if area <= 0:
            _count(skips, EMPTY_MASK, f"{info['file_name']} (annotation {ann['id']})")
            continue
        if image not in checked:
            size = image_size(image) if image.is_file() else None
            checked[image] = (MISSING_IMAGE if not image.is_file() else UNREADABLE if size is None else
                              SIZE_MISMATCH if size != (width, height) else None)
        if checked[image]:
            _count(skips, checked[image], info["file_name"])
            continue
        found.append(
            Instance(
                id=f"coco-{file_id}-{ann['id']}",
                class_name=names.get(ann.get("category_id"), "object"),
                image=str(image),
                area=area,
                coco={"annotations": str(annotations), "id": int(ann["id"])},
            )
        )
    return found


def coco_obstacles(annotations):
    """{file_name: [[x, y, w, h], ...]} of objects covering < 40 % of their image (the official obstacles)."""
    try:
        coco = load_coco(annotations)
    except ValueError:
        return {}
    boxes = {}
    for ann in coco.dataset["annotations"]:
        info = coco.imgs.get(ann["image_id"])
        if info is None or "bbox" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        area_norm = float(ann.get("area", w * h)) / float(info["height"] * info["width"])
        if 0.0 < area_norm < OBSTACLE_MAX_AREA:
            boxes.setdefault(info["file_name"], []).append([float(x), float(y), float(w), float(h)])
    return boxes


# ---- folders ----------------------------------------------------------------------------------------
_IMAGE_DIRS = ("images", "image", "paste", "source")
_MASK_DIRS = ("masks", "mask")
_TARGET_DIRS = ("gt", "target", "targets")  # the clean side of a triplet folder: not instances


def _images_in(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pairs(folder):
    folder = Path(folder)
    image_dir = next((folder / d for d in _IMAGE_DIRS if (folder / d).is_dir()), None)
    mask_dir = next((folder / d for d in _MASK_DIRS if (folder / d).is_dir()), None)
    if image_dir is not None and mask_dir is not None:
        masks = {p.stem: p for p in _images_in(mask_dir)}
        return [(p, masks.get(p.stem)) for p in _images_in(image_dir)]
    files = _images_in(folder)
    masks = {p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask")}
    return [(p, masks.get(p.stem)) for p in files if not p.stem.endswith("_mask")]


def folder_instances(folder, class_name="object", skips=None):
    """Instances from image + mask pairs in ``folder`` and its class sub-folders (one instance per mask). A pair
    whose mask is unreadable, empty or not of its photo's size is left out and named in ``skips``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"instance folder {folder} does not exist")
    groups = [(folder, class_name)]
    groups += [(d, d.name) for d in sorted(folder.iterdir()) if d.is_dir() and d.name not in _IMAGE_DIRS + _MASK_DIRS + _TARGET_DIRS]
    found = []
    for group, name in groups:
        for image_path, mask_path in _pairs(group):
            if mask_path is None:
                _count(skips, MISSING_MASK, _name(image_path, folder))
                continue
            mask, reason = read_mask(mask_path)
            if mask is None:
                _count(skips, reason, _name(mask_path, folder))
                continue
            if not mask.any():
                _count(skips, EMPTY_MASK, _name(mask_path, folder))
                continue
            size = image_size(image_path)
            if size is None:
                _count(skips, UNREADABLE, _name(image_path, folder))
                continue
            if size != (mask.shape[1], mask.shape[0]):
                _count(skips, SIZE_MISMATCH, _name(mask_path, folder))
                continue
            stem = image_path.relative_to(folder).with_suffix("").as_posix().replace("/", "-")
            found.append(
                Instance(
                    id=f"file-{stem}-{files_id(image_path, mask_path)}",
                    class_name=name,
                    image=str(image_path),
                    area=float(mask.mean()),
                    mask_file=str(mask_path),
                )
            )
    return found


# ---- SAM proposals ------------------------------------------------------------------------------------
def sam_instances(folder, sam, mask_folder, class_name="object", points_per_side=16, score_threshold=0.7,
                  skips=None, progress=None, check_interrupt=None):
    """One instance per mask SAM proposes on each photo of ``folder``; masks saved in ``mask_folder``.

    ``sam``: a ``segmenters.Sam`` (or anything with its ``propose_masks``)."""
    import cv2

    mask_folder = Path(mask_folder)
    mask_folder.mkdir(parents=True, exist_ok=True)
    images = _images_in(folder)
    found = []
    for done, image_path in enumerate(images, 1):
        if check_interrupt:
            check_interrupt()
        rgb, reason = read_rgb(image_path)
        if rgb is None:
            _count(skips, reason, _name(image_path, folder))
            continue
        masks, _ = sam.propose_masks(rgb, points_per_side=points_per_side, score_threshold=score_threshold)
        if len(masks) == 0:
            _count(skips, "no SAM proposal", _name(image_path, folder))
        key = f"{image_path.stem}-{content_hash(image_path)[:10]}"  # a.jpg and a.png are two photos
        for k, mask in enumerate(masks):
            path = mask_folder / f"{key}_sam{k:03d}.png"
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # shards may propose at once
            cv2.imwrite(str(tmp), mask.astype(np.uint8) * 255)
            os.replace(tmp, path)
            found.append(Instance(id=f"sam-{key}-{k:03d}", class_name=class_name, image=str(image_path),
                                  area=float(mask.mean()), mask_file=str(path)))
        if progress:
            progress(done, len(images))
    return found


# ---- loading --------------------------------------------------------------------------------------
def load_instance(instance):
    """``(rgb uint8 H×W×3, mask bool H×W, None)`` of the full image, or ``(None, None, reason)``."""
    rgb, reason = read_rgb(instance.image)
    if rgb is None:
        return None, None, reason
    if instance.coco is not None:
        mask = coco_mask(instance.coco["annotations"], instance.coco["id"])
    else:
        mask, reason = read_mask(instance.mask_file)
        if mask is None:
            return None, None, reason
    if mask.shape != rgb.shape[:2]:
        return None, None, SIZE_MISMATCH
    if not mask.any():
        return None, None, EMPTY_MASK
    return rgb, mask, None


def cut_instance(rgb, mask):
    """The instance's tight box: (rgb crop, mask crop)."""
    x0, y0, x1, y1 = mask_box(mask)
    return rgb[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy()


# ---- scoring and filtering ----------------------------------------------------------------------------
def score_instances(instances, scorer, batch_size=8, skips=None, progress=None, check_interrupt=None):
    """Sets ``instance.score`` with a ``ClipScorer``; returns the instances that could be read."""
    readable = []
    for start in range(0, len(instances), batch_size):
        if check_interrupt:
            check_interrupt()
        batch, images, masks = [], [], []
        for instance in instances[start : start + batch_size]:
            rgb, mask, reason = load_instance(instance)
            if rgb is None:
                _count(skips, reason, Path(instance.mask_file or instance.image).name)
                continue
            batch.append(instance)
            images.append(rgb)
            masks.append(mask)
        for instance, score in zip(batch, scorer.score(images, masks, [i.class_name for i in batch], batch_size)):
            instance.score = float(score)
        readable.extend(batch)
        if progress:
            progress(min(start + batch_size, len(instances)), len(instances))
    return readable


def filter_instances(
    instances,
    use_clip=True,
    use_area=True,
    use_class_count=True,
    min_clip=MIN_CLIP,
    tolerance=CLIP_TOLERANCE,
    min_area=MIN_AREA,
    max_area=MAX_AREA,
    min_class_instances=MIN_CLASS_INSTANCES,
):
    """The official filters → (kept instances, {class: ClassStats}, FilterReport)."""
    if use_clip and any(i.score is None for i in instances):
        raise ValueError("the CLIP filter needs every instance scored: run score_instances first or switch it off")
    report = FilterReport(
        clip=use_clip,
        area=use_area,
        class_count=use_class_count,
        thresholds={
            "min_clip": min_clip, "tolerance": tolerance, "min_area": min_area, "max_area": max_area,
            "min_class_instances": min_class_instances,
        },
        dropped={"clip": 0, "area": 0, "class_count": 0},
    )
    by_class = {}
    for instance in instances:
        by_class.setdefault(instance.class_name, []).append(instance)
    kept, stats = [], {}
    for name in sorted(by_class):
        members = by_class[name]
        bar = min(min_clip, max(i.score for i in members) - tolerance) if use_clip else None
        survivors = []
        for instance in members:
            if use_clip and instance.score < bar:
                report.dropped["clip"] += 1
            elif use_area and not min_area <= instance.area <= max_area:
                report.dropped["area"] += 1
            else:
                survivors.append(instance)
        if not survivors or (use_class_count and len(survivors) < min_class_instances):
            report.dropped["class_count"] += len(survivors)
            continue
        areas = np.array([i.area for i in survivors])
        scores = np.array([i.score for i in survivors]) if all(i.score is not None for i in survivors) else None
        stats[name] = ClassStats(
            count=len(survivors),
            mean_area=float(areas.mean()),
            var_area=float(areas.var()),
            mean_score=None if scores is None else float(scores.mean()),
            var_score=None if scores is None else float(scores.var()),
        )
        kept.extend(survivors)
    return kept, stats, report


def interleave_by_class(instances, stats):
    """Round-robin over classes (largest class first) as the official sampler, each class in score order."""
    queues = {}
    for instance in instances:
        queues.setdefault(instance.class_name, []).append(instance)
    for name in queues:  # the official sampler pops from a best-first list, i.e. takes the lowest score first
        queues[name].sort(key=lambda i: (i.score if i.score is not None else 0.0, i.id))
    order = sorted(queues, key=lambda n: (-stats[n].count, n))
    result = []
    while any(queues[n] for n in order):
        for name in order:
            if queues[name]:
                result.append(queues[name].pop(0))
    return result


def _count(skips, reason, name):
    """Name ``name`` under ``reason`` in ``skips`` (a ``jobs.Skips``, or None)."""
    if skips is not None:
        skips.add(reason, name)
