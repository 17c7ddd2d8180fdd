"""A dynamic micro-batcher: concurrent single requests in, batched calls out.

Modelled on Triton's dynamic batcher, with its two knobs: ``max_batch``
(never call the function with more items) and ``max_delay_ms`` (never hold
the first item of a batch longer than this waiting for company). The queue
is bounded: when it is full ``submit`` raises ``QueueFull`` at once instead
of letting latency grow without limit. Every item may carry a deadline;
items whose deadline passed, or whose future was cancelled, are dropped
before the batch runs, so abandoned requests cost no compute.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The batcher's queue is at capacity: shed load (RESOURCE_EXHAUSTED / retry later)."""


class DeadlineExceeded(TimeoutError):
    """The item's deadline passed before it was computed."""


class BatcherClosed(RuntimeError):
    """The batcher is shut down and accepts no new work."""


@dataclass
class _Item(Generic[T, R]):
    value: T
    future: Future
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchDone:
    """One engine call, as metrics see it."""

    size: int
    depth: int  # items still queued after it
    waits: list[float]  # seconds each item waited in the queue
    seconds: float  # the batch function's time


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    abandoned_before_queue: int = 0  # the caller was gone (cancelled, past its deadline) before submitting
    rejected_full: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1,000

    def record(self, n: int) -> None:
        self.batches += 1
        self.items += n
        self.batch_sizes.append(n)
        del self.batch_sizes[:-1000]


class MicroBatcher(Generic[T, R]):
    """Collects items for ``fn(list[T]) -> Sequence[R]`` (one result per item, in order)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        max_queue: int = 1024,
        name: str = "batcher",
        on_batch: Callable[[BatchDone], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_delay_ms >= 0")
        self.fn, self.max_batch, self.max_delay = fn, max_batch, max_delay_ms / 1000.0
        self.on_batch = on_batch  # after each batch, e.g. for metrics
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, value: T, timeout: float | None = None) -> Future:
        """Queue one item; ``timeout`` (seconds) is its deadline. Never blocks."""
        fut: Future = Future()
        deadline = time.monotonic() + timeout if timeout is not None else None
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            try:
                self._queue.put_nowait(_Item(value, fut, deadline))
            except queue.Full:
                self.stats.rejected_full += 1
                raise QueueFull(f"request queue is full ({self._queue.maxsize} items waiting); retry later") from None
        return fut

    def submit_many(self, values: Sequence[T], timeout: float | None = None) -> list[Future]:
        """All or nothing: if the queue cannot take every item, none stays queued to run."""
        futures: list[Future] = []
        try:
            for v in values:
                futures.append(self.submit(v, timeout))
        except (QueueFull, BatcherClosed):
            for f in futures:
                f.cancel()
            raise
        return futures

    async def run_async(self, values: Sequence[T], timeout: float | None = None) -> list[R]:
        """Submit and wait without holding a thread: the results of ``values``, in order.

        ``timeout`` is what is left of the caller's deadline; at or below zero the work is not
        queued at all (the caller spent its time decoding). No timer of its own: the items
        carry the deadline, and gRPC cancels the caller's task when the client's passes,
        which cancels the queued items here."""
        if timeout is not None and timeout <= 0:
            self.stats.abandoned_before_queue += len(values)
            raise DeadlineExceeded("deadline passed before the request reached the engine")
        futures = self.submit_many(values, timeout)
        try:
            if len(futures) == 1:
                return [await asyncio.wrap_future(futures[0])]
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting work; with ``drain`` finish what is queued, else cancel it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not drain:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.future.cancel()
        self._queue.put(None)  # wakes the worker; it exits after the queued items
        self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------
    def _take(self, block_until: float | None) -> _Item | None | bool:
        """Next item; False when the wait ran out, None for the stop sentinel."""
        try:
            if block_until is None:
                return self._queue.get()
            wait = block_until - time.monotonic()
            return self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._take(None)
            if first is None:
                break
            batch = [first]
            until = time.monotonic() + self.max_delay
            while len(batch) < self.max_batch:
                nxt = self._take(until)
                if nxt is False:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._execute(batch)

    def _execute(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        live: list[_Item] = []
        for item in batch:
            if item.deadline is not None and now > item.deadline:
                self.stats.dropped_expired += 1
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
            elif not item.future.set_running_or_notify_cancel():
                self.stats.dropped_cancelled += 1
            else:
                live.append(item)
        if not live:
            return
        t = time.monotonic()
        try:
            results = self._call(live)
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it
            if len(live) == 1:
                live[0].future.set_exception(e)
            else:
                self._one_by_one(live)  # one bad item must not fail the requests batched beside it
        else:
            for it, r in zip(live, results):
                it.future.set_result(r)
        self.stats.record(len(live))
        if self.on_batch:
            self.on_batch(BatchDone(len(live), self._queue.qsize(), [now - it.enqueued for it in live], time.monotonic() - t))

    def _call(self, items: list[_Item]) -> Sequence:
        results = self.fn([it.value for it in items])
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    def _one_by_one(self, items: list[_Item]) -> None:
        for it in items:
            try:
                it.future.set_result(self._call([it])[0])
            except BaseException as e:  # noqa: BLE001
                it.future.set_exception(e)
