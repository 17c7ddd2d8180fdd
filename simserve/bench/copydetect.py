"""``simserve bench copydetect``: how well the service finds copies of natural photos, and what it
costs, for each collection configuration side by side on one copy set (bench/copyset.py).

Every configuration runs through the service core (``serve.service.Service``: the same decode,
batcher, engine and ranking pipeline a gRPC Search uses) on a fresh collection of the same
references and distractors, and is scored on the same queries:

- recall@1 / recall@10 of the queries that have a reference, per transform too;
- micro-AP (DISC21's µAP) over each query's first (query, hit, score), queries without a copy
  included, so it judges the *returned score* as a threshold, not only the order (and over the
  top 10, where a query's wrong runners-up count too);
- the score at which precision reaches 0.99, the recall there, and how often a distinct
  look-alike (another place of a reference's scene, queried as it is) scores above the score
  set that way without the look-alikes;
- ScorePairs on (copy, reference) and (look-alike, reference) pairs at the bundle's threshold;
- search p50 / p99 (one query at a time), add cost per image, bytes stored per item.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from simserve.bench.copyset import TRANSFORMS, CopySet, Query, build
from simserve.ranking.calibration import evidence_key

CONFIGS = {
    "plain": {"crop_views": False, "verify": False},  # the embedding alone
    "crop-views": {"crop_views": True, "verify": False, "query_views": False},
    "crop-views+verify": {"crop_views": True, "verify": True, "query_views": False},  # the default before query views
    "default": {"crop_views": True, "verify": True, "query_views": True},  # what `simserve serve` gives
    "default-unbudgeted": {"crop_views": True, "verify": True, "query_views": True, "search_budget_ms": 0},  # every candidate verified
}
PRECISION = 0.99


def micro_ap(queries: Sequence[Query], hits: Sequence[Sequence[tuple[str, float]]], depth: int = 1) -> dict[str, float]:
    """µAP over the top ``depth`` (query, hit, score) predictions of every query, and the lowest
    score with precision >= PRECISION over the predictions scoring at least that much (with the
    recall there). At depth 1 each query stands for its best answer, as a user thresholding the
    first hit sees it; deeper, a query's wrong runners-up count against the score too."""
    preds = sorted(((s, key == q.truth) for q, hs in zip(queries, hits) for key, s in hs[:depth]), key=lambda p: -p[0])
    positives = sum(q.truth is not None for q in queries)
    correct = np.cumsum([c for _, c in preds]) if preds else np.zeros(0)
    precision = correct / np.arange(1, len(preds) + 1)
    ap = float(sum(p for p, (_, c) in zip(precision, preds) if c) / max(1, positives))
    ok = np.nonzero(precision >= PRECISION)[0]
    last = int(ok[-1]) if len(ok) else -1
    return {
        "micro_ap": ap,
        f"threshold_at_p{PRECISION}": float(preds[last][0]) if last >= 0 else float("inf"),
        f"recall_at_p{PRECISION}": float(correct[last] / max(1, positives)) if last >= 0 else 0.0,
    }


def score(queries: Sequence[Query], hits: Sequence[Sequence[tuple[str, float]]], photographs: frozenset[str] = frozenset(), threshold: float | None = None) -> dict:
    """Every quality figure of one configuration from its ranked hits (key, returned score) per
    query; the headline figures again over the scenes in ``photographs`` alone; and, given the
    bundle's ``threshold`` for this configuration, the precision and recall a user gets there."""
    rows = [(q, hs) for q, hs in zip(queries, hits) if q.truth is not None]
    first = {q.name: bool(hs) and hs[0][0] == q.truth for q, hs in rows}
    out = {
        "recall@1": float(np.mean(list(first.values()))),
        "recall@10": float(np.mean([q.truth in [k for k, _ in hs[:10]] for q, hs in rows])),
        **micro_ap(queries, hits),
        "micro_ap_top10": micro_ap(queries, hits, depth=10)["micro_ap"],
    }
    # The threshold is set without the look-alikes, then they are asked whether they pass it.
    rest = [(q, hs) for q, hs in zip(queries, hits) if q.transform != "lookalike"]
    thr = micro_ap([q for q, _ in rest], [hs for _, hs in rest])[f"threshold_at_p{PRECISION}"]
    out["lookalike_threshold"] = thr
    looks = [hs for q, hs in zip(queries, hits) if q.transform == "lookalike"]
    out["lookalike_fpr_at_threshold"] = float(np.mean([bool(hs) and hs[0][1] >= thr for hs in looks])) if looks else None
    out["per_transform_recall@1"] = {
        t: float(np.mean([first[q.name] for q, _ in rows if q.transform == t])) for t in dict.fromkeys(q.transform for q, _ in rows)
    }
    if threshold is not None:
        out["at_bundle_threshold"] = at_threshold(queries, hits, threshold)
    photo = [(q, hs) for q, hs in zip(queries, hits) if q.name.split("/")[0] in photographs]
    if photo:
        sub = score([q for q, _ in photo], [hs for _, hs in photo], threshold=threshold)
        out["photographs"] = {k: sub[k] for k in ("recall@1", "recall@10", "micro_ap", f"recall_at_p{PRECISION}", "at_bundle_threshold") if k in sub}
        out["photographs"]["queries"] = len(photo)
    return out


def at_threshold(queries: Sequence[Query], hits: Sequence[Sequence[tuple[str, float]]], threshold: float) -> dict:
    """What a user thresholding each query's first hit at ``threshold`` gets: precision, recall,
    and how many copy-less queries (look-alikes and transformed look-alikes) pass."""
    passed = [(q, hs[0][0] == q.truth) for q, hs in zip(queries, hits) if hs and hs[0][1] >= threshold]
    positives = sum(q.truth is not None for q in queries)
    none = [hs for q, hs in zip(queries, hits) if q.truth is None]
    return {
        "threshold": threshold,
        "precision": float(np.mean([ok for _, ok in passed])) if passed else None,
        "recall": sum(ok for _, ok in passed) / max(1, positives),
        "copyless_passing": float(np.mean([bool(hs) and hs[0][1] >= threshold for hs in none])) if none else None,
    }


async def _measure(bundle: str | None, cs: CopySet, options: dict, k: int, progress: bool, photographs: frozenset[str]) -> dict:
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    with tempfile.TemporaryDirectory() as d:
        cut = []  # searches the server's budget answered before every candidate was verified
        svc = Service(load_engine(bundle), Collections(d), ServerConfig(collection="bench", **options), on_cut=lambda: cut.append(1))
        items = [(key, data, None) for key, data in {**cs.references, **cs.distractors}.items()]
        t = time.perf_counter()
        for s in range(0, len(items), 32):
            await svc.add("bench", items[s : s + 32], None)
            _tick(progress, f"adding {s + 32}/{len(items)}")
        add_ms = (time.perf_counter() - t) * 1000 / len(items)
        await svc.search(ImageRef(data=cs.queries[0].data), "bench", k, 0, {}, None)  # warm-up
        hits, times = [], []
        for i, q in enumerate(cs.queries):
            t = time.perf_counter()
            found = await svc.search(ImageRef(data=q.data), "bench", k, 0, {}, None)
            times.append((time.perf_counter() - t) * 1000)
            hits.append([(h.key, h.score) for h in found])
            _tick(progress, f"searching {i + 1}/{len(cs.queries)}")
        cal = svc.calibrations.get(evidence_key(bool(options.get("crop_views")), bool(options.get("verify"))))
        svc.close()
        stored = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file() and f.suffix != ".faiss")
    return {
        **score(cs.queries, hits, photographs, cal.threshold if cal else None),
        "calibrated": cal is not None,
        "search_p50_ms": statistics.median(times),
        "search_p99_ms": float(np.percentile(times, 99)),
        "searches_cut_by_budget": len(cut) / len(cs.queries),
        "add_ms_per_image": add_ms,
        "stored_bytes_per_item": stored / len(items),
        "items": len(items),
    }


async def _pairs(bundle: str | None, cs: CopySet) -> dict:
    """ScorePairs at the threshold it decides by: P(copy) at the calibration's with a calibrated
    bundle, else the head's score at the bundle's; and the head at its own threshold, beside it."""
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.service import ImageRef, Service

    with tempfile.TemporaryDirectory() as d:
        svc = Service(load_engine(bundle), Collections(d))
        copies = [(ImageRef(data=q.data), ImageRef(data=cs.references[q.truth])) for q in cs.queries if q.truth is not None]
        looks = [
            (ImageRef(data=q.data), ImageRef(data=data))
            for q in cs.queries if q.transform == "lookalike"
            for key, data in cs.references.items() if key.split("/")[0] == q.name.split("/")[0]
        ]
        (copy_scores, copy_head), thr = await _scores(svc, copies)
        (look_scores, look_head), _ = await _scores(svc, looks)
        head_thr = svc.bundle.threshold
        svc.close()
    return {
        "threshold": float(thr),
        "copy_pairs_matched": float(np.mean(copy_scores >= thr)),
        "lookalike_pairs": len(looks),
        "lookalike_pairs_matched": float(np.mean(look_scores >= thr)) if len(looks) else None,
        "head_threshold": float(head_thr),
        "head_copy_pairs_matched": float(np.mean(copy_head >= head_thr)),
        "head_lookalike_pairs_matched": float(np.mean(look_head >= head_thr)) if len(looks) else None,
    }


async def _scores(svc, pairs: list) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """(scores, head scores) of many pairs, a request's worth at a time; and the threshold ScorePairs decides by."""
    parts = [await svc.score_pairs(pairs[s : s + 256], None, 0.0, None) for s in range(0, len(pairs), 256)]
    if not parts:
        return (np.zeros(0), np.zeros(0)), svc.bundle.threshold
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), parts[0][3]


def _tick(progress: bool, text: str) -> None:
    if progress:
        print(f"\r  {text}      ", end="", file=sys.stderr, flush=True)


def run(
    bundle: str | None = None,
    *,
    distractors: int = 10_000,
    refs_per_scene: int = 8,
    configs: Sequence[str] = tuple(CONFIGS),
    transforms: Sequence[str] = tuple(TRANSFORMS),
    scenes: list | None = None,
    k: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    from simserve.photos import scenes as photo_scenes

    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise ValueError(f"unknown configuration {bad[0]!r}; choose from {', '.join(CONFIGS)}")
    chosen = scenes if scenes is not None else photo_scenes("eval")
    photographs = frozenset(s.name for s in chosen if getattr(s, "photograph", False))
    if not chosen:
        raise SystemExit("no benchmark photos installed: run scripts/install-data.sh --photos")
    t0 = time.perf_counter()
    cs = build(chosen, refs_per_scene=refs_per_scene, distractors=distractors, transforms=tuple(transforms), seed=seed,
               progress=lambda s: _tick(progress, s))
    out: dict = {
        "set": {
            "scenes": len(chosen), "references": len(cs.references), "distractors": len(cs.distractors),
            "queries": len(cs.queries), "queries_with_a_copy": sum(q.truth is not None for q in cs.queries),
            "lookalike_queries": sum(q.transform == "lookalike" for q in cs.queries), "transforms": list(transforms), "seed": seed,
            "sources": cs.scenes, "photograph_scenes": sorted(photographs),
        },
        "pairs": asyncio.run(_pairs(bundle, cs)),
        "configs": {},
    }
    for name in configs:
        _tick(progress, f"{name}: ")
        out["configs"][name] = asyncio.run(_measure(bundle, cs, CONFIGS[name], k, progress, photographs))
    if progress:
        print(file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    return out


def table(result: dict) -> str:
    """The side-by-side table for the README."""
    cols = list(result["configs"])
    rows = [("recall@1", "recall@1", "{:.3f}"), ("recall@10", "recall@10", "{:.3f}"), ("µAP, first hit (returned score)", "micro_ap", "{:.3f}"), ("µAP, top 10", "micro_ap_top10", "{:.3f}"),
            (f"recall at precision {PRECISION}", f"recall_at_p{PRECISION}", "{:.3f}"),
            ("look-alikes above that score", "lookalike_fpr_at_threshold", "{:.3f}"),
            ("search p50 ms", "search_p50_ms", "{:.1f}"), ("search p99 ms", "search_p99_ms", "{:.1f}"),
            ("searches cut by the budget", "searches_cut_by_budget", "{:.3f}"),
            ("add ms / image", "add_ms_per_image", "{:.1f}"), ("stored KB / item", "stored_bytes_per_item", "{:.1f}")]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, fmt in rows:
        vals = [result["configs"][c].get(key) for c in cols]
        vals = [v / 1024 if key == "stored_bytes_per_item" else v for v in vals]
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) if v is not None else "-" for v in vals) + " |")
    for label, key in (("photographs: recall@1", "recall@1"), ("photographs: µAP, first hit", "micro_ap")):
        vals = [result["configs"][c].get("photographs", {}).get(key) for c in cols]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    for label, key in (("at the bundle's threshold: precision", "precision"), ("at the bundle's threshold: recall", "recall"), ("at the bundle's threshold: copy-less queries passing", "copyless_passing")):
        vals = [result["configs"][c].get("at_bundle_threshold", {}).get(key) for c in cols]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    for t in result["set"]["transforms"]:
        lines.append(f"| recall@1: {t} | " + " | ".join(f"{result['configs'][c]['per_transform_recall@1'][t]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
