"""Video4Removal: mine real removal pairs from static-camera video (the OmniEraser paper's data recipe; the
authors released no code for it, so every number below is ours unless it says "paper").

One streaming pass per video. A MOG2 background model runs on a downscaled copy of ``analysis_fps``
frames per second (the others are only decoded); a frame whose cleaned foreground covers more than
``foreground_ratio`` (0.15, the paper's) of the picture is a *foreground* frame, one with almost none is a
*background* frame. Each kept foreground frame is paired with the background frame that is nearest in time
and closest in MSE (lighting drift) within a time window, and the pair is only accepted when the pictures
agree outside the object zone (same lighting), the background frame is empty where the object is, and the
object stands out inside the mask. Fast-motion frames (an object much less sharp than it usually is) are
dropped; a moving camera (ORB + RANSAC against the first frame) stops the clip with a reason.

Masks: GroundingDINO + SAM / SAM 2 through a ``segmenter`` (dataset_tools/segmenters.py), else the MOG
foreground refined at full resolution against the paired background frame, shadows excluded (the paper
masks the object, not its shadow: the pair teaches the eraser to remove the shadow too).

Clean pairs: a pair may differ only where its object is. After pairing, the two frames are compared at full
resolution outside the mask (grown by ~1 % of the frame's side) and outside the object's own shadow (changed
pixels connected to the mask where the source is a darker copy of the target), as connected regions. With
``outside_changes="mask"`` a region the source frame's moving objects explain (it touches the source's MOG
foreground, or the mask itself: a part of the object the mask missed) is added to the mask, with the MOG blob
around it; a region the background frame's objects explain cannot be masked (the target would show an object
the source lacks). Then, in both modes, a pair whose largest remaining region reaches
``outside_change_pixels`` is refused and the next-best background frame tried. The lighting test compares the
frames only on pixels where neither has foreground (MOG's foreground and shadows, grown by a pixel), so other
moving objects do not pass for a change of light.

Memory is bounded whatever the video's length: a thinned bank of recent background frames and a thinned
queue of foreground frames waiting for a background frame after them; nothing else is kept.

This module is the algorithm only. ``mine_video`` mines one video in the calling process; ``mine_task`` is
the unit of work a run hands out (one video range → typed events: ``VideoProgress``, ``PairMined``,
``VideoFinished``), run in isolated processes by ``video_isolation.py`` and driven by ``video_job.py``.
Frames come from ``video_decode.py``.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from ..erasers import masks as mask_ops
from ..erasers.layout import mask_box
from ..jobs import content_hash
from .video_decode import CANNOT_DECODE, VideoSkipped, iter_frames, open_video

MASK_AUGMENTATIONS = ("none", "dilate", "erode", "bbox", "random")
OUTSIDE_CHANGES = ("mask", "reject")
EMPTY_SCENE_RATIO = 0.002  # default share of cleaned foreground up to which a frame counts as empty
OUTSIDE_MARGIN = 0.008  # changes this close to the mask (share of the frame's larger side) belong to its edge
BACKGROUND_CANDIDATES = 3  # background frames tried, best first, before a foreground frame is given up


@dataclass(frozen=True)
class PairingConfig:
    """Every number that decides which pairs a video yields (stored in each sample's manifest record)."""

    foreground_ratio: float = 0.15  # paper: a frame is foreground when its foreground-pixel ratio > 0.15
    # At most this much cleaned foreground: the scene is empty. None (the default) derives it from
    # foreground_ratio: min(EMPTY_SCENE_RATIO, foreground_ratio / 2), so a low foreground_ratio (small objects)
    # keeps a band of in-between frames below it; the resolved number is what records and summaries store.
    background_ratio: float | None = None
    window_seconds: float = 6.0  # a pair's two frames are at most this far apart
    lighting_mse: float = 20.0  # max MSE (0-255 scale) between the frames outside the dilated mask
    empty_fraction: float = 0.01  # max share of the object mask the background frame's foreground may cover
    min_object_mse: float = 400.0  # the object must differ from the background inside the mask at least this much
    blur_ratio: float = 0.4  # object sharpness below this share of its median over the last 0.5 s: motion blur
    sample_gap_seconds: float = 0.2  # min time between two kept foreground frames (near-duplicates)
    bank_size: int = 24  # background frames kept (thinned over the window)
    max_pending: int = 24  # foreground frames waiting for a later background frame
    analysis_width: int = 160  # MOG2 and the checks run at this width; outputs keep the full resolution
    analysis_fps: float = 10.0  # frames analysed per second of video; the others are only decoded (grab)
    warmup_frames: int = 10  # frames the background model needs before its verdicts count
    mog_history: int = 500
    mog_var_threshold: float = 16.0
    min_island_fraction: float = 0.0005  # foreground specks smaller than this share of the frame are noise
    max_camera_shift: float = 0.02  # global shift vs. the first frame, as a share of the width: camera moved
    motion_check_seconds: float = 1.0  # time between two global-motion checks (ORB + RANSAC similarity)
    motion_patience: int = 2  # consecutive checks over the limit before the clip counts as moving
    difference_threshold: float = 25.0  # full-resolution |source - target| that counts as object (0-255)
    mask_dilate_ratio: float = 1.10  # safety margin of the object mask (area ratio) before augmentation
    mask_augment: str = "none"  # none | dilate | erode | bbox | random (one per sample, seeded by its id)
    # what to do with changes outside the mask: "mask" grows the mask over the source's moving objects that
    # cause them (else the pair is refused), "reject" refuses the pair. "mask" keeps more clean pairs on every
    # clip measured (benchmarks/pair_cleanliness.py)
    outside_changes: str = "mask"
    outside_change_pixels: int = 40  # a changed region this large (px, full resolution) outside the mask is one

    def __post_init__(self):
        if not 0 < self.foreground_ratio < 1:
            raise ValueError(f"foreground_ratio must be in (0, 1), got {self.foreground_ratio}")
        if self.background_ratio is None:
            object.__setattr__(self, "background_ratio", min(EMPTY_SCENE_RATIO, self.foreground_ratio / 2))
        if not 0 <= self.background_ratio < self.foreground_ratio:
            raise ValueError(
                f"background_ratio must be in [0, foreground_ratio={self.foreground_ratio}), got {self.background_ratio}"
            )
        for name in ("window_seconds", "lighting_mse", "analysis_width", "analysis_fps", "bank_size", "max_pending",
                     "mask_dilate_ratio", "motion_check_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mask_augment not in MASK_AUGMENTATIONS:
            raise ValueError(f"mask_augment must be one of {MASK_AUGMENTATIONS}, got {self.mask_augment!r}")
        if self.outside_changes not in OUTSIDE_CHANGES:
            raise ValueError(f"outside_changes must be one of {OUTSIDE_CHANGES}, got {self.outside_changes!r}")
        if not self.outside_change_pixels >= 1:
            raise ValueError(f"outside_change_pixels must be >= 1, got {self.outside_change_pixels}")

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown pairing settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class Pair:
    """One mined sample: full-resolution RGB frames and the object mask (True = remove)."""

    frame: int
    background_frame: int
    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    stats: dict


@dataclass
class VideoReport:
    """What happened to one video (the run summary is a list of these)."""

    video: str
    status: str = "ok"  # ok | skipped | crashed | duplicate (the same content as another video of the run)
    reason: str = ""
    problem: str = ""  # a short phrase grouping skipped and crashed videos in a run summary
    video_id: str = ""
    decoder: str = "opencv"  # the decoder that produced the pairs
    fallback: str = ""  # why the first decoder was given up, when it was
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    pairs: int = 0
    written: int = 0
    counts: dict = field(default_factory=dict)  # frame classes and rejection reasons

    def as_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class VideoTask:
    """One unit of mining work: frames [start, stop) of one video; ``job`` is its index in the run."""

    job: int
    path: str
    start: int = 0
    stop: int | None = None
    video_id: str = ""  # the id of the video (``video_id``); computed from the file when empty
    decoder: str = "opencv"  # opencv | pyav
    fallback: str = ""  # why an earlier try with another decoder failed (kept in the report)


@dataclass
class VideoProgress:
    """``done`` of ``total`` frames of task ``job`` decoded (``total`` is what the container declares)."""

    job: int
    done: int
    total: int


@dataclass
class PairMined:
    """One finished sample of task ``job``: RGB frames, the final (augmented) bool mask and its manifest record."""

    job: int
    sample_id: str
    source: np.ndarray
    mask: np.ndarray
    target: np.ndarray
    record: dict


@dataclass
class VideoFinished:
    """Task ``job`` is over: mined, skipped for a reason, or crashed (its process died)."""

    job: int
    report: VideoReport


EVENT_TYPES = (VideoProgress, PairMined, VideoFinished)


# --- small pure helpers ---------------------------------------------------------------------------

def analysis_size(width, height, analysis_width):
    if width <= analysis_width:
        return width, height
    return analysis_width, max(1, round(height * analysis_width / width))


def downscale(frame, size):
    """Area-average ``frame`` down to ``size`` = (w, h): exact halvings (a 2× linear resize averages 2×2
    pixels) and one small area resize; ~4× cheaper than one INTER_AREA resize of the full frame."""
    width, height = size
    while frame.shape[1] >= 2 * width and frame.shape[0] >= 2 * height:
        frame = cv2.resize(frame, (frame.shape[1] // 2, frame.shape[0] // 2), interpolation=cv2.INTER_LINEAR)
    if (frame.shape[1], frame.shape[0]) != (width, height):
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    return frame


_SQUARE_3 = np.ones((3, 3), np.uint8)
_ELLIPSE_7 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
_ELLIPSE_9 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))


def clean_foreground(raw, min_island_pixels, fill=True):
    """MOG2 output (255 = foreground, 127 = shadow) → bool object mask: shadows out, specks out, holes in.

    ``fill=False`` skips hole filling (frame classification only needs the area; kept frames are filled).
    """
    fg = (raw == 255).view(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _SQUARE_3)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _ELLIPSE_7)
    mask = mask_ops.remove_small_islands(fg, min_island_pixels)
    return mask_ops.fill_holes(mask) if fill else mask


def sharpness(gray, box):
    """Variance of the Laplacian inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    crop = gray[y0:y1, x0:x1]
    if crop.size < 9:
        return 0.0
    return float(cv2.Laplacian(crop, cv2.CV_32F).var())


def masked_mse(a, b, where):
    """Mean squared difference of two float32 H×W×C images over the pixels where ``where`` is True
    (0-255 scale); ``where`` may be bool or uint8."""
    where = where.astype(np.uint8) if where.dtype == bool else where
    if not cv2.countNonZero(where):
        return 0.0
    diff = cv2.absdiff(a, b)
    means = cv2.mean(cv2.multiply(diff, diff), mask=where)
    return float(sum(means[: a.shape[2] if a.ndim == 3 else 1]) / (a.shape[2] if a.ndim == 3 else 1))


def component_boxes(mask):
    """Each 8-connected component replaced by its filled bounding box."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = np.zeros(mask.shape, bool)
    for x, y, w, h, _ in stats[1:count]:
        out[y:y + h, x:x + w] = True
    return out


def augment_mask(mask, mode, rng):
    """The paper's mask augmentation (dilate, erode, bbox) on the mask core; returns (mask, what was done)."""
    if mode == "random":
        mode = ("none", "dilate", "erode", "bbox")[int(rng.integers(0, 4))]
    if mode == "dilate":
        ratio = float(rng.uniform(1.1, 1.5))
        return mask_ops.resize_to_area(mask, ratio), {"mode": "dilate", "area_ratio": round(ratio, 3)}
    if mode == "erode":
        ratio = float(rng.uniform(0.8, 0.95))
        return mask_ops.resize_to_area(mask, ratio), {"mode": "erode", "area_ratio": round(ratio, 3)}
    if mode == "bbox":
        return component_boxes(mask), {"mode": "bbox"}
    return mask, {"mode": "none"}


class CameraMotion:
    """Global motion of a frame against the first one: ORB features matched and a RANSAC similarity fit.

    Moving cars are outliers of the fit, so a static camera reads ~0 px even in heavy traffic; a panning,
    shaking or zooming camera reads its displacement. ``measure`` returns (shift in px at full
    resolution, inliers), or (inf, inliers) when the frame no longer matches the first one at all.
    """

    def __init__(self, full_width, probe_width=320):
        self.probe_width = probe_width
        self.scale = full_width / min(full_width, probe_width)
        self.orb = cv2.ORB_create(500)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
        self.reference = None

    def _features(self, frame):
        height, width = frame.shape[:2]
        if width > self.probe_width:
            frame = downscale(frame, (self.probe_width, max(1, round(height * self.probe_width / width))))
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        return self.orb.detectAndCompute(gray, None)

    def measure(self, frame):
        keypoints, descriptors = self._features(frame)
        if self.reference is None:
            self.reference = (keypoints, descriptors)
            return 0.0, len(keypoints)
        ref_points, ref_descriptors = self.reference
        if ref_descriptors is None or len(ref_points) < 8:
            return 0.0, 0  # a featureless scene (fog, flat wall): no evidence either way
        if descriptors is None:
            return math.inf, 0
        matches = self.matcher.match(ref_descriptors, descriptors)
        if len(matches) < 8:
            return math.inf, len(matches)
        a = np.float32([ref_points[m.queryIdx].pt for m in matches])
        b = np.float32([keypoints[m.trainIdx].pt for m in matches])
        model, inliers = cv2.estimateAffinePartial2D(a, b, method=cv2.RANSAC, ransacReprojThreshold=2.0)
        if model is None or int(inliers.sum()) < 8:
            return math.inf, 0 if inliers is None else int(inliers.sum())
        # displacement of the probe's corners captures translation, rotation and zoom in one number
        height, width = frame.shape[:2]
        w = min(width, self.probe_width)
        h = height * w / width
        corners = np.float32([[0, 0], [w, 0], [0, h], [w, h]])
        moved = corners @ model[:, :2].T + model[:, 2]
        return float(np.abs(moved - corners).max()) * self.scale, int(inliers.sum())


def video_id(path, digest=None):
    """Stable, file-name-safe id of a video: its stem plus a hash of its content (``jobs.content_hash``: size,
    first and last MiB), so two different files of the same name and size never share an id (and neither do
    their samples), while a copy or a moved file keeps it. ``digest``: the content hash if already computed."""
    path = Path(path)
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", path.stem).strip("._-") or "video"
    if digest is None:
        digest = content_hash(path) if path.is_file() else "0" * 16
    return f"{stem}-{digest[:12]}"


def sample_id(vid, frame):
    return f"{vid}-f{frame:06d}"


# --- the streaming miner ---------------------------------------------------------------------------

@dataclass
class _Background:
    index: int
    full: np.ndarray  # BGR, full resolution
    small: np.ndarray  # float32 BGR at analysis size
    foreground: np.ndarray  # bool raw MOG foreground at analysis size (what is not empty)
    moving: np.ndarray  # bool raw MOG foreground or shadow, grown by a pixel (what the lighting test leaves out)


@dataclass
class _Foreground:
    index: int
    full: np.ndarray
    small: np.ndarray
    mask: np.ndarray  # cleaned bool mask at analysis size
    ratio: float
    sharpness_ratio: float
    foreground: np.ndarray  # bool raw MOG foreground at analysis size, specks included
    moving: np.ndarray  # as _Background.moving


def moving_pixels(raw):
    """MOG2 output → bool: foreground or shadow, grown by one pixel (their blurred edges move too)."""
    return cv2.dilate((raw > 0).view(np.uint8), _SQUARE_3).view(bool)


SHADOW_RULE = (0.5, 0.92, 0.08)  # MOG2's: darker by 8-50 %, the channels' ratios within 0.08 of their mean
# an object's shadow around its mask, penumbra and compression noise included: darker by 5-70 %, ratios within 0.15
DARKER_RULE = (0.3, 0.95, 0.15)


def shadow_pixels(source, target, rule=SHADOW_RULE):
    """Where ``source`` is a darker copy of ``target`` (same colour): ``rule`` = (least, most brightness ratio,
    largest spread of the channels' ratios); by default MOG2's shadow rule, at full resolution."""
    # In bands of rows: a dozen full-size float temporaries would each be fresh memory the kernel has to
    # fault in (most of the pairing's time); bands this small are recycled by the allocator instead.
    height, width = source.shape[:2]
    rows = max(1, 8192 // max(1, width))
    out = np.empty((height, width), bool)
    for y in range(0, height, rows):
        out[y:y + rows] = _shadow_rule(source[y:y + rows], target[y:y + rows], *rule)
    return out


def _shadow_rule(source, target, low, high, largest_spread):
    src = source.astype(np.float32) + 1.0
    tgt = target.astype(np.float32) + 1.0
    ratios = [src[..., c] / tgt[..., c] for c in range(3)]
    mean_ratio = (ratios[0] + ratios[1] + ratios[2]) / 3.0
    spread = np.maximum(np.maximum(np.abs(ratios[0] - mean_ratio), np.abs(ratios[1] - mean_ratio)),
                        np.abs(ratios[2] - mean_ratio))
    return (mean_ratio > low) & (mean_ratio < high) & (spread < largest_spread)


# --- changes outside the mask ----------------------------------------------------------------------

def largest_channel(image):
    """The per-pixel maximum over the channels of an H×W×3 uint8 image (OpenCV: ~20× numpy's max over an axis)."""
    return cv2.max(cv2.max(image[..., 0], image[..., 1]), image[..., 2])


def changed_pixels(source, target, threshold):
    """Where two RGB frames differ: |difference| > ``threshold`` (0-255) in their largest channel after a 3×3
    blur (compression noise), specks of one or two pixels opened away."""
    diff = largest_channel(cv2.absdiff(cv2.GaussianBlur(source, (3, 3), 0), cv2.GaussianBlur(target, (3, 3), 0)))
    changed = (diff > threshold).view(np.uint8)
    return cv2.morphologyEx(changed, cv2.MORPH_OPEN, _SQUARE_3).view(bool)


def object_zone(source, target, mask, changed):
    """What a pair may change besides nothing: the mask grown by ``OUTSIDE_MARGIN`` of the frame's larger side,
    and the changed pixels where the source is a darker copy of the target connected to it (the object's shadow:
    the eraser learns to remove it), grown by one pixel."""
    margin = max(2, round(OUTSIDE_MARGIN * max(mask.shape)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    zone = cv2.dilate(mask.view(np.uint8), disc)
    darker = changed & ~mask
    where = np.flatnonzero(darker)  # the rule on the changed pixels only: a fraction of the frame
    darker.ravel()[where] = _shadow_rule(source.reshape(-1, 3)[where], target.reshape(-1, 3)[where], *DARKER_RULE)
    count, labels = cv2.connectedComponents((darker.view(np.uint8) | zone), connectivity=8)
    attached = np.unique(labels[mask])
    attached = attached[attached > 0]
    zone = np.isin(labels, attached).view(np.uint8) | zone
    return cv2.dilate(zone, _SQUARE_3).view(bool)


def outside_regions(changed, zone):
    """Connected regions of ``changed`` outside ``zone``: (labels, areas) with areas[k] the size of label k + 1."""
    # plain labelling and a pixel count: connectedComponentsWithStats costs several times more in OpenCV 5
    count, labels = cv2.connectedComponents((changed & ~zone).view(np.uint8), connectivity=8)
    return labels, np.bincount(labels.ravel(), minlength=count)[1:]


def largest_outside_change(source, target, mask, threshold):
    """Size (px) of the largest region where the pair differs outside its mask and its object's shadow."""
    changed = changed_pixels(source, target, threshold)
    _, areas = outside_regions(changed, object_zone(source, target, mask, changed))
    return int(areas.max()) if len(areas) else 0


def refine_mask(source, target, zone, threshold, min_island):
    """Object mask at full resolution: |source - target| inside the MOG zone, shadows out, cleaned.

    ``source``/``target`` are RGB uint8 of one size, ``zone`` a bool mask where the object may be.
    Only the zone's box is processed. Returns None when the difference finds nothing there.
    """
    if not zone.any():
        return None
    x0, y0, x1, y1 = mask_box(zone)
    src, tgt, inside = source[y0:y1, x0:x1], target[y0:y1, x0:x1], zone[y0:y1, x0:x1]
    diff = largest_channel(cv2.absdiff(cv2.GaussianBlur(src, (3, 3), 0), cv2.GaussianBlur(tgt, (3, 3), 0)))
    crop = (diff > threshold) & inside & ~shadow_pixels(src, tgt)
    crop = cv2.morphologyEx(crop.view(np.uint8), cv2.MORPH_CLOSE, _ELLIPSE_9).view(bool) & inside
    crop = mask_ops.fill_holes(mask_ops.remove_small_islands(crop, min_island))
    if not crop.any():
        return None
    mask = np.zeros(zone.shape, bool)
    mask[y0:y1, x0:x1] = crop
    return mask


class PairMiner:
    """Streaming Video4Removal state: ``push(index, frame)`` analysed frames in order, then ``finish()``.

    Both return lists of accepted :class:`Pair` objects. ``counts`` tallies frame classes and rejection
    reasons. ``segmenter`` (optional) maps an RGB frame and the object zone found by MOG (bool, full
    size) to an object mask or None; without it the MOG foreground refined at full resolution against the
    paired background frame is the mask.
    """

    def __init__(self, fps, width, height, config=PairingConfig(), segmenter=None):
        self.config = config
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self.small_size = analysis_size(self.width, self.height, config.analysis_width)
        small_area = self.small_size[0] * self.small_size[1]
        self.min_island = max(4, int(round(config.min_island_fraction * small_area)))
        self.min_island_full = max(16, int(round(config.min_island_fraction * self.width * self.height)))
        self.step = max(1, int(round(self.fps / config.analysis_fps)))
        self.window = max(1, int(round(config.window_seconds * self.fps)))
        self.sample_gap = max(1, int(round(config.sample_gap_seconds * self.fps)), self.window // config.max_pending + 1)
        self.bank_gap = max(1, (2 * self.window) // config.bank_size + 1)
        self.motion_every = max(1, int(round(config.motion_check_seconds * self.fps)))
        self.segmenter = segmenter
        self.mog = cv2.createBackgroundSubtractorMOG2(
            history=config.mog_history, varThreshold=config.mog_var_threshold, detectShadows=True
        )
        self.camera = CameraMotion(self.width)
        self.bank = deque()
        self.pending = deque()
        self.last_kept = -10**9
        self.recent_sharpness = deque(maxlen=16)
        self.blur_horizon = max(2, int(round(0.5 * self.fps)))
        self.last_motion_check = -10**9
        self.counts = Counter()
        self.frames = 0
        self.largest_shift = 0.0
        self._moving_checks = 0

    # frame classification ---------------------------------------------------------------------
    def push(self, index, frame, small=None):
        """Analyse one frame; ``small`` is its ``downscale`` to the analysis size if already made."""
        if frame.shape[:2] != (self.height, self.width):
            raise VideoSkipped(
                f"frame {index} is {frame.shape[1]}×{frame.shape[0]} but the video says {self.width}×{self.height}",
                "frame size changes")
        self.frames += 1
        if index - self.last_motion_check >= self.motion_every:
            self.last_motion_check = index
            self._check_camera(index, frame)
        if small is None:
            small = downscale(frame, self.small_size)
        raw = self.mog.apply(small)
        if self.frames <= self.config.warmup_frames:
            self.counts["warmup"] += 1
            return self._resolve(index)
        raw_ratio = np.count_nonzero(raw == 255) / raw.size
        if raw_ratio <= self.config.background_ratio:
            self._add_background(index, frame, small, raw)  # nothing moves: no cleaning needed
            return self._resolve(index)
        mask = clean_foreground(raw, self.min_island, fill=False)
        ratio = float(np.count_nonzero(mask)) / mask.size
        if ratio <= self.config.background_ratio:
            self._add_background(index, frame, small, raw)
            return self._resolve(index)
        if ratio > 0.5 * self.config.foreground_ratio:
            # holes (a car's windows) count as object; far below the threshold, filling cannot reach it
            mask = mask_ops.fill_holes(mask)
            ratio = float(np.count_nonzero(mask)) / mask.size
        if ratio > self.config.foreground_ratio:
            self._add_foreground(index, frame, small, mask, ratio, raw)
        else:
            self.counts["in_between"] += 1
        return self._resolve(index)

    def finish(self):
        pairs = []
        while self.pending:
            pairs.extend(self._pair(self.pending.popleft()))
        return pairs

    def _check_camera(self, index, frame):
        shift, inliers = self.camera.measure(frame)
        limit = self.config.max_camera_shift * self.width
        if math.isfinite(shift):
            self.largest_shift = max(self.largest_shift, shift)
        if shift <= limit:
            self._moving_checks = 0
            return
        self._moving_checks += 1
        if self._moving_checks >= self.config.motion_patience:
            seen = f"{shift:.0f} px" if math.isfinite(shift) else f"no match ({inliers} features agree)"
            raise VideoSkipped(
                f"camera moves: frame {index} is displaced by {seen} against the first frame "
                f"(limit {limit:.0f} px); Video4Removal needs a static camera", "camera moves")

    def _add_background(self, index, frame, small, raw):
        self.counts["background"] += 1
        if self.bank and index - self.bank[-1].index < self.bank_gap:
            return
        self.bank.append(_Background(index, frame.copy(), small.astype(np.float32), raw == 255, moving_pixels(raw)))

    def _add_foreground(self, index, frame, small, mask, ratio, raw):
        self.counts["foreground"] += 1
        # Fast motion smears the object: a frame whose object box is much less sharp (Laplacian variance)
        # than in the frames just before it (same object, half a second) is blurred. Older frames may show
        # another object, so they do not count.
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        value = sharpness(gray, mask_box(mask, pad=2))
        recent = sorted(v for i, v in self.recent_sharpness if index - i <= self.blur_horizon)
        self.recent_sharpness.append((index, value))
        median = recent[len(recent) // 2] if len(recent) >= 2 else 0.0
        sharp_ratio = value / median if median > 0 else 1.0
        if sharp_ratio < self.config.blur_ratio:
            self.counts["rejected_blur"] += 1
            return
        if index - self.last_kept < self.sample_gap:
            self.counts["near_duplicate"] += 1
            return
        self.last_kept = index
        self.pending.append(_Foreground(index, frame.copy(), small.astype(np.float32), mask, ratio, sharp_ratio,
                                        raw == 255, moving_pixels(raw)))

    def _resolve(self, now):
        pairs = []
        while self.pending and now - self.pending[0].index >= self.window:
            pairs.extend(self._pair(self.pending.popleft()))
        oldest_needed = (self.pending[0].index if self.pending else now) - self.window
        while self.bank and self.bank[0].index < oldest_needed:
            self.bank.popleft()
        return pairs

    # pairing ---------------------------------------------------------------------------------------
    def _choose_backgrounds(self, fg, zone):
        """Background frames for ``fg``, best first: within the window, empty in ``zone``, same lighting where
        neither frame has foreground; cost = MSE / lighting limit + time distance / window. Returns
        ([(mse, frame)], reasons the others were refused)."""
        cfg = self.config
        zone_pixels = max(1, int(np.count_nonzero(zone)))
        candidates, reasons = [], Counter()
        for bg in self.bank:
            dt = abs(bg.index - fg.index)
            if dt > self.window:
                reasons["no_background_in_window"] += 1
                continue
            if np.count_nonzero(bg.foreground & zone) / zone_pixels > cfg.empty_fraction:
                reasons["background_not_empty_there"] += 1
                continue
            mse_out = masked_mse(fg.small, bg.small, self._static(zone, fg, bg))
            if mse_out > cfg.lighting_mse:
                reasons["lighting_differs"] += 1
                continue
            candidates.append((mse_out / cfg.lighting_mse + dt / self.window, mse_out, bg))
        candidates.sort(key=lambda c: (c[0], c[2].index))
        return [(mse, bg) for _, mse, bg in candidates], reasons

    @staticmethod
    def _static(zone, fg, bg, least=0.1):
        """Pixels where the lighting is compared: outside the object zone, where neither frame has foreground (other
        moving objects are not light); outside the zone alone when fewer than ``least`` of the frame are left."""
        outside = ~zone
        static = outside & ~fg.moving & ~bg.moving
        return static if np.count_nonzero(static) >= least * static.size else outside

    def _covers_motion(self, mask, motion, share=0.6):
        """Does ``mask`` (full size, grown a little) cover most of the MOG foreground (analysis size)?"""
        small = cv2.resize(mask.astype(np.uint8), self.small_size, interpolation=cv2.INTER_AREA) > 0
        small = cv2.dilate(small.astype(np.uint8), _SQUARE_3) > 0
        return np.count_nonzero(small & motion) >= share * max(1, np.count_nonzero(motion))

    def _upscale(self, small):
        """A bool analysis-size mask at full size, grown by about one analysis pixel (its blurred edge)."""
        full = cv2.resize(small.view(np.uint8), (self.width, self.height), interpolation=cv2.INTER_NEAREST)
        radius = max(1, math.ceil(self.width / self.small_size[0]))
        return cv2.dilate(full, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)).view(bool)

    def _clean(self, fg, bg, source, target, mask):
        """The pair's changes outside its mask: (mask, largest remaining region in px, pixels the mask grew by).

        With ``outside_changes="mask"`` the regions of at least a quarter of the limit that the source frame's
        moving objects explain (the region touches the source's raw MOG foreground, or the object zone: a part of
        the object the mask missed) and the background frame's do not are added to the mask, each with the MOG
        blob it belongs to, holes filled."""
        cfg = self.config
        changed = changed_pixels(source, target, cfg.difference_threshold)
        zone = object_zone(source, target, mask, changed)
        labels, areas = outside_regions(changed, zone)
        grown = 0
        if cfg.outside_changes == "mask" and len(areas) and areas.max() >= cfg.outside_change_pixels:
            source_moving, target_moving = self._upscale(fg.foreground), self._upscale(bg.foreground)
            near_zone = cv2.dilate(zone.view(np.uint8), _SQUARE_3).view(bool)
            # per region (label k): does it touch the background frame's movers, the source's movers or the zone
            in_target = np.bincount(labels[target_moving], minlength=len(areas) + 1) > 0
            explained = np.bincount(labels[source_moving | near_zone], minlength=len(areas) + 1) > 0
            candidates = np.flatnonzero(areas >= max(4, cfg.outside_change_pixels // 4)) + 1
            chosen = np.zeros(len(areas) + 1, bool)
            chosen[candidates[~in_target[candidates] & explained[candidates]]] = True
            add = chosen[labels]
            if add.any():
                count, blobs = cv2.connectedComponents(fg.foreground.view(np.uint8), connectivity=8)
                hit = cv2.resize(add.view(np.uint8), self.small_size, interpolation=cv2.INTER_AREA) > 0
                touched = np.unique(blobs[hit])
                add |= self._upscale(np.isin(blobs, touched[touched > 0]))
                add = mask_ops.fill_holes(cv2.morphologyEx(add.view(np.uint8), cv2.MORPH_CLOSE, _ELLIPSE_7).view(bool))
                grown = int(np.count_nonzero(add & ~mask))
                mask = mask | add
                zone = object_zone(source, target, mask, changed)
                labels, areas = outside_regions(changed, zone)
        return mask, int(areas.max()) if len(areas) else 0, grown

    def _target_shows_object(self, bg, mask):
        """Does the background frame show a moving object (MOG foreground, specks removed) under the mask? The
        target would then teach the eraser to paint it in. (The choice of frames checks the zone's share only, which
        a small object in a large zone passes.)"""
        objects = mask_ops.remove_small_islands(bg.foreground, self.min_island)
        if not objects.any():
            return False
        small = cv2.resize(mask.view(np.uint8), self.small_size, interpolation=cv2.INTER_AREA) > 0
        return bool(np.count_nonzero(objects & small))

    def _object_mask(self, fg, source, zone_full):
        """(mask or None, mask source, reason when None) from the segmenter, independent of the background frame."""
        mask = self.segmenter(source, zone_full)
        if mask is None or not mask.any():
            return None, None, "segmenter"
        if not self._covers_motion(mask, fg.mask):
            # a moving thing outside the prompt's objects would stay in the source but not the target
            return None, None, "mask_misses_motion"
        return mask, getattr(self.segmenter, "name", "segmenter"), None

    def _pair(self, fg):
        cfg = self.config
        zone = mask_ops.resize_to_area(fg.mask, 1.5)  # the object plus a margin for its shadow and halo
        candidates, reasons = self._choose_backgrounds(fg, zone)
        if not candidates:
            reason = reasons.most_common(1)[0][0] if reasons else "no_background_in_window"
            self.counts[f"rejected_{reason}"] += 1
            return []
        source = cv2.cvtColor(fg.full, cv2.COLOR_BGR2RGB)
        zone_full = cv2.resize(zone.astype(np.uint8), (self.width, self.height), interpolation=cv2.INTER_NEAREST) > 0
        if self.segmenter is not None:
            segmented, mask_source, failure = self._object_mask(fg, source, zone_full)
            if segmented is None:
                self.counts[f"rejected_{failure}"] += 1
                return []
        first_failure = None
        for rank, (mse_out, bg) in enumerate(candidates[:BACKGROUND_CANDIDATES]):
            mse_in = masked_mse(fg.small, bg.small, fg.mask)
            if mse_in < cfg.min_object_mse:
                first_failure = first_failure or "no_object_in_mask"
                continue
            target = cv2.cvtColor(bg.full, cv2.COLOR_BGR2RGB)
            if self.segmenter is None:
                mask = refine_mask(source, target, zone_full, cfg.difference_threshold, self.min_island_full)
                mask_source = "mog"
                if mask is None or not mask.any():
                    first_failure = first_failure or "no_object_in_mask"
                    continue
            else:
                mask = segmented
            mask = mask_ops.resize_to_area(mask, cfg.mask_dilate_ratio)
            mask, outside, grown = self._clean(fg, bg, source, target, mask)
            if outside >= cfg.outside_change_pixels:
                first_failure = first_failure or "outside_changes"
                continue
            if self._target_shows_object(bg, mask):
                first_failure = first_failure or "background_not_empty_there"
                continue
            self.counts["pairs"] += 1
            stats = {
                "time_s": round(fg.index / self.fps, 3),
                "background_time_s": round(bg.index / self.fps, 3),
                "foreground_ratio": round(fg.ratio, 4),
                "sharpness_ratio": round(fg.sharpness_ratio, 3),
                "mse_outside": round(mse_out, 3),
                "mse_inside": round(mse_in, 3),
                "outside_change_px": outside,
                "mask_grown_px": grown,
                "background_rank": rank,
                "mask_source": mask_source,
            }
            return [Pair(fg.index, bg.index, source, target, mask, stats)]
        self.counts[f"rejected_{first_failure}"] += 1
        return []


REASON_WORDS = {
    "no_background_in_window": "no empty frame within the time window",
    "background_not_empty_there": "the background frames nearby are not empty where the object is (busy scene)",
    "lighting_differs": "lighting differs too much between the frames outside the object",
    "no_object_in_mask": "no object stands out inside the mask against the background frame",
    "blur": "the object is motion-blurred",
    "segmenter": "the segmenter found no object of the prompt",
    "mask_misses_motion": "the prompt's objects do not cover what moves",
    "outside_changes": "the frames also differ outside the mask (other moving objects, or the object only partly "
                       "masked)",
}


def explain(counts, pairs):
    """A sentence saying why a video gave no pairs (empty when it gave some)."""
    if pairs:
        return ""
    foreground = counts.get("foreground", 0)
    background = counts.get("background", 0)
    if foreground == 0:
        return "no pairs: no frame has enough foreground (no large enough moving object)"
    if background == 0:
        return (f"no pairs: the scene is never empty ({foreground} foreground frames, no frame without "
                "foreground to pair them with)")
    rejected = {k[len("rejected_"):]: v for k, v in counts.items() if k.startswith("rejected_")}
    if not rejected:
        return "no pairs: no foreground frame could be paired"
    ranked = sorted(rejected.items(), key=lambda kv: -kv[1])
    reasons = "; ".join(f"{REASON_WORDS.get(name, name)} ({number})" for name, number in ranked)
    return f"no pairs: {reasons} [frames refused, of {foreground} foreground frames]"


def mine_video(path, config=PairingConfig(), segmenter=None, start=0, stop=None, progress=None, check_interrupt=None,
               decoder="opencv"):
    """Mine one video in this process. A generator of :class:`Pair` whose return value is the
    :class:`VideoReport` (see :func:`run_mining`). A skipped clip ends with ``status = "skipped"`` and the
    reason; pairs already yielded stay valid (each is complete on its own). ``decoder``: opencv or pyav."""
    report = VideoReport(video=str(path), decoder=decoder)
    try:
        capture, fps, count, width, height = open_video(path, decoder)
        capture.release()
    except VideoSkipped as skip:
        report.status, report.reason, report.problem = "skipped", str(skip), skip.problem
        return report
    report.fps, report.width, report.height = fps, width, height
    if width <= 0 or height <= 0:
        report.status, report.reason = "skipped", f"{Path(path).name} reports no frame size"
        report.problem = CANNOT_DECODE
        return report
    end = min(count, stop) if (count and stop) else (stop or count)
    total = max(0, end - start)
    miner = PairMiner(fps, width, height, config, segmenter)
    last = start - 1
    decoded = []
    try:
        # the decode thread also makes the small analysis copy: it overlaps the analysis on a second core
        for index, (frame, small) in iter_frames(path, start, stop, miner.step, prefetch=8, decoded=decoded,
                                                 prepare=lambda f: downscale(f, miner.small_size), decoder=decoder):
            last = index
            if check_interrupt is not None:
                check_interrupt()
            for pair in miner.push(index, frame, small):
                report.pairs += 1
                yield pair
            if progress is not None and miner.frames % 10 == 0:
                progress(index - start + 1, max(total, index - start + 1))
        last = max([last, *decoded])  # the frames only grabbed after the last analysed one count too
        for pair in miner.finish():
            report.pairs += 1
            yield pair
    except VideoSkipped as skip:
        report.status, report.reason, report.problem = "skipped", str(skip), skip.problem
    report.frames = last - start + 1
    report.counts = dict(miner.counts)
    if report.status == "ok":
        if miner.frames == 0:
            report.status, report.problem = "skipped", CANNOT_DECODE
            report.reason = f"{Path(path).name} has no decodable frame (empty, truncated or damaged file)"
        else:
            report.reason = explain(miner.counts, report.pairs)
            # containers estimate their length; only a clear shortfall means the file ends early
            if total and report.frames + max(miner.step, 2) < total * 0.98:
                report.reason = "; ".join(filter(None, [report.reason, (
                    f"decoding stopped at frame {last} of {end} (truncated or damaged file)")]))
    if progress is not None:
        progress(max(total, report.frames), max(total, report.frames))
    return report


def run_mining(path, config=PairingConfig(), segmenter=None, start=0, stop=None, progress=None, check_interrupt=None):
    """``mine_video`` collected: returns (list of Pair, VideoReport)."""
    generator = mine_video(path, config, segmenter, start, stop, progress, check_interrupt)
    pairs = []
    while True:
        try:
            pairs.append(next(generator))
        except StopIteration as done:
            return pairs, done.value


def pair_record(vid, video_path, pair, config, augmentation, decoder="opencv"):
    """The manifest record of one pair (the triplet format's video origin plus how it was made)."""
    return {
        "origin": {
            "kind": "video",
            "video": Path(video_path).name,
            "video_id": vid,
            "frame": pair.frame,
            "background_frame": pair.background_frame,
        },
        "decoder": decoder,
        "mask_source": pair.stats["mask_source"],
        "mask_augment": augmentation,
        "stats": {k: v for k, v in pair.stats.items() if k != "mask_source"},
        "params": {"method": "video4removal", **asdict(config)},
    }


def finalize_pair(vid, pair, config):
    """(sample id, mask after augmentation, augmentation record); the augmentation is seeded by the id."""
    sid = sample_id(vid, pair.frame)
    seed = int(hashlib.sha1(sid.encode()).hexdigest()[:8], 16)
    mask, augmentation = augment_mask(pair.mask, config.mask_augment, np.random.default_rng(seed))
    return sid, mask, augmentation


# --- the unit of work a run hands out -------------------------------------------------------------

def mine_task(task, config, emit, segmenter=None, check_interrupt=None):
    """Mine ``task`` (a ``VideoTask``) and hand each event to ``emit``: ``VideoProgress`` now and then, a
    ``PairMined`` per sample (mask augmented, record made) and last a ``VideoFinished``. A Python error inside
    one video ends that video with status "skipped" and the error as its reason; it never escapes.

    A file OpenCV cannot open or get a frame from is tried once more with PyAV (a file that crashes OpenCV's
    decoder is retried by the process pool, which sees the crash); the report and every record name the decoder
    that produced the pairs, and the report says why the first one was given up."""
    from .sources import local_copy

    vid = task.video_id or video_id(task.path)
    decoder, fallback = task.decoder, task.fallback
    try:
        with local_copy(task.path) as local:  # a video at a URL is decoded from a temporary local copy
            while True:
                report, mined = _mine_with(task, local, vid, decoder, config, emit, segmenter, check_interrupt)
                if decoder == "opencv" and not mined and report.status == "skipped" and report.problem == CANNOT_DECODE:
                    fallback, decoder = report.reason, "pyav"
                    continue
                break
    except OSError as error:  # the copy of a remote file failed
        report = VideoReport(video=str(task.path), status="skipped", problem="cannot be read",
                             reason=f"{task.path} cannot be read: {error}", decoder=decoder)
    if fallback and report.status == "skipped" and report.problem == CANNOT_DECODE:
        report.reason = f"{fallback}; {report.reason}"
    report.video, report.video_id, report.fallback = str(task.path), vid, fallback
    emit(VideoFinished(task.job, report))


def _mine_with(task, local, vid, decoder, config, emit, segmenter, check_interrupt):
    """(report, pairs emitted) of one try of ``task`` (its file at the local path ``local``) with ``decoder``."""
    mined = 0
    try:
        generator = mine_video(local, config, segmenter, task.start, task.stop,
                               lambda done, total: emit(VideoProgress(task.job, done, total)), check_interrupt,
                               decoder)
        while True:
            try:
                pair = next(generator)
            except StopIteration as finished:
                return finished.value, mined
            sample, mask, augmentation = finalize_pair(vid, pair, config)
            record = pair_record(vid, task.path, pair, config, augmentation, decoder)
            emit(PairMined(task.job, sample, pair.source, mask, pair.target, record))
            mined += 1
    except Exception as error:  # one video's failure is its report, not the run's end
        report = VideoReport(video=str(task.path), status="skipped", reason=f"{type(error).__name__}: {error}",
                             problem="error while mining", decoder=decoder, pairs=mined)
        return report, mined
