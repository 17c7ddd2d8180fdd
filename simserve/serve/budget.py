"""A server-wide budget of bytes being decoded: many requests of small files that decode to
large images wait their turn instead of taking the server's memory all at once."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import CancelledError
from typing import Iterator

from simserve.serve.batcher import DeadlineExceeded

BYTES_PER_PIXEL = 4  # the most a decoded pixel of an allowed format takes here (RGBA, 32-bit grey)


class DecodeBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, deadline: float | None, stop: threading.Event) -> Iterator[None]:
        """Wait until ``pixels`` fit beside what is being decoded (one image larger than the whole
        budget waits for it all); give up when the request's deadline passes or it is cancelled."""
        n = min(max(1, pixels) * BYTES_PER_PIXEL, self.limit)
        with self._cond:
            while self.used + n > self.limit:
                if stop.is_set():
                    raise CancelledError()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded("deadline passed while waiting for memory to decode the images")
                self._cond.wait(0.1 if left is None else min(left, 0.1))
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()
