"""Query views: a search also looks with the query turned on its side and by regions of it."""

from __future__ import annotations

import numpy as np
import pytest

from simserve.index.collection import Collections
from simserve.index.store import NewItem
from simserve.inference.crops import N_QUERY_VIEWS, TURNS, pool_views, query_view_embeddings, query_view_pixels
from simserve.inference.decode import decode
from simserve.inference.decode_pool import pixels
from simserve.inference.pixels import to_pixels
from simserve.ranking import pipeline
from simserve.ranking.views import view_score_matrix, view_scores


def test_query_views_are_the_query_turned_and_sixteen_regions_of_two_fifths_its_side(photo_jpeg):
    v = query_view_pixels(photo_jpeg, 48, 3)
    assert v.shape == (N_QUERY_VIEWS, 3, 48, 48) == (20, 3, 48, 48) and v.dtype == np.uint8
    for t, turned in zip(TURNS, v[1:4]):
        assert np.array_equal(turned, np.rot90(v[0], t, axes=(1, 2)))
    wide = to_pixels(decode(photo_jpeg, min_side=120), 120, 3)
    regions = [wide[:, y : y + 48, x : x + 48] for y in (0, 24, 48, 72) for x in (0, 24, 48, 72)]
    assert all(np.array_equal(a, b) for a, b in zip(v[4:], regions))
    # the whole view is the ordinary model input, up to the decoder's scaling (a few grey levels)
    assert np.abs(v[0].astype(int) - pixels(photo_jpeg, 48, 3).astype(int)).mean() < 4


def test_the_view_score_matrix_scores_every_candidate_under_every_query_vector():
    rng = np.random.default_rng(0)
    views = rng.normal(size=(5, 6, 8)).astype(np.float32)
    views /= np.linalg.norm(views, axis=2, keepdims=True)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    m = view_score_matrix(q, views)
    assert m.shape == (5, 3)
    for j in range(3):
        assert np.allclose(m[:, j], view_scores(q[j], pool_views(views) @ q[j], views), atol=1e-6)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_a_turned_view_scores_a_hit_and_a_region_brings_one_to_verification(tmp_path):
    """A real crop-views collection of 200 items: one (turned) is near only the query's turned
    view, another (pasted) only one region's; both are far from the upright query, past the
    100-item shortlist. The turned one is scored by its turned view (less TURN_PENALTY), the
    pasted one keeps its upright score; both are moved up to be verified, after the first LEAD."""
    dim, rng = 16, np.random.default_rng(1)
    col = Collections(tmp_path).create("c", dim, crop_views=True)
    query = _unit(rng.normal(size=dim))
    items = []
    for i in range(198):  # distractors near the upright query, so the two are outranked by it
        v = _unit(query + 0.8 * rng.normal(size=dim))
        views = np.stack([_unit(v + 0.1 * rng.normal(size=dim)) for _ in range(6)])
        items.append(NewItem(f"d{i}", pool_views(views[None])[0], None, views=views))
    turned_v, pasted_v = _unit(rng.normal(size=dim)), _unit(rng.normal(size=dim))
    for key, v in (("turned", turned_v), ("pasted", pasted_v)):
        views = np.stack([v] * 6)
        items.append(NewItem(key, v, None, views=views))
    col.add(items)
    extra = np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)])
    extra[1], extra[3 + 5] = turned_v, pasted_v  # the half turn; a region

    plain, _ = pipeline.shortlist(col, pipeline.Query(query), 10)
    assert {"turned", "pasted"}.isdisjoint(h.key for h in plain)  # the upright query alone never reads them
    hits, _ = pipeline.shortlist(col, pipeline.Query(query, views=extra), 10)
    order = [h.key for h in hits]
    assert pipeline.SHORTLIST + 2 <= len(hits) <= pipeline.SHORTLIST + (N_QUERY_VIEWS - 1) * pipeline.VIEW_DEPTH  # what each view found joins
    assert order[0] == "turned"  # its turned view's score beats every upright one
    picks = len(TURNS) * pipeline.TURNED_PICKS + (N_QUERY_VIEWS - 1 - len(TURNS)) * pipeline.REGION_PICKS
    assert "pasted" in order[pipeline.LEAD : pipeline.LEAD + picks] and pipeline.LEAD + picks <= pipeline.VERIFY_MAX  # verified
    firsts = pipeline.LEAD + len(TURNS) * pipeline.TURNED_PICKS + (N_QUERY_VIEWS - 1 - len(TURNS))
    assert order.index("pasted") < firsts  # a region's first pick is verified before any region's second
    by = {h.key: h for h in hits}
    assert by["turned"].cosine == pytest.approx(1.0 - pipeline.TURN_PENALTY, abs=2e-3)  # stored views are float16
    assert by["pasted"].cosine < 0.5  # a region's match is not a score


def test_the_hit_most_regions_picked_is_verified_first():
    """Every region holding a pasted photo picks its original: a hit several regions picked goes
    before one region's best-scored first pick; among equals, the better pick, then the score."""
    by_region = sorted([(0, -0.9, 1, 0), (0, -0.8, 2, 1), (1, -0.7, 3, 0), (1, -0.6, 2, 2), (0, -0.5, 4, 3), (1, -0.95, 5, 1)])
    assert pipeline._region_order(by_region) == [2, 1, 4, 5, 3]


def test_views_are_made_only_when_the_upright_query_leaves_the_search_uncertain(tmp_path, photos):
    """A verifying collection of real photos through the service core, searched as the server
    searches: a copy of an indexed photo is certain among the upright query's first candidates,
    so its view passes are never made; a photo with no copy makes them, once, and is still
    answered below the threshold."""
    import asyncio
    import io
    from concurrent.futures import Future

    from simserve.inference.engine import load_engine
    from simserve.ranking import verify
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import Service

    def jpeg(img, q=90) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    indexed = ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
    svc = Service(load_engine(None), Collections(tmp_path), ServerConfig(collection="c"))
    try:
        asyncio.run(svc.add("c", [(n, jpeg(photos[n]), None) for n in indexed], None))
        col, c = svc.collection("c"), svc.bundle.config
        assert col.config.crop_views and col.config.verify and svc.config.query_views  # the default collection
        found = {}
        for name, img in (("astronaut", photos["astronaut"].resize((400, 400))), ("chelsea", photos["chelsea"])):
            data, made = jpeg(img, 75), []

            def views(data=data, made=made) -> Future:
                made.append(1)
                done: Future = Future()
                done.set_result(query_view_embeddings(svc.engine, data))
                return done

            _, emb = svc.engine.embed(pixels(data, c.input_size, c.in_channels)[None])
            q = pipeline.Query(emb[0], keypoints=verify.query_features(verify.decode(data)), views=views)
            found[name] = (pipeline.search(col, q, 3, calibrations=svc.calibrations), len(made))
    finally:
        svc.close()
    threshold = svc.calibrations[next(k for k in svc.calibrations if k.endswith("inliers"))].threshold
    hits, made = found["astronaut"]
    assert made == 0 and hits[0].key == "astronaut" and hits[0].score >= threshold
    hits, made = found["chelsea"]
    assert made == 1 and hits[0].score < threshold


def test_views_are_asked_for_before_the_first_candidate_when_its_cosine_is_low(tmp_path, photos, monkeypatch):
    """Below EARLY_VIEWS_BELOW the upright query's best is seldom certain at once: the views are
    asked for before the query's keypoints are awaited, so a pasted photo's regions are searched
    sooner; above it, only if that candidate is left uncertain. Real photos, a real collection:
    one copy, searched with the bar above and below its cosine."""
    import asyncio
    import io
    from concurrent.futures import Future

    from simserve.inference.engine import load_engine
    from simserve.ranking import verify
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import Service

    def jpeg(img, q=90) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    svc = Service(load_engine(None), Collections(tmp_path), ServerConfig(collection="c"))
    try:
        asyncio.run(svc.add("c", [(n, jpeg(photos[n]), None) for n in ("astronaut", "coffee", "rocket")], None))
        col, c = svc.collection("c"), svc.bundle.config
        data = jpeg(photos["astronaut"].resize((400, 400)), 75)
        _, emb = svc.engine.embed(pixels(data, c.input_size, c.in_channels)[None])
        features = verify.query_features(verify.decode(data))
        runs = {}
        for bar in (0.0, 1.01):  # below every cosine: as before; above: at once
            monkeypatch.setattr(pipeline, "EARLY_VIEWS_BELOW", bar)
            events: list[str] = []

            def views(events=events) -> Future:
                events.append("views")
                done: Future = Future()
                done.set_result(query_view_embeddings(svc.engine, data))
                return done

            def keypoints(events=events):
                events.append("keypoints")
                return features

            hits = pipeline.search(col, pipeline.Query(emb[0], keypoints=keypoints, views=views), 1, calibrations=svc.calibrations)
            runs[bar] = (hits[0].key, events)
    finally:
        svc.close()
    assert runs[0.0] == ("astronaut", ["keypoints"])  # certain on its first candidate: no views made
    assert runs[1.01] == ("astronaut", ["views", "keypoints"])  # asked for first; the answer is the same


def test_views_asked_for_early_are_scanned_after_fewer_upright_candidates(tmp_path, photos, monkeypatch):
    """A query whose views were asked for early (its best cosine low: a pasted photo, often on a
    background that half-matches many items) verifies UPRIGHT_FIRST_EARLY upright candidates
    before it scans them, not UPRIGHT_FIRST: the rest wait behind the views' picks."""
    from concurrent.futures import Future

    from simserve.ranking import verify

    keypoints, _, _ = _cat_pasted_top_right(photos)
    dim, rng = 16, np.random.default_rng(4)
    col = Collections(tmp_path).create("c", dim, crop_views=True, verify=True)
    query = _unit(rng.normal(size=dim))
    col.add(_near_distractors(query, rng, verify.keypoints(photos["coffee"]), n=40))  # none a copy: every candidate uncertain
    extra = np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)])
    read, search = col.keypoints, col.search
    runs = {}
    for bar in (1.01, 0.0):  # early (above every cosine), then late
        monkeypatch.setattr(pipeline, "EARLY_VIEWS_BELOW", bar)
        before: list[int] = []  # candidates whose keypoints were read before the views' scan
        scanned: list[bool] = []
        monkeypatch.setattr(col, "keypoints", lambda ids, before=before, scanned=scanned: (before.extend(ids) if not any(scanned) else None, read(ids))[1])
        monkeypatch.setattr(col, "search", lambda v, *a, scanned=scanned, **kw: (scanned.append(len(v) > 1), search(v, *a, **kw))[1])

        def views() -> Future:
            done: Future = Future()
            done.set_result(extra)
            return done

        pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=views), 10)
        assert any(scanned)
        runs[bar] = len(before)
    assert runs == {1.01: pipeline.UPRIGHT_FIRST_EARLY, 0.0: pipeline.UPRIGHT_FIRST} and pipeline.UPRIGHT_FIRST_EARLY < pipeline.UPRIGHT_FIRST


def test_a_region_found_again_at_full_detail_confirms_a_photo_pasted_small(photos):
    """A photo pasted at 140 of 600 px: the whole query's points, and the region's share of them,
    are mostly the other photo's; the region's own points, found on the region itself, are not."""
    import io

    from PIL import Image

    from simserve.inference.crops import REGION_BOXES
    from simserve.ranking import verify

    bg, cat = photos["astronaut"].resize((600, 450)), photos["chelsea"]
    bg.paste(cat.resize((140, round(140 * cat.height / cat.width))), (430, 30))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=75)
    q = verify.query_features(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), regions=True)
    stored, other = verify.unpack(verify.keypoints(cat)), verify.unpack(verify.keypoints(photos["coffee"]))
    top_right = next(b for b in REGION_BOXES if b[0] > 0.4 and b[1] < 0.1)
    assert verify.inliers(q, stored) < 6 and verify.part_inliers(verify.within(q, top_right), stored) < 10
    assert verify.inliers(q.region(top_right), stored) >= 40
    assert verify.inliers(q.region(top_right), other) < 6
    assert verify.query_features(photos["coffee"]).region(top_right) is None  # a pair's features keep no image


def test_a_hit_a_region_brought_is_verified_by_that_regions_points(tmp_path, photos):
    """A real photo pasted small into another: the whole query's points are mostly the other
    photo's, so it reads a few inliers; of the two regions that found it, the one that scored it
    best (bottom left) holds none of it, and the other (top right, where it was pasted, and where
    it is only second) matches its own points and confirms it."""
    from simserve.inference.crops import REGION_BOXES
    from simserve.ranking import verify

    keypoints, stored, whole = _cat_pasted_top_right(photos)

    dim, rng = 16, np.random.default_rng(2)
    col = Collections(tmp_path).create("c", dim, crop_views=True, verify=True)
    query = _unit(rng.normal(size=dim))
    items = _near_distractors(query, rng, verify.keypoints(photos["coffee"]))
    cat_v = _unit(rng.normal(size=dim))
    items.append(NewItem("chelsea", cat_v, None, views=np.stack([cat_v] * 6), keypoints=stored))
    right = _unit(cat_v + 0.3 * rng.normal(size=dim))  # what the right region sees: nearer another item
    items.append(NewItem("decoy", right, None, views=np.stack([right] * 6), keypoints=verify.keypoints(photos["coffee"])))
    col.add(items)
    extra = np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)])
    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    bottom_left = next(i for i, b in enumerate(REGION_BOXES) if b[0] < 0.1 and b[1] > 0.4)
    extra[3 + bottom_left], extra[3 + top_right] = cat_v, right
    assert [c.key for c in col.search(extra[3 + top_right : 4 + top_right], 2)[0]] == ["decoy", "chelsea"]
    hits, _ = pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=extra), 10)
    found = {h.key: h for h in hits}["chelsea"]
    part = verify.part_inliers(verify.within(keypoints, REGION_BOXES[top_right]), verify.unpack(stored))
    assert found.inliers >= 2 * whole + 4 and found.inliers >= 2 * part  # the region's points found again, not just its share


def _cat_pasted_top_right(photos):
    """A cat pasted small at the top right of a motorcycle photo: the query's keypoints, the cat's
    stored keypoints, and the inliers the whole query finds in it (few)."""
    import io

    from PIL import Image

    from simserve.ranking import verify

    bg = photos["motorcycle_left"].resize((600, 450))
    cat = photos["chelsea"]
    bg.paste(cat.resize((200, round(200 * cat.height / cat.width))), (330, 40))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=75)
    keypoints = verify.query_features(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), regions=True)
    stored = verify.keypoints(cat)
    whole = verify.inliers(keypoints, verify.unpack(stored))
    assert whole < 6  # the whole query alone does not confirm it
    return keypoints, stored, whole


def _near_distractors(query: np.ndarray, rng: np.random.Generator, keypoints: bytes, n: int = 150) -> list[NewItem]:
    """Items near the query by embedding whose points are another photo's (one set, found once)."""
    items = []
    for i in range(n):
        v = _unit(query + 0.8 * rng.normal(size=len(query)))
        items.append(NewItem(f"d{i}", v, None, views=np.stack([v] * 6), keypoints=keypoints))
    return items


def _verify_round(tmp_path, photos, monkeypatch, stored_by_key: dict[str, bytes], regions_by_key: dict[str, list[int]], verify_with=pipeline._verify):
    """``pipeline._verify`` of the cat pasted at the top right against real stored items (the
    first counted alone, the others in one round), certain at 30 inliers. Returns whether one was
    certain, the hits by key, the stored points each box's share of the query was matched
    against, in order, and the threads that found regions' points."""
    import threading

    from simserve.ranking import verify

    keypoints, _, _ = _cat_pasted_top_right(photos)
    col = Collections(tmp_path).create("c", 4, crop_views=True, verify=True)
    v = np.ones(4, np.float32) / 2
    ids = col.add([NewItem(k, v, None, views=np.stack([v] * 6), keypoints=b) for k, b in stored_by_key.items()])
    hits = [pipeline.Hit(k, 0.5, i, cosine=0.5) for k, i in zip(stored_by_key, ids)]
    matched, threads = [], []
    region, part = verify.QueryFeatures.region, verify.part_inliers

    def found_where(self, box):
        threads.append(threading.current_thread().name)
        return region(self, box)

    def share(query, stored):
        matched.append(stored)
        return part(query, stored)

    monkeypatch.setattr(verify.QueryFeatures, "region", found_where)
    monkeypatch.setattr(verify, "part_inliers", share)
    regions = {h.id: regions_by_key[h.key] for h in hits if h.key in regions_by_key}
    certain = verify_with(keypoints, hits, col, lambda cosine: 30, regions)
    return certain, {h.key: h for h in hits}, matched, threads


def test_a_round_stops_at_its_first_certain_hit(tmp_path, photos, monkeypatch):
    """The original of a pasted photo and a decoy in one round: once a region's points confirm the
    original, the decoy stops trying its boxes (it would try all sixteen)."""
    from simserve.inference.crops import REGION_BOXES
    from simserve.ranking import verify

    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    coffee, cat = verify.keypoints(photos["coffee"]), verify.keypoints(photos["chelsea"])
    stored = {"lead": coffee, "chelsea": cat, "decoy": coffee}
    certain, hits, matched, _ = _verify_round(tmp_path, photos, monkeypatch, stored, {"chelsea": [top_right], "decoy": list(range(16))})
    assert certain and hits["chelsea"].inliers >= 30 and hits["decoy"].inliers is not None
    decoy = verify.unpack(coffee).orb
    assert sum(np.array_equal(m.orb, decoy) for m in matched) < 8  # stopped, not through its sixteen boxes


def test_every_region_pick_tries_its_first_box_before_any_pick_tries_its_second(tmp_path, photos, monkeypatch):
    """A decoy sixteen regions picked, verified before the pasted photo's original: it tries one
    box, the original's first box confirms it, and the decoy's other fifteen are never tried."""
    from simserve.inference.crops import REGION_BOXES
    from simserve.ranking import verify

    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    coffee, cat = verify.keypoints(photos["coffee"]), verify.keypoints(photos["chelsea"])
    stored, regions = {"decoy": coffee, "chelsea": cat}, {"decoy": list(range(16)), "chelsea": [top_right]}
    certain, hits, matched, _ = _verify_round(tmp_path, photos, monkeypatch, stored, regions, pipeline._verify_picks)
    assert certain and hits["chelsea"].inliers >= 30
    decoy = verify.unpack(coffee).orb
    assert sum(np.array_equal(m.orb, decoy) for m in matched) == 1


def test_a_round_of_one_hit_finds_its_regions_points_on_the_idle_threads(tmp_path, photos, monkeypatch):
    """A hit alone in its round tries its boxes one after another on the search's thread; the
    verifying threads, idle otherwise, find its later boxes' points ahead of it."""
    from simserve.ranking import verify

    coffee = verify.keypoints(photos["coffee"])
    certain, hits, _, threads = _verify_round(tmp_path, photos, monkeypatch, {"decoy": coffee}, {"decoy": list(range(16))})
    assert not certain and hits["decoy"].inliers is not None
    assert any(t.startswith("verify") for t in threads)


def test_a_hit_the_embedding_ranks_first_is_still_verified_by_the_region_that_picked_it(tmp_path, photos):
    """The original of a pasted photo often leads by the embedding too, where only the whole
    query's points were matched against it (a few inliers): the region that picked it confirms it."""
    from simserve.inference.crops import REGION_BOXES
    from simserve.ranking import verify

    keypoints, stored, whole = _cat_pasted_top_right(photos)
    dim, rng = 16, np.random.default_rng(3)
    col = Collections(tmp_path).create("c", dim, crop_views=True, verify=True)
    query = _unit(rng.normal(size=dim))
    col.add([NewItem("chelsea", query, None, views=np.stack([query] * 6), keypoints=stored), *_near_distractors(query, rng, verify.keypoints(photos["coffee"]))])
    extra = np.stack([_unit(rng.normal(size=dim)) for _ in range(N_QUERY_VIEWS - 1)])
    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    extra[3 + top_right] = query
    hits, _ = pipeline.shortlist(col, pipeline.Query(query, keypoints=keypoints, views=extra), 10)
    assert hits[0].key == "chelsea"  # the upright query's lead
    assert hits[0].inliers >= 2 * whole + 4  # confirmed by the region's points, not the whole query's


def test_a_window_of_the_feature_map_pooled_as_the_tower_pools_gives_its_embedding(photo_jpeg):
    """Engine.pool over the whole map of a 128 px image is the tower's own embedding; the regions'
    windows of a 320 px image's map are the 4 x 4 grid of 0.4-side boxes, on its 16 px cells."""
    from simserve.inference.crops import REGION_BOXES, region_windows
    from simserve.inference.engine import load_engine

    engine = load_engine(None)
    x = pixels(photo_jpeg, 128, 3)[None]
    fmap, emb = engine.embed(x)
    rows, cols = fmap.shape[-2:]
    assert np.allclose(engine.pool(fmap, [(0, 0, rows, cols)]), emb, atol=1e-4)
    windows = region_windows(20, 20)
    assert len(windows) == len(REGION_BOXES) and {w[2:] for w in windows} == {(8, 8)}
    assert sorted({w[0] for w in windows}) == sorted({w[1] for w in windows}) == [0, 4, 8, 12]


def test_a_region_pooled_from_one_pass_finds_a_photo_pasted_small(tmp_path, photos):
    """A real photo pasted small into another, searched by the regions a search pools from one
    320 px pass over it: the region where it was pasted ranks it first among real photos."""
    import io

    from simserve.inference.crops import REGION_BOXES, crop_view_pixels
    from simserve.inference.engine import load_engine

    engine = load_engine(None)
    bg = photos["motorcycle_left"].resize((600, 450))
    cat = photos["chelsea"]
    bg.paste(cat.resize((200, round(200 * cat.height / cat.width))), (330, 40))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=75)
    col = Collections(tmp_path).create("c", engine.bundle.embedding_dim, crop_views=True)
    names = ("astronaut", "coffee", "rocket", "hubble_deep_field", "chelsea")
    items = []
    for name in names:
        b = io.BytesIO()
        photos[name].save(b, "JPEG", quality=90)
        _, views = engine.embed(crop_view_pixels(b.getvalue(), 128, 3))
        items.append(NewItem(name, pool_views(views[None])[0], None, views=views))
    col.add(items)
    regions = query_view_embeddings(engine, buf.getvalue())[len(TURNS) :]
    top_right = next(i for i, b in enumerate(REGION_BOXES) if b[0] > 0.4 and b[1] < 0.1)
    assert col.search(regions[top_right : top_right + 1], 1, views=True)[0][0].key == "chelsea"
