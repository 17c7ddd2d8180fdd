"""A small readers-writer lock: many searches at once, one index mutation alone."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    """Task-fair: requests are served in arrival order, consecutive readers together.

    Neither side starves. That matters because the HNSW drainer takes the
    write lock again the moment it lets go: with a writer-preferring lock it
    would lock out every search, and with a plain one every add, for as long
    as a backlog lasts. Here it queues behind whoever arrived meanwhile.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._queue: deque[tuple[bool, object]] = deque()  # (is_writer, ticket), oldest first

    def _acquire(self, writer: bool) -> None:
        ticket = object()
        with self._cond:
            self._queue.append((writer, ticket))
            while not (self._queue[0][1] is ticket and not self._writer and (not writer or not self._readers)):
                self._cond.wait()
            self._queue.popleft()
            if writer:
                self._writer = True
            else:
                self._readers += 1
                self._cond.notify_all()  # a reader next in line may come in too

    def _release(self, writer: bool) -> None:
        with self._cond:
            if writer:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self._acquire(False)
        try:
            yield
        finally:
            self._release(False)

    @contextmanager
    def write(self) -> Iterator[None]:
        self._acquire(True)
        try:
            yield
        finally:
            self._release(True)
