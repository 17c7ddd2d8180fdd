"""PIL image -> normalised float32 array, exactly as the model was trained.

numpy only (no torch): the serving path, the batch tools and training all
call this one function, so there is no train/serve skew in resizing or
normalisation. Policy: squash the whole image to a square (no centre crop),
because for copy detection the border of an image is as telling as its
centre.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def to_array(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Return a [C, size, size] float32 array; C is 1 for "L" models and 3 for RGB."""
    mode = "L" if len(mean) == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
