"""Which transformations cost the model retrieval accuracy: recall@1 per augmentation subset,
and what indexing the originals with crop views (simserve/views.py) wins back.

    python -m training.robustness runs/default     # writes runs/default/robustness.json
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from simserve.model import SiameseNet, load_checkpoint
from simserve.preprocess import normalize
from simserve.search import fused_scores
from simserve.views import N_VIEWS, RESCORE_DEPTH, crop_view_pixels, pool_views, view_scores
from training.augment import CopyAugment
from training.evaluate import embed_images, evaluate_copy, head_scores
from training.sources import ImageSet
from training.recipe import Recipe
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
def crop_view_recall(model: SiameseNet, held_out: ImageSet, augment: CopyAugment, n_queries: int = 1000, seed: int = 1234) -> dict[str, float]:
    """recall@1/@10 as in ``evaluate_copy`` (same queries), but every original is indexed the
    way a crop-views collection stores it: PNG bytes -> the six views -> pooled embedding; and
    recall@1 once a search re-scores its top RESCORE_DEPTH by the stored views, then also with
    the head (a crop-views Search with ``rerank``: the head sees the whole original's features)."""
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
    q_f, q = embed_images(model, [augment(held_out.images[i], random.Random(f"eval:{seed}:{i}")) for i in qidx])
    sim = q @ gallery.t()
    top = sim.topk(10, dim=1).indices.numpy()
    cos, cand = (t.numpy() for t in sim.topk(RESCORE_DEPTH, dim=1))
    rescored = np.stack([view_scores(qv, s, views[c]) for qv, s, c in zip(q.numpy(), cos, cand)])
    head = head_scores(model, q_f.repeat_interleave(RESCORE_DEPTH, 0), g_f[torch.from_numpy(cand.reshape(-1))]).reshape(cand.shape)
    rows = np.arange(len(cand))
    return {
        "recall@1": float((top[:, 0] == qidx).mean()),
        "recall@10": float((top == qidx[:, None]).any(1).mean()),
        "view_rescored_recall@1": float((cand[rows, rescored.argmax(1)] == qidx).mean()),
        "view_rescored_rerank_recall@1": float((cand[rows, fused_scores(rescored, head).argmax(1)] == qidx).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    run = Path((argv or sys.argv[1:])[0])
    model, payload = load_checkpoint(run / "model.pt")
    model = model.to(memory_format=torch.contiguous_format).eval()
    recipe = Recipe.from_dict(json.loads(payload["recipe"]))
    data = load_data(recipe, model.cfg)
    rows = {}
    augments = variants(model.cfg.input_size)
    for name, aug in augments.items():
        m = evaluate_copy(model, data.held_out, aug, n_queries=recipe.eval.get("queries", 1000))
        rows[name] = {k: m[k] for k in ("recall@1", "recall@10", "rerank_recall@1", "head_rerank_recall@1", "pair_auc")}
        print(name, rows[name], flush=True)
    for name in ("all augmentations (training distribution)", "crop only (30-100% area)", "no crop"):
        rows[f"{name}, originals indexed with crop views"] = r = crop_view_recall(model, data.held_out, augments[name], recipe.eval.get("queries", 1000))
        print(f"{name}, crop views", r, flush=True)
    (run / "robustness.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
