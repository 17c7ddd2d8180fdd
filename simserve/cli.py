"""The ``simserve`` command line: one entry point, one subcommand per job.

Subcommands import their machinery lazily, so ``simserve serve`` never
loads torch or the training code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simserve import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe
    from training.trainer import train

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe.seed = args.seed
    for override in args.set or []:
        key, _, value = override.partition("=")
        section, _, field = key.partition(".")
        target = recipe.train if section == "train" else getattr(recipe, section)
        parsed = json.loads(value) if value[:1] in "[{0123456789-tf" else value
        if isinstance(target, dict):
            target[field] = parsed
        elif hasattr(target, field):
            setattr(target, field, parsed)
        else:
            raise SystemExit(f"--set {key}: no such setting")
    out = Path(args.out or f"runs/{recipe.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(["simserve"] + sys.argv[1:]) + "\n")
    result = train(recipe, out, resume=args.resume, progress=not args.quiet)
    if "metrics" in result:
        print(json.dumps(result["metrics"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simserve",
        description="Siamese image similarity: train, export, serve and score.",
    )
    p.add_argument("--version", action="version", version=f"simserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model from a recipe (also under torchrun for DDP)",
        description="Train a Siamese model from a recipe. Writes last.pt (resumable), model.pt, "
        "metrics.json and log.jsonl into --out. Under `torchrun --nproc_per_node=N simserve train ...` "
        "it trains with DistributedDataParallel (gloo on CPU).",
    )
    t.add_argument("--recipe", required=True, help="recipe name (training/recipes/*.json) or path to a JSON recipe")
    t.add_argument("--out", help="output folder (default runs/RECIPE_NAME)")
    t.add_argument("--seed", type=int, help="override the recipe's seed")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value, e.g. train.epochs=2 or model.head=dynamic")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
