"""Re-run the held-out evaluation of a finished run (after the evaluation code changed)
and record it in metrics.json and model.pt, so the next export carries it.

    python -m training.reevaluate runs/default [default]   # optionally with a recipe's eval section
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from simserve.model import load_checkpoint, save_checkpoint
from training.recipe import Recipe, load_recipe
from training.trainer import evaluate, load_data


def main(argv: list[str] | None = None) -> int:
    args = argv or sys.argv[1:]
    run = Path(args[0])
    model, payload = load_checkpoint(run / "model.pt")
    recipe = Recipe.from_dict(json.loads(payload["recipe"]))
    if len(args) > 1:  # evaluate as a (newer) recipe says: its eval section, the run's data and model
        recipe.eval = load_recipe(args[1]).eval
        payload["recipe"] = json.dumps(recipe.to_dict())
    metrics = evaluate(model.to(memory_format=torch.contiguous_format), load_data(recipe, model.cfg), recipe)
    save_checkpoint(run / "model.pt", model, metrics=json.dumps(metrics), recipe=payload["recipe"])
    result = json.loads((run / "metrics.json").read_text())
    result["metrics"] = metrics
    result["recipe"] = recipe.to_dict()
    (run / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
