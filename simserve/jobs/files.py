"""The image files of a folder, as every folder job and training source reads them."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root``, sorted, so keys and shards come out the same on every run."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
