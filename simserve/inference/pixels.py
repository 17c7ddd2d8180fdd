"""PIL image -> model input, exactly as the model was trained.

numpy only (no torch): the serving path, the batch tools and training all
call these functions, so there is no train/serve skew in resizing or
normalisation. Policy: squash the whole image to a square (no centre crop),
because for copy detection the border of an image is as telling as its
centre.

Two steps, so the expensive part parallelises and the cheap part
vectorises: ``to_pixels`` (resize, per image, in decode workers) gives
uint8; ``normalize`` (per batch, in the engine) gives float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def to_pixels(img: Image.Image | np.ndarray, size: int, channels: int = 3) -> np.ndarray:
    """Return [C, size, size] uint8; C is 1 for grey ("L") models and 3 for RGB.
    ``img`` may be an [H, W, 3] uint8 RGB array (the JPEG fast path's output)."""
    if isinstance(img, np.ndarray):
        if channels == 3 and img.shape[:2] == (size, size):
            return img.transpose(2, 0, 1)
        img = Image.fromarray(img)
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        # reducing_gap only acts when shrinking by 3x or more (e.g. big photos).
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0 if min(img.size) >= 3 * size else None)
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., C, H, W] -> float32 ((x / 255) - mean) / std, vectorised over the batch.

    As one multiply-add (x * 1/(255 std) - mean/std): two passes over the batch
    instead of four; equal to the textbook form within float32 rounding. The output
    is C-contiguous whatever the input's layout: a batch stacked from ``to_pixels``'
    HWC->CHW views is strided, and numpy would otherwise give the result that same
    layout (5x slower to write, and ORT would copy it again)."""
    shape = (len(mean), 1, 1)
    s = np.asarray(std, np.float64).reshape(shape)
    scale = (1.0 / (255.0 * s)).astype(np.float32)
    bias = (-np.asarray(mean, np.float64).reshape(shape) / s).astype(np.float32)
    x = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, scale, out=x)
    x += bias
    return x


def to_array(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Both steps for one image: [C, size, size] float32."""
    return normalize(to_pixels(img, size, len(mean)), mean, std)
