"""Which transformations cost the model retrieval accuracy: recall@1 per augmentation subset.

    python -m training.robustness runs/default     # writes runs/default/robustness.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from simserve.model import load_checkpoint
from training.augment import CopyAugment
from training.evaluate import evaluate_copy
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


def main(argv: list[str] | None = None) -> int:
    run = Path((argv or sys.argv[1:])[0])
    model, payload = load_checkpoint(run / "model.pt")
    model = model.to(memory_format=torch.contiguous_format).eval()
    recipe = Recipe.from_dict(json.loads(payload["recipe"]))
    data = load_data(recipe, model.cfg)
    rows = {}
    for name, aug in variants(model.cfg.input_size).items():
        m = evaluate_copy(model, data.held_out, aug, n_queries=recipe.eval.get("queries", 1000))
        rows[name] = {k: m[k] for k in ("recall@1", "recall@10", "rerank_recall@1", "pair_auc")}
        print(name, rows[name], flush=True)
    (run / "robustness.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
