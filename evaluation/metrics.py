"""Full-reference metrics that need no weights: PSNR, SSIM, and PSNR inside / outside the (dilated) mask.

Images are uint8 ``H×W×3`` RGB arrays (the files as saved); masks bool ``H×W`` (True = removed object). Values are
computed in float64 on the 0-255 scale.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

PEAK = 255.0
# SSIM as Wang et al. 2004 define it ("Image quality assessment: from error visibility to structural similarity",
# IEEE TIP 13(4), §III-C): an 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255; the mean of the
# SSIM map over the pixels whose window lies inside the image, averaged over the three channels (as skimage's
# structural_similarity with gaussian_weights=True, use_sample_covariance=False, and torchmetrics' SSIM give).
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _check_pair(result, target):
    result, target = np.asarray(result), np.asarray(target)
    if result.shape != target.shape:
        raise ValueError(f"the result is {_size(result)} but the reference is {_size(target)}")
    if result.ndim != 3 or result.shape[2] != 3:
        raise ValueError(f"images must be H×W×3 RGB, got shape {result.shape}")
    return result.astype(np.float64), target.astype(np.float64)


def _size(array):
    return f"{array.shape[1]}×{array.shape[0]}" if array.ndim >= 2 else str(array.shape)


def psnr(result, target, region=None):
    """Peak signal-to-noise ratio in dB over all pixels or those of ``region`` (bool H×W); ``inf`` when they are
    identical, ``nan`` when the region is empty."""
    result, target = _check_pair(result, target)
    return _psnr((result - target) ** 2, region)


def _psnr(squared, region=None):
    """PSNR from the float64 squared error ``H×W×3`` (see ``psnr``)."""
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != squared.shape[:2]:
            raise ValueError(f"the mask is {_size(region)} but the images are {_size(squared)}")
        if not region.any():
            return math.nan
        squared = squared[region]
    mse = float(squared.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK * PEAK / mse)


def ssim(result, target):
    """Structural similarity (Wang et al. 2004; see ``SSIM_*``): 1 for identical images; ``nan`` for images too
    small to hold one whole window (11×11)."""
    return _ssim(*_check_pair(result, target))


def _ssim(result, target):
    """SSIM of two float64 ``H×W×3`` images (see ``ssim``)."""
    pad = SSIM_WINDOW // 2
    if min(result.shape[:2]) <= 2 * pad:
        return math.nan
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2

    def blur(image):
        return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(result), blur(target)
    var_x = blur(result * result) - mu_x * mu_x
    var_y = blur(target * target) - mu_y * mu_y
    cov = blur(result * target) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def dilate(mask, pixels):
    """``mask`` grown by ``pixels`` (a disc), so the seam an eraser blends around the object counts as inside."""
    mask = np.asarray(mask, bool)
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def pixel_metrics(result, target, mask=None, dilation=0):
    """``{"psnr", "ssim"}`` and, with a mask, ``"psnr_masked"`` (inside the mask grown by ``dilation`` px: the
    filled hole) and ``"psnr_unmasked"`` (everything else: what the eraser should have left alone)."""
    result, target = _check_pair(result, target)
    squared = (result - target) ** 2
    values = {"psnr": _psnr(squared), "ssim": _ssim(result, target)}
    if mask is not None:
        inside = dilate(mask, dilation)
        values["psnr_masked"] = _psnr(squared, inside)
        values["psnr_unmasked"] = _psnr(squared, ~inside)
    return values
