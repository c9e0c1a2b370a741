"""ComfyUI's IMAGE/MASK layout in one place: validation, batch broadcasting, binarisation, boxes, resizing.

Layouts: IMAGE is float ``[B,H,W,C]`` in [0, 1]; MASK is float ``[B,H,W]`` in [0, 1] with 1 = remove. Per-item
OpenCV work uses numpy ``H×W×3`` uint8 RGB images and ``H×W`` masks.

**The one mask threshold.** A pixel is *inside* a mask when its value is at least half of full scale:

- bool masks are taken as they are;
- float masks (ComfyUI MASK, in [0, 1]): ``value >= 0.5``, the rule of diffusers' ``VaeImageProcessor.binarize``
  that the SD-inpainting and FLUX pipelines apply;
- integer masks: full scale is 1 when every value is 0 or 1 (a {0, 1} label mask), 255 when the largest value
  fits in 8 bits (a mask image: ``value >= 128``, exactly where ``value / 255 >= 0.5``), otherwise the dtype's
  maximum. A uint8 {0, 1} mask is therefore the object it marks, never empty, and an 8-bit mask image gives
  the same pixels as its float MASK.

Every function accepts numpy arrays or torch tensors where both make sense and returns the same kind.
"""
from __future__ import annotations

import cv2
import numpy as np

MASK_THRESHOLD = 0.5  # of full scale; see the module docstring


def _is_torch(value):
    return type(value).__module__.startswith("torch")


def _integer_full_scale(largest, dtype_max):
    """Full scale of an integer mask whose largest value is ``largest`` (see the module docstring)."""
    if largest <= 1:
        return 1
    return 255 if largest <= 255 else dtype_max


def binarize(mask, ndim=None):
    """Bool mask under the one threshold (module docstring); a new array/tensor of the same shape.

    ``ndim``, when given, is the number of dimensions the mask must have (2 for one ``H×W`` mask)."""
    if ndim is not None and mask.ndim != ndim:
        what = "height x width" if ndim == 2 else f"{ndim} dimensions"
        raise ValueError(f"expected a {ndim}-D mask ({what}), got shape {tuple(mask.shape)}")
    if _is_torch(mask):
        import torch

        if mask.dtype == torch.bool:
            return mask.clone()
        if mask.is_floating_point():
            return mask >= MASK_THRESHOLD
        largest = int(mask.max()) if mask.numel() else 0
        return mask >= MASK_THRESHOLD * _integer_full_scale(largest, torch.iinfo(mask.dtype).max)
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.copy()
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= MASK_THRESHOLD
    if np.issubdtype(mask.dtype, np.integer):
        largest = int(mask.max()) if mask.size else 0
        return mask >= MASK_THRESHOLD * _integer_full_scale(largest, np.iinfo(mask.dtype).max)
    raise ValueError(f"mask dtype {mask.dtype} is neither bool, integer nor float")


# --- IMAGE / MASK batches (torch) -------------------------------------------------------------------

def check_image(image, channels=(3,)):
    """An IMAGE ``[B,H,W,C]`` with ``C`` in ``channels``, else ValueError naming the shape found."""
    if image.ndim != 4 or image.shape[-1] not in channels:
        wanted = " or ".join(str(c) for c in channels)
        raise ValueError(f"image must be [batch, height, width, {wanted}], got shape {tuple(image.shape)}")
    return image


def as_mask_batch(mask):
    """A MASK as ``[B,H,W]``: a single ``[H,W]`` mask becomes a batch of one."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0) if _is_torch(mask) else mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be [batch, height, width], got shape {tuple(mask.shape)}")
    return mask


def match_batches(*batches):
    """Tensors whose first dimension is equal or 1, expanded to the common batch size (views, no copies)."""
    sizes = [b.shape[0] for b in batches]
    common = max(sizes)
    if any(size not in (1, common) for size in sizes):
        raise ValueError(f"batches of {' and '.join(str(s) for s in sizes)} do not match; use equal batches or a "
                         "batch of 1")
    return tuple(b if b.shape[0] == common else b.expand(common, *b.shape[1:]) for b in batches)


def check_mask_matches_image(image, mask):
    """Validate a MASK [B,H,W] against an IMAGE [B,H,W,C]; return the mask, a batch of 1 broadcast.

    Sizes must be equal; batches equal or one of them 1. Raises ValueError naming both sizes otherwise.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be [batch, height, width, channels], got shape {tuple(image.shape)}")
    mask = as_mask_batch(mask)
    image_hw, mask_hw = tuple(image.shape[1:3]), tuple(mask.shape[1:3])
    if image_hw != mask_hw:
        raise ValueError(f"mask is {mask_hw[1]}x{mask_hw[0]} (width x height) but the image is "
                         f"{image_hw[1]}x{image_hw[0]}; resize the mask to the image first")
    image_batch, mask_batch = image.shape[0], mask.shape[0]
    if image_batch != mask_batch and 1 not in (image_batch, mask_batch):
        raise ValueError(f"mask batch of {mask_batch} does not match image batch of {image_batch}; "
                         "use equal batches or a batch of 1")
    if mask_batch == 1 and image_batch > 1:
        mask = mask.expand(image_batch, -1, -1)
    return mask


# --- boxes ------------------------------------------------------------------------------------------

def mask_box(mask, pad=0):
    """``(x0, y0, x1, y1)`` (end-exclusive) of the non-zero pixels, grown by ``pad`` within the image; None when
    the mask is empty. A batch ``[..., H, W]`` gives the box of the union of its items.

    Binarise first (``binarize``) to box only what is inside the mask; raw soft masks box every painted pixel."""
    height, width = mask.shape[-2:]
    if _is_torch(mask):
        hit = (mask != 0).reshape(-1, height, width).any(dim=0)
        rows = hit.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            return None
        cols = hit.any(dim=0).nonzero().flatten()
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    else:
        mask = np.asarray(mask)
        hit = mask if mask.ndim == 2 else mask.reshape(-1, height, width).any(axis=0)
        hit = hit.view(np.uint8) if hit.dtype == bool else (hit != 0).view(np.uint8)
        x, y, w, h = cv2.boundingRect(np.ascontiguousarray(hit))  # the fastest extent of a 2-D uint8 mask
        if not w:
            return None
        x0, y0, x1, y1 = x, y, x + w, y + h
    return max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)


# --- resizing ---------------------------------------------------------------------------------------

def latent_mask(mask, height, width, cover="nearest"):
    """A MASK ``[B,H,W]`` (or ``[H,W]``) binarised and brought to a ``height × width`` grid: float ``[B,1,h,w]``.

    ``cover="nearest"``: nearest-neighbour, as diffusers' inpainting pipelines downsample the mask;
    ``cover="any"``: a grid cell is inside when any of its pixels is (no part of the object escapes)."""
    import torch
    import torch.nn.functional as F

    binary = binarize(as_mask_batch(mask)).to(torch.float32).unsqueeze(1)
    if cover == "nearest":
        return F.interpolate(binary, size=(height, width), mode="nearest")
    if cover == "any":
        return F.adaptive_max_pool2d(binary, (height, width))
    raise ValueError(f"cover must be 'nearest' or 'any', got {cover!r}")


def resize_pixels(pixels_bchw, height, width, mode="bilinear"):
    """Resize ``[B,C,H,W]`` pixels (``mode`` "bilinear" or "bicubic"), antialiased when shrinking as PIL is; a copy
    when the size is unchanged."""
    import torch.nn.functional as F

    if tuple(pixels_bchw.shape[-2:]) == (height, width):
        return pixels_bchw.clone()
    shrinking = height < pixels_bchw.shape[-2] or width < pixels_bchw.shape[-1]
    return F.interpolate(pixels_bchw, size=(height, width), mode=mode, align_corners=False, antialias=shrinking)


def crop_resize_pad(image, mask, box, resized_hw, padded_hw, image_pad="replicate", mode="bilinear"):
    """Cut ``box`` = (x0, y0, x1, y1) out of IMAGE ``[B,H,W,C]`` and MASK ``[B,H,W]``, resize it to ``resized_hw``
    (``resize_pixels`` with ``mode``, clamped to [0, 1]) and pad right/bottom up to ``padded_hw``.

    The image is padded with its edge pixels (``image_pad="replicate"``) or a constant value; the mask with 0.
    Returns ``(crop [B,h,w,C], crop_mask [B,h,w])``, contiguous."""
    import torch.nn.functional as F

    x0, y0, x1, y1 = box
    (resized_h, resized_w), (padded_h, padded_w) = resized_hw, padded_hw
    padding = (0, padded_w - resized_w, 0, padded_h - resized_h)
    crop = resize_pixels(image[:, y0:y1, x0:x1, :].movedim(-1, 1).float(), resized_h, resized_w, mode).clamp(0, 1)
    if image_pad == "replicate":
        crop = F.pad(crop, padding, mode="replicate")
    else:
        crop = F.pad(crop, padding, value=float(image_pad))
    crop_mask = resize_pixels(mask[:, None, y0:y1, x0:x1].float(), resized_h, resized_w, mode).clamp(0, 1)
    crop_mask = F.pad(crop_mask, padding, value=0.0)
    return crop.movedim(1, -1).contiguous(), crop_mask[:, 0].contiguous()


def _interpolation(width, height, shape):
    """Area averaging when the picture shrinks (in pixel count), bilinear when it grows."""
    return cv2.INTER_AREA if width * height < shape[0] * shape[1] else cv2.INTER_LINEAR


def resize_image(rgb, width, height):
    """uint8 ``H×W×C`` image to ``width × height`` (area averaging when shrinking, bilinear when growing)."""
    return cv2.resize(rgb, (width, height), interpolation=_interpolation(width, height, rgb.shape))


def resize_mask(mask, width, height):
    """Bool ``H×W`` mask to ``width × height``: resized as coverage (like ``resize_image``), then binarised."""
    coverage = cv2.resize(binarize(mask, ndim=2).astype(np.float32), (width, height),
                          interpolation=_interpolation(width, height, mask.shape))
    return binarize(coverage)
