"""Crop a photo around its mask for an eraser, and stitch the result back.

Erasers run at a fixed working size (OmniEraser 1024 px, SmartEraser 512 px); photos come in any size.
``crop_around_mask`` cuts the mask's bounding box plus context, resizes it so its longer side is the target
side (floored to a multiple of ``multiple``) and pads to that multiple. ``stitch`` undoes the resize and
pastes the result through a feathered copy of the mask: every pixel whose feathered alpha is 0 is the input
pixel, bit for bit, so nothing outside the mask changes colour.

Layouts follow ComfyUI: IMAGE float32 ``[B,H,W,3]`` in [0, 1], MASK float32 ``[B,H,W]`` in [0, 1], 1 = remove.
"""
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropInfo:
    """Where a crop came from and how it was scaled; all a stitch needs besides the original image."""

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

    @property
    def box_height(self):
        return self.y1 - self.y0

    @property
    def box_width(self):
        return self.x1 - self.x0


def _check_image_mask(image, mask):
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"Expected an IMAGE of shape [B,H,W,3], got {tuple(image.shape)}.")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"Expected a MASK of shape [B,H,W], got {tuple(mask.shape)}.")
    if tuple(mask.shape[1:]) != tuple(image.shape[1:3]):
        raise ValueError(
            f"The mask is {mask.shape[2]}x{mask.shape[1]} but the image is {image.shape[2]}x{image.shape[1]}; "
            "they must have the same size."
        )
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(
            f"The mask batch ({mask.shape[0]}) must be 1 or match the image batch ({image.shape[0]})."
        )
    return mask


def mask_box(mask, threshold=0.0):
    """Bounding box ``(x0, y0, x1, y1)`` (end-exclusive) of ``mask > threshold`` over the whole batch."""
    hit = (mask > threshold).reshape(-1, mask.shape[-2], mask.shape[-1]).any(dim=0)
    rows = torch.nonzero(hit.any(dim=1)).flatten()
    cols = torch.nonzero(hit.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("The mask is empty: mark the object to remove (mask value 1) before cropping.")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def context_box(box, image_height, image_width, context=0.5, min_margin=0, square=False):
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


def _resize(pixels_bchw, height, width):
    if tuple(pixels_bchw.shape[-2:]) == (height, width):
        return pixels_bchw.clone()
    shrinking = height < pixels_bchw.shape[-2] or width < pixels_bchw.shape[-1]
    return F.interpolate(pixels_bchw, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)


def crop_around_mask(image, mask, context=0.5, target_side=1024, multiple=16, min_margin=0, square=False, upscale=True):
    """Crop ``image``/``mask`` around the mask with context and scale the crop to the eraser's working size.

    The box is the mask's bounding box (over the batch) grown by ``context`` × its longer side on each side
    (clipped to the photo). It is resized so its longer side is ``target_side`` floored to a multiple of
    ``multiple`` (with ``upscale=False`` a smaller box keeps its size), then padded on the right/bottom (edge pixels; mask 0) up to multiples of ``multiple``.
    Returns ``(crop_image [B,h,w,3], crop_mask [B,h,w], CropInfo)``.
    """
    mask = _check_image_mask(image, mask)
    if multiple < 1 or target_side < multiple:
        raise ValueError(f"target_side ({target_side}) must be at least multiple ({multiple}), and multiple ≥ 1.")
    _, height, width, _ = image.shape
    x0, y0, x1, y1 = context_box(mask_box(mask), height, width, context, min_margin, square)
    side = (int(target_side) // multiple) * multiple
    scale = side / max(x1 - x0, y1 - y0)
    if not upscale:
        scale = min(scale, 1.0)
    resized_w = max(1, min(side, int(round((x1 - x0) * scale))))
    resized_h = max(1, min(side, int(round((y1 - y0) * scale))))
    padded_w = int(math.ceil(resized_w / multiple)) * multiple
    padded_h = int(math.ceil(resized_h / multiple)) * multiple

    crop = image[:, y0:y1, x0:x1, :].movedim(-1, 1)
    crop = _resize(crop, resized_h, resized_w).clamp(0, 1)
    crop = F.pad(crop, (0, padded_w - resized_w, 0, padded_h - resized_h), mode="replicate")
    crop_mask = _resize(mask[:, None, y0:y1, x0:x1], resized_h, resized_w).clamp(0, 1)
    crop_mask = F.pad(crop_mask, (0, padded_w - resized_w, 0, padded_h - resized_h), value=0.0)
    info = CropInfo(x0, y0, x1, y1, height, width, resized_h, resized_w, padded_h, padded_w)
    return crop.movedim(1, -1).contiguous(), crop_mask[:, 0].contiguous(), info


def gaussian_kernel(radius):
    """1-D Gaussian with standard deviation ``radius`` (as PIL's GaussianBlur), cut at 3σ so its support is finite."""
    half = int(math.ceil(3 * radius))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / radius) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def feather_mask(mask, grow=0, blur_radius=5.0):
    """Paste-back alpha: ``mask`` dilated by ``grow`` px (square), then Gaussian-blurred with σ = ``blur_radius``.

    Zero stays exactly zero farther than ``grow + ceil(3σ)`` px from the mask.
    """
    alpha = mask[:, None].to(torch.float32)
    if grow > 0:
        alpha = F.max_pool2d(alpha, kernel_size=2 * grow + 1, stride=1, padding=grow)
    if blur_radius > 0:
        kernel = gaussian_kernel(blur_radius)
        half = kernel.numel() // 2
        alpha = F.conv2d(F.pad(alpha, (half, half, 0, 0)), kernel.view(1, 1, 1, -1))
        alpha = F.conv2d(F.pad(alpha, (0, 0, half, half)), kernel.view(1, 1, -1, 1))
    # Float round-off leaves ~1e-9 where the kernel never reached a mask pixel; those must stay untouched.
    alpha = torch.where(alpha < 1e-6, torch.zeros_like(alpha), alpha.clamp(max=1.0))
    return alpha[:, 0]


def uncrop(result_crop, info):
    """Remove the padding from an eraser's output and scale it back to the crop box (``[B,box_h,box_w,3]``)."""
    if tuple(result_crop.shape[1:3]) != (info.padded_height, info.padded_width):
        raise ValueError(
            f"The result is {result_crop.shape[2]}x{result_crop.shape[1]} but the crop was "
            f"{info.padded_width}x{info.padded_height}; stitch needs the eraser's output at the crop's size."
        )
    patch = result_crop[:, : info.resized_height, : info.resized_width, :].movedim(-1, 1).to(torch.float32)
    return _resize(patch, info.box_height, info.box_width).clamp(0, 1).movedim(1, -1)


def stitch(original_image, result_crop, info, mask, grow=0, blur_radius=5.0):
    """Paste ``result_crop`` back into ``original_image`` through the feathered ``mask``.

    ``mask`` is the full-size mask (1 = removed). The alpha is ``feather_mask(mask, grow, blur_radius)``,
    limited to the crop box; every pixel where it is 0 is returned bit-identical to ``original_image``.
    SmartEraser's demo uses ``grow=0, blur_radius=5``.
    """
    mask = _check_image_mask(original_image, mask)
    if (info.image_height, info.image_width) != tuple(original_image.shape[1:3]):
        raise ValueError(
            f"The crop was taken from a {info.image_width}x{info.image_height} image but the original given is "
            f"{original_image.shape[2]}x{original_image.shape[1]}."
        )
    batch = max(original_image.shape[0], result_crop.shape[0], mask.shape[0])
    for name, count in (("image", original_image.shape[0]), ("result", result_crop.shape[0]), ("mask", mask.shape[0])):
        if count not in (1, batch):
            raise ValueError(f"The {name} batch ({count}) must be 1 or {batch}.")
    patch = uncrop(result_crop, info).expand(batch, -1, -1, -1)
    alpha = feather_mask(mask, grow, blur_radius)[:, info.y0 : info.y1, info.x0 : info.x1]
    alpha = alpha.expand(batch, -1, -1).unsqueeze(-1)

    out = original_image.expand(batch, -1, -1, -1).clone()
    region = out[:, info.y0 : info.y1, info.x0 : info.x1, :]
    blended = torch.lerp(region, patch.to(region.dtype), alpha.to(region.dtype))
    out[:, info.y0 : info.y1, info.x0 : info.x1, :] = torch.where(alpha > 0, blended, region)
    return out
