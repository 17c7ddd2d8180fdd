"""Learned whitening of the embedding, folded into the tower's projection.

After training, a copy's embedding still sits off its original's along a few directions
that the metric loss left wide (what crops, colour shifts and overlays move). Learned
whitening (Radenovic, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018, sec. 3.3) measures those directions on (copy, original) pairs of
*training* images and shrinks them: z -> Cw^(-1/2) (z - m), with Cw the covariance of the
copy - original differences and m the originals' mean. Fitted on the projection's output
before the L2 normalisation, the map is affine, so it folds into the projection's weight and
bias: the exported model keeps its shape and cost, and every stored vector is simply made
with the whitened tower. The head compares feature maps, which whitening leaves alone.

Default model: recall@1 by embedding 0.839 -> 0.843, crop-views re-scored 0.901 -> 0.916; cosine
as a global-threshold pair verifier gets a little worse (docs/decisions/whitening.md).

    python -m training.whiten runs/default [default]   # whiten a finished run in place (with a recipe's
                                                       # settings if given), then re-evaluate
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from simserve.model import SiameseNet, load_checkpoint, save_checkpoint
from training.evaluate import input_batches
from training.sources import ImageSet


@torch.no_grad()
def unnormalised_embeddings(model: SiameseNet, images: list[Image.Image], batch: int = 256) -> np.ndarray:
    return np.concatenate([model.tower.project(model.tower.feature_map(x)).double().numpy() for x in input_batches(model, images, batch)])


def fit_whitening(originals: np.ndarray, copies: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """[n, d] originals and [r, n, d] copies of them -> (A, m) with whitened z = A (z - m).

    A is the inverse square root of the copy - original covariance, its eigenvalues floored
    at ``eps`` times the largest. (The paper follows with a PCA rotation; at full dimension a
    rotation leaves every cosine as it is, so it is left out.)"""
    diffs = (copies - originals[None]).reshape(-1, originals.shape[1])
    cw = diffs.T @ diffs / len(diffs)
    w, u = np.linalg.eigh(cw)
    w = np.maximum(w, eps * w.max())
    return (u * w**-0.5) @ u.T, originals.mean(0)


@torch.no_grad()
def fold_into(proj: nn.Linear, a: np.ndarray, m: np.ndarray) -> None:
    """proj(x) = W x + b  ->  A (W x + b - m) = (A W) x + A (b - m)."""
    at = torch.from_numpy(a)
    w, b = proj.weight.double(), proj.bias.double()
    proj.weight.copy_(at @ w)
    proj.bias.copy_(at @ (b - torch.from_numpy(m)))


def whiten(model: SiameseNet, images: ImageSet, augment: Any, rounds: int, eps: float, seed: int) -> dict[str, float]:
    """Fit learned whitening on ``rounds`` augmented copies of every image and fold it into
    ``model``'s projection. Copies are seeded by (seed, round, index): reproducible."""
    t0 = time.time()
    model.eval()
    originals = unnormalised_embeddings(model, images.images)
    copies = np.stack(
        [
            unnormalised_embeddings(model, [augment(im, random.Random(f"whiten:{seed}:{r}:{i}")) for i, im in enumerate(images.images)])
            for r in range(rounds)
        ]
    )
    a, m = fit_whitening(originals, copies, eps)
    fold_into(model.tower.proj, a, m)
    return {"pairs": int(rounds * len(images)), "eps": eps, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    from training.recipe import Recipe, load_recipe
    from training.trainer import evaluate, load_data  # here: the trainer imports this module

    args = argv if argv is not None else sys.argv[1:]
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    run = Path(args[0])
    model, payload = load_checkpoint(run / "model.pt")
    recipe = Recipe.from_dict(json.loads(payload["recipe"]))
    if len(args) > 1:  # a run trained before its recipe whitened: take a recipe's whitening settings
        newer = load_recipe(args[1]).train
        recipe.train.whiten_rounds, recipe.train.whiten_eps = newer.whiten_rounds, newer.whiten_eps
        payload["recipe"] = json.dumps(recipe.to_dict())
    result = json.loads((run / "metrics.json").read_text())
    if result.get("whitening"):
        raise SystemExit(f"{run} is already whitened ({result['whitening']}); whitening twice would distort it")
    s = recipe.train
    if not s.whiten_rounds:
        raise SystemExit(f"{run}: its recipe has train.whiten_rounds = 0 (whitening off)")
    data = load_data(recipe, model.cfg)
    model = model.to(memory_format=torch.contiguous_format)
    result["whitening"] = whiten(model, data.train, data.augment, s.whiten_rounds, s.whiten_eps, recipe.seed)
    result["metrics"] = metrics = evaluate(model, data, recipe)
    save_checkpoint(run / "model.pt", model, metrics=json.dumps(metrics), recipe=payload["recipe"])
    (run / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
