"""Train every fusion head with the same recipe, data and seed; write one table.

    python -m training.compare_heads --recipe fashion_mnist --out docs/heads

Writes OUT.json (all figures) and OUT.md (the table). Each head's run is
kept under runs/heads/HEAD, so an interrupted comparison resumes per head.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from simserve.inference.config import ModelConfig
from simserve.model import load_checkpoint
from simserve.model.heads import HEAD_REGISTRY
from simserve.model.profile import count_params, flops_per_pair, interleaved_latency
from training.recipe import load_recipe
from training.trainer import load_data, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="fashion_mnist")
    p.add_argument("--heads", nargs="+", default=list(HEAD_REGISTRY), choices=sorted(HEAD_REGISTRY))
    p.add_argument("--out", default="docs/heads")
    p.add_argument("--runs", default="runs/heads")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (docs/heads.md used 6)")
    args = p.parse_args(argv)

    base = load_recipe(args.recipe)
    if args.seed is not None:
        base.seed = args.seed
    if args.epochs:
        base.train.epochs = args.epochs
    data = None  # the same data for every head, loaded only if some head still has to train
    models, results = {}, {}
    for head in args.heads:  # train (or reuse) every head first
        recipe = load_recipe(args.recipe)
        recipe.seed = base.seed
        recipe.model["head"] = head
        if args.epochs:
            recipe.train.epochs = args.epochs
        run = Path(args.runs) / head
        if not (run / "model.pt").exists():
            data = data or load_data(base, ModelConfig.from_dict(base.model))
            train(recipe, run, resume=True, data=data)
        models[head], _ = load_checkpoint(run / "model.pt")
        results[head] = json.loads((run / "metrics.json").read_text())
    # Latency for every head in one go, interleaved, so machine noise hits all alike.
    latency = interleaved_latency(models, batch=64, threads=os.cpu_count() or 1)
    rows = []
    for head, model in models.items():
        m = results[head]["metrics"]
        rows.append({
            "head": head,
            "head_params": count_params(model.head),
            "total_params": count_params(model),
            **flops_per_pair(model),
            **latency[head],
            "pair_auc": m["pair_auc"],
            "pair_accuracy": m["pair_accuracy"],
            "recall@1": m["recall@1"],
            "rerank_recall@1": m["head_rerank_recall@1"],  # the head alone: this table compares heads
            "train_seconds": results[head]["train_seconds"],
        })
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": base.to_dict(), "seed": base.seed, "torch": torch.__version__, "threads": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if not out.with_suffix(".md").exists():
        out.with_suffix(".md").write_text(table(rows, base.name) + "\n")
    else:  # keep the written analysis around the table; replace only the table
        text = out.with_suffix(".md").read_text()
        lines = text.splitlines()
        start = next((i for i, l in enumerate(lines) if l.startswith("| head (")), None)
        if start is None:
            text = text.rstrip() + "\n\n" + table(rows, base.name) + "\n"
        else:
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            text = "\n".join(lines[:start] + table(rows, base.name).splitlines() + lines[end:]) + "\n"
        out.with_suffix(".md").write_text(text)
    print(table(rows, base.name))
    return 0


def table(rows: list[dict], recipe: str) -> str:
    lines = [
        f"| head ({recipe}) | head params | MFLOPs / pair (head) | ms / 64 pairs (head) | ROC-AUC | pair acc | recall@1 (emb) | recall@1 (head re-rank) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['head_params']:,} | {r['pair_mflops']:.1f} ({r['head_mflops']:.1f}) | "
            f"{r['pair_ms']:.1f} ({r['head_ms']:.2f}) | {r['pair_auc']:.4f} | {r['pair_accuracy']:.4f} | "
            f"{r['recall@1']:.4f} | {r['rerank_recall@1']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
