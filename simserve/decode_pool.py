"""A pool of decode workers: encoded bytes -> model-sized uint8 pixels, in parallel.

Threads, not processes: Pillow's decoders and resizers and numpy's
arithmetic release the GIL, so threads scale across cores without copying
pixels between processes. A failed image yields its ``DecodeError`` in
place of an array, so one bad input never sinks a batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from simserve.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from simserve.engine import default_threads
from simserve.preprocess import to_pixels


class DecodePool:
    def __init__(
        self,
        input_size: int,
        channels: int = 3,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.input_size, self.channels, self.max_pixels = input_size, channels, max_pixels
        self.workers = workers or default_threads()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")

    def load(self, data: bytes) -> np.ndarray:
        """One image: bytes -> [C, S, S] uint8 pixels (``Engine.embed`` normalises), or raise DecodeError."""
        img = decode_image(data, max_pixels=self.max_pixels, min_side=self.input_size)
        return to_pixels(img, self.input_size, self.channels)

    def _safe(self, data: bytes) -> np.ndarray | DecodeError:
        try:
            return self.load(data)
        except DecodeError as e:
            return e

    def map(self, blobs: Iterable[bytes]) -> Iterator[np.ndarray | DecodeError]:
        """Results in input order; decoding runs ahead on every worker."""
        return self._pool.map(self._safe, blobs)

    def _safe_file(self, path: Path) -> np.ndarray | DecodeError:
        try:
            data = path.read_bytes()
        except OSError as e:
            return DecodeError("unreadable", f"cannot read: {e.strerror or e}")
        return self._safe(data)

    def map_files(self, paths: Iterable[Path]) -> Iterator[np.ndarray | DecodeError]:
        """Like ``map``, reading each file in the worker (a missing file is a DecodeError too)."""
        return self._pool.map(self._safe_file, paths)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
