"""Robust image reading for dataset tools: any photo a user has becomes RGB uint8, or a skip reason.

Batch jobs must not die on one bad file, so the readers here return ``(array, None)`` or
``(None, reason)`` where ``reason`` is a short fixed phrase (the run summary counts files per reason).
"""
import io
import warnings

import numpy as np
from PIL import Image

from ..erasers.layout import binarize
from .sources import is_url, read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

UNREADABLE = "unreadable image"
TRUNCATED = "truncated image"
UNSUPPORTED = "unsupported pixel format"

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open_fully(path, read=False):
    """``(image, None, bytes)`` or ``(None, reason, None)``: decode the whole file (a local path or an fsspec URL)
    now, so truncated files fail here instead of later. ``bytes``: the file's content when ``read`` (the file is
    then read once and decoded from memory), else None for a local file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            data = read_bytes(path) if read or is_url(path) else None
            image = Image.open(path if data is None else io.BytesIO(data))
            image.load()
        return image, None, data
    except FileNotFoundError:
        return None, UNREADABLE, None
    except OSError as error:
        truncated = "truncated" in str(error).lower() or "broken data" in str(error).lower()
        return None, TRUNCATED if truncated else UNREADABLE, None
    except (ValueError, SyntaxError, Image.DecompressionBombError):
        return None, UNREADABLE, None


def _to_uint8_gray(image):
    """16-bit / 32-bit integer greyscale → 8-bit, scaled by the format's range (not clipped)."""
    values = np.asarray(image)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return np.clip(np.round(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def pil_to_rgb(image):
    """Any PIL image → uint8 H×W×3 RGB (alpha dropped, greyscale replicated, 16-bit scaled)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _to_uint8_gray(image)
        return np.repeat(gray[..., None], 3, axis=2), None
    if image.mode == "F":
        return None, UNSUPPORTED
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), None


def read_rgb(path):
    """``(uint8 H×W×3, None)`` or ``(None, reason)`` for unreadable/truncated/unsupported files."""
    image, reason, _ = _open_fully(path)
    return (None, reason) if image is None else pil_to_rgb(image)


def read_rgb_and_bytes(path):
    """``read_rgb`` and the file's bytes, the file read once: ``(rgb, None, bytes)`` or ``(None, reason, bytes or
    None)``."""
    image, reason, data = _open_fully(path, read=True)
    return (None, reason, data) if image is None else (*pil_to_rgb(image), data)


def read_mask(path):
    """Binary mask from any image file: its luminance (a 16-bit value scaled to 8 bits) under the one mask
    threshold of ``erasers.layout.binarize`` (≥ 128 of 255, or 1 in a mask stored as 0 and 1).

    A mask whose only information is transparency (opaque object, transparent elsewhere) is read from its
    alpha channel. Returns ``(bool H×W, None)`` or ``(None, reason)``.
    """
    image, reason, _ = _open_fully(path)
    if image is None:
        return None, reason
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _to_uint8_gray(image)
    elif image.mode == "F":
        return None, UNSUPPORTED
    else:
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA"):
            alpha = np.asarray(image.getchannel("A"))
            luminance = np.asarray(image.convert("L"))
            gray = alpha if alpha.min() < 255 and luminance.min() == luminance.max() else luminance
        else:
            gray = np.asarray(image.convert("L"))
    return binarize(gray), None
