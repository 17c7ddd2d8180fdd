"""The one search pipeline: ANN -> view re-score (and query views) -> geometric verification ->
calibration -> head fusion.

The index finds a deep shortlist by the embedding; a crop-views collection re-scores it by the
stored views, and widens it with what the query turned and its regions find (in a verifying
collection, only when the upright query's best candidate is not certain, or its cosine is too
low to expect that it will be); a verifying one
counts, best first, the inliers one affine map gives between the query's keypoints and each
candidate's, until one is certain; the bundle's calibration turns
each candidate's evidence into P(copy), the score returned and ordered by; with ``rerank`` the
fusion head, which compares feature maps and so cannot be pre-indexed, fuses its log-odds in.
The evidence the stages need is read with the candidates, in one query of the store, except the
keypoints: only the few candidates verified need them.
``simserve index search`` and the server both search through here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from simserve.index.collection import Collection
from simserve.index.store import Candidate
from simserve.inference.crops import REGION_BOXES, TURNS
from simserve.inference.engine import Engine
from simserve.ranking import verify
from simserve.ranking.calibration import Calibration, Calibrations, evidence_key
from simserve.ranking.scores import fused_scores, verified_score
from simserve.ranking.views import view_score_matrix, view_scores

# Candidates a crop-views or verifying search reads from the index and re-scores by views.
SHORTLIST = 100
# At most this many are verified, best view score first (docs/decisions/deep-shortlist.md): the
# upright query's lead, the turned views' picks and the regions' (3 + 6 + up to 32).
VERIFY_MAX = 50
# Verification stops at a candidate this sure to be a copy (calibrated): above the shipped
# threshold at precision 0.99 (~0.90), so a user's decision is made; at 0.99 copies found with
# 50-65 inliers at a low cosine went on through all 50 candidates (all 1,884 benchmark queries at
# 100k: the same recall@1 and µAP, p50 34.6 -> 30.7 ms: docs/decisions/search-budget.md). Uncalibrated,
# it stops at this many inliers (12 at most on a non-copy photo; a repeated pattern reached 79).
CERTAIN = 0.95
CERTAIN_INLIERS = 25
# Query views (inference/crops.query_view_inputs; docs/decisions/query-views.md): each searches the
# index this deep, and its best few join the verified list after the upright query's first LEAD:
# a turned view's best 2, a region's best 2 (at 1, pasted copies found first 0.78 -> 0.76 on 16
# half-side regions, 0.70 -> 0.63 on nine). A turned view's score stands for a hit's, less this
# much: at 0 a turned view's chance matches cost crops their first place (0.05 and 0.1 measured).
VIEW_DEPTH = 10
LEAD = 3
TURNED_PICKS, REGION_PICKS = 2, 2
TURN_PENALTY = 0.05
# Made lazily, the views are awaited while the upright query's first this many are verified;
# asked for early (EARLY_VIEWS_BELOW), they are scanned after the first 7 (the rest wait behind
# the views' picks): a query pasted on a textured background spent up to 80 ms on 15, each of
# 20-40 inliers and uncertain, before its regions were searched. At 90 ms, all 248 pasted
# queries at 100k, photographs 0.921 -> 0.956, 0.921 -> 0.939, 0.904 -> 0.930 in three runs
# (3 and 5 read 0.921-0.939); 600 random: the same answers, 1.011x mean per query.
UPRIGHT_FIRST = 15
UPRIGHT_FIRST_EARLY = 7
# Below this cosine the upright query's best candidate is seldom a copy certain at once, and the
# views are asked for before it is verified (beside the query's keypoints): a pasted query reaches
# its regions' picks ~15 ms sooner. At a 92 ms budget, 100k: all 248 pasted queries' photographs
# 0.895 -> 0.921; 600 random 0.970 -> 0.974, p50 20.9 -> 23.3 ms (views made for copies the first
# candidate settles). 0.9 the same; always, 0.895: the wasted views take a core.
EARLY_VIEWS_BELOW = 0.8

# Uncertain queries verify up to VERIFY_MAX candidates, regions' points found again among them.
_VERIFYING = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="verify")


@dataclass
class Hit:
    key: str
    # What the caller thresholds on: with a calibrated bundle, P(copy) given every piece of
    # evidence below; without one, the cosine (plus the inliers' worth when verified).
    score: float
    id: int
    metadata: dict[str, Any] | None = None
    head_score: float | None = None  # set when re-ranked by the fusion head
    inliers: int | None = None  # set when verified
    # The embedding's evidence: cosine of the pooled vectors; in a crop-views collection, the
    # mean of that and the best view's.
    cosine: float = 0.0

    @property
    def rank(self) -> float:
        """What orders hits before any head re-ranking: the score, plus the inliers' worth when verified."""
        return verified_score(self.cosine, self.inliers)


class Deadline:
    """When a search answers with what it has: candidates not verified by then keep no count,
    and the query's views are not made or searched past it. ``cut`` tells whether it stopped
    anything (set from verifying threads too)."""

    def __init__(self, at: float) -> None:
        self.at, self.cut = at, False  # time.monotonic()

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline | None":
        return None if seconds is None else cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        if self.left() > 0:
            return False
        self.cut = True
        return True


def _passed(deadline: Deadline | None) -> bool:
    return deadline is not None and deadline.passed()


@dataclass
class Query:
    embedding: np.ndarray  # [d]
    features: np.ndarray | None = None  # the head's input, for re-ranking
    # For a verifying collection (verify.query_features); or what waits for them (found on another
    # thread while the index is searched: they take longer than the embedding).
    keypoints: Sequence[verify.LocalFeatures] | Callable[[], Sequence[verify.LocalFeatures]] | None = None
    exclude_id: int | None = None  # a stored item used as the query is not its own neighbour
    # [19, d]: the query turned (3), then its regions (16) (inference/crops.query_view_embeddings), for
    # a crop-views collection, whose stored views score any candidate under any of them. Or what
    # starts making them (a Future of the array), called only if the upright query's best
    # candidate leaves a verifying search uncertain, or its cosine is below EARLY_VIEWS_BELOW:
    # 19 engine passes saved on every query a copy answers at once.
    views: np.ndarray | Callable[[], Future] | None = None


def search(
    collection: Collection,
    query: Query,
    k: int,
    *,
    rerank: int = 0,
    where: dict[str, Any] | None = None,
    engine: Engine | None = None,
    calibrations: Calibrations | None = None,
    deadline: Deadline | None = None,
) -> list[Hit]:
    """The top k for one query, each scored by ``calibrations`` (the bundle's) when it has one for
    this collection's evidence. With ``rerank`` > 0 (query features and an engine given), the top
    max(k, rerank) are re-ordered by ``fused_scores`` and carry the head's score too. Verification
    stops at ``deadline`` (None: at VERIFY_MAX candidates or a certain one)."""
    cfg = collection.config
    fusing = rerank > 0 and query.features is not None and engine is not None
    keep = max(k, rerank) if fusing else k
    cal = calibrations or {}
    plain, verified = cal.get(evidence_key(cfg.crop_views, False)), cal.get(evidence_key(cfg.crop_views, True))
    if plain is None or (cfg.verify and verified is None):
        plain = verified = None  # half a calibration would order hits by two scales at once
    hits, evidence = shortlist(collection, query, keep, where=where, features=fusing, certain_at=_certainty(verified), deadline=deadline)
    # A verifying search scores every hit with the inliers model, an unverified one as if it had
    # none: it ranked below the verified ones by cosine, and the embedding-only model's scale
    # would put it above verified candidates that found nothing (recall@1 0.66 -> 0.54).
    use = verified if any(h.inliers is not None for h in hits) else plain
    cosine = np.array([h.cosine for h in hits])
    scores = cosine if use is None else use.probability(cosine, np.array([h.inliers or 0 for h in hits]))
    for h, s in zip(hits, scores):
        h.score = float(s)
    # Uncalibrated, the inliers' worth orders a verified shortlist, as before calibration.
    hits.sort(key=lambda h: -(h.score if plain is not None else h.rank))
    hits = hits[:keep]
    if fusing:
        hits = _fuse(engine, query.features, hits, evidence, cfg.feature_shape)
    return hits[:k]


def shortlist(
    collection: Collection,
    query: Query,
    k: int,
    *,
    where: dict[str, Any] | None = None,
    features: bool = False,
    certain_at: Callable[[float], float] | None = None,
    deadline: Deadline | None = None,
) -> tuple[list[Hit], dict[int, Candidate]]:
    """The candidates and the evidence about them, best embedding (or view) score first: the top
    k, or in a crop-views or verifying collection the top SHORTLIST, re-scored by views; the first
    VERIFY_MAX verified, stopping after the first with the inliers ``certain_at`` its cosine asks
    for (None: never stop), or at ``deadline``.
    Scores are left to the caller: ``search`` calibrates them, ``simserve calibrate`` fits on them."""
    cfg = collection.config
    verifying = cfg.verify and query.keypoints is not None
    depth = max(k, SHORTLIST) if cfg.crop_views or verifying else k
    exclude = () if query.exclude_id is None else (query.exclude_id,)
    found = collection.search(query.embedding.reshape(1, -1), depth, where, exclude, views=cfg.crop_views, features=features)[0]
    hits = [Hit(c.key, c.score, c.id, c.metadata, cosine=c.score) for c in found]
    evidence = {c.id: c for c in found}
    need = certain_at or (lambda cosine: math.inf)
    views = query.views
    took = _VIEW_TIMES.setdefault(collection, _ViewTimes()) if cfg.crop_views and verifying and deadline is not None else None
    pending: Future | None = None
    if cfg.crop_views and callable(views) and verifying:
        hits = _rescore_views(query.embedding, hits, evidence)
        if hits and hits[0].cosine < EARLY_VIEWS_BELOW:
            started, pending = time.monotonic(), views()
    keypoints = query.keypoints() if callable(query.keypoints) else query.keypoints
    if cfg.crop_views and callable(views):
        if verifying:
            # The upright query's best is verified first; then its views are made while its next
            # few (which a search verifies anyway) are, and are not waited for if one is certain.
            if _verify(keypoints, hits[:1], collection, need, deadline=deadline) or _passed(deadline):
                if pending is not None:
                    pending.cancel()
                return hits, evidence
            upright = UPRIGHT_FIRST if pending is None else UPRIGHT_FIRST_EARLY
            if pending is None:
                if took is not None and not took.fit(deadline, made=False):  # they could not be made and searched before it
                    _verify(keypoints, hits[:UPRIGHT_FIRST], collection, need, deadline=deadline)
                    return hits, evidence
                started, pending = time.monotonic(), views()
            if _verify(keypoints, hits[:upright], collection, need, deadline=deadline):
                pending.cancel()
                return hits, evidence
            try:
                views = pending.result(timeout=None if deadline is None else max(0.0, deadline.left()))
            except concurrent.futures.TimeoutError:
                pending.cancel()
                deadline.cut = True
                views = None
            if took is not None:
                took.made(time.monotonic() - started)  # at least this long, when they were not ready
            if views is None:
                return hits, evidence
        else:
            views = views().result()
    regions: dict[int, list[int]] = {}
    if cfg.crop_views and views is not None and len(views):
        if took is not None and not took.fit(deadline, made=True):  # the scan would end past it, its picks unverified
            return hits, evidence
        started = time.monotonic()
        hits, regions = _with_query_views(collection, views, query.embedding, hits, evidence, where, exclude, features)  # re-scores by views too
        if took is not None:
            took.scanned(time.monotonic() - started)
    elif cfg.crop_views:
        hits = _rescore_views(query.embedding, hits, evidence)
    if verifying:
        _verify_picks(keypoints, hits, collection, need, regions, deadline)
    return hits, evidence


class _ViewTimes:
    """How long a collection's query views took lately to be made (19 engine passes, beside the
    upright query's verification) and to be searched (19 index scans: ~50 ms at 100,000 items on
    2 cores), as exponential means: a search does not start them when they would end past its
    deadline, having verified nothing more (at 100,000 items a 90 ms budget then answered at
    ~135 ms instead of ~90). Each skip lowers the means a little, so that a faster machine, or a
    longer budget, is noticed again."""

    def __init__(self) -> None:
        self.make = self.scan = 0.0

    def made(self, seconds: float) -> None:
        self.make = _mean(self.make, seconds)

    def scanned(self, seconds: float) -> None:
        self.scan = _mean(self.scan, seconds)

    def fit(self, deadline: Deadline | None, made: bool) -> bool:
        need = self.scan + (0.0 if made else self.make)
        if deadline is None or deadline.left() > need:
            return True
        deadline.cut = True
        self.make, self.scan = 0.95 * self.make, 0.95 * self.scan
        return False


def _mean(mean: float, seconds: float) -> float:
    """An exponential mean's next value (the first measurement stands alone)."""
    return 0.8 * mean + 0.2 * seconds if mean else seconds


_VIEW_TIMES: weakref.WeakKeyDictionary[Collection, _ViewTimes] = weakref.WeakKeyDictionary()


def _certainty(calibration: Calibration | None) -> Callable[[float], float]:
    """The inliers that make a candidate of a given cosine certain: P(copy) >= CERTAIN under the
    calibration, solved for the count (its log-odds are linear in it); uncalibrated, CERTAIN_INLIERS.
    As a count, verification can stop matching a query's other orientation once it is reached."""
    if calibration is None:
        return lambda cosine: CERTAIN_INLIERS
    if calibration.inliers <= 0:
        return lambda cosine: math.inf
    z = math.log(CERTAIN / (1 - CERTAIN))
    return lambda cosine: calibration.free + (z - calibration.bias - calibration.score * cosine) / calibration.inliers


def stored_keypoints(collection: Collection, id: int) -> list[verify.LocalFeatures] | None:
    """A stored item's keypoints as a query's (not mirrored: its image is not kept), or None."""
    blob = collection.keypoints([id]).get(id)
    return None if blob is None else [verify.unpack(blob)]


def _rescore_views(query: np.ndarray, hits: list[Hit], evidence: dict[int, Candidate]) -> list[Hit]:
    """Hits re-scored by their stored views, best first (items added before views were stored
    keep the pooled cosine)."""
    have = [h for h in hits if evidence[h.id].views is not None]
    if have:
        q = np.asarray(query, np.float32).reshape(-1)
        new = view_scores(q, np.array([h.cosine for h in have], np.float32), np.stack([evidence[h.id].views for h in have]))
        for h, s in zip(have, new):
            h.cosine = float(s)
    return sorted(hits, key=lambda h: -h.cosine)


def _with_query_views(
    collection: Collection, views: np.ndarray, embedding: np.ndarray, hits: list[Hit], evidence: dict[int, Candidate], where: dict[str, Any] | None,
    exclude: Sequence[int], features: bool,
) -> tuple[list[Hit], dict[int, list[int]]]:
    """The shortlist widened by the query's views: what each view finds joins it; a hit's score
    becomes the better of the upright query's and its best turned view's (less TURN_PENALTY: a
    region's chance matches with other crops of a scene cost more than they found, so regions
    only bring candidates to verification); and each view's best few are moved up to be verified
    right after the upright query's first LEAD. Hits without stored views keep their place.
    Also returns, for each hit regions picked, those regions (REGION_BOXES' indices) in the order
    its boxes are tried."""
    found = collection.search(np.asarray(views, np.float32), VIEW_DEPTH, where, exclude, views=True, features=features)
    for c in (c for row in found for c in row):
        if c.id not in evidence and c.views is not None:
            evidence[c.id] = c
            hits.append(Hit(c.key, c.score, c.id, c.metadata))
    have = [h for h in hits if evidence[h.id].views is not None]
    if not have:
        return hits, {}
    vectors = np.vstack([np.asarray(embedding, np.float32).reshape(1, -1), views])
    s = view_score_matrix(vectors, np.stack([evidence[h.id].views for h in have]))  # [m, N_QUERY_VIEWS]
    turned = s[:, 1 : 1 + len(TURNS)].max(axis=1) - TURN_PENALTY
    for h, upright, t in zip(have, s[:, 0], turned):
        h.cosine = float(max(upright, t))
    order = sorted(hits, key=lambda h: -h.cosine)
    picks: dict[int, None] = {}  # in the order they are verified: the turned views', then the regions'
    for j in range(1, 1 + len(TURNS)):
        for i in np.argsort(-s[:, j], kind="stable")[:TURNED_PICKS]:
            picks[have[i].id] = None
    # A region picks its best by the index's own order: its crop of the scene is scored against
    # the stored crops more often than against the whole it was pasted from. The picks are
    # verified in _region_order's order: the region holding a paste usually ranks it first, and a
    # certain hit ends verification.
    by_region = sorted(
        (n, -c.score, c.id, r) for r, row in enumerate(found[len(TURNS) :]) for n, c in enumerate([c for c in row if c.views is not None][:REGION_PICKS])
    )
    for id_ in _region_order(by_region):
        picks[id_] = None
    lead = {h.id for h in order[:LEAD]}
    by_id = {h.id: h for h in hits}
    ordered = order[:LEAD] + [by_id[i] for i in picks if i not in lead] + [h for h in order if h.id not in lead and h.id not in picks]
    regions: dict[int, list[int]] = {}
    for _, _, id_, r in by_region:  # a hit several regions picked tries each box, in that order
        regions.setdefault(id_, []).append(r)
    return ordered, regions


def _region_order(by_region: list[tuple[int, float, int, int]]) -> list[int]:
    """The ids regions picked (``by_region``: (pick rank, -score, id, region), sorted), in the
    order they are verified: those more regions picked first, then by their best pick's rank and
    score. The original of a pasted photo is picked by every region holding the paste, and so comes
    first ~0.54 of the time against ~0.19 by rank and score alone: at a 92 ms budget, all 248
    pasted queries at 100k, photographs 0.868 -> 0.886 and 0.851 -> 0.868 in two runs."""
    count = collections.Counter(id_ for _, _, id_, _ in by_region)
    best: dict[int, tuple[int, float]] = {}
    for n, neg_score, id_, _ in by_region:  # sorted, so an id's best pick comes first
        best.setdefault(id_, (n, neg_score))
    return sorted(best, key=lambda i: (-count[i], *best[i]))


def _verify_picks(
    query: Sequence[verify.LocalFeatures],
    hits: list[Hit],
    collection: Collection,
    certain_at: Callable[[float], float],
    regions: dict[int, list[int]],
    deadline: Deadline | None = None,
) -> bool:
    """``_verify`` with every region pick's first box (the region that ranked it best) tried
    before any pick's second: a pasted photo's original is mostly confirmed by its first, while a
    pick many regions made (a texture like the query's background) tried all its boxes before
    the next pick was reached. At 90 ms, all 248 pasted queries at 100k, photographs
    0.912 -> 0.930, 0.921 -> 0.947, 0.912 -> 0.939, 0.904 -> 0.921 in four runs; 600 random:
    the same."""
    first = {i: r[:1] for i, r in regions.items()}
    later = {i: r[1:] for i, r in regions.items() if len(r) > 1}
    return _verify(query, hits, collection, certain_at, first, deadline) or (bool(later) and _verify(query, hits, collection, certain_at, later, deadline))


def _verify(
    query: Sequence[verify.LocalFeatures],
    hits: list[Hit],
    collection: Collection,
    certain_at: Callable[[float], float],
    regions: dict[int, list[int]] | None = None,
    deadline: Deadline | None = None,
) -> bool:
    """Counts inliers for the best-scored hits, in order, until one is certain (then True) or
    VERIFY_MAX are done: a copy is nearly always found among the first few, and each costs half a
    millisecond. Hits counted before keep their count. A hit regions of the query brought
    (``regions``: id -> the REGION_BOXES indices of the regions that picked it, best first) is
    matched by each region's share of the query's points too, then by the region's ORB points
    found again at full detail, until certain: a photo pasted small into another holds few of the
    whole query's points (pasted copies found first 0.49 -> 0.84, docs/decisions/query-views.md). Keypoints (~16 KB an item) are read in rounds of
    1, 2, 4, ... candidates: reading the whole shortlist's would cost more than verifying the one
    a copy usually needs. A round stops where it is once one of its hits is certain. Hits past
    that, those ``deadline`` left no time for, and items added without keypoints, keep no count
    (or the one they had, or what they reached)."""
    regions = regions or {}
    done = threading.Event()  # a hit is certain (or verification is over): the others stop where they are

    def stop() -> bool:
        return done.is_set() or _passed(deadline)

    def count(h: Hit, blob: bytes) -> int | None:
        if stop():  # checked by each candidate and box: a round may hold 32 of them
            return h.inliers
        stored, need = verify.unpack(blob), certain_at(h.cosine)
        n = h.inliers if h.inliers is not None else verify.inliers(query, stored, need)
        for box in (REGION_BOXES[r] for r in regions.get(h.id, ())):
            if n >= need or stop():
                break
            share = query.share(box) if isinstance(query, verify.QueryFeatures) else verify.within(query, box)
            n = max(n, verify.part_inliers(share, stored))
            again = query.region(box) if n < need and isinstance(query, verify.QueryFeatures) else None
            if again is not None:  # the region's own points, found again (a search's query keeps its image for them)
                n = max(n, verify.inliers(again, stored, need))
        if n >= need:
            done.set()
        return n

    # A hit the whole query's points left uncertain (verified before the views were made, or among
    # the upright query's lead) is matched again by the regions that picked it: the original of a
    # pasted photo often ranks high by the embedding too (7 of the photographs' 26 misses).
    todo, size = [h for h in hits[:VERIFY_MAX] if h.inliers is None or h.id in regions], 1
    try:
        while todo and not _passed(deadline):
            part, todo, size = todo[:size], todo[size:], 2 * size
            blobs = collection.keypoints([h.id for h in part])
            part = [h for h in part if h.id in blobs]
            # A round's candidates are counted on worker threads (OpenCV and FAISS let go of the
            # GIL), and its regions' points found ahead of them on threads that fall idle.
            counts = _VERIFYING.map(lambda h: count(h, blobs[h.id]), part) if len(part) > 1 else None  # queued first
            _regions_ahead(query, [b for h in part for b in regions.get(h.id, ())], stop)
            for h, n in zip(part, counts if counts is not None else [count(h, blobs[h.id]) for h in part]):
                h.inliers = n
            if done.is_set():
                return True
        return False
    finally:
        done.set()  # regions still queued ahead are not found


def _regions_ahead(query: Sequence[verify.LocalFeatures], boxes: Sequence[int], stop: Callable[[], bool]) -> None:
    """A round's regions' points (REGION_BOXES' indices ``boxes``, in the order its hits try
    them) found on the verifying threads as they fall idle, ahead of the hits that need them:
    a round of one hit tries its boxes one after another on one core, and a round's last hit
    alone on the other. Each is found once (``QueryFeatures.region`` locks a box), and not at
    all once ``stop()``."""
    if not isinstance(query, verify.QueryFeatures):
        return
    for box in dict.fromkeys(REGION_BOXES[b] for b in boxes):
        _VERIFYING.submit(lambda box=box: None if stop() else query.region(box))


def _fuse(engine: Engine, features: np.ndarray, hits: list[Hit], evidence: dict[int, Candidate], shape: Sequence[int]) -> list[Hit]:
    """Hits re-ordered by the head fused with their score; items stored without features follow, unscored."""
    scored = [h for h in hits if evidence[h.id].features is not None]
    if not scored:
        return hits
    cand = np.stack([evidence[h.id].features.reshape(tuple(shape)).astype(np.float32) for h in scored])
    q = np.repeat(np.asarray(features, np.float32).reshape(1, *cand.shape[1:]), len(scored), axis=0)
    head = engine.fuse(q, cand)
    for h, s in zip(scored, head):
        h.head_score = float(s)
    order = np.argsort(-fused_scores(np.array([h.rank for h in scored]), head), kind="stable")
    return [scored[i] for i in order] + [h for h in hits if evidence[h.id].features is None]
