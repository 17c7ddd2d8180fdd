"""``simserve calibrate``: fit a bundle's map from search evidence to P(copy), on photos the
benchmark never uses, and write it into the bundle's manifest.

A copy set (bench/copyset.py) is cut from the *training* scenes of ``simserve.photos``; its
references and distractors go into two collections through the service core (the real add
path), one plain and one with crop views, both verifying. Every query's shortlist is read
with its evidence (``ranking.pipeline.shortlist``, verification not stopped early), and one
logistic model is fitted per evidence set (``ranking.calibration.evidence_key``): the top 10 by
the embedding alone, and the verified candidates with their inliers (and, in the plain
collection, with the fusion head's score too: the model ScorePairs and compare decide by).
Search then returns that probability as the score, and the bundle's threshold at precision 0.99
for each evidence set.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from simserve.bench.copyset import TRANSFORMS, CopySet, build
from simserve.ranking.calibration import PAIR, Calibration, evidence_key, fit

TOP = 10  # candidates per query the embedding-only models are fitted on: what a user asks for


async def _evidence(bundle: str | None, cs: CopySet, crop_views: bool, tick: Callable[[str], None]) -> dict[str, list]:
    """(score, inliers, head, label, query) rows for both evidence sets of one collection
    configuration. head: the fusion head's score of query and verified candidate in the plain
    collection (a pair's model is fitted on those rows), 0.5 (log-odds 0) where not computed."""
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.ranking import pipeline, verify
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import Service

    pair = not crop_views  # a pair is scored as a plain collection's hit, with the head beside it
    rows: dict[str, list] = {evidence_key(crop_views, False): [], evidence_key(crop_views, True): []}
    with tempfile.TemporaryDirectory() as d:
        svc = Service(load_engine(bundle), Collections(d), ServerConfig(collection="calibrate", crop_views=crop_views, verify=True, search_budget_ms=0))
        items = [(key, data, None) for key, data in {**cs.references, **cs.distractors}.items()]
        for s in range(0, len(items), 32):
            await svc.add("calibrate", items[s : s + 32], None)
            tick(f"{evidence_key(crop_views, True)}: adding {min(s + 32, len(items))}/{len(items)}")
        col = svc.collection("calibrate")
        for i, q in enumerate(cs.queries):
            kp = verify.query_features(verify.decode(q.data), regions=True)  # as the server finds them
            if crop_views:  # searched as the server searches it, query views and all
                got, views = await svc.embed_query_views(q.data, None)
                feats, emb = got.features[0], got.embeddings[0]
            else:
                ((feats, emb),), views = await svc.batcher.run_async([svc.decode(q.data, "query")]), None
            hits, _ = pipeline.shortlist(col, pipeline.Query(emb, keypoints=kp, views=views), TOP)
            for h in hits[:TOP]:
                rows[evidence_key(crop_views, False)].append((h.cosine, 0, 0.5, h.key == q.truth, i))
            verified = [h for h in hits if h.inliers is not None]
            head = np.full(len(verified), 0.5)
            if pair and verified:  # the verified candidates' feature maps only, not the shortlist's
                stored = col.features([h.id for h in verified])
                head = svc.engine.fuse(np.repeat(feats[None], len(verified), axis=0), np.stack([stored[h.id] for h in verified]))
            rows[evidence_key(crop_views, True)].extend((h.cosine, h.inliers, float(s), h.key == q.truth, i) for h, s in zip(verified, head))
            tick(f"{evidence_key(crop_views, True)}: searching {i + 1}/{len(cs.queries)}")
        svc.close()
    return rows


def run(
    bundle: str | None = None, *, distractors: int = 1500, refs_per_scene: int = 2, seed: int = 2, scenes: list | None = None,
    rows_out: str | Path | None = None, progress: bool = True,
) -> dict:
    """Fitted calibrations by evidence key, with what they were fitted on (``scenes``: the
    training photo scenes unless given; ``rows_out``: an .npz of the evidence rows, to study)."""
    from simserve.photos import scenes as photo_scenes

    chosen = scenes if scenes is not None else photo_scenes("train")
    if not chosen:
        raise SystemExit("no training photos installed: run scripts/install-data.sh --photos")

    def tick(text: str) -> None:
        if progress:
            print(f"\r  {text}      ", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    cs = build(chosen, refs_per_scene=refs_per_scene, distractors=distractors, transforms=tuple(TRANSFORMS), seed=seed, progress=tick)
    fitted: dict[str, dict] = {}
    evidence = {k: np.array(r, np.float64) for views in (False, True) for k, r in asyncio.run(_evidence(bundle, cs, views, tick)).items()}
    if rows_out:
        np.savez_compressed(rows_out, **{k.replace("+", "_"): a for k, a in evidence.items()})
    evidence[PAIR] = evidence[evidence_key(False, True)]  # the same rows, with the head's scores in
    for key, a in evidence.items():
        cal = fit(a[:, 0], a[:, 1] if "+inliers" in key else None, a[:, 3], head=a[:, 2] if key == PAIR else None)
        fitted[key] = {**cal.to_dict(), "candidates": len(a), "copies": int(a[:, 3].sum())}
    if progress:
        print(file=sys.stderr)
    return {
        **fitted,
        "fitted_on": {
            "scenes": len(chosen), "split": "train" if scenes is None else "given", "references": len(cs.references), "distractors": len(cs.distractors),
            "queries": len(cs.queries), "seed": seed, "transforms": list(TRANSFORMS), "seconds": round(time.perf_counter() - t0, 1),
        },
    }


def write(bundle_dir: str | Path, calibration: dict) -> Path:
    """The calibration into the bundle's manifest (atomically; files and checksums untouched)."""
    from simserve.atomic import atomic_write
    from simserve.inference.bundle import MANIFEST

    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["calibration"] = calibration
    for key, d in calibration.items():
        if isinstance(d, dict) and "bias" in d:
            Calibration.from_dict(d)  # refuse to write what a server would refuse to load
    atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path
