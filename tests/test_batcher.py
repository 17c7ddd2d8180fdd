import asyncio
import threading
import time

import pytest

from simserve.serve.batcher import BatcherClosed, DeadlineExceeded, MicroBatcher, QueueFull


def test_fifty_concurrent_callers_each_get_their_own_result():
    seen_batches = []

    def square(xs):
        seen_batches.append(len(xs))
        time.sleep(0.005)
        return [x * x for x in xs]

    b = MicroBatcher(square, max_batch=16, max_delay_ms=5)

    async def call(i):
        return i, await b.run_async([i, i + 1000])

    async def everyone():
        return await asyncio.gather(*(call(i) for i in range(50)))

    results = asyncio.run(everyone())
    b.close()
    for i, r in results:
        assert r == [i * i, (i + 1000) ** 2]
    assert sum(seen_batches) == 100  # none lost, none computed twice
    assert max(seen_batches) <= 16
    assert max(seen_batches) > 1  # concurrent requests really were batched


def test_full_queue_rejects_instead_of_hanging():
    release = threading.Event()

    def slow(xs):
        release.wait(5)
        return xs

    b = MicroBatcher(slow, max_batch=1, max_delay_ms=0, max_queue=3)
    first = b.submit(0)  # taken by the worker, blocks there
    time.sleep(0.05)
    queued = [b.submit(i) for i in (1, 2, 3)]
    t = time.monotonic()
    with pytest.raises(QueueFull, match="queue is full"):
        b.submit(4)
    assert time.monotonic() - t < 0.5
    with pytest.raises(QueueFull):
        b.submit_many([5, 6])
    release.set()
    assert first.result(2) == 0 and [f.result(2) for f in queued] == [1, 2, 3]
    assert b.stats.rejected_full == 2
    b.close()


def test_expired_and_cancelled_items_are_never_computed():
    computed = []
    gate = threading.Event()

    def fn(xs):
        gate.wait(5)
        computed.extend(xs)
        return xs

    b = MicroBatcher(fn, max_batch=8, max_delay_ms=0)
    blocker = b.submit("blocker")
    time.sleep(0.05)
    expired = b.submit("late", timeout=0.01)
    cancelled = b.submit("gone")
    assert cancelled.cancel()
    kept = b.submit("kept", timeout=10)
    time.sleep(0.05)
    gate.set()
    assert kept.result(2) == "kept" and blocker.result(2) == "blocker"
    with pytest.raises(DeadlineExceeded):
        expired.result(2)
    b.close()
    assert "late" not in computed and "gone" not in computed
    assert b.stats.dropped_expired == 1 and b.stats.dropped_cancelled == 1


def test_a_bad_item_fails_only_its_own_caller_and_the_batcher_survives():
    calls = []

    def fn(xs):
        calls.append(list(xs))
        if "bad" in xs:
            raise ValueError("boom")
        return xs

    b = MicroBatcher(fn, max_batch=4, max_delay_ms=50)
    f1, f2, f3 = b.submit("ok"), b.submit("bad"), b.submit("also ok")
    with pytest.raises(ValueError, match="boom"):
        f2.result(2)
    assert f1.result(2) == "ok" and f3.result(2) == "also ok"
    assert calls[0] == ["ok", "bad", "also ok"]  # batched together, then retried one by one
    assert asyncio.run(b.run_async(["fine"])) == ["fine"]
    b.close()


def test_a_caller_out_of_time_is_not_queued():
    b = MicroBatcher(lambda xs: xs, max_batch=4, max_delay_ms=1)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(b.run_async([1, 2], timeout=0.0))
    assert b.stats.abandoned_before_queue == 2 and b.stats.items == 0
    b.close()


def test_close_drains_queued_work_then_refuses():
    b = MicroBatcher(lambda xs: [x + 1 for x in xs], max_batch=2, max_delay_ms=1)
    futures = [b.submit(i) for i in range(10)]
    b.close(drain=True)
    assert [f.result(0) for f in futures] == list(range(1, 11))
    with pytest.raises(BatcherClosed):
        b.submit(1)


def test_max_delay_bounds_the_wait_of_a_lone_request():
    b = MicroBatcher(lambda xs: xs, max_batch=64, max_delay_ms=10)
    t = time.monotonic()
    assert asyncio.run(b.run_async([1])) == [1]
    assert time.monotonic() - t < 1.0  # generous: a shared machine
    b.close()


def test_the_decode_budget_lets_images_in_only_while_they_fit():
    from concurrent.futures import CancelledError

    from simserve.serve.budget import BYTES_PER_PIXEL, DecodeBudget

    budget = DecodeBudget(100 * BYTES_PER_PIXEL)
    never = threading.Event()
    with budget.hold(60, None, never):
        assert budget.used == 60 * BYTES_PER_PIXEL
        t = time.monotonic()
        with pytest.raises(DeadlineExceeded):  # 60 more do not fit beside it: waits, then gives up
            with budget.hold(60, time.monotonic() + 0.2, never):
                pass
        assert time.monotonic() - t >= 0.19
        gone = threading.Event()
        gone.set()
        with pytest.raises(CancelledError):  # nor does a caller that left
            with budget.hold(60, None, gone):
                pass
        with budget.hold(40, None, never):  # what fits goes in at once
            assert budget.used == 100 * BYTES_PER_PIXEL
    with budget.hold(10**9, None, never):  # one image larger than the budget runs alone
        assert budget.used == budget.limit
    assert budget.used == 0
