"""The ``simserve`` command line: one entry point, one subcommand per job.

Subcommands import their machinery lazily, so ``simserve serve`` never
loads torch or the training code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from simserve import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe
    from training.trainer import train

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe.seed = args.seed
    for assignment in args.set or []:
        try:
            recipe.override(assignment)
        except ValueError as e:
            raise SystemExit(f"simserve train: {e}")
    out = Path(args.out or f"runs/{recipe.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(["simserve"] + sys.argv[1:]) + "\n")
    result = train(recipe, out, resume=args.resume, progress=not args.quiet)
    if "metrics" in result:
        print(json.dumps(result["metrics"], indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from simserve.inference.bundle import load_bundle
    from simserve.model.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    b = load_bundle(out)
    print(f"wrote {out}: head={b.config.head} embedding_dim={b.embedding_dim} threshold={b.threshold:.4f}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from simserve.bench import calibrate
    from simserve.inference.bundle import BundleError, load_bundle

    try:
        load_bundle(args.bundle_dir)
    except BundleError as e:
        raise SystemExit(f"simserve calibrate: {e}")
    result = calibrate.run(args.bundle_dir, distractors=args.distractors, refs_per_scene=args.refs_per_scene, seed=args.seed, progress=not args.quiet)
    path = calibrate.write(args.bundle_dir, result)
    for key, d in result.items():
        if "bias" in d:
            print(f"{key}: threshold {d['threshold']:.4f} at precision 0.99 ({d['copies']} copies among {d['candidates']} candidates)")
    print(f"wrote {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from simserve.inference.bundle import load_bundle

    b = load_bundle(args.bundle)
    m = dict(b.manifest)
    if not args.full:
        m.pop("recipe", None)
    print(json.dumps({"path": str(b.path), **m}, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from simserve.inference.decode import DecodeError
    from simserve.inference.decode_pool import pixels
    from simserve.inference.engine import load_engine
    from simserve.ranking import verify
    from simserve.ranking.calibration import from_manifest, pair_model

    engine = load_engine(args.bundle, args.backend)
    c = engine.bundle.config
    # The server's decode and scoring, step for step, so that compare and ScorePairs agree.
    try:
        data = [Path(args.image_a).read_bytes(), Path(args.image_b).read_bytes()]
        feats, emb = engine.embed(np.stack([pixels(d, c.input_size, c.in_channels) for d in data]))
    except (DecodeError, OSError) as e:
        raise SystemExit(f"simserve compare: {e}")
    head = float(engine.fuse(feats[:1], feats[1:])[0])
    cosine = float(emb[0] @ emb[1])
    cal = pair_model(from_manifest(engine.bundle.manifest))
    result: dict[str, Any] = {"cosine": cosine, "head": head}
    if cal is not None:
        # P(copy) from the cosine, the inliers and the head's score, as ScorePairs scores a pair.
        a, b = (verify.query_features(verify.decode(d)) for d in data)
        inliers = verify.pair_inliers(a, b)
        score, default_threshold = float(cal.probability(cosine, inliers, head)), cal.threshold
        result["inliers"] = inliers
    else:  # an uncalibrated bundle: the head decides, at its own threshold
        score, default_threshold = head, engine.bundle.threshold
    threshold = args.threshold if args.threshold is not None else default_threshold
    result = {"score": score, "match": score >= threshold, "threshold": threshold, **result}
    detail = f"embedding cosine {cosine:.4f}" + (f", {result['inliers']} inliers" if "inliers" in result else "") + f", head {head:.4f}"
    print(json.dumps(result) if args.json else f"score {score:.4f} ({'match' if result['match'] else 'different'} at threshold {threshold:.3f}), {detail}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simserve.bench.common import emit

    if args.what == "engine":
        from simserve.bench import engine

        result = engine.run(args.bundle, batch=args.batch, repeats=args.repeats, threads=args.threads)
    elif args.what == "index":
        from simserve.bench import index

        result = index.run(
            args.bundle, n=args.n, queries=args.queries, cache=args.cache, parts=tuple(args.parts.split(",")),
            backends=tuple(args.backends.split(",")), backend_types=tuple(args.backend_types.split(";")),
        )
        tables = []
        if result["types"]:
            tables.append(index.scaling_table(result))
        if "backends" in result:
            from simserve.bench import backends

            tables.append(backends.table(result["backends"]))
        if tables:
            print("\n".join(tables), file=sys.stderr)
            if args.out:  # the tables, next to the figures they come from
                Path(args.out).with_suffix(".md").write_text("\n".join(tables))
    elif args.what == "serve":
        from simserve.bench import serve

        result = serve.run(args.bundle, clients=args.clients, procs=args.procs, seconds=args.seconds, collection_size=args.collection_size, rounds=args.rounds)
    elif args.what == "fuzz":
        from simserve.bench import hostile

        result = hostile.run(args.bundle, cases=args.cases, seed=args.seed)
    elif args.what == "batch":
        from simserve.bench import batch

        if args.engine:  # the embed job's ways to run, side by side, and nothing else
            from simserve.bench import embed_engines

            result = embed_engines.run(args.bundle, images=args.embed_images, engines=tuple(args.engine.split(",")), batch=args.batch)
        else:
            result = batch.run(args.bundle, dedupe_images=args.dedupe_images, originals=args.originals)
    elif args.what == "copydetect":
        from simserve.bench import copydetect

        configs = tuple(args.configs.split(","))
        result = copydetect.run(args.bundle, distractors=args.distractors, refs_per_scene=args.refs_per_scene, configs=configs, seed=args.seed)
        table = copydetect.table(result)
        print(table, file=sys.stderr)
        if args.out:
            Path(args.out).with_suffix(".md").write_text(table)
    elif args.what == "soak":
        from simserve.bench import soak

        result = soak.run(args.bundle, minutes=args.minutes, clients=args.clients, procs=args.procs)
    else:  # argparse restricts the choices
        raise SystemExit(f"unknown benchmark {args.what}")
    emit(result, args.out)
    return 0 if result.get("ok", True) else 1


def _collections(args: argparse.Namespace):
    from simserve.index.backends import open_collections

    return open_collections(args.index_backend, args.data_dir, args.milvus_uri, args.milvus_token)


def _collection(args: argparse.Namespace, engine=None, create: bool = False):
    cols = _collections(args)
    if create and engine is not None:
        return cols, cols.get_or_create(args.collection, engine.bundle.embedding_dim, args.factory, engine.bundle.manifest["feature_shape"], args.crop_views, verify=args.verify)
    return cols, cols.get(args.collection)


def _cmd_index(args: argparse.Namespace) -> int:
    from simserve.index.collection import CollectionNotFound

    try:
        if args.action == "build":
            from simserve.inference.engine import load_engine
            from simserve.jobs.index_folder import index_folder

            engine = load_engine(args.bundle)
            cols, col = _collection(args, engine, create=True)
            if col.dim != engine.bundle.embedding_dim:
                raise SystemExit(f"collection {col.name!r} holds {col.dim}-d vectors; this model makes {engine.bundle.embedding_dim}-d")
            report = index_folder(engine, col, args.folder, batch=args.batch, workers=args.workers, progress=not args.quiet)
            for key, why in sorted(report.failed.items()):
                print(f"skipped {key}: {why}", file=sys.stderr)
            print(json.dumps({"added": report.added, "unchanged": report.skipped_unchanged, "failed": len(report.failed), **col.stats()}))
            cols.close()
        elif args.action == "stats":
            cols = _collections(args)
            names = [args.collection] if args.collection else cols.names()
            print(json.dumps([cols.get(n).stats() for n in names], indent=2))
            cols.close(snapshot=False)
        elif args.action == "remove":
            cols, col = _collection(args)
            found = col.remove(args.keys)
            missing = sorted(set(args.keys) - set(found))
            print(json.dumps({"removed": sorted(found), "not_found": missing}))
            cols.close()
            return 1 if missing and not found else 0
        elif args.action == "search":
            return _index_search(args)
    except CollectionNotFound as e:
        raise SystemExit(f"simserve index {args.action}: {e}")
    return 0


def _index_search(args: argparse.Namespace) -> int:
    import concurrent.futures

    from simserve.inference.crops import query_view_embeddings
    from simserve.inference.decode import DecodeError, decode_image
    from simserve.inference.engine import load_engine
    from simserve.ranking.calibration import from_manifest
    from simserve.ranking.pipeline import Query, search, stored_keypoints
    from simserve.ranking.verify import VerifyUnavailable, query_features

    engine = load_engine(args.bundle)
    cols, col = _collection(args)
    if args.key:
        item = col.get([args.key]).get(args.key)
        if item is None:
            raise SystemExit(f"simserve index search: no item {args.key!r} in {col.name!r}")
        feats = col.features([item.id])
        query = Query(item.vector, feats.get(item.id), stored_keypoints(col, item.id) if col.config.verify else None, item.id)
    elif args.image:
        try:
            data = Path(args.image).read_bytes()  # read once: the views, if made, are cut from the same bytes
            img = decode_image(data)
            keypoints = query_features(img, regions=True) if col.config.verify else None
            features, emb = engine.embed_images([img])
            query = Query(emb[0], features[0], keypoints)
            if col.config.crop_views and args.query_views:  # as the server searches (serve --query-views): made when needed
                pool = concurrent.futures.ThreadPoolExecutor(1)
                query.views = lambda: pool.submit(query_view_embeddings, engine, data)
        except (DecodeError, OSError, VerifyUnavailable) as e:
            raise SystemExit(f"simserve index search: {e}")
    else:
        raise SystemExit("simserve index search: give an IMAGE or --key")
    where = _where(args.where)
    hits = search(col, query, args.k, rerank=args.rerank, where=where or None, engine=engine, calibrations=from_manifest(engine.bundle.manifest))
    rows = [
        {"key": h.key, "score": round(h.score, 5), "cosine": round(h.cosine, 5), "head_score": None if h.head_score is None else round(h.head_score, 5), "inliers": h.inliers, "metadata": h.metadata}
        for h in hits
    ]
    print(json.dumps(rows) if args.json else _hit_lines(rows))
    cols.close(snapshot=False)
    return 0


def _hit_lines(hits: list[dict[str, Any]]) -> str:
    """One line per hit: score, the head's score and the inlier count when there are, key."""
    if not hits:
        return "no matches (the collection is empty, or nothing passed the filter)"
    return "\n".join(
        f"{h['score']:.4f}"
        + (f"  head {h['head_score']:.4f}" if h.get("head_score") is not None else "")
        + (f"  inliers {h['inliers']}" if h.get("inliers") is not None else "")
        + f"  {h['key']}"
        for h in hits
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from simserve.serve.app import ServerConfig, serve_forever
    from simserve.serve.logs import setup_logging

    cfg = ServerConfig.from_env(**{f.name: getattr(args, f.name, None) for f in fields(ServerConfig)})
    setup_logging(cfg.log_level, json_logs=not args.plain_logs)
    return serve_forever(cfg)


def _cmd_client(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from simserve.client import Client, Key
    from simserve.jobs.files import find_images

    def image(arg: str):
        return Key(arg[4:]) if arg.startswith("key:") else arg

    defaults = {
        "target": os.environ.get("SIMSERVE_TARGET", f"127.0.0.1:{os.environ.get('SIMSERVE_PORT', '50051')}"),
        "token": None, "tls": False, "ca_cert": None, "timeout": 30.0, "collection": "", "json": False,
    }  # fmt: skip
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)

    c = Client(args.target, token=args.token or os.environ.get("SIMSERVE_TOKEN"), tls=args.tls, ca_cert=args.ca_cert, timeout=args.timeout)
    status = 0
    try:
        if args.action == "score":
            s = c.score([(image(args.a), image(args.b))], collection=args.collection)[0]
            out: Any = {"score": s.score, "match": s.match, "cosine": s.cosine, "head_score": s.head_score}
            text = f"score {s.score:.4f} ({'match' if s.match else 'different'}), cosine {s.cosine:.4f}, head {s.head_score:.4f}"
        elif args.action == "search":
            out = c.search(image(args.image), k=args.k, rerank=args.rerank, collection=args.collection, where=_where(args.where))
            text = _hit_lines(out)
        elif args.action == "add":
            root = Path(args.folder)
            try:
                rows = [(p.relative_to(root).as_posix(), p, {"path": p.relative_to(root).as_posix()}) for p in find_images(root)]
            except NotADirectoryError as e:
                raise SystemExit(f"simserve client add: {e}") from None
            with tqdm(total=len(rows), unit="img", desc="adding", disable=args.quiet or args.json, file=sys.stderr) as bar:
                report = c.add_each(rows, collection=args.collection, batch=max(1, args.batch), on_batch=bar.update)
            out = {"added": len(report.added), "skipped": len(report.failed), "failed": report.failed}
            where = args.collection or "the default collection"
            text = "\n".join([f"skipped {k}: {why}" for k, why in report.failed.items()] + [f"added {out['added']} images to {where}, skipped {out['skipped']}"])
            status = 1 if report.failed else 0
        elif args.action == "stats":
            s = c.stats(args.collection)
            out = {"collection": s.collection, "items": s.items, "indexed": s.indexed, "dim": s.dim, "factory": s.factory, "index_type": s.index_type, "index_bytes": s.index_bytes, "crop_views": s.crop_views, "verify": s.verify}
            text = "\n".join(f"{k:>11}: {v}" for k, v in out.items())
        else:  # health
            out = {"status": c.health_status()}
            text = out["status"]
    except grpc.RpcError as e:
        raise SystemExit(f"simserve client {args.action}: {e.code().name}: {e.details()}")
    finally:
        c.close()
    print(json.dumps(out) if args.json else text)
    return status


def _cmd_score(args: argparse.Namespace) -> int:
    from simserve.inference.bundle import load_bundle
    from simserve.inference.engine import load_engine
    from simserve.jobs.score import score_file
    from simserve.jobs.shard import Shard

    threshold = None if args.threshold is None else load_bundle(args.bundle).threshold if args.threshold == "model" else float(args.threshold)
    columns = tuple(args.columns.split(",")) if args.columns else None
    if columns is not None and len(columns) != 2:
        raise SystemExit("--columns takes two names: A,B")
    shard = Shard.from_env()
    if args.engine == "ray":
        r = _on_ray().score_file_ray(
            args.bundle, args.pairs, args.out, threshold=threshold, root=args.root, columns=columns, batch=args.batch,
            actors=args.actors, address=args.ray_address, resume=args.resume, progress=not args.quiet, cache_mb=args.cache_mb,
        )  # fmt: skip
    else:
        r = score_file(
            load_engine(args.bundle), args.pairs, args.out, threshold=threshold, root=args.root, columns=columns, batch=args.batch,
            workers=args.workers, resume=args.resume, progress=not args.quiet and shard.rank == 0, shard=shard, cache_mb=args.cache_mb,
        )  # fmt: skip
    where = f" (rank {shard.rank} of {shard.world})" if not shard.single else ""
    print(
        f"{r.rows} rows{where}: {r.scored} scored, {r.errors} with errors"
        + (f", {r.resumed_after} kept from the interrupted run" if r.resumed_after else "")
        + f"; {r.rows_per_s:.0f} rows/s",
        file=sys.stderr,
    )
    for e in r.error_examples:
        print(f"  error: {e}", file=sys.stderr)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from simserve.inference.engine import load_engine
    from simserve.jobs.embed import embed_folder
    from simserve.jobs.shard import Shard

    if args.engine == "ray":
        r = _on_ray().embed_folder_ray(
            args.bundle, args.folder, args.out, batch=args.batch, actors=args.actors, address=args.ray_address, resume=args.resume, progress=not args.quiet
        )  # fmt: skip
        print(f"{r.images} images on ray: {r.embedded} embedded this run, {r.errors} errors, {r.resumed_after} kept from before -> {args.out}.npy", file=sys.stderr)
        return 0
    shard = Shard.from_env()
    r = embed_folder(
        load_engine(args.bundle), args.folder, args.out, batch=args.batch, workers=args.workers, resume=args.resume,
        progress=not args.quiet and shard.rank == 0, shard=shard,
    )  # fmt: skip
    where = f" (rank {shard.rank} of {shard.world})" if not shard.single else ""
    print(f"{r.images} images{where}: {r.embedded} embedded this run, {r.errors} errors, {r.resumed_after} kept from before -> {args.out}.npy", file=sys.stderr)
    return 0


def _cmd_dedupe(args: argparse.Namespace) -> int:
    from simserve.index.collection import default_data_dir
    from simserve.inference.engine import load_engine
    from simserve.jobs.dedupe import find_duplicates, write_groups

    engine = load_engine(args.bundle)
    cache = args.cache or str(default_data_dir() / "cache")
    threshold = None if args.threshold is None else engine.bundle.threshold if args.threshold == "model" else float(args.threshold)
    groups, r = find_duplicates(engine, args.folder, cache, threshold=threshold, k=args.k, batch=args.batch, workers=args.workers, progress=not args.quiet)
    write_groups(groups, args.out)
    if args.html:
        from simserve.jobs.contact_sheet import write_contact_sheet

        write_contact_sheet(groups, args.folder, args.html)
    print(
        f"{r.images} images ({r.distinct} distinct contents; {r.from_cache} from the cache, {r.embedded} embedded, "
        f"{len(r.failed)} unreadable): {r.candidates} candidate pairs, {r.duplicate_pairs} confirmed by the head -> "
        f"{r.groups} groups holding {r.in_groups} files, in {r.seconds:.1f} s -> {args.out}" + (f", {args.html}" if args.html else ""),
        file=sys.stderr,
    )
    for path, err in list(r.failed.items())[:5]:
        print(f"  unreadable: {path}: {err}", file=sys.stderr)
    return 0


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local",
        help="local (default): this process, or torchrun ranks; ray: Ray Data actors, one ONNX Runtime session each, "
        "the driver writing the output (pip install 'simserve[ray]'; the images must be readable where Ray runs)",
    )  # fmt: skip
    p.add_argument("--ray-address", dest="ray_address", help="with --engine ray: the cluster to join ('auto': the one this machine is in; default: start one here)")
    p.add_argument("--actors", type=int, help="with --engine ray: actors, each one ONNX Runtime session (default: one per CPU in the cluster)")


def _on_ray():
    """The Ray jobs module, or one line saying how to get it."""
    try:
        from simserve.jobs import on_ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'simserve[ray]'") from None
    return on_ray


def _add_job_args(p: argparse.ArgumentParser, batch_help: str, resumable: bool) -> None:
    """The knobs every batch job shares."""
    p.add_argument("--batch", type=int, default=64, help=f"{batch_help} (default 64)")
    p.add_argument("--workers", type=int, help="lanes: pipelines that each read, decode and embed a whole batch, one engine session each (default: one per core)")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep the whole batches already written")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_bundle_arg(p)


QUERY_VIEWS_HELP = (
    "searches of a crop-views collection also look with the query turned on its side and by 16 regions of it "
    "(default on: finds copies rotated 90 degrees or pasted small into another photo, for 4 engine passes and one at 320 px a query instead of 1); "
    "--no-query-views searches with the query as it is"
)
CROP_VIEWS_HELP = (
    "on by default: new collections index each item as the pooled embedding of the whole image and 5 crops of 75%% of "
    "each side, and a search re-scores its top 100 by the stored views, so crops of stored images are found (6x the "
    "embedding work per added item); --no-crop-views indexes the whole image alone"
)
VERIFY_HELP = (
    "on by default: new collections keep each item's keypoints (SIFT + ORB) and a search verifies its best candidates, "
    "best first, counting the keypoints one affine map carries from the query onto each, until one is certain "
    "(simserve/ranking/verify.py); the score a hit returns is then P(copy) given the cosine and the inliers. "
    "--no-verify: ~3x cheaper adds, smaller items, and copies that the embedding alone misses stay missed"
)


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

    ca = sub.add_parser(
        "calibrate",
        help="fit a bundle's search score to P(copy) on training photos (needs scripts/install-data.sh --photos)",
        description="Fit how a search's evidence (embedding cosine, crop views, inliers) maps to the probability that a hit "
        "is a copy, on a copy set cut from the training photo scenes (never the benchmark's), and write it into "
        "BUNDLE_DIR/manifest.json. A calibrated bundle's Search returns that probability as the score, with a "
        "threshold that held precision 0.99. Takes a few minutes.",
    )
    ca.add_argument("bundle_dir", help="bundle folder to calibrate (its manifest is rewritten in place)")
    ca.add_argument("--distractors", type=int, default=1500, help="distractor images in the calibration index")
    ca.add_argument("--refs-per-scene", type=int, default=2, help="references cut from each training scene")
    ca.add_argument("--seed", type=int, default=2, help="seed of the calibration copy set")
    ca.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    ca.set_defaults(func=_cmd_calibrate)

    i = sub.add_parser("info", help="verify a bundle and print its manifest", description="Verify a bundle's checksums and print its manifest.")
    _add_bundle_arg(i)
    i.add_argument("--full", action="store_true", help="include the training recipe")
    i.set_defaults(func=_cmd_info)

    c = sub.add_parser(
        "compare",
        help="score two image files",
        description="Score two images: with a calibrated bundle (the shipped one is), the probability that one is a copy of "
        "the other, from their embedding cosine, the keypoints one affine map carries between them and the fusion head's "
        "score; otherwise the fusion head's score alone. Prints the cosine, the inliers and the head's score too. Decodes and scores "
        "as the server's ScorePairs does (`simserve client score`), so both give the same numbers.",
    )
    c.add_argument("image_a")
    c.add_argument("image_b")
    _add_bundle_arg(c)
    c.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    c.add_argument("--threshold", type=float, help="match threshold (default: the bundle's, precision 0.99 on its calibration copies)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_compare)

    ix = sub.add_parser("index", help="build, inspect and search collections", description="Manage the durable vector collections (SQLite + FAISS) in the data directory.")
    ixs = ix.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, collection_required: bool = True) -> None:
        p.add_argument("--collection", required=collection_required, default=None if collection_required else None, help="collection name")
        p.add_argument("--data-dir", help="data directory (default $SIMSERVE_DATA_DIR or ~/.local/share/simserve)")
        p.add_argument("--index-backend", dest="index_backend", choices=["embedded", "milvus"], default=os.environ.get("SIMSERVE_INDEX_BACKEND", "embedded"),
                       help="where the collections live: embedded (the data directory; default) or milvus (--milvus-uri), as `simserve serve` takes it")
        p.add_argument("--milvus-uri", dest="milvus_uri", default=os.environ.get("SIMSERVE_MILVUS_URI", ""),
                       help="with --index-backend milvus: http://host:19530 or a Milvus Lite file (default $SIMSERVE_MILVUS_URI)")
        p.add_argument("--milvus-token", dest="milvus_token", default=os.environ.get("SIMSERVE_MILVUS_TOKEN", ""), help="Milvus credentials (default $SIMSERVE_MILVUS_TOKEN)")

    ib = ixs.add_parser("build", help="embed every image under a folder into a collection (resumable)",
                        description="Embed every image under FOLDER into a collection, keyed by relative path. Re-running skips files whose content is unchanged, so an interrupted build resumes.")
    ib.add_argument("folder")
    common(ib)
    _add_bundle_arg(ib)
    ib.add_argument("--factory", default="Flat", help="FAISS factory string for a new collection: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 ...")
    ib.add_argument("--crop-views", action=argparse.BooleanOptionalAction, default=True, help=CROP_VIEWS_HELP)
    ib.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=VERIFY_HELP)
    ib.add_argument("--batch", type=int, default=64)
    ib.add_argument("--workers", type=int, help="lanes: pipelines that each decode and embed a whole batch, one engine session each (default: one per core)")
    ib.add_argument("--quiet", action="store_true")
    ist = ixs.add_parser("stats", help="item counts, index type and size")
    common(ist, collection_required=False)
    ir = ixs.add_parser("remove", help="remove items by key")
    ir.add_argument("keys", nargs="+")
    common(ir)
    isr = ixs.add_parser("search", help="nearest neighbours of an image file or of a stored key")
    isr.add_argument("image", nargs="?")
    isr.add_argument("--key", help="search with a stored item instead of an image (the item itself is excluded)")
    common(isr)
    _add_bundle_arg(isr)
    isr.add_argument("-k", type=int, default=10)
    isr.add_argument("--rerank", type=int, default=0, metavar="N", help="re-rank the top N by cosine and fusion head together (simserve/ranking/scores.py: fused_scores)")
    isr.add_argument("--where", action="append", type=_field_value, metavar="FIELD=VALUE", help="metadata filter (equality; repeatable)")
    isr.add_argument("--query-views", dest="query_views", action=argparse.BooleanOptionalAction, default=True, help=QUERY_VIEWS_HELP)
    isr.add_argument("--json", action="store_true")
    ix.set_defaults(func=_cmd_index)

    sc = sub.add_parser(
        "score",
        help="score a CSV/JSONL file of image pairs (streamed, resumable, torchrun-shardable)",
        description="Score every pair in PAIRS (CSV with a header, or JSONL; columns a and b, or the first two) and "
        "write the rows with score, cosine, error (and match with --threshold) to OUT (.csv or .jsonl). Extra columns pass "
        "through. A missing or broken image gives that row an error; the run goes on. Relative paths are read from --root "
        "(default: the folder of PAIRS). Under `torchrun --nproc_per_node=N -m simserve.cli score ...` each process takes "
        "every N-th batch and the output is the same as one process's.",
    )
    sc.add_argument("pairs", help="CSV or JSONL of pairs")
    sc.add_argument("--out", "-o", required=True, help="output .csv or .jsonl")
    sc.add_argument("--threshold", nargs="?", const="model", help="add a match column: score >= T (bare --threshold: the model's own)")
    sc.add_argument("--root", help="folder that relative image paths are in (default: the folder of PAIRS)")
    sc.add_argument("--columns", help="the two image columns, A,B (default: a,b or the first two)")
    sc.add_argument("--cache-mb", type=float, default=256, help="memory for decoded images, so an image in many pairs is decoded once (0: off)")
    _add_ray_args(sc)
    _add_job_args(sc, "pairs per engine call", resumable=True)
    sc.set_defaults(func=_cmd_score)

    em = sub.add_parser(
        "embed",
        help="embed every image in a folder to .npy + keys (resumable, torchrun-shardable)",
        description="Embed every image under FOLDER. Writes OUT.npy (float32, L2-normalised rows), OUT.keys.txt (paths "
        "relative to FOLDER, aligned with the rows) and OUT.errors.jsonl (images that failed).",
    )
    em.add_argument("folder")
    em.add_argument("--out", "-o", required=True, help="output prefix")
    _add_ray_args(em)
    _add_job_args(em, "images per engine call", resumable=True)
    em.set_defaults(func=_cmd_embed)

    dd = sub.add_parser(
        "dedupe",
        help="find near-duplicate groups in a folder (FAISS recall, head precision, HTML report)",
        description="Group the near-duplicate images under FOLDER: embeddings (cached by content hash, so a second run is "
        "fast) find each image's nearest neighbours, the fusion head confirms them, connected components are the groups. "
        "Each group suggests the file to keep (highest resolution, then largest). Writes one JSON object per group.",
    )
    dd.add_argument("folder")
    dd.add_argument("--out", "-o", required=True, help="GROUPS.jsonl")
    dd.add_argument("--html", help="also write an HTML contact sheet of the groups")
    dd.add_argument(
        "--threshold",
        help="head score for a duplicate (default 0.99: strict, because one false pair merges two groups; "
        "'model' = the model's own threshold, which also catches heavy crops and overlays)",
    )
    dd.add_argument("-k", type=int, default=10, help="neighbours per image to check (default 10)")
    dd.add_argument("--cache", help="embedding cache folder (default: DATA_DIR/cache)")
    _add_job_args(dd, "images per engine call", resumable=False)
    dd.set_defaults(func=_cmd_dedupe)

    sv = sub.add_parser(
        "serve",
        help="run the gRPC service",
        description="Serve the Similarity and Index gRPC services (plus grpc.health.v1 and reflection). "
        "With no options: the shipped default model, collection 'default' in the data directory, 127.0.0.1:50051. "
        "Every option can also be set as SIMSERVE_<OPTION> (e.g. SIMSERVE_PORT=50052, SIMSERVE_TOKEN=...). "
        "SIGTERM drains in-flight requests, snapshots the index and exits 0.",
    )
    sv.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    sv.add_argument("--port", type=_port, help="gRPC port (default 50051; 0 picks a free one)")
    sv.add_argument("--data-dir", dest="data_dir", help="collections live here (default $SIMSERVE_DATA_DIR or ~/.local/share/simserve)")
    sv.add_argument("--bundle", help="model bundle (default: the shipped model)")
    sv.add_argument("--backend", choices=["onnx", "torch"])
    sv.add_argument("--threads", type=int, help="engine threads: one single-threaded ONNX Runtime session each, a batch cut across them (default: all cores)")
    sv.add_argument("--workers", type=int, help="server threads for blocking work: SQLite reads and writes, index scans, keypoint matching, heavy decodes; every RPC itself runs on the event loop (default 32; not the batch jobs' --workers, which are engine lanes)")
    sv.add_argument("--faiss-threads", dest="faiss_threads", type=int, help="threads per index search: FAISS's OpenMP, or the exact scan's for a flat index (default 1: concurrent requests fill the cores)")
    sv.add_argument("--max-batch", dest="max_batch", type=int, help="micro-batcher: most images per engine call (default 32)")
    sv.add_argument("--max-delay-ms", dest="max_delay_ms", type=float, help="micro-batcher: longest wait for a fuller batch (default 2)")
    sv.add_argument("--max-queue", dest="max_queue", type=int, help="images waiting before RESOURCE_EXHAUSTED (default 1024)")
    sv.add_argument("--max-message-mb", dest="max_message_mb", type=int, help="largest gRPC message (default 64)")
    sv.add_argument("--max-pixels", dest="max_pixels", type=int, help="largest decoded image (default 40,000,000)")
    sv.add_argument("--max-items", dest="max_items", type=int, help="most images in one request; a pair is two (default 1024)")
    sv.add_argument("--collection", help="default collection name (default 'default')")
    sv.add_argument("--max-collections", type=int, help="refuse to create collections past this many (default 100): each open one holds files and memory")
    sv.add_argument("--decode-budget-mb", dest="decode_budget_mb", type=int, help="decoded pixels in flight, server-wide (default 384): past it, large decodes wait their turn")
    sv.add_argument("--factory", help="FAISS factory for new collections (default Flat; with --index-backend milvus: Flat, HNSW<M>, IVF<n>,Flat/SQ8/PQ<m> as Milvus's FLAT, HNSW, IVF_*)")
    sv.add_argument("--index-backend", dest="index_backend", choices=["embedded", "milvus"], help="where collections live: 'embedded' (default: SQLite + FAISS in --data-dir, one server) or 'milvus' (shared by every replica pointed at --milvus-uri; pip install 'simserve[milvus]')")
    sv.add_argument("--milvus-uri", dest="milvus_uri", help="with --index-backend milvus: http://host:19530 (a Milvus server or `milvus-lite server`), or a Milvus Lite file such as ./index.db (one process)")
    sv.add_argument("--milvus-token", dest="milvus_token", help="Milvus credentials, 'user:password' or an API key (default: $SIMSERVE_MILVUS_TOKEN)")
    sv.add_argument("--crop-views", dest="crop_views", action=argparse.BooleanOptionalAction, default=None, help=CROP_VIEWS_HELP)
    sv.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None, help=VERIFY_HELP)
    sv.add_argument("--query-views", dest="query_views", action=argparse.BooleanOptionalAction, default=None, help=QUERY_VIEWS_HELP)
    sv.add_argument(
        "--search-budget-ms", dest="search_budget_ms", type=float,
        help="a verifying search answers this long after its request came in, with the candidates it has verified by then "
        "(default 90: p99 under 100 ms on 2 cores at 100,000 items, 0.3-0.6 points of photographs' recall@1 given up by the machine's speed, mostly pasted copies; "
        "more finds more of those on a slow machine; 0 verifies every candidate however long it takes). A request's own timeout brings it forward",
    )  # fmt: skip
    sv.add_argument("--token", help="require 'authorization: Bearer TOKEN' (health and reflection stay open)")
    sv.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain (enables TLS)")
    sv.add_argument("--tls-key", dest="tls_key", help="PEM private key")
    sv.add_argument("--tls-client-ca", dest="tls_client_ca", help="require client certificates signed by this CA (mutual TLS)")
    sv.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus /metrics port (default off; 0 picks one)")
    sv.add_argument("--grace-s", dest="grace_s", type=float, help="seconds in-flight requests get at shutdown (default 30)")
    sv.add_argument("--log-level", dest="log_level")
    sv.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    sv.set_defaults(func=_cmd_serve)

    # The connection options are accepted before or after the action (`client --json stats` and
    # `client stats --json`): SUPPRESS keeps a flag given in one place from being reset by the
    # other, and _cmd_client fills in the defaults (these actions are shared: no set_defaults).
    conn = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    conn.add_argument(
        "--target",
        help="host:port of the server (default: $SIMSERVE_TARGET, else 127.0.0.1:$SIMSERVE_PORT, else 127.0.0.1:50051, "
        "so a container's HEALTHCHECK follows its port)",
    )
    conn.add_argument("--token", help="bearer token, when the server was started with --token (default: $SIMSERVE_TOKEN)")
    conn.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    conn.add_argument("--ca-cert", help="PEM CA certificate to trust (implies --tls)")
    conn.add_argument("--timeout", type=float, help="seconds each call may take (default: 30)")
    conn.add_argument("--collection", help="collection to use (default: the server's default collection)")
    conn.add_argument("--json", action="store_true", help="print JSON instead of text")
    cl = sub.add_parser(
        "client", parents=[conn], help="call a running server",
        description="Call a running simserve server. IMAGE arguments are files, or key:KEY for a stored item. Options may come before or after the action.",
    )  # fmt: skip
    cls = cl.add_subparsers(dest="action", required=True, metavar="ACTION")
    c1 = cls.add_parser("score", parents=[conn], help="score two images", description="Is one image a copy of the other? Prints the score the server decides by, its decision, the cosine and the fusion head's score.")
    c1.add_argument("a", metavar="IMAGE")
    c1.add_argument("b", metavar="IMAGE")
    c2 = cls.add_parser("search", parents=[conn], help="nearest neighbours of one image", description="The collection's items nearest to IMAGE, best first, each with its score.")
    c2.add_argument("image", metavar="IMAGE")
    c2.add_argument("-k", type=int, default=10, help="how many neighbours (default: 10)")
    c2.add_argument("--rerank", type=int, default=0, help="re-rank this many hits with the fusion head (default: 0, off)")
    c2.add_argument("--where", action="append", type=_field_value, metavar="FIELD=VALUE", help="metadata filter (equality; repeatable)")
    c3 = cls.add_parser(
        "add", parents=[conn], help="add every image under a folder",
        description="Add every image under FOLDER, keyed by its path relative to FOLDER (an existing key is replaced). "
        "A file that cannot be read or that the server refuses is skipped and named with its reason; the rest are added. "
        "Exit status 0 when every image was added, 1 when any was skipped.",
    )  # fmt: skip
    c3.add_argument("folder", metavar="FOLDER")
    c3.add_argument("--batch", type=int, default=32, help="images per request (default: 32)")
    c3.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cls.add_parser("stats", parents=[conn], help="collection statistics", description="Items, index type and size, and the options of the collection.")
    cls.add_parser("health", parents=[conn], help="grpc.health.v1 status", description="The server's grpc.health.v1 status: SERVING, NOT_SERVING, ...")
    cl.set_defaults(func=_cmd_client)

    b = sub.add_parser("bench", help="benchmarks (medians; ratios measured side by side)", description="Run a benchmark and print JSON.")
    b.add_argument(
        "what",
        choices=["engine", "index", "serve", "batch", "fuzz", "soak", "copydetect"],
        help="engine: ONNX Runtime vs eager torch, decode pool, roofline; index: FAISS types on real embeddings, durable adds, "
        "snapshot start; serve: the gRPC service under concurrent load; batch: score end to end vs the engine, dedupe at "
        "scale, recall at precision 0.99 vs perceptual hashing; fuzz: hostile input against a real server, "
        "outcomes counted; soak: mixed score/search/add traffic for --minutes, errors, latency over time and RSS "
        "(exit status 1 when fuzz or soak finds a failure); copydetect: finding copies of natural photos (benchmark scenes of "
        "the Debian wallpaper packages, never trained on) per collection configuration: recall, µAP on the returned score, "
        "look-alikes, latency, add cost",
    )
    _add_bundle_arg(b)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--repeats", type=int, default=15)
    b.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    b.add_argument("--clients", type=int, default=32, help="serve: concurrent clients")
    b.add_argument("--procs", type=int, default=2, help="serve: load-generator processes")
    b.add_argument("--seconds", type=float, default=10.0, help="serve: seconds per load measurement")
    b.add_argument("--rounds", type=int, default=3, help="serve: interleaved rounds of (engine, batching on, batching off); figures are medians")
    b.add_argument("--collection-size", type=int, default=100_000, help="serve: items in the searched collection")
    b.add_argument("--n", type=int, default=1_000_000, help="index: vectors in the largest index")
    b.add_argument("--queries", type=int, default=1000, help="index: query vectors")
    b.add_argument("--cache", default="runs/bench/embeddings.npy", help="index: where the real embeddings are cached")
    b.add_argument(
        "--parts",
        default="types,adds,snapshot,views",
        help="index: which parts to run (types = search figures per index type and size; adds = durable adds/s; snapshot = start from a snapshot; "
        "views = a crop-views collection's search re-scoring vs a plain search; verify = geometric verification's cost per add and per search; "
        "backends = the embedded index vs Milvus: durable adds, search latency, recall, two replicas)",
    )
    b.add_argument("--backends", default="embedded,milvus", help="index --parts backends: which index backends, side by side (milvus: a local milvus-lite server)")
    b.add_argument("--backend-types", dest="backend_types", default="Flat;HNSW32", help="index --parts backends: index types, ';'-separated (default Flat;HNSW32)")
    b.add_argument("--cases", type=int, default=1000, help="fuzz: random mutations of valid images, on top of the named corpus")
    b.add_argument("--seed", type=int, default=0, help="fuzz: seed of the mutations; copydetect: seed of the copy set")
    b.add_argument("--minutes", type=float, default=10.0, help="soak: how long to run")
    b.add_argument("--dedupe-images", type=int, default=100_000, help="batch: images in the dedupe run (0: skip it)")
    b.add_argument("--engine", help="batch: compare `simserve embed` run by these, side by side, e.g. local,torchrun,ray,ray-warm (one process, a rank per core, a local Ray cluster started by the command, the job alone on a cluster already up), against the engine alone")
    b.add_argument("--embed-images", dest="embed_images", type=int, default=8192, help="batch --engine: images in the embedded folder")
    b.add_argument("--originals", type=int, default=400, help="batch: distinct real photos in the perceptual-hashing comparison")
    b.add_argument("--distractors", type=int, default=10_000, help="copydetect: distractor images in the index")
    b.add_argument("--refs-per-scene", type=int, default=8, help="copydetect: references cut from each benchmark scene (at most; only tiles with detail)")
    b.add_argument("--configs", default="plain,crop-views+verify,default", help="copydetect: collection configurations, side by side")
    b.add_argument("--out", help="also write the JSON here")
    b.set_defaults(func=_cmd_bench)
    return p


def _field_value(text: str) -> tuple[str, str]:
    """argparse type of --where: FIELD=VALUE, refused with a usage line otherwise."""
    field, eq, value = text.partition("=")
    if not eq or not field:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return field, value


def _where(pairs: list[tuple[str, str]] | None) -> dict[str, str]:
    return dict(pairs or [])


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0 picks a free one)")
    return port


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from simserve.index.store import StoreError
    from simserve.ranking.verify import VerifyUnavailable

    try:
        return args.func(args)
    except (OSError, ValueError, VerifyUnavailable, StoreError) as e:  # a missing file, a bad format or value, OpenCV missing, Milvus away
        if os.environ.get("SIMSERVE_DEBUG"):
            raise
        print(f"simserve: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # train / export / reference engine in the serving install
        if e.name not in ("torch", "torchvision", "onnx"):
            raise
        print(f"simserve: error: `simserve {args.command}` needs {e.name}, which the serving install leaves out: pip install 'simserve[train]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
