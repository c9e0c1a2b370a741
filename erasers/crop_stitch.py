"""Crop a photo around its mask for an eraser, and stitch the result back.

Erasers run at a fixed working size (OmniEraser 1024 px, SmartEraser 512 px); photos come in any size.
``crop_around_mask`` cuts the mask's bounding box plus context, resizes it so its longer side is the target
side (floored to a multiple of ``multiple``) and pads to that multiple. ``resize_whole_image`` is the official
OmniEraser demo's geometry instead: the whole photo, short side 1024, sides floored to a multiple of 16.

``stitch`` undoes the resize and pastes the result back through one of three alphas (``PASTE_BACK``):
- ``"mask"``: the mask, grown and feathered. Right for an eraser that removes the object alone (SmartEraser).
- ``"whole crop"``: the whole crop box, feathered only at the box's own border (not at the photo's edges).
- ``"change-aware"``: the grown, feathered mask united with a cleaned, feathered map of where the eraser's
  output differs from what it was given. OmniEraser removes shadows and reflections far outside the mask;
  this keeps them, and keeps every pixel the eraser did not change.
Every pixel whose alpha is 0, and every pixel where the pasted result equals the input, is returned bit for bit.

Several objects per photo: ``object_groups`` splits a mask into its connected objects and groups those whose crop
boxes would overlap or lie close; ``crop_around_objects`` makes one crop per group and ``stitch_parts`` pastes the
erased crops into the photo one after another, so three separate objects cost three crops, not one over the
whole photo.

Layouts follow ComfyUI: IMAGE float32 ``[B,H,W,3]`` in [0, 1], MASK float32 ``[B,H,W]`` in [0, 1], 1 = remove.
"""
from dataclasses import dataclass, replace
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import layout

# Default context around the mask's box, per side, as a fraction of the box's longer side. Shadows and
# reflections are what OmniEraser removes beyond the mask, so the crop must hold them. Measured on the real
# removal pairs (IOPaint's unwant_person.jpg / _clean.jpg: the woman's floor reflection reaches 0.63x her height
# below her feet; the RORD pair among SmartEraser's visual examples: the shadow spreads 0.16x the box's side
# beside the feet). 0.75 holds the longest of them plus the crop-border feather (1/32 of the box, below).
CONTEXT = 0.75
PASTE_BACK = ("mask", "whole crop", "change-aware")
# "whole crop" and "change-aware": alpha ramps from 0 at the crop box's border up to 1 over this fraction of the
# box's longer side (32 px of a 1024 px working crop), on the sides where the box does not reach the photo's edge.
BORDER_FEATHER_FRACTION = 1 / 32
# The change map of "change-aware", at the eraser's working resolution (values in [0, 1] pixel units):
# - the signed difference per channel is smoothed with a Gaussian of sigma CHANGE_SMOOTH_SIGMA px first. A VAE
#   round trip errs on fine texture and edges, with errors of both signs a few pixels apart; a shadow or
#   reflection shifts a whole region one way. Smoothing cancels the first and keeps the second.
# - a pixel has changed where the smoothed difference of some channel exceeds CHANGE_THRESHOLD (0.05, about
#   13/255), or exceeds half of it and is connected to such a pixel (hysteresis: the soft edge of a shadow comes
#   along with its core);
# - clean-up: an opening of radius CHANGE_OPEN_RADIUS px removes thin lines of residual edge error, and
#   regions smaller than CHANGE_MIN_AREA px (one 16x16 FLUX token) are dropped.
# Calibration, on the photos of IOPaint's removal pairs and SmartEraser's visual examples scaled to a 1024 px
# working crop. The round trip is a JPEG one at quality 30, a stand-in for the VAE (no autoencoder weights are
# available offline): it loses detail in 8x8 blocks as an f8 autoencoder does, at a PSNR of 30-39 dB, about or
# below what the 16-channel FLUX autoencoder keeps. It leaves no pixel counted as changed (quality 20, PSNR
# 29-37 dB: under 1 %). The woman's faint floor reflection in unwant_person.jpg vs its clean version is kept
# 250 px below her feet, to where it fades. tests/test_crop_stitch.py re-checks both.
CHANGE_THRESHOLD = 0.05
CHANGE_SMOOTH_SIGMA = 3.0
CHANGE_OPEN_RADIUS = 3
CHANGE_MIN_AREA = 256
# Grouping rule of split mode (object_groups): objects are the 8-connected pieces of the mask; two groups merge
# while their crop boxes (context included) overlap, touch or lie at most GROUP_DISTANCE px apart (Chebyshev gap
# between the boxes, in the photo's pixels), and a merged group's box is recomputed from all its objects, so
# merging repeats until no two groups are that close. 0 merges only crops that would overlap or touch: every
# pixel is then erased by one crop at most, the pastes never meet, and the order of the crops does not matter.
GROUP_DISTANCE = 0


@dataclass(frozen=True)
class CropInfo:
    """Where a crop came from and how it was scaled; all a stitch needs besides the original image.

    ``resample`` is the filter that scaled the box to the working size (and scales the result back).
    ``feather_scale`` is the scale (working px per photo px, or 1.0) at which the stitch's ``grow`` and
    ``blur_radius`` are measured: SmartEraser's demo feathers at its 512-short-side scale.
    ``part`` / ``parts``: this crop is number ``part`` (from 0) of the ``parts`` crops one photo was split into.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    image_height: int
    image_width: int
    resized_height: int
    resized_width: int
    padded_height: int
    padded_width: int
    resample: str = "bilinear"
    feather_scale: float = 1.0
    part: int = 0
    parts: int = 1

    @property
    def box_height(self):
        return self.y1 - self.y0

    @property
    def box_width(self):
        return self.x1 - self.x0


def _check_image_mask(image, mask):
    """The MASK ``[B,H,W]`` of an IMAGE ``[B,H,W,3]``, checked by ``erasers.layout``'s rules. A mask batch of 1 stays
    one (the crop's mask then broadcasts over the crops as the input's did)."""
    mask = layout.as_mask_batch(mask)
    layout.check_mask_matches_image(layout.check_image(image), mask)
    return mask


def mask_box(mask):
    """Bounding box ``(x0, y0, x1, y1)`` (end-exclusive) of every painted pixel of the batch; an error when empty."""
    box = layout.mask_box(mask)
    if box is None:
        raise ValueError("The mask is empty: mark the object to remove (mask value 1) before cropping.")
    return box


def context_box(box, image_height, image_width, context=CONTEXT, min_margin=0, square=False):
    """Grow ``box`` by ``context`` × its longer side (at least ``min_margin`` px) on every side, clipped to the image.

    With ``square`` the box becomes square where the image allows (SmartEraser works on square crops).
    """
    x0, y0, x1, y1 = box
    margin = max(int(math.ceil(context * max(x1 - x0, y1 - y0))), int(min_margin))
    x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
    if square:
        side = min(max(x1 - x0, y1 - y0), image_height, image_width)
        x0, x1 = _fit_span(x0, x1, side, image_width)
        y0, y1 = _fit_span(y0, y1, side, image_height)
    return max(0, x0), max(0, y0), min(image_width, x1), min(image_height, y1)


def _fit_span(start, end, length, limit):
    """A span of ``length`` centred on [start, end) and shifted to lie inside [0, limit)."""
    centre = (start + end) / 2
    start = int(round(centre - length / 2))
    start = min(max(start, 0), limit - length)
    return start, start + length


def crop_around_mask(image, mask, context=CONTEXT, target_side=1024, multiple=16, min_margin=0, square=False,
                     upscale=True):
    """Crop ``image``/``mask`` around the mask with context and scale the crop to the eraser's working size.

    The box is the mask's bounding box (over the batch) grown by ``context`` × its longer side on each side
    (clipped to the photo). It is resized so its longer side is ``target_side`` floored to a multiple of
    ``multiple`` (with ``upscale=False`` a smaller box keeps its size), then padded on the right/bottom (edge
    pixels; mask 0) up to multiples of ``multiple``.
    Returns ``(crop_image [B,h,w,3], crop_mask [B,h,w], CropInfo)``.
    """
    mask = _check_image_mask(image, mask)
    _check_target(target_side, multiple)
    _, height, width, _ = image.shape
    box = context_box(mask_box(mask), height, width, context, min_margin, square)
    return crop_box(image, mask, box, target_side, multiple, upscale)


def crop_around_objects(image, mask, context=CONTEXT, target_side=1024, multiple=16, min_margin=0, square=False,
                        upscale=True, distance=GROUP_DISTANCE):
    """One crop per group of nearby objects (``object_groups``), in reading order: a list of what
    ``crop_around_mask`` returns for one object, each CropInfo numbered ``part`` of ``parts``.

    Each crop's box is its group's box with context, as ``crop_around_mask`` makes it; its mask is the whole mask
    cut to that box (which holds no other group's object, by the grouping rule).
    """
    mask = _check_image_mask(image, mask)
    _check_target(target_side, multiple)
    _, height, width, _ = image.shape
    groups = object_groups(mask, lambda box: context_box(box, height, width, context, min_margin, square), distance)
    crops = []
    for part, (_, box) in enumerate(groups):
        crop, crop_mask, info = crop_box(image, mask, box, target_side, multiple, upscale)
        crops.append((crop, crop_mask, replace(info, part=part, parts=len(groups))))
    return crops


def _check_target(target_side, multiple):
    if multiple < 1 or target_side < multiple:
        raise ValueError(f"target_side ({target_side}) must be at least multiple ({multiple}), and multiple ≥ 1.")


def crop_box(image, mask, box, target_side=1024, multiple=16, upscale=True):
    """``(crop, crop_mask, CropInfo)`` of the photo's ``box`` (x0, y0, x1, y1), scaled and padded as
    ``crop_around_mask`` describes."""
    _, height, width, _ = image.shape
    x0, y0, x1, y1 = box
    side = (int(target_side) // multiple) * multiple
    scale = side / max(x1 - x0, y1 - y0)
    if not upscale:
        scale = min(scale, 1.0)
    resized_w = max(1, min(side, int(round((x1 - x0) * scale))))
    resized_h = max(1, min(side, int(round((y1 - y0) * scale))))
    padded_w = int(math.ceil(resized_w / multiple)) * multiple
    padded_h = int(math.ceil(resized_h / multiple)) * multiple
    info = CropInfo(x0, y0, x1, y1, height, width, resized_h, resized_w, padded_h, padded_w)
    return working_crop(image, mask, info)


# --------------------------------------------------------------------------------------------- several objects
def object_boxes(mask):
    """Bounding boxes ``(x0, y0, x1, y1)`` of the 8-connected objects of ``mask > 0`` (the union of the batch), in
    reading order; the same pixels ``mask_box`` bounds."""
    hit = (mask > 0).reshape(-1, mask.shape[-2], mask.shape[-1]).any(dim=0)
    count, _, stats, _ = cv2.connectedComponentsWithStats(hit.cpu().numpy().astype(np.uint8), connectivity=8)
    if count <= 1:
        raise ValueError("The mask is empty: mark the object to remove (mask value 1) before cropping.")
    boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:]]
    return sorted(boxes, key=lambda box: (box[1], box[0]))


def box_gap(box, boxes):
    """Pixels between ``box`` and each of ``boxes`` (one box or ``[N,4]``) along the axis where they are farthest
    apart (Chebyshev gap): 0 when they touch, negative when they overlap."""
    boxes = np.asarray(boxes)
    return np.max([box[0] - boxes[..., 2], boxes[..., 0] - box[2], box[1] - boxes[..., 3], boxes[..., 1] - box[3]],
                  axis=0)


def union_box(boxes):
    """The smallest box holding every box of ``boxes``."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def group_boxes(boxes, crop_box_of, distance=GROUP_DISTANCE):
    """Merge object ``boxes`` into groups whose crop boxes lie more than ``distance`` px apart (``GROUP_DISTANCE``).

    ``crop_box_of(box)`` is the crop box a group with bounding box ``box`` gets (its context). Returns
    ``[(group_box, crop_box)]`` in reading order (top to bottom, then left to right).
    """
    groups = [tuple(int(v) for v in box) for box in boxes]
    while True:
        crops = [tuple(crop_box_of(box)) for box in groups]
        parent = list(range(len(groups)))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        crop_array = np.array(crops, dtype=np.int64).reshape(-1, 4)
        for i in range(len(groups) - 1):
            for j in np.nonzero(box_gap(crops[i], crop_array[i + 1 :]) <= distance)[0] + i + 1:
                parent[root(int(j))] = root(i)
        members = {}
        for i in range(len(groups)):
            members.setdefault(root(i), []).append(groups[i])
        if len(members) == len(groups):
            break
        groups = [union_box(found) for found in members.values()]
    return sorted(zip(groups, crops), key=lambda pair: (pair[0][1], pair[0][0]))


def object_groups(mask, crop_box_of, distance=GROUP_DISTANCE):
    """The mask's objects (``object_boxes``) grouped by ``group_boxes``: ``[(group_box, crop_box)]``."""
    return group_boxes(object_boxes(mask), crop_box_of, distance)


def whole_image_size(height, width, short_side=1024, multiple=16):
    """The official OmniEraser demo's working size ``(h, w)`` for a ``height × width`` photo.

    gradio_control_lora_flux.py: the short side becomes ``short_side``, the long one ``int(long / short ·
    short_side)``; both are then floored to a multiple of ``multiple``.
    """
    if width < height:
        resized_w, resized_h = short_side, int(height / width * short_side)
    else:
        resized_w, resized_h = int(width / height * short_side), short_side
    return resized_h - resized_h % multiple, resized_w - resized_w % multiple


def resize_whole_image(image, mask, short_side=1024, multiple=16):
    """The whole photo at the official OmniEraser demo's working size (``whole_image_size``), bicubic like PIL.

    The demo resizes the photo twice (short side first, then to the floored size) and the mask once; both are
    resized once here, straight to the final size. Returns ``(image [B,h,w,3], mask [B,h,w], CropInfo)``; the
    CropInfo's box is the whole photo, so ``stitch`` scales the result back to the photo's size.
    """
    mask = _check_image_mask(image, mask)
    if short_side < multiple or multiple < 1:
        raise ValueError(f"short_side ({short_side}) must be at least multiple ({multiple}), and multiple ≥ 1.")
    _, height, width, _ = image.shape
    resized_h, resized_w = whole_image_size(height, width, short_side, multiple)
    if min(resized_h, resized_w) < multiple:
        raise ValueError(f"A {width}x{height} photo is too elongated for a {short_side} px short side: its sides "
                         f"would floor to {resized_w}x{resized_h}.")
    info = CropInfo(0, 0, width, height, height, width, resized_h, resized_w, resized_h, resized_w, resample="bicubic")
    return working_crop(image, mask, info)


def working_crop(image, mask, info, image_pad="replicate"):
    """``(crop, crop_mask, info)``: the box of ``info`` scaled to its working size and padded (``image_pad``: the
    edge pixels, "replicate", or a constant value; the mask with 0)."""
    crop, crop_mask = layout.crop_resize_pad(image, mask, (info.x0, info.y0, info.x1, info.y1),
                                             (info.resized_height, info.resized_width),
                                             (info.padded_height, info.padded_width), image_pad, info.resample)
    return crop, crop_mask, info


def crop_pixels(image, info):
    """The box of ``info`` cut from ``image`` and scaled to the working size, unpadded: what the eraser was given."""
    box = image[:, info.y0 : info.y1, info.x0 : info.x1, :].movedim(-1, 1).float()
    return layout.resize_pixels(box, info.resized_height, info.resized_width, info.resample).clamp(0, 1).movedim(1, -1)


def gaussian_kernel(radius):
    """1-D Gaussian with standard deviation ``radius`` (as PIL's GaussianBlur), cut at 3σ so its support is finite."""
    half = int(math.ceil(3 * radius))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / radius) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_blur(maps_bchw, sigma):
    """Separable Gaussian blur of ``[B,C,H,W]``, edges replicated (a mask at the photo's edge stays 1 there).

    Zero stays zero farther than ``ceil(3σ)`` px from any non-zero value.
    """
    if sigma <= 0:
        return maps_bchw
    kernel = gaussian_kernel(sigma).to(maps_bchw)
    half, channels = kernel.numel() // 2, maps_bchw.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(maps_bchw, (half, half, 0, 0), mode="replicate"), rows, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, half, half), mode="replicate"), cols, groups=channels)


def _zero_small(alpha):
    # Float round-off leaves ~1e-9 where the kernel never reached a mask pixel; those must stay untouched.
    return torch.where(alpha < 1e-6, torch.zeros_like(alpha), alpha.clamp(max=1.0))


def feather_mask(mask, grow=0, blur_radius=5.0, scale=1.0):
    """Paste-back alpha: ``mask`` dilated by ``grow`` px (square), then Gaussian-blurred with σ = ``blur_radius``.

    With ``scale`` ≠ 1 both are applied to the mask resized by ``scale`` (``int(side · scale)``, as SmartEraser's
    demo resizes it) and the alpha is resized back. Zero stays exactly zero farther than about
    ``(grow + ceil(3σ) + 1) / scale`` px from the mask.
    """
    alpha = mask[:, None].to(torch.float32)
    height, width = alpha.shape[-2:]
    if scale != 1.0:
        alpha = layout.resize_pixels(alpha, max(1, int(height * scale)), max(1, int(width * scale)))
    if grow > 0:  # a square dilation, as two 1-D ones
        alpha = F.max_pool2d(alpha, kernel_size=(1, 2 * grow + 1), stride=1, padding=(0, grow))
        alpha = F.max_pool2d(alpha, kernel_size=(2 * grow + 1, 1), stride=1, padding=(grow, 0))
    alpha = gaussian_blur(alpha, blur_radius)
    if scale != 1.0:
        alpha = layout.resize_pixels(alpha, height, width)
    return _zero_small(alpha)[:, 0]


def border_alpha(info, fraction=BORDER_FEATHER_FRACTION):
    """``[box_h, box_w]``: 1 inside the crop box, ramping to 0 at the box's border where it is not the photo's edge.

    The ramp is ``fraction`` × the box's longer side wide; the border pixel itself gets ``0.5 / width``.
    """
    width = max(1.0, fraction * max(info.box_height, info.box_width))

    def ramp(length, open_start, open_end):
        position = torch.arange(length, dtype=torch.float32)
        weight = torch.ones(length)
        if open_start:
            weight = torch.minimum(weight, (position + 0.5) / width)
        if open_end:
            weight = torch.minimum(weight, (length - position - 0.5) / width)
        return weight

    rows = ramp(info.box_height, info.y0 > 0, info.y1 < info.image_height)
    cols = ramp(info.box_width, info.x0 > 0, info.x1 < info.image_width)
    return rows[:, None] * cols[None, :]


def change_map(seen, result, threshold=CHANGE_THRESHOLD, smooth_sigma=CHANGE_SMOOTH_SIGMA,
               open_radius=CHANGE_OPEN_RADIUS, min_area=CHANGE_MIN_AREA):
    """``[B,h,w]`` bool: where ``result`` differs from ``seen`` (both ``[B,h,w,3]``) by more than round-trip noise.

    The smoothed signed difference must pass ``threshold`` (or half of it, connected to a pixel that passes it);
    the map is then opened with radius ``open_radius`` and regions under ``min_area`` px are dropped.
    """
    difference = (result.float() - seen.float()).movedim(-1, 1)
    strength = gaussian_blur(difference, smooth_sigma).abs().amax(dim=1).cpu().numpy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_radius + 1,) * 2) if open_radius > 0 else None
    maps = []
    for item in strength:
        weak = (item > threshold / 2).astype(np.uint8)
        count, labels = cv2.connectedComponents(weak, connectivity=8)
        seeded = np.zeros(count, bool)
        seeded[np.unique(labels[item > threshold])] = True
        seeded[0] = False
        changed = seeded[labels].astype(np.uint8)
        if kernel is not None:
            changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, kernel)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(changed, connectivity=8)
        large = stats[:, cv2.CC_STAT_AREA] >= min_area
        large[0] = False
        maps.append(torch.from_numpy(large[labels]))
    return torch.stack(maps)


def uncrop(result_crop, info):
    """Remove the padding from an eraser's output and scale it back to the crop box (``[B,box_h,box_w,3]``)."""
    _check_result_size(result_crop, info)
    patch = result_crop[:, : info.resized_height, : info.resized_width, :].movedim(-1, 1).to(torch.float32)
    return layout.resize_pixels(patch, info.box_height, info.box_width, info.resample).clamp(0, 1).movedim(1, -1)


def _check_result_size(result_crop, info):
    if tuple(result_crop.shape[1:3]) != (info.padded_height, info.padded_width):
        raise ValueError(
            f"The result is {result_crop.shape[2]}x{result_crop.shape[1]} but the crop was "
            f"{info.padded_width}x{info.padded_height}; stitch needs the eraser's output at the crop's size."
        )


def _canvas(info, grow, blur_radius):
    """The box of ``info`` grown by the feather's reach, clipped to the photo: ``(y0, y1, x0, x1)`` and the box
    inside it. Feathering there instead of on the whole photo gives the same alpha inside the box."""
    reach = int(math.ceil((grow + math.ceil(3 * blur_radius) + 2) / info.feather_scale))
    y0, x0 = max(0, info.y0 - reach), max(0, info.x0 - reach)
    y1, x1 = min(info.image_height, info.y1 + reach), min(info.image_width, info.x1 + reach)
    inner = (slice(None), slice(info.y0 - y0, info.y1 - y0), slice(info.x0 - x0, info.x1 - x0))
    return (y0, y1, x0, x1), inner


def paste_alpha(original_image, result_crop, info, mask, paste_back="change-aware", grow=0, blur_radius=5.0,
                change_threshold=CHANGE_THRESHOLD, reference=None, box_only=False):
    """The alpha ``[B,box_h,box_w]`` with which ``stitch`` pastes the result into the crop box (see ``PASTE_BACK``).

    The change map compares the result with ``reference`` (default ``original_image``), the photo the eraser's
    crop was cut from. ``box_only``: feather only the mask inside the crop box, as if it were 0 outside (one part
    of a split photo: a neighbouring group's mask cannot feather into it).
    """
    if paste_back not in PASTE_BACK:
        raise ValueError(f"paste_back must be one of {PASTE_BACK}, got {paste_back!r}.")
    if paste_back == "whole crop":
        return border_alpha(info)[None]
    (y0, y1, x0, x1), inner = _canvas(info, grow, blur_radius)
    around = mask[:, y0:y1, x0:x1]
    if box_only:
        around = torch.zeros_like(around)
        around[inner] = mask[:, info.y0 : info.y1, info.x0 : info.x1]
    alpha = feather_mask(around, grow, blur_radius, info.feather_scale)[inner]
    if paste_back == "mask":
        return alpha
    _check_result_size(result_crop, info)
    seen = crop_pixels(original_image if reference is None else reference, info)
    result = result_crop[:, : info.resized_height, : info.resized_width, :]
    changed = change_map(seen, result, change_threshold).float()[:, None]
    changed = layout.resize_pixels(changed, info.box_height, info.box_width)[:, 0] > 0.5
    canvas = torch.zeros(changed.shape[0], y1 - y0, x1 - x0)
    canvas[inner] = changed.float()
    changed_alpha = feather_mask(canvas, grow, blur_radius, info.feather_scale)[inner] * border_alpha(info)
    return torch.maximum(alpha, changed_alpha)


def _check_photo_size(image, info, what="original"):
    if (info.image_height, info.image_width) != tuple(image.shape[1:3]):
        raise ValueError(
            f"The crop was taken from a {info.image_width}x{info.image_height} image but the {what} given is "
            f"{image.shape[2]}x{image.shape[1]}."
        )


def stitch(original_image, result_crop, info, mask, paste_back="change-aware", grow=0, blur_radius=5.0,
           change_threshold=CHANGE_THRESHOLD, reference=None):
    """Paste ``result_crop`` back into ``original_image`` through the alpha ``paste_back`` names (``PASTE_BACK``).

    ``mask`` is the full-size mask (1 = removed); ``grow`` and ``blur_radius`` feather it (and the change map)
    in the pixels of ``info.feather_scale``. Every pixel where the alpha is 0, or where the scaled-back result
    equals the input, is returned bit-identical to ``original_image``. SmartEraser's demo: ``paste_back="mask",
    grow=0, blur_radius=5``. ``reference``: the photo the crop was cut from, when ``original_image`` is already
    the result of earlier pastes (as in ``stitch_parts``); the change map is taken against it.
    """
    mask = _check_image_mask(original_image, mask)
    _check_photo_size(original_image, info)
    if reference is not None:
        _check_photo_size(reference, info, "reference photo")
    photo = layout.match_batches(original_image, result_crop, mask)[0]  # the photo at the batches' common size
    patch = uncrop(result_crop, info)
    alpha = paste_alpha(original_image, result_crop, info, mask, paste_back, grow, blur_radius, change_threshold,
                        reference)
    return _paste_into(photo.clone(), patch, alpha, info)


def _paste_into(out, patch, alpha, info):
    """Blend ``patch`` ``[B,box_h,box_w,3]`` into the crop box of ``out`` (in place, returned) through ``alpha``
    ``[B,box_h,box_w]`` (batches 1 or out's); pixels where the alpha is 0 keep their bits."""
    batch = out.shape[0]
    patch = patch.expand(batch, -1, -1, -1)
    alpha = alpha.expand(batch, -1, -1).unsqueeze(-1)
    region = out[:, info.y0 : info.y1, info.x0 : info.x1, :]
    blended = torch.lerp(region, patch.to(region.dtype), alpha.to(region.dtype))
    out[:, info.y0 : info.y1, info.x0 : info.x1, :] = torch.where(alpha > 0, blended, region)
    return out


def part_runs(infos):
    """``[(start, end)]``: the slices of ``infos`` that are the parts of one photo each (parts 0 … parts-1 in a
    row, as the crop nodes make them), or a ValueError saying where the sequence breaks."""
    runs, start = [], 0
    while start < len(infos):
        parts = infos[start].parts
        run = infos[start : start + parts]
        if [info.part for info in run] != list(range(parts)) or any(info.parts != parts for info in run):
            found = ", ".join(f"{info.part + 1}/{info.parts}" for info in infos)
            raise ValueError(
                f"The crop infos must come in whole runs (part 1/N … N/N of each photo, in order), as the crop node "
                f"outputs them; got {found}. Connect every erased crop of a split, and keep the eraser chain one "
                "item per crop.")
        runs.append((start, start + parts))
        start += parts
    return runs


def stitch_parts(original_image, results, infos, mask, paste_back="change-aware", grow=0, blur_radius=5.0,
                 change_threshold=CHANGE_THRESHOLD, check_interrupt=None):
    """Paste the erased crops of one photo's parts into it in turn, each into the result of the one before.

    Each paste is ``stitch``'s, into one copy of the photo, with the mask kept to that crop's box (a neighbouring
    group's mask cannot feather into it). The change map of every crop is taken against the photo the crops were cut
    from, not against the photo after the earlier pastes: the crop node cuts every crop before any is erased, so
    where an earlier paste erased something, a later crop's output still shows the photo as it was, and comparing it
    with the erased photo would count that as the later eraser's change and paste the object back. With the grouping
    rule (``GROUP_DISTANCE``) the boxes never overlap and the two agree; the rule decides for overlapping boxes.
    Every pixel outside all crop boxes is returned bit-identical.
    """
    if len(results) != len(infos):
        raise ValueError(f"Got {len(results)} erased crops for {len(infos)} crop infos: the stitch needs the "
                         "eraser's output of every crop, one per crop info.")
    mask = _check_image_mask(original_image, mask)
    if not results:
        return original_image
    out = layout.match_batches(original_image, mask, *results)[0].clone()
    for result, info in zip(results, infos):
        if check_interrupt is not None:
            check_interrupt()
        _check_photo_size(original_image, info)
        patch = uncrop(result, info)
        alpha = paste_alpha(original_image, result, info, mask, paste_back, grow, blur_radius, change_threshold,
                            box_only=info.parts > 1)
        _paste_into(out, patch, alpha, info)
    return out
