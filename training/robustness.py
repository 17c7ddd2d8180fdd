"""Which transformations cost the model retrieval accuracy: recall@1 per augmentation subset,
and what indexing the originals with crop views (simserve/inference/crops.py) and verifying a search's
top hits geometrically (simserve/ranking/verify.py) win back.

    python -m training.robustness runs/default     # writes runs/default/robustness.json
    python -m training.robustness simserve/bundles/default --out docs/default-robustness.json --draws 99,7   # a bundle
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from simserve.inference.bundle import load_bundle
from simserve.inference.crops import N_VIEWS, crop_view_pixels, pool_views
from simserve.inference.engine import TorchEngine
from simserve.inference.pixels import normalize
from simserve.model import SiameseNet, load_checkpoint
from simserve.ranking import verify
from simserve.ranking.scores import fused_scores, verified_score
from simserve.ranking.views import RESCORE_DEPTH, view_scores
from training.augment import CopyAugment
from training.evaluate import embed_images, evaluate_copy, head_scores
from training.recipe import Recipe, load_recipe
from training.sources import ImageSet
from training.trainer import load_data


def variants(size: int) -> dict[str, CopyAugment]:
    full = CopyAugment(size)
    none = CopyAugment(size, crop_p=0, aspect_p=0, pad_p=0, flip_p=0, rotate_p=0, jitter_p=0, grey_p=0, blur_p=0, overlay_p=0, jpeg_p=0)
    return {
        "all augmentations (training distribution)": full,
        "crops of at least 50% area": dataclasses.replace(full, crop_scale=(0.5, 1.0)),
        "no crop": dataclasses.replace(full, crop_p=0.0),
        "no overlay, no rotation": dataclasses.replace(full, overlay_p=0.0, rotate_p=0.0),
        "crop only (30-100% area)": dataclasses.replace(none, crop_p=1.0),
        "colour + JPEG only": dataclasses.replace(none, jitter_p=1.0, grey_p=0.2, jpeg_p=1.0),
    }


@torch.no_grad()
def crop_view_recall(
    model: SiameseNet,
    held_out: ImageSet,
    augment: CopyAugment,
    n_queries: int = 1000,
    seed: int = 1234,
    keypoints: list[verify.LocalFeatures] | None = None,
) -> dict[str, float]:
    """recall@1/@10 as in ``evaluate_copy`` (same queries), but every original is indexed the
    way a crop-views collection stores it: PNG bytes -> the six views -> pooled embedding; and
    recall@1 once a search re-scores its top RESCORE_DEPTH by the stored views, then also with
    the head (a crop-views Search with ``rerank``: the head sees the whole original's features).
    With the originals' ``keypoints``, also recall@1 of verifying collections (the top
    RESCORE_DEPTH re-ordered by ``verify.verified_score``), crop-views and plain (what it costs:
    ``simserve bench index --parts verify``)."""
    model.eval()
    cfg = model.cfg
    vecs, whole = [], []
    for im in held_out.images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        views = crop_view_pixels(buf.getvalue(), cfg.input_size, cfg.in_channels)
        f, e = model.embed(torch.from_numpy(normalize(views, cfg.mean, cfg.std)))
        vecs.append(e.numpy())
        whole.append(f[:1])
    views = np.stack(vecs).reshape(len(vecs), N_VIEWS, -1)
    gallery, g_f = torch.from_numpy(pool_views(views)), torch.cat(whole)
    rng = np.random.default_rng(seed)
    qidx = np.sort(rng.choice(len(held_out), size=min(n_queries, len(held_out)), replace=False))
    queries = [augment(held_out.images[i], random.Random(f"eval:{seed}:{i}")) for i in qidx]
    q_f, q = embed_images(model, queries)
    sim = q @ gallery.t()
    top = sim.topk(10, dim=1).indices.numpy()
    cos, cand = (t.numpy() for t in sim.topk(RESCORE_DEPTH, dim=1))
    rescored = np.stack([view_scores(qv, s, views[c]) for qv, s, c in zip(q.numpy(), cos, cand)])
    head = head_scores(model, q_f.repeat_interleave(RESCORE_DEPTH, 0), g_f[torch.from_numpy(cand.reshape(-1))]).reshape(cand.shape)
    rows = np.arange(len(cand))
    out = {
        "recall@1": float((top[:, 0] == qidx).mean()),
        "recall@10": float((top == qidx[:, None]).any(1).mean()),
        "view_rescored_recall@1": float((cand[rows, rescored.argmax(1)] == qidx).mean()),
        "view_rescored_rerank_recall@1": float((cand[rows, fused_scores(rescored, head).argmax(1)] == qidx).mean()),
    }
    if keypoints is not None:
        plain_cos, plain_cand = (t.numpy() for t in (q @ torch.from_numpy(views[:, 0]).t()).topk(RESCORE_DEPTH, dim=1))
        q_kp = [verify.query_features(im) for im in queries]
        inl = np.array([[verify.inliers(k, keypoints[c]) for c in row] for k, row in zip(q_kp, cand)], np.float64)
        plain_inl = np.array([[verify.inliers(k, keypoints[c]) for c in row] for k, row in zip(q_kp, plain_cand)], np.float64)
        out["verified_recall@1"] = float((cand[rows, verified_score(rescored, inl).argmax(1)] == qidx).mean())
        out["plain_verified_recall@1"] = float((plain_cand[rows, verified_score(plain_cos, plain_inl).argmax(1)] == qidx).mean())
    return out


def model_and_recipe(path: Path) -> tuple[SiameseNet, Recipe]:
    """A training run's model.pt, or an exported bundle (its manifest keeps the recipe)."""
    if (path / "model.pt").exists():
        model, payload = load_checkpoint(path / "model.pt")
        return model.to(memory_format=torch.contiguous_format).eval(), Recipe.from_dict(json.loads(payload["recipe"]))
    bundle = load_bundle(path)
    return TorchEngine(bundle).model, Recipe.from_dict(bundle.manifest["recipe"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.robustness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a training run (its model.pt) or an exported bundle")
    ap.add_argument("--out", type=Path, help="where the JSON goes (default PATH/robustness.json)")
    ap.add_argument("--draws", default="", help="more query seeds (e.g. 99,7) for the training-distribution crop-views rows: one draw of 1,000 queries moves recall@1 by ~0.01")
    ap.add_argument("--recipe", help="evaluate on this recipe's held-out images (e.g. default) instead of the model's own: two models, one test set")
    args = ap.parse_args(argv)
    model, recipe = model_and_recipe(args.path)
    if args.recipe:
        recipe = load_recipe(args.recipe)
    data = load_data(recipe, model.cfg)
    n = recipe.eval.queries
    rows = {}
    augments = variants(model.cfg.input_size)
    for name, aug in augments.items():
        m = evaluate_copy(model, data.held_out, aug, n_queries=n)
        rows[name] = {k: m[k] for k in ("recall@1", "recall@10", "rerank_recall@1", "head_rerank_recall@1", "pair_auc")}
        print(name, rows[name], flush=True)
    keypoints = [verify.unpack(verify.keypoints(im)) for im in data.held_out.images]
    for name in ("all augmentations (training distribution)", "crop only (30-100% area)", "no crop"):
        rows[f"{name}, originals indexed with crop views"] = r = crop_view_recall(model, data.held_out, augments[name], n, keypoints=keypoints)
        print(f"{name}, crop views", r, flush=True)
    name = "all augmentations (training distribution)"
    for seed in (int(s) for s in args.draws.split(",") if s):
        rows[f"{name}, originals indexed with crop views, query draw {seed}"] = r = crop_view_recall(model, data.held_out, augments[name], n, seed, keypoints)
        print(f"{name}, crop views, draw {seed}", r, flush=True)
    (args.out or args.path / "robustness.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
