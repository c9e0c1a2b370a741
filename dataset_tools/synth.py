"""Syn4Removal paste synthesis (SmartEraser, Dataset_pipeline/Third_sam_coco_paste.py).

One sample: a background resized (short side → ``size``, bilinear) and centre-cropped; a target instance
area drawn from its class (N(mean, std) clamped to mean ± variance, then min(·, free area / 2), floor 5 %);
a centre outside the 20 % edge band and outside obstacle boxes, accepted when the pasted box overlaps every
obstacle box by ≤ 50 % of that obstacle (R1) and ≥ 60 % of the box lies inside the image (R2); 10 tries per
attempt, the instance shrunk by 1/k on attempt k (k = 1…4); if every attempt fails, a random centre inside
the band with R2 only. Then a random rotation in ±45° and alpha blending.

Deviations, on purpose: the official code picks the paste size *after* placement (largest divisor keeping
≥ 5 % of the image), so a paste can be bigger than the box it checked; here divisors below the 5 % floor are
not tried, so the pasted box is always the checked box. The composite is rounded, and the alpha is exactly 0
outside the pasted mask, so source == target wherever mask == 0 (the official float→uint8 truncation can
change untouched pixels by one level).

Blending: ``matting`` (pymatting closed-form alpha with the official trimap: mask eroded 3× by a 3×3 kernel
is foreground, the eroded-away band is unknown = 128), ``feather`` (alpha rises linearly over
``feather_px`` inside the mask edge: fast), ``hard`` (binary alpha).

A sample whose background or instance file turns out bad (unreadable, truncated, too small) is drawn again with
another background (or another instance of the same class) instead of being lost, deterministically from
(seed, index, draw), so N samples asked are N written whenever enough good files exist; each bad file is named
once in the run summary.
"""
import contextlib
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..erasers.layout import mask_box, resize_image, resize_mask
from ..jobs import Skips, content_hash_bytes, describe_os_error, require
from . import instances as inst
from .imageio import IMAGE_EXTENSIONS, read_rgb_and_bytes
from .triplets import TripletWriter, encode_triplet, parse_shard

BLEND_MODES = ("matting", "feather", "hard")
TOO_SMALL = "background smaller than the crop"
VANISHED = "instance vanished after placement"
MAX_DRAWS = 8  # tries of one sample: the planned background and instance first, then others in place of bad ones


@dataclass
class SynthConfig:
    size: int = 512
    min_side: int = None  # backgrounds with a shorter side are skipped; default = size (no upscaling)
    edge_ratio: float = 0.2
    max_obstacle_overlap: float = 0.5  # R1
    min_inside: float = 0.6  # R2
    tries: int = 10
    max_downscale: int = 4
    max_rotation: float = 45.0
    min_paste_area: float = 0.05
    obstacle_max_area: float = 0.4
    blend: str = "matting"
    feather_px: float = 3.0
    matting_margin: int = 8

    def __post_init__(self):
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend {self.blend!r} is not one of {BLEND_MODES}")
        if self.size < 16:
            raise ValueError(f"crop size {self.size} is too small (need ≥ 16)")

    def to_json(self):
        return asdict(self)


# ---- background -----------------------------------------------------------------------------------------
def prepare_background(rgb, size=512, min_side=None):
    """Resize the short side to ``size`` (PIL bilinear, as torchvision's Resize) and centre-crop to
    ``size``² → ``(crop, (scale, left, top))``, or ``(None, TOO_SMALL)`` below ``min_side`` (default size)."""
    height, width = rgb.shape[:2]
    if min(height, width) < (size if min_side is None else min_side):
        return None, TOO_SMALL
    scale = size / min(height, width)
    new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR)) if (new_w, new_h) != (width, height) else rgb
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size]), (scale, left, top)


def transform_boxes(boxes, transform, size):
    """Obstacle boxes [x, y, w, h] of the original image → boxes in the crop (clipped; outside dropped)."""
    scale, left, top = transform
    result = []
    for x, y, w, h in boxes:
        x, y, w, h = x * scale - left, y * scale - top, w * scale, h * scale
        if x + w > 0 and y + h > 0 and x < size and y < size:
            x0, y0 = max(0.0, x), max(0.0, y)
            result.append([x0, y0, min(x + w, size) - x0, min(y + h, size) - y0])
    return result


# ---- size -----------------------------------------------------------------------------------------
def sample_area(rng, mean, var):
    """Area fraction ~ N(mean, sqrt(var)) clamped to [mean − var, mean + var] (official)."""
    value = rng.normal(mean, np.sqrt(max(var, 0.0)))
    return float(np.clip(value, mean - var, mean + var))


def union_area(boxes, size):
    covered = np.zeros((size, size), bool)
    for x, y, w, h in boxes:
        covered[int(y) : int(y) + int(h), int(x) : int(x) + int(w)] = True
    return int(covered.sum())


def paste_size(ins_w, ins_h, size, area_fraction, obstacles, min_paste_area=0.05):
    """Instance box scaled to cover max(min(area, free/2), floor) of the crop (official ins_resize)."""
    free_half = (1.0 - union_area(obstacles, size) / float(size * size)) / 2.0
    need = max(min(free_half, area_fraction), min_paste_area) * size * size
    scale = (need / float(ins_w * ins_h)) ** 0.5
    return max(1, int(ins_w * scale)), max(1, int(ins_h * scale))


# ---- placement ------------------------------------------------------------------------------------
@dataclass
class Placement:
    center: tuple  # (x, y)
    box: list  # [x, y, w, h] of the unrotated pasted instance, centred at `center`
    divisor: int
    tries: int  # tries used in the accepted attempt; -1 when every attempt failed
    fallback: bool


def edge_band(size, ratio):
    return int(size * ratio), int(size * (1 - ratio))


def candidate_centres(size, obstacles, edge_ratio):
    """Pixels (y, x) outside the edge band and outside every obstacle box (official candidate map)."""
    low, high = edge_band(size, edge_ratio)
    allowed = np.zeros((size, size), bool)
    allowed[low + 1 : high, low + 1 : high] = True  # PIL draws the band rectangles inclusive of both ends
    for x, y, w, h in obstacles:
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        allowed[max(0, y0) : int(np.ceil(y + h)) + 1, max(0, x0) : int(np.ceil(x + w)) + 1] = False
    return np.argwhere(allowed)


def obstacle_overlap_ok(box, obstacles, max_overlap):
    """R1: intersection / obstacle area ≤ max_overlap for every obstacle."""
    x, y, w, h = box
    for ox, oy, ow, oh in obstacles:
        inter = max(0.0, min(x + w, ox + ow) - max(x, ox)) * max(0.0, min(y + h, oy + oh) - max(y, oy))
        if ow * oh > 0 and inter / (ow * oh) > max_overlap:
            return False
    return True


def inside_fraction(box, size):
    x, y, w, h = box
    inside_w = max(0.0, min(x + w, size) - max(x, 0.0))
    inside_h = max(0.0, min(y + h, size) - max(y, 0.0))
    return inside_w * inside_h / float(w * h)


def _box(cx, cy, w, h):
    return [int(cx) - w // 2, int(cy) - h // 2, int(w), int(h)]


def place(rng, ins_w, ins_h, size, obstacles, config):
    """Official placement search (see module doc); divisors that would fall below the area floor are skipped."""
    floor = config.min_paste_area * size * size
    divisors = [k for k in range(1, config.max_downscale + 1) if k == 1 or (ins_w // k) * (ins_h // k) >= floor]
    divisors = [k for k in divisors if ins_w // k >= 1 and ins_h // k >= 1]
    low, high = edge_band(size, config.edge_ratio)
    candidates = candidate_centres(size, obstacles, config.edge_ratio)
    if len(candidates):
        for k in divisors:
            w, h = ins_w // k, ins_h // k
            for attempt in range(config.tries):
                cy, cx = candidates[rng.integers(len(candidates))]
                box = _box(cx, cy, w, h)
                if obstacle_overlap_ok(box, obstacles, config.max_obstacle_overlap) and inside_fraction(box, size) >= config.min_inside:
                    return Placement((int(cx), int(cy)), box, k, attempt, False)
    k = divisors[-1]
    w, h = ins_w // k, ins_h // k
    cx, cy = int(rng.integers(low, high)), int(rng.integers(low, high))
    if len(candidates):
        for _ in range(config.tries):
            y, x = candidates[rng.integers(len(candidates))]
            if inside_fraction(_box(x, y, w, h), size) >= config.min_inside:
                cx, cy = int(x), int(y)
                break
    return Placement((cx, cy), _box(cx, cy, w, h), k, -1, True)


# ---- pasting ---------------------------------------------------------------------------------------
def resize_instance(rgb, mask, width, height):
    return resize_image(rgb, width, height), resize_mask(mask, width, height)


def rotate_instance(rgb, mask, angle):
    """Rotate counter-clockwise by ``angle`` degrees on an expanded canvas (PIL ``rotate(expand=True)``)."""
    height, width = mask.shape
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(np.ceil(height * sin + width * cos)), int(np.ceil(height * cos + width * sin))
    matrix[0, 2] += new_w / 2.0 - width / 2.0
    matrix[1, 2] += new_h / 2.0 - height / 2.0
    rgb = cv2.warpAffine(rgb, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(mask.astype(np.uint8), matrix, (new_w, new_h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    return rgb, mask


def paste_binary(background, rgb, mask, center):
    """Hard paste centred at ``center`` (cropped at the borders) → (composite, full-size bool mask)."""
    size_h, size_w = background.shape[:2]
    height, width = mask.shape
    x0, y0 = center[0] - width // 2, center[1] - height // 2
    bx0, by0 = max(0, x0), max(0, y0)
    bx1, by1 = min(size_w, x0 + width), min(size_h, y0 + height)
    full = np.zeros((size_h, size_w), bool)
    composite = background.copy()
    if bx1 <= bx0 or by1 <= by0:
        return composite, full
    part = mask[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]
    full[by0:by1, bx0:bx1] = part
    region = composite[by0:by1, bx0:bx1]
    region[part] = rgb[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0][part]
    return composite, full


def official_trimap(mask):
    """uint8 trimap: 255 = mask eroded 3× by 3×3, 128 = the eroded-away band, 0 = outside."""
    binary = mask.astype(np.uint8) * 255
    eroded = cv2.erode(binary, np.ones((3, 3), np.uint8), iterations=3)
    trimap = eroded.copy()
    trimap[(binary > 0) & (eroded == 0)] = 128
    return trimap


def matting_alpha(composite, mask, margin=8):
    """Closed-form matting alpha (pymatting) on the mask's box plus ``margin``; exactly 0 outside the mask,
    1 on the definite foreground. Returns (alpha, mode actually used)."""
    trimap = official_trimap(mask)
    if not (trimap == 255).any() or not (trimap == 128).any():
        return mask.astype(np.float64), "hard"  # nothing to solve: thinner than the erosion, or no band
    estimate_alpha_cf = require("pymatting", None, "blend 'matting'").estimate_alpha_cf

    x0, y0, x1, y1 = mask_box(mask, pad=margin)
    crop_alpha = estimate_alpha_cf(composite[y0:y1, x0:x1] / 255.0, trimap[y0:y1, x0:x1] / 255.0)
    alpha = np.zeros(mask.shape, np.float64)
    alpha[y0:y1, x0:x1] = np.clip(crop_alpha, 0.0, 1.0)
    alpha[trimap == 0] = 0.0
    alpha[trimap == 255] = 1.0
    return alpha, "matting"


def feather_alpha(mask, feather_px=3.0):
    """Alpha rising linearly from the mask edge inward over ``feather_px`` pixels (> 0 exactly on the mask)."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(distance / max(feather_px, 1e-6), 0.0, 1.0).astype(np.float64)


def blend(background, composite, alpha):
    mixed = alpha[..., None] * composite.astype(np.float64) + (1.0 - alpha[..., None]) * background.astype(np.float64)
    out = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    out[alpha == 0] = background[alpha == 0]
    return out


# ---- one sample ------------------------------------------------------------------------------------
def synthesize(background, obstacles, instance_rgb, instance_mask, class_stats, rng, config):
    """Paste one cut instance onto one prepared (cropped) background.

    ``class_stats``: (mean_area, var_area) of the instance's class. Returns ``(sample, None)`` with
    sample = {"source", "mask", "target", "params"} or ``(None, reason)``.
    """
    size = config.size
    mean_area, var_area = class_stats
    area = sample_area(rng, mean_area, var_area)
    ins_h, ins_w = instance_mask.shape
    width, height = paste_size(ins_w, ins_h, size, area, obstacles, config.min_paste_area)
    placement = place(rng, width, height, size, obstacles, config)
    w, h = placement.box[2], placement.box[3]
    rgb, mask = resize_instance(instance_rgb, instance_mask, w, h)
    angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
    rgb, mask = rotate_instance(rgb, mask, angle)
    composite, pasted = paste_binary(background, rgb, mask, placement.center)
    if not pasted.any():
        return None, VANISHED
    if config.blend == "matting":
        alpha, used = matting_alpha(composite, pasted, config.matting_margin)
    elif config.blend == "feather":
        alpha, used = feather_alpha(pasted, config.feather_px), "feather"
    else:
        alpha, used = pasted.astype(np.float64), "hard"
    source = blend(background, composite, alpha)
    params = {
        "area_sample": area,
        "paste_size": [width, height],
        "center": list(placement.center),
        "box": placement.box,
        "divisor": placement.divisor,
        "tries": placement.tries,
        "fallback": placement.fallback,
        "rotation": angle,
        "blend": used,
        "obstacles": [[round(float(v), 3) for v in b] for b in obstacles],
    }
    return {"source": source, "mask": alpha > 0, "target": background, "params": params}, None


# ---- a whole run ------------------------------------------------------------------------------------
@dataclass
class SynthesisPlan:
    """Everything a worker needs to make sample ``index``; picklable, identical for every shard/worker."""

    backgrounds: list  # image paths (str), sorted
    obstacles: dict  # path → [[x, y, w, h], ...] in the original image
    instances: list  # inst.Instance, in paste order
    class_stats: dict  # class → [mean_area, var_area]
    config: SynthConfig
    seed: int = 0
    num_samples: int = 0
    filters: dict = field(default_factory=dict)
    background_root: str = ""  # the background folder (skips name files relative to it)

    def class_members(self):
        """``{class: [instance indices, ascending]}``, built once per plan object (each worker's copy builds its
        own); not a field, so it is neither compared nor part of ``asdict``."""
        members = self.__dict__.get("_class_members")
        if members is None:
            members = {}
            for k, instance in enumerate(self.instances):
                members.setdefault(instance.class_name, []).append(k)
            self.__dict__["_class_members"] = members
        return members


def sample_id(index):
    return f"{index:08d}"


def collect_backgrounds(folder, annotations=None):
    """Sorted background image paths under ``folder`` (recursive) and their obstacle boxes.

    ``folder`` may also be a list of paths (``.txt``), a parquet file of paths, or an fsspec URL of a folder
    (``sources.expand``); paths are strings, URLs kept as such. ``annotations``: a COCO file whose ``file_name``
    entries are relative to ``folder``; objects covering less than 40 % of their image become obstacles (official
    rule). Returns (paths, obstacles, ``Skips``).
    """
    from .sources import expand, is_url, join

    if not is_url(str(folder)) and not Path(folder).exists():
        raise FileNotFoundError(f"background folder {folder} does not exist")
    paths = [str(p) for p in expand([folder], IMAGE_EXTENSIONS, "backgrounds")]
    if not is_url(str(folder)) and Path(folder).is_dir():
        paths.sort()
    obstacles, skips = {}, Skips()
    if annotations:
        try:
            inst.load_coco(annotations)
        except ValueError as error:
            skips.add(str(error), Path(annotations).name)
        for name, boxes in inst.coco_obstacles(annotations).items():
            obstacles[join(str(folder), name) if is_url(str(folder)) else str(Path(folder) / name)] = boxes
    return paths, obstacles, skips


def build_plan(backgrounds, obstacles, instances, config, seed=0, num_samples=None, filters=None, background_root=""):
    """Filter the instances (official rules; ``filters`` switches them: keys ``clip``, ``area``,
    ``class_count`` and thresholds of ``instances.filter_instances``) and fix the paste order."""
    options = {"use_clip": any(i.score is not None for i in instances), "use_area": True, "use_class_count": True}
    options.update(filters or {})
    kept, stats, report = inst.filter_instances(instances, **options)
    if not kept:
        raise ValueError(
            f"no instance passed the filters ({len(instances)} found; dropped {report.dropped}); switch filters off "
            "(e.g. fewer than 6 instances per class) or add instances"
        )
    if not backgrounds:
        raise ValueError("no background images found")
    ordered = inst.interleave_by_class(kept, stats)
    return SynthesisPlan(
        backgrounds=list(backgrounds),
        obstacles=dict(obstacles),
        instances=ordered,
        class_stats={name: [s.mean_area, s.var_area] for name, s in stats.items()},
        config=config,
        seed=int(seed),
        num_samples=int(num_samples if num_samples is not None else len(backgrounds)),
        filters=asdict(report),
        background_root=str(background_root or os.path.commonpath([os.path.dirname(p) for p in backgrounds])),
    )


_INSTANCE_CACHE = {}
_BACKGROUND_CACHE = {}


def _cached(cache, key, make, limit=32):
    if key not in cache:
        if len(cache) >= limit:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


def _stamp(path):
    """Path and modification time: a file rewritten in place (e.g. new SAM masks) is not served stale."""
    try:
        return path, os.stat(path).st_mtime_ns
    except (OSError, TypeError):
        return path, None


def _cut(instance):
    rgb, mask, reason = inst.load_instance(instance)
    return (None, None, reason) if rgb is None else (*inst.cut_instance(rgb, mask), None)


def _background(path, config):
    """(crop, transform, content id, None) of a background file, or (None, None, None, why it cannot serve)."""
    rgb, reason, data = read_rgb_and_bytes(path)  # the file is read once: decoded and hashed from memory
    if rgb is None:
        return None, None, None, reason
    crop, transform = prepare_background(rgb, config.size, config.min_side)
    return (None, None, None, transform) if crop is None else (crop, transform, content_hash_bytes(data), None)


def _redraw(plan, index, draw, background, instance, failed):
    """The (background, instance) indices of ``draw`` of sample ``index``, after the last draw's ``failed`` part
    ("background", "instance" or "paste") failed: only that part is drawn again (an instance within its class)."""
    rng = np.random.default_rng([plan.seed, index, draw, 1])
    if failed == "background":
        background = int(rng.integers(len(plan.backgrounds)))
    elif failed == "instance":
        name = plan.instances[instance].class_name
        members = [k for k in plan.class_members()[name] if k != instance]
        instance = int(members[rng.integers(len(members))]) if members else int(rng.integers(len(plan.instances)))
    return background, instance


def make_sample(plan, index):
    """Sample ``index`` of the plan → (sample_id, sample or None, record or None, problems).

    ``problems``: the (reason, file name or None) of every draw that failed on the way. The first draw pastes
    instance ``index`` onto background ``index`` (modulo their counts) with an RNG seeded by (seed, index) only, so
    shards, workers and resumes make the same samples; a draw that meets a bad file or loses its instance is
    followed by another (``_redraw``), up to ``MAX_DRAWS``."""
    problems, failed = [], None
    background_index, instance_index = index % len(plan.backgrounds), index % len(plan.instances)
    for draw in range(MAX_DRAWS):
        if draw:
            background_index, instance_index = _redraw(plan, index, draw, background_index, instance_index, failed)
        rng = np.random.default_rng([plan.seed, index] if draw == 0 else [plan.seed, index, draw])
        background_path, instance = plan.backgrounds[background_index], plan.instances[instance_index]
        # cache keys hold everything the value depends on: one process may serve plans of several runs
        background_key = (_stamp(background_path), plan.config.size, plan.config.min_side)
        background, transform, background_id, reason = _cached(
            _BACKGROUND_CACHE, background_key, lambda: _background(background_path, plan.config), 4)
        if background is None:
            failed = "background"
            problems.append((reason, inst._name(background_path, plan.background_root)))
            continue
        instance_key = (_stamp(instance.image), _stamp(instance.mask_file), json.dumps(instance.coco, sort_keys=True))
        rgb, mask, reason = _cached(_INSTANCE_CACHE, instance_key, lambda: _cut(instance))
        if rgb is None:
            failed = "instance"
            problems.append((reason, Path(instance.mask_file or instance.image).name))
            continue
        obstacles = transform_boxes(plan.obstacles.get(background_path, []), transform, plan.config.size)
        sample, reason = synthesize(background, obstacles, rgb, mask, plan.class_stats[instance.class_name], rng,
                                    plan.config)
        if sample is None:
            failed = "paste"
            problems.append((reason, None))
            continue
        record = {
            "origin": {"kind": "image", "image": instance.image, "instance": instance.id},
            "background": background_path,
            "background_id": background_id,
            "class": instance.class_name,
            "params": {"seed": plan.seed, "index": index, **({"draw": draw} if draw else {}), **sample.pop("params")},
            "config": plan.config.to_json(),
            "filters": plan.filters,
        }
        return sample_id(index), sample, record, problems
    return sample_id(index), None, None, problems


def make_encoded(plan, index):
    """``make_sample`` + PNG encoding, so a worker hands the writer only bytes to store: (sample id, EncodedTriplet
    or None, record or None, problems). Every back-end (in process, a process pool, a Ray task) makes a sample with
    this function; an error in one sample is its problem, never the run's end."""
    try:
        sid, sample, record, problems = make_sample(plan, index)
        if sample is not None:
            sample = encode_triplet(sample["source"], sample["mask"], sample["target"])
        return sid, sample, record, problems
    except Exception as error:  # one bad item must not kill the run; the summary names it
        return sample_id(index), None, None, [(f"error: {type(error).__name__}: {error}", None)]


_WORKER_PLAN = None


def _init_worker(plan):
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _work(index):
    return make_encoded(_WORKER_PLAN, index)


def shard_indices(plan, shard, shard_size):
    """The sample indices of WebDataset shard ``shard`` (``shards.synth_shard_name``): shard·N … (shard+1)·N − 1."""
    return range(shard * shard_size, min(plan.num_samples, (shard + 1) * shard_size))


def write_shard(plan, shard, shard_size, target):
    """Make the samples of shard ``shard`` with ``make_encoded`` and write the shard (``target``:
    ``shards.ShardWriter.target()``). Returns its summary: the commit's (shard, samples, bytes), ``planned``,
    ``redrawn``, ``failed`` [(reason, sample id)] and ``skipped`` [(reason, file)]."""
    from .shards import open_shard, synth_shard_name

    indices = shard_indices(plan, shard, shard_size)
    output = open_shard(target, synth_shard_name(shard))
    failed, skipped, redrawn = [], [], 0
    try:
        for index in indices:
            sid, sample, record, problems = make_encoded(plan, index)
            skipped += [(reason, name) for reason, name in problems if name is not None]
            if sample is None:
                failed.append((problems[-1][0] if problems else "no draw succeeded", sid))
                continue
            output.add(sid, sample, record)
            redrawn += bool(problems)
        result = output.commit()
    except BaseException:
        output.abort()
        raise
    return {**result, "planned": len(indices), "redrawn": redrawn, "failed": failed, "skipped": skipped}


def _shard_work(unit):
    return write_shard(_WORKER_PLAN, *unit)


@contextlib.contextmanager
def _produced(plan, units, work, workers, results, ordered):
    """``work(unit)`` of every unit, as the block iterates them: from ``results(plan, units)`` (another back-end),
    this process (``workers`` <= 1) or a process pool (in order when ``ordered``), which the block's end stops."""
    if results is not None:
        yield results(plan, units)
        return
    if workers <= 1:
        _init_worker(plan)
        yield (work(unit) for unit in units)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(plan,))
    try:
        yield (pool.imap if ordered else pool.imap_unordered)(work, units, chunksize=1)
    finally:
        pool.terminate()
        pool.join()


def run_synthesis(plan, output, workers=1, shard=None, resume=True, progress=None, check_interrupt=None,
                  summary=None, results=None):
    """Write the plan's samples (those of ``shard`` = "i/N" when given) to a triplet folder (a path, or an open
    ``TripletWriter``).

    Returns (and fills, when given) a summary: {"planned", "existing", "written", "redrawn" (samples made with
    another draw), "failed" (samples not made in ``MAX_DRAWS`` draws, by reason), "skipped" (bad files met, by
    reason)}; the last two as ``jobs.Skips`` dicts (count, first names). Samples already in the folder are not
    redone (``resume``); a failing item is counted, never fatal. A write that fails (a full disk) stops the run:
    the summary says so under "stopped" and the error is raised.

    ``results(plan, indices)``: another back-end making the samples (``scale.sample_results`` on Ray), yielding
    ``make_encoded``'s tuples in any order; by default this process (``workers`` = 1) or a process pool.
    """
    shard_index, shard_count = parse_shard(shard) if shard is not None else (0, 1)
    todo_all = [i for i in range(plan.num_samples) if i % shard_count == shard_index]
    summary = {} if summary is None else summary
    summary.update(planned=len(todo_all), existing=0, written=0, redrawn=0, failed={}, skipped={})
    skipped, failed = Skips(), Skips()
    writer = output if isinstance(output, TripletWriter) else TripletWriter(output, resume=resume, shard=shard)
    with writer:
        todo = [i for i in todo_all if not writer.has(sample_id(i))]
        summary["existing"] = len(todo_all) - len(todo)
        done = summary["existing"]
        if progress:
            progress(done, len(todo_all))

        def consume(result):
            nonlocal done
            sid, sample, record, problems = result
            if writer.has(sid):  # a retried task of another back-end sends its samples again
                return
            if sample is None:
                failed.add(problems[-1][0] if problems else "no draw succeeded", sid)
            else:
                try:
                    writer.write_encoded(sid, sample, record)
                except OSError as error:
                    summary["stopped"] = f"could not write sample {sid}: {describe_os_error(error)}"
                    raise
                summary["written"] += 1
                summary["redrawn"] += bool(problems)
            for reason, name in problems:  # after the write: a sample that could not be stored counts nothing
                if name is not None:
                    skipped.add(reason, name)
            done += 1
            if progress:
                progress(done, len(todo_all))

        try:
            with _produced(plan, todo, _work, workers, results, ordered=True) as produced:
                for result in produced:
                    if check_interrupt:
                        check_interrupt()
                    consume(result)
        finally:  # whatever stops the run, the summary holds what was met
            summary["skipped"], summary["failed"] = skipped.as_dict(), failed.as_dict()
    return summary


def run_synthesis_shards(plan, writer, shard_size, workers=1, shard=None, progress=None, check_interrupt=None,
                         summary=None, results=None):
    """Write the plan's samples as WebDataset shards of ``shard_size`` (``--format webdataset``) through a
    ``shards.ShardWriter``: every shard not yet finished (of ``shard`` = "i/N": shards k with k % N == i) is made by
    ``write_shard``, in this process, a process pool (``workers``) or another back-end (``results(plan, units)``
    yielding ``write_shard``'s summaries; ``scale.shard_results`` on Ray). Finished shards are skipped.

    Returns (and fills) the summary of ``run_synthesis`` plus ``shards`` (finished shards of this run) and
    ``bytes`` (written)."""
    shard_index, shard_count = parse_shard(shard) if shard is not None else (0, 1)
    from .shards import synth_shard_name

    count = -(-plan.num_samples // shard_size)
    mine = [k for k in range(count) if k % shard_count == shard_index]
    todo = [(k, shard_size, writer.target()) for k in mine if not writer.is_finished(synth_shard_name(k))]
    summary = {} if summary is None else summary
    planned = sum(len(shard_indices(plan, k, shard_size)) for k in mine)
    existing = sum(writer.counts.get(synth_shard_name(k), 0) for k in mine)
    summary.update(planned=planned, existing=existing, written=0, redrawn=0, failed={}, skipped={}, shards=0, bytes=0)
    skipped, failed = Skips(), Skips()
    done = planned - sum(len(shard_indices(plan, k, shard_size)) for k, _, _ in todo)
    if progress:
        progress(done, planned)
    with _produced(plan, todo, _shard_work, workers, results, ordered=False) as produced:
        for result in produced:
            if check_interrupt:
                check_interrupt()
            for reason, name in result["skipped"]:
                skipped.add(reason, name)
            for reason, sid in result["failed"]:
                failed.add(reason, sid)
            if "shard" in result:
                writer.finish(result)
                summary["shards"] += 1
                summary["bytes"] += result["bytes"]
                summary["written"] += result["samples"]
            summary["redrawn"] += result["redrawn"]
            summary["skipped"], summary["failed"] = skipped.as_dict(), failed.as_dict()
            done += result["planned"]
            if progress:
                progress(done, planned)
    return summary
