"""A pool of decode workers: encoded bytes -> model-sized uint8 pixels, in parallel.

Threads by default: Pillow's decoders and resizers release the GIL for
their heavy loops, so threads scale across cores with no copying, and they
start instantly. The Python between those loops still holds the GIL, so on
small images threads stop scaling early; ``processes=True`` runs the same
function in worker processes instead (bytes in, a 27 KB uint8 array out per
image, sent in chunks) for the bulk jobs where throughput is all that counts.
A failed image yields its ``DecodeError`` in place of an array, so one bad
input never sinks a batch.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from simserve.inference.crops import crop_view_pixels
from simserve.inference.decode import DEFAULT_MAX_PIXELS, DecodeError, decode
from simserve.inference.engine import default_threads
from simserve.inference.pixels import to_pixels


class DecodePool:
    def __init__(
        self,
        input_size: int,
        channels: int = 3,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        processes: bool = False,
        crop_views: bool = False,
    ) -> None:
        self.input_size, self.channels, self.max_pixels = input_size, channels, max_pixels
        self.workers = workers or default_threads()
        self.processes = processes
        self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) if processes else ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        # crop_views: each result is [6, C, S, S] (simserve/inference/crops.py) instead of [C, S, S].
        kw = dict(size=input_size, channels=channels, max_pixels=max_pixels, crop_views=crop_views)
        self._load = partial(load_bytes, **kw)
        self._load_file = partial(load_file, **kw)

    def load(self, data: bytes) -> np.ndarray:
        """One image: bytes -> [C, S, S] uint8 pixels (``Engine.embed`` normalises), or raise DecodeError."""
        return pixels(data, self.input_size, self.channels, self.max_pixels)

    def map(self, blobs: Iterable[bytes]) -> Iterator[np.ndarray | DecodeError]:
        """Results in input order; decoding runs ahead on every worker."""
        return self._map(self._load, blobs)

    def map_files(self, paths: Iterable[Path]) -> Iterator[np.ndarray | DecodeError]:
        """Like ``map``, reading each file in the worker (a missing file is a DecodeError too)."""
        return self._map(self._load_file, paths)

    def _map(self, fn: Callable, items: Iterable) -> Iterator:
        """Every item submitted now, in runs: a task per image costs ~0.1 ms of Python under
        the GIL (a future, a queue hand-off, a wake-up), a third of a 256 px JPEG's decode, so
        each task takes a run of up to 16 images (two runs per worker at least, to balance)."""
        items = list(items)
        if self.processes:
            return self._pool.map(fn, items, chunksize=16)
        size = max(1, min(16, -(-len(items) // (2 * self.workers))))
        runs = [self._pool.submit(_load_run, fn, items[i : i + size]) for i in range(0, len(items), size)]
        return itertools.chain.from_iterable(r.result() for r in runs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Module-level, so worker processes can unpickle them.
def pixels(data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, crop_views: bool = False) -> np.ndarray:
    """Bytes -> [C, size, size] uint8 model pixels (with ``crop_views``: [6, C, size, size], see
    simserve/inference/crops.py), or raise DecodeError: the one recipe for the pool's workers and the
    server's request threads."""
    if crop_views:
        return crop_view_pixels(data, size, channels, max_pixels)
    return to_pixels(decode(data, max_pixels=max_pixels, min_side=size), size, channels)


def _load_run(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def load_bytes(data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, crop_views: bool = False) -> np.ndarray | DecodeError:
    """``pixels``, with a failure returned (not raised), so one bad image never sinks a batch."""
    try:
        return pixels(data, size, channels, max_pixels, crop_views)
    except DecodeError as e:
        return e


def load_file(path: Path, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, crop_views: bool = False) -> np.ndarray | DecodeError:
    """A file -> model pixels, or the DecodeError that says why not (a missing file is one too)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return DecodeError("unreadable", f"cannot read: {e.strerror or e}")
    return load_bytes(data, size, channels, max_pixels, crop_views)
