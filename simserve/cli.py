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


def _cmd_export(args: argparse.Namespace) -> int:
    from simserve.bundle import load_bundle
    from simserve.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    b = load_bundle(out)
    print(f"wrote {out}: head={b.config.head} embedding_dim={b.embedding_dim} threshold={b.threshold:.4f}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from simserve.bundle import load_bundle

    b = load_bundle(args.bundle)
    m = dict(b.manifest)
    if not args.full:
        m.pop("recipe", None)
    print(json.dumps({"path": str(b.path), **m}, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from simserve.decode import DecodeError, decode_file
    from simserve.engine import load_engine

    engine = load_engine(args.bundle, args.backend)
    try:
        a, b = decode_file(args.image_a), decode_file(args.image_b)
    except (DecodeError, OSError) as e:
        raise SystemExit(f"simserve compare: {e}")
    score = float(engine.score_images([(a, b)])[0])
    _, emb = engine.embed_images([a, b])
    threshold = args.threshold if args.threshold is not None else engine.bundle.threshold
    result = {"score": score, "match": score >= threshold, "threshold": threshold, "cosine": float(emb[0] @ emb[1])}
    print(json.dumps(result) if args.json else f"score {score:.4f} ({'match' if result['match'] else 'different'} at threshold {threshold:.3f}), embedding cosine {result['cosine']:.4f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simserve.bench.common import emit

    if args.what == "engine":
        from simserve.bench import engine

        result = engine.run(args.bundle, batch=args.batch, repeats=args.repeats, threads=args.threads)
    else:  # argparse restricts the choices
        raise SystemExit(f"unknown benchmark {args.what}")
    emit(result, args.out)
    return 0


def _add_bundle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="model bundle folder (default: the shipped default model)")


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

    e = sub.add_parser(
        "export",
        help="turn a checkpoint into a servable bundle (ONNX + manifest)",
        description="Export CHECKPOINT (model.pt from `simserve train`) as a bundle folder: tower.onnx and head.onnx "
        "with a dynamic batch, weights.npz, and manifest.json (config, preprocessing, threshold, metrics, sha256 of every file).",
    )
    e.add_argument("checkpoint")
    e.add_argument("-o", "--out", required=True, help="bundle folder to write (replaced atomically)")
    e.set_defaults(func=_cmd_export)

    i = sub.add_parser("info", help="verify a bundle and print its manifest", description="Verify a bundle's checksums and print its manifest.")
    _add_bundle_arg(i)
    i.add_argument("--full", action="store_true", help="include the training recipe")
    i.set_defaults(func=_cmd_info)

    c = sub.add_parser(
        "compare",
        help="score two image files",
        description="Score two images with the fusion head (1 = same image / copy, 0 = different) and print the embedding cosine.",
    )
    c.add_argument("image_a")
    c.add_argument("image_b")
    _add_bundle_arg(c)
    c.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    c.add_argument("--threshold", type=float, help="match threshold (default: the bundle's suggested one)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_compare)

    b = sub.add_parser("bench", help="benchmarks (medians; ratios measured side by side)", description="Run a benchmark and print JSON.")
    b.add_argument("what", choices=["engine"], help="engine: ONNX Runtime vs eager torch, decode pool, roofline")
    _add_bundle_arg(b)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--repeats", type=int, default=15)
    b.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    b.add_argument("--out", help="also write the JSON here")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
