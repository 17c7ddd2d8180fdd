"""A search's budget: past it, a verifying search answers with what it has verified."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import Future

import numpy as np

from simserve.index.collection import Collections
from simserve.index.store import NewItem
from simserve.inference.crops import N_QUERY_VIEWS, REGION_BOXES
from simserve.ranking import pipeline, verify
from tests.test_query_views import _cat_pasted_top_right, _near_distractors, _unit


def test_views_slower_than_the_deadline_are_not_waited_for(tmp_path, photos):
    """A photo pasted small into another, found only by the region that holds it: with views that
    take a second to make, a search with no deadline waits and confirms it; one with a deadline
    0.1 s away answers without them, with the upright query's candidates, and says it was cut."""
    keypoints, stored, whole = _cat_pasted_top_right(photos)
    dim, rng = 16, np.random.default_rng(4)
    col = Collections(tmp_path).create("c", dim, crop_views=True, verify=True)
    query = _unit(rng.normal(size=dim))
    cat = _unit(rng.normal(size=dim))
    col.add([NewItem("chelsea", cat, None, views=np.stack([cat] * 6), keypoints=stored), *_near_distractors(query, rng, verify.keypoints(photos["coffee"]))])
    extra = np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)])
    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    extra[3 + top_right] = cat

    def slow_views() -> Future:
        done: Future = Future()
        threading.Timer(1.0, lambda: done.set_running_or_notify_cancel() and done.set_result(extra)).start()
        return done

    def run(deadline):
        t = time.monotonic()
        hits, _ = pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=slow_views), 10, certain_at=lambda c: 25, deadline=deadline)
        return {h.key: h for h in hits}, time.monotonic() - t

    found, _ = run(None)
    assert found["chelsea"].inliers >= 2 * whole + 4
    deadline = pipeline.Deadline.after(0.1)
    found, seconds = run(deadline)
    assert seconds < 0.9 and deadline.cut
    assert "chelsea" not in found  # only a region found it, and the views were not waited for
    assert any(h.inliers is not None for h in found.values())  # the upright query's lead was verified


def test_a_passed_deadline_leaves_candidates_unverified_and_the_service_counts_the_cut(tmp_path, photos):
    """Through the service core, on real photos: a budget too short for any verification still
    answers, by the embedding, with no candidate counted, and the cut is reported; with no budget
    a copy is verified; a copy-less photo is answered below the threshold either way."""
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    def jpeg(img, q=90) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    cuts: list[int] = []
    indexed = ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
    assert ServerConfig().search_budget_ms > 0  # on by default
    svc = Service(load_engine(None), Collections(tmp_path), ServerConfig(collection="c", search_budget_ms=0), on_cut=lambda: cuts.append(1))
    try:
        asyncio.run(svc.add("c", [(n, jpeg(photos[n]), None) for n in indexed], None))
        copy, none = ImageRef(data=jpeg(photos["astronaut"].resize((400, 400)), 75)), ImageRef(data=jpeg(photos["chelsea"], 75))
        unbudgeted = [asyncio.run(svc.search(q, "c", 3, 0, {}, None)) for q in (copy, none)]
        assert not cuts
        svc.config.search_budget_ms = 1e-6
        starved = [asyncio.run(svc.search(q, "c", 3, 0, {}, None)) for q in (copy, none)]
    finally:
        svc.close()
    threshold = svc.calibrations[next(k for k in svc.calibrations if k.endswith("inliers"))].threshold
    assert unbudgeted[0][0].key == "astronaut" and unbudgeted[0][0].inliers and unbudgeted[0][0].score >= threshold
    assert unbudgeted[1][0].score < threshold
    assert all(h.inliers is None for hits in starved for h in hits) and len(cuts) == 2
    assert starved[0][0].key == "astronaut"  # the embedding's order still stands
    assert starved[1][0].score < threshold


def test_views_that_could_not_end_before_the_deadline_are_not_started(tmp_path, photos):
    """Once a collection's views are known to take longer than a search has left, they are not
    made at all (the search answers with the upright query's candidates, verified); each such
    skip lowers what they are thought to cost, so they are tried again later."""
    keypoints, stored, _ = _cat_pasted_top_right(photos)
    dim, rng = 16, np.random.default_rng(5)
    col = Collections(tmp_path).create("c", dim, crop_views=True, verify=True)
    query = _unit(rng.normal(size=dim))
    col.add([NewItem("chelsea", _unit(rng.normal(size=dim)), None, views=np.stack([_unit(rng.normal(size=dim))] * 6), keypoints=stored), *_near_distractors(query, rng, verify.keypoints(photos["coffee"]))])
    made: list[int] = []

    def views() -> Future:
        made.append(1)
        done: Future = Future()
        done.set_result(np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)]))
        return done

    took = pipeline._VIEW_TIMES.setdefault(col, pipeline._ViewTimes())
    took.made(1.0)
    took.scanned(1.0)  # as if they had taken 2 s here
    deadline = pipeline.Deadline.after(1.5)  # ample for anything but those views
    hits, _ = pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=views), 10, certain_at=lambda c: 25, deadline=deadline)
    assert not made and deadline.cut
    assert sum(h.inliers is not None for h in hits) > 1  # the upright query's first candidates were verified
    assert took.make == 0.95 and took.scan == 0.95
    pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=views), 10, certain_at=lambda c: 25, deadline=pipeline.Deadline.after(30.0))
    assert made  # with time enough, they are made
