"""SmartEraser mask irregularisation ("ME") and the mask clean-ups an eraser user needs.

Users' masks hug the object, so its shadow, reflection and boundary halo stay behind. SmartEraser trains on
masks irregularised by one of six choices and evaluates with every mask dilated to 1.10x its area
(SmartEraser, CVPR 2025; official code longtaojiang/SmartEraser, modules/mask_region_enhence.py,
``MaskAugmentor.augment_mask``).

Per-mask functions work on numpy ``HxW`` masks (bool, integer or float, binarised by ``layout.binarize``: the
one threshold, half of full scale) and return bool arrays. The ``*_batch`` wrappers take ComfyUI MASK tensors
``[B,H,W]`` and treat each item independently. 1 = remove.

Deviations from the official code, each deliberate:
- ``resize_to_area`` reaches the target pixel count exactly, where the official loop dilates with ever
  smaller square kernels and stops after the first step past the target, landing 5-30 % past it on real
  masks. Default geometry is the official one: any sequence of square-kernel dilations is a chessboard-distance
  ball, so ``metric="chessboard"`` finds the ring radius with a few incremental square dilations on a crop
  and fills the last ring partially. ``metric="euclidean"`` (round growth) ranks an exact distance transform.
- Hull (4), ellipse (5) and Bezier blob (6) are united with the input mask: the official ellipse fit and the
  +-5 px jitter of the blob can cut into the object, which defeats the purpose of the mask.
- Bounding boxes are inclusive (the official ``max - min`` makes a one-pixel mask divide by zero).
"""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from .layout import as_mask_batch, binarize, mask_box

CHOICES = (1, 2, 3, 4, 5, 6)
CHOICE_NAMES = {
    1: "keep",
    2: "erode",
    3: "dilate",
    4: "convex hull + dilate",
    5: "dilate + ellipse",
    6: "bbox + Bezier blob",
}
# Fixed area ratios of SmartEraser's test mode (``augment_mask(mode=choice)``), choices 2-6.
TEST_RATIOS = {2: 0.85, 3: 1.10, 4: 1.35, 5: 2.25, 6: 1.15}
# Training-mode ratio ranges in hundredths, drawn as ``1 +- randint(lo, hi) * 0.01`` like the official code.
RANDOM_RATIO_PERCENT = {2: (-20, -10), 3: (25, 50), 4: (25, 50), 5: (100, 150), 6: (10, 20)}
EVAL_DILATION = 1.10  # SmartEraser evaluation/inference dilates every mask to 1.10x its area
FALLBACK_COVERAGE = 0.7  # a result covering more of the image than this is replaced by the input mask
BLOB_SAMPLES = 18  # points per Bezier side, at t = 0.05 .. 0.90
BLOB_JITTER = 5  # px, uniform integer jitter of each blob point
METRICS = ("chessboard", "euclidean")

# Among pixels at the same distance, those with more already-selected neighbours go first (edge-adjacent
# weighs more than corner-adjacent), so a partial last ring fills concavities and sides before corners.
_NEIGHBOURS = ((-1, -1, 1), (-1, 0, 2), (-1, 1, 1), (0, -1, 2), (0, 1, 2), (1, -1, 1), (1, 0, 2), (1, 1, 1))


def _expand(box, margin: int, shape) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return max(0, x0 - margin), max(0, y0 - margin), min(shape[1], x1 + margin), min(shape[0], y1 + margin)


def _square_dilate(seed_u8: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2r+1)-square: the pixels within chessboard distance r (image edges add nothing)."""
    if radius == 0:
        return seed_u8
    return cv2.dilate(seed_u8, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8))


def _smallest_radius(added_at: Callable[[int], int], count: int, limit: int) -> int:
    """Smallest r in 1..limit with added_at(r) >= count; added_at is non-decreasing with added_at(0) = 0."""
    low, low_added, high, high_added = 0, 0, None, 0
    radius, bisect = 1, False
    while True:
        added = added_at(radius)
        if added >= count:
            high, high_added = radius, added
        else:
            low, low_added = radius, added
        if high is not None and high - low <= 1:
            return high
        if high is None and radius >= limit:
            return limit
        if high is None:  # extrapolate linearly: overshoots a little for convex shapes, undershoots concave
            radius = min(limit, max(low + 1, math.ceil(low * count / max(low_added, 1))))
        elif bisect:
            radius = (low + high) // 2
        else:  # interpolate, alternating with bisection so a curved growth cannot stall the bracket
            step = round((count - low_added) / (high_added - low_added) * (high - low))
            radius = low + min(max(step, 1), high - low - 1)
        bisect = high is not None and not bisect


class _SquareDilations:
    """Dilations of a 0/1 seed by growing square radii, built incrementally (D(r) = D(r - k) dilated by k).

    With ``box`` each radius works on the crop box + r, which holds every pixel within that chessboard
    distance; without it the whole array is used.
    """

    def __init__(self, seed_u8: np.ndarray, box=None):
        self.seed, self.box = seed_u8, box
        self.seed_count = cv2.countNonZero(seed_u8)
        self.done: dict[int, np.ndarray] = {}

    def region(self, radius: int):
        if self.box is None:
            return (slice(None), slice(None))
        x0, y0, x1, y1 = _expand(self.box, radius, self.seed.shape)
        return (slice(y0, y1), slice(x0, x1))

    def _embedded(self, radius: int, into: int) -> np.ndarray:
        """Dilation ``radius`` placed in the (larger) crop of ``into``: the extra band is empty."""
        if self.box is None:
            return self.done[radius]
        small, large = self.region(radius), self.region(into)
        out = np.zeros((large[0].stop - large[0].start, large[1].stop - large[1].start), np.uint8)
        out[small[0].start - large[0].start:small[0].stop - large[0].start,
            small[1].start - large[1].start:small[1].stop - large[1].start] = self.done[radius]
        return out

    def at(self, radius: int) -> np.ndarray:
        if radius not in self.done:
            lower = max((r for r in self.done if r < radius), default=0)
            base = self.seed[self.region(radius)] if lower == 0 else self._embedded(lower, radius)
            self.done[radius] = _square_dilate(base, radius - lower)
        return self.done[radius]

    def added(self, radius: int) -> int:
        return cv2.countNonZero(self.at(radius)) - self.seed_count

    def take(self, count: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """(crop, seed + its ``count`` chessboard-nearest pixels on that crop)."""
        radius = _smallest_radius(self.added, count, max(self.seed.shape))
        outer = self.at(radius)
        if cv2.countNonZero(outer) - self.seed_count == count:
            return self.region(radius), outer
        if radius == 1:
            return self.region(1), _fill_ring(self.seed[self.region(1)], outer, count)
        missing = count - self.added(radius - 1)
        return self.region(radius), _fill_ring(self._embedded(radius - 1, radius), outer, missing)


def _neighbour_score(inner_u8: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    padded = cv2.copyMakeBorder(inner_u8, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    score = np.zeros(ys.size, np.int32)
    for dy, dx, weight in _NEIGHBOURS:
        score += weight * padded[ys + 1 + dy, xs + 1 + dx]
    return score


def _fill_ring(inner_u8: np.ndarray, outer_u8: np.ndarray, missing: int) -> np.ndarray:
    """``inner`` plus the ``missing`` pixels of the ring outer - inner with the best neighbour score."""
    points = cv2.findNonZero(cv2.subtract(outer_u8, inner_u8)).reshape(-1, 2)  # raster order, (x, y)
    xs, ys = points[:, 0], points[:, 1]
    order = np.argsort(-_neighbour_score(inner_u8, ys, xs), kind="stable")[:missing]
    result = inner_u8.copy()
    result[ys[order], xs[order]] = 1
    return result


def _euclidean_take(seed_u8: np.ndarray, count: int) -> np.ndarray:
    """Seed + its ``count`` Euclidean-nearest pixels; squared distances are exact integer levels."""
    # distanceTransform measures each non-zero pixel's distance to the nearest zero pixel: zeros = seed.
    dist = cv2.distanceTransform(1 - seed_u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    level = np.rint(np.square(dist, dtype=np.float64)).astype(np.int64)
    cumulative = np.cumsum(np.bincount(level.ravel()))
    cumulative -= cumulative[0]  # level 0 is the seed itself
    last = int(np.searchsorted(cumulative, count))  # first level whose cumulative count reaches count
    outer = (level <= last).view(np.uint8)
    if cumulative[last] == count:
        return outer
    return _fill_ring((level < last).view(np.uint8), outer, count - int(cumulative[last - 1]))


def resize_to_area(mask: np.ndarray, ratio: float, metric: str = "chessboard") -> np.ndarray:
    """Grow (ratio > 1) or shrink (ratio < 1) a mask to exactly ``round(area * ratio)`` pixels.

    Pixels are added (or removed) in order of distance to the mask (to the background), so the result is a
    dilation (erosion) whose last ring is partial. ``metric="chessboard"`` is the geometry of the official
    square kernels; ``"euclidean"`` grows round. Growth stops at the full image; an empty mask is returned
    unchanged; eroding a mask that touches the image border does not erode from the border (like cv2.erode).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"area ratio must be a positive finite number, got {ratio}")
    # Bool input is only read (the result is a new array): skip binarize's defensive copy, ~15 % of the time.
    is_bool_2d = isinstance(mask, np.ndarray) and mask.dtype == bool and mask.ndim == 2
    mask = mask if is_bool_2d else binarize(mask, ndim=2)
    area = int(np.count_nonzero(mask))
    height, width = mask.shape
    target = min(int(round(area * ratio)), height * width)
    if area == 0 or target == area:
        return mask.copy()
    if target > area:
        return _grow(mask, target - area, metric)
    return _shrink(mask, area - target, metric)


def _grow(mask: np.ndarray, count: int, metric: str) -> np.ndarray:
    dilations = _SquareDilations(mask.view(np.uint8), mask_box(mask))
    if metric == "chessboard":
        region, grown = dilations.take(count)
    else:  # the chessboard ball that holds `count` pixels lies within Euclidean radius * sqrt(2)
        radius = _smallest_radius(dilations.added, count, max(mask.shape))
        region = dilations.region(math.ceil(radius * math.sqrt(2)))
        grown = _euclidean_take(np.ascontiguousarray(mask[region]).view(np.uint8), count)
    result = mask.copy()
    result[region] = grown.view(bool)
    return result


def _shrink(mask: np.ndarray, count: int, metric: str) -> np.ndarray:
    # One pixel of background around the box is enough: every mask pixel is inside it.
    x0, y0, x1, y1 = mask_box(mask, pad=1)
    background = (~mask[y0:y1, x0:x1]).view(np.uint8)
    # A mask filling the image has no boundary to erode from: use a frame around the image instead.
    framed = cv2.countNonZero(background) == 0
    if framed:
        background = cv2.copyMakeBorder(background, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    if metric == "chessboard":
        grown = _SquareDilations(background).take(count)[1]
    else:
        grown = _euclidean_take(background, count)
    if framed:
        grown = grown[1:-1, 1:-1]
    result = mask.copy()
    result[y0:y1, x0:x1] = grown == 0
    return result


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of each outer contour (as the official ``convex_hull_mask``), united with the mask."""
    mask = binarize(mask, ndim=2)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(hull, [cv2.convexHull(c) for c in contours], -1, 1, -1)
    return hull.astype(bool) | mask


def _shape_stats(mask: np.ndarray) -> tuple[float, float, float]:
    """Coverage of the image by the mask, its bounding box and its convex hull."""
    image_area = mask.size
    x0, y0, x1, y1 = mask_box(mask)
    return (np.count_nonzero(mask) / image_area, (x1 - x0) * (y1 - y0) / image_area,
            np.count_nonzero(convex_hull(mask)) / image_area)


def allowed_choices(mask: np.ndarray) -> list[int]:
    """SmartEraser's shape rule: which choices the random mode may draw for this mask.

    Sparse (mask/bbox < 0.5) or big (bbox > 40 % of the image) masks get no Bezier blob; if they are also
    non-convex (mask/hull < 0.6) or their hull covers > 50 % they only get keep/erode/dilate, and a mask
    covering more than half the image is only kept. An empty mask is only kept.
    """
    mask = binarize(mask, ndim=2)
    if not mask.any():
        return [1]
    mask_cover, bbox_cover, hull_cover = _shape_stats(mask)
    if mask_cover / bbox_cover < 0.5 or bbox_cover > 0.4:
        if mask_cover / hull_cover < 0.6 or hull_cover > 0.5:
            return [1] if mask_cover > 0.5 else [1, 2, 3]
        return [1, 2, 3, 4, 5]
    return [1, 2, 3, 4, 5, 6]


def ellipse_fit(mask: np.ndarray) -> np.ndarray:
    """Filled ellipse fitted (cv2.fitEllipse, least squares) to all mask pixels, like the official code."""
    ys, xs = np.nonzero(mask)
    if xs.size < 5:  # fitEllipse needs five points
        return mask.copy()
    ellipse = cv2.fitEllipse(np.column_stack([xs, ys]).astype(np.float32))
    out = np.zeros(mask.shape, np.uint8)
    cv2.ellipse(out, ellipse, 1, -1)
    return out.astype(bool)


def _quadratic_bezier(start, control, end, t: np.ndarray) -> np.ndarray:
    start, control, end = (np.asarray(p, np.float64) for p in (start, control, end))
    t = t[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def bezier_blob(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blob around the mask's box: each side bulges out by a random amount, traced by a jittered Bezier.

    Each side extends by ``randint(0, min(0.5 * free space, 0.2 * box side))``; the four sides are quadratic
    Bezier curves corner -> pushed-out midpoint -> corner sampled at t = 0.05..0.90, each point jittered by
    +-5 px, and the polygon through them is filled (official ``bessel_curve_fit``).
    """
    height, width = mask.shape
    x0, y0, x1, y1 = mask_box(mask)
    box_w, box_h = x1 - x0, y1 - y0
    ext_left = x0 - int(rng.integers(0, int(min(0.5 * x0, 0.2 * box_w)) + 1))
    ext_top = y0 - int(rng.integers(0, int(min(0.5 * y0, 0.2 * box_h)) + 1))
    ext_right = x1 + int(rng.integers(0, int(min(0.5 * (width - x1), 0.2 * box_w)) + 1))
    ext_bottom = y1 + int(rng.integers(0, int(min(0.5 * (height - y1), 0.2 * box_h)) + 1))
    mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
    sides = [  # clockwise: top, right, bottom, left
        ((x0, y0), (mid_x, ext_top), (x1, y0)),
        ((x1, y0), (ext_right, mid_y), (x1, y1)),
        ((x1, y1), (mid_x, ext_bottom), (x0, y1)),
        ((x0, y1), (ext_left, mid_y), (x0, y0)),
    ]
    t = np.arange(1, BLOB_SAMPLES + 1) * 0.05
    points = []
    for start, control, end in sides:
        seen_x, seen_y = set(), set()
        for x, y in _quadratic_bezier(start, control, end, t):
            if x in seen_x or y in seen_y:  # the official code skips repeated coordinates per side
                continue
            seen_x.add(x)
            seen_y.add(y)
            points.append((x + int(rng.integers(-BLOB_JITTER, BLOB_JITTER + 1)),
                           y + int(rng.integers(-BLOB_JITTER, BLOB_JITTER + 1))))
    blob = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(blob, [np.round(np.array(points)).astype(np.int32)], 1)
    return blob.astype(bool)


def _bbox_mask(mask: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = mask_box(mask)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = True
    return out


def choice_ratio(choice: int, rng: np.random.Generator | None, test_mode: bool) -> float:
    """Area ratio a choice uses: the fixed test-mode ratio, or a draw from SmartEraser's training range."""
    if choice == 1:
        return 1.0
    if test_mode:
        return TEST_RATIOS[choice]
    low, high = RANDOM_RATIO_PERCENT[choice]
    return 1 + int(rng.integers(low, high + 1)) * 0.01


def apply_choice(mask: np.ndarray, choice: int, ratio: float, rng: np.random.Generator | None = None,
                 metric: str = "chessboard") -> np.ndarray:
    """One SmartEraser choice with an explicit area ratio (no fallback). ``rng`` is used by choice 6 only."""
    mask = binarize(mask, ndim=2)
    if choice not in CHOICES:
        raise ValueError(f"SmartEraser choice must be one of {CHOICES}, got {choice!r}")
    if choice == 1 or not mask.any():
        return mask
    if choice in (2, 3):
        return resize_to_area(mask, ratio, metric)
    if choice == 4:
        return resize_to_area(convex_hull(mask), ratio, metric)
    if choice == 5:
        return ellipse_fit(resize_to_area(mask, ratio, metric)) | mask
    rng = rng if rng is not None else np.random.default_rng()
    return bezier_blob(resize_to_area(_bbox_mask(mask), ratio, metric), rng) | mask


def irregularize(mask: np.ndarray, choice: int | str = "random", rng: np.random.Generator | None = None,
                 test_mode: bool = False, metric: str = "chessboard") -> tuple[np.ndarray, int]:
    """SmartEraser's ``augment_mask``: returns (irregularised bool mask, choice actually used).

    ``choice="random"`` draws uniformly from :func:`allowed_choices`; a fixed choice is applied as asked.
    ``test_mode`` uses the fixed ratios (0.85, 1.10, 1.35, 2.25, 1.15), otherwise ratios are drawn from the
    training ranges. A result covering > 70 % of the image falls back to the input (reported as choice 1).
    An empty mask is returned unchanged.
    """
    mask = binarize(mask, ndim=2)
    if choice != "random" and choice not in CHOICES:
        raise ValueError(f"choice must be 'random' or one of {CHOICES}, got {choice!r}")
    if not mask.any():
        return mask, 1
    rng = rng if rng is not None else np.random.default_rng()
    if choice == "random":
        allowed = allowed_choices(mask)
        choice = allowed[int(rng.integers(0, len(allowed)))]
    choice = int(choice)
    result = apply_choice(mask, choice, choice_ratio(choice, rng, test_mode), rng, metric)
    if np.count_nonzero(result) > FALLBACK_COVERAGE * result.size:
        return mask, 1
    return result, choice


def smarteraser_eval_mask(mask: np.ndarray) -> np.ndarray:
    """SmartEraser's test-mode choice 3 (``irregularize``): the mask dilated to exactly 1.10x its area. The pack's
    SmartEraser path uses ``smarteraser.evaluation_mask`` instead, which follows the official loop that overshoots."""
    return irregularize(mask, 3, test_mode=True)[0]


# --- clean-ups ComfyUI core lacks (core has GrowMask, FeatherMask for image borders, ThresholdMask) ---

def fill_holes(mask: np.ndarray, max_hole_pixels: int | None = None) -> np.ndarray:
    """Fill background regions enclosed by the mask (not touching the image border), up to a size if given."""
    mask = binarize(mask, ndim=2)
    if max_hole_pixels is not None and max_hole_pixels < 0:
        raise ValueError(f"max_hole_pixels must be >= 0 or None, got {max_hole_pixels}")
    if max_hole_pixels is None:  # one flood fill from a background frame that touches every border region
        padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
        padded[1:-1, 1:-1] = mask
        cv2.floodFill(padded, None, (0, 0), 2, 0, 0, 4)
        return padded[1:-1, 1:-1] != 2
    # Plain labelling + a pixel count: cv2.connectedComponentsWithStats costs 4-14x more in OpenCV 5.
    count, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    is_hole = np.bincount(labels.ravel(), minlength=count) <= max_hole_pixels
    is_hole[0] = False  # label 0 is the mask itself
    is_hole[border_labels] = False
    return mask | is_hole[labels]


def remove_small_islands(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected mask components smaller than ``min_pixels`` (stray SAM specks, paint dabs)."""
    mask = binarize(mask, ndim=2)
    if min_pixels < 0:
        raise ValueError(f"min_pixels must be >= 0, got {min_pixels}")
    # Plain labelling + a pixel count: cv2.connectedComponentsWithStats costs 4-14x more in OpenCV 5.
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(mask.shape, bool)
    keep = np.bincount(labels.ravel(), minlength=count) >= min_pixels
    if keep[1:].all():
        return labels != 0
    keep[0] = False  # background
    return keep[labels]


def feather(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soft edge that ramps from 1 at the mask boundary to 0 at ``radius`` px outside it (float32).

    The inside stays 1, so the object is still fully erased; core FeatherMask only fades the image borders
    and a blur would let the object's edge show through.
    """
    mask = binarize(mask, ndim=2)
    if radius < 0:
        raise ValueError(f"feather radius must be >= 0, got {radius}")
    if radius == 0 or not mask.any():
        return mask.astype(np.float32)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.clip(1.0 - outside / (radius + 1.0), 0.0, 1.0).astype(np.float32)


def clean_mask(mask: np.ndarray, fill: bool = True, max_hole_pixels: int | None = None,
               min_island_pixels: int = 0, feather_radius: float = 0.0) -> np.ndarray:
    """Islands, then holes, then feather: islands first so specks don't enclose fake holes. Float32 out."""
    out = binarize(mask, ndim=2)
    if min_island_pixels > 0:
        out = remove_small_islands(out, min_island_pixels)
    if fill:
        out = fill_holes(out, max_hole_pixels)
    return feather(out, feather_radius)


# --- ComfyUI MASK batches [B,H,W] (torch); the core never imports ComfyUI ---

def item_rng(seed: int, index: int) -> np.random.Generator:
    """Independent, reproducible generator for batch item ``index`` under node seed ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def _map_batch(masks, per_item: Callable[[int, np.ndarray], np.ndarray],
               progress: Callable[[int, int], None] | None, check_interrupt: Callable[[], None] | None):
    import torch

    masks = as_mask_batch(masks)
    items = masks.detach().float().cpu().numpy()
    out = []
    for index, item in enumerate(items):
        if check_interrupt is not None:
            check_interrupt()
        out.append(np.asarray(per_item(index, binarize(item)), np.float32))
        if progress is not None:
            progress(index + 1, len(items))
    return torch.from_numpy(np.stack(out)).to(masks.device)


def irregularize_batch(masks, choice: int | str = "random", seed: int = 0, test_mode: bool = False,
                       metric: str = "chessboard", progress=None, check_interrupt=None):
    """:func:`irregularize` on each item of a MASK batch (binarised by ``layout.binarize``); returns (masks, choices)."""
    used: list[int] = []

    def one(index, item):
        result, choice_used = irregularize(item, choice, item_rng(seed, index), test_mode, metric)
        used.append(choice_used)
        return result

    return _map_batch(masks, one, progress, check_interrupt), used


def resize_to_area_batch(masks, ratio: float, metric: str = "chessboard", progress=None,
                         check_interrupt=None):
    """:func:`resize_to_area` on each item of a MASK batch (binarised by ``layout.binarize``)."""
    return _map_batch(masks, lambda _, item: resize_to_area(item, ratio, metric), progress, check_interrupt)


def clean_mask_batch(masks, fill: bool = True, max_hole_pixels: int | None = None,
                     min_island_pixels: int = 0, feather_radius: float = 0.0, progress=None,
                     check_interrupt=None):
    """:func:`clean_mask` on each item of a MASK batch (binarised by ``layout.binarize``)."""
    return _map_batch(masks, lambda _, item: clean_mask(item, fill, max_hole_pixels, min_island_pixels,
                                                         feather_radius), progress, check_interrupt)
