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

Measured on the default model (32 epochs, seed 0; 3 rounds of copies of the 7,528 training
images; two held-out query draws, 1,000 queries among 1,028 originals): recall@1 by
embedding 0.839 / 0.827 -> 0.843 / 0.844 (uncropped copies 0.968 -> 0.981), crop-views
collections re-scored by their views 0.901 / 0.902 -> 0.916 / 0.918. Re-ranking with the head
gains less on top of it (cosine + head: 0.866 / 0.862 -> 0.855 / 0.869).
The eigenvalue floor (``eps`` x the largest) keeps rarely-moved
directions from being blown up by noise: on a first fit, 1e-3 gave 0.914 / 0.913 re-scored,
1e-2 and 2e-2 0.919 / 0.920. Plain PCA whitening of the originals (no pairs) lost recall
(0.878 pooled), and re-fitting the projection with InfoNCE against all training originals
gained only 0.005; on a model trained with clean anchors (data.clean_anchor=0.5), which
already pairs copies with originals, whitening gained nothing.

The price: cosine as a *pair verifier* with one global threshold gets a little worse (held-out
pair ROC-AUC by cosine 0.9989 -> 0.9984; ``simserve bench batch``'s photo copies, recall at
precision 0.99 by cosine 0.888 -> 0.864), since ranking among neighbours is what improves, not
calibration across queries. Match decisions use the head's score, which is unchanged.

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
