"""``simserve embed|score --engine ray``: the batch jobs on a Ray cluster, through Ray Data.

The driver lists the images and hands their paths out in blocks; actors that each hold one
single-threaded ONNX Runtime session read, decode and embed a batch at a time (``map_batches``;
the images must be readable where the actors run: one machine, or a folder every node mounts).
The driver receives the blocks in input order and appends each to the same files one process
writes, made durable block by block.
Only the driver writes, so nothing needs a shared filesystem for output, and there is no
rendezvous (torchrun's ranks meet through files). ONNX Runtime's answer for an image does not
depend on the batch it rides in (checked bit for bit), so the output equals one process's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray  # the `ray` extra; the CLI says so when it is missing
from tqdm import tqdm

from simserve.inference.decode_pool import load_file
from simserve.jobs.embed import EmbedReport, Parts, finalize, write_batch
from simserve.jobs.files import find_images
from simserve.jobs.lanes import decode_each, embed_decoded
from simserve.jobs.score import ScoreReport, ScoreRun, Scored, batch_decoder, score_batch


class EmbedActor:
    """One Ray actor: one single-threaded ONNX Runtime session; reads, decodes and embeds a batch
    of images at a time (as a local lane does)."""

    def __init__(self, bundle: str | None) -> None:
        from simserve.inference.engine import load_engine

        self.engine = load_engine(bundle, threads=1)
        self.load = partial(load_file, size=self.engine.config.input_size, channels=self.engine.config.in_channels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        _, loaded, out = embed_decoded(self.engine, decode_each([Path(p) for p in batch["path"]], self.load))
        ok = np.array([isinstance(a, np.ndarray) for a in loaded], bool)
        vecs = np.zeros((len(loaded), self.engine.bundle.embedding_dim), np.float32)
        if out is not None:
            vecs[ok] = out[1]
        return {"path": batch["path"], "vector": vecs, "error": np.array(["" if good else str(a) for good, a in zip(ok, loaded)], dtype=object)}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` ("auto": the one this machine belongs to), or start a
    local one with ``num_cpus``; nothing when this process already joined one (a test's)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _blocks(items: int, batch: int) -> int:
    return max(1, items // (16 * batch))


def _start_data(address: str | None, actors: int | None) -> int:
    """Ray Data set up for a job; the number of actors to run (default: one per CPU)."""
    start_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks reach the driver in input order
    ctx.enable_progress_bars = False  # the job's own bar says how far it is
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


def embed_folder_ray(
    bundle: str | None,
    folder: str | os.PathLike,
    prefix: str | os.PathLike,
    *,
    batch: int = 64,
    actors: int | None = None,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> EmbedReport:
    from simserve.inference.bundle import load_bundle

    folder, prefix = Path(folder).resolve(), Path(prefix)
    paths = find_images(folder)
    dim = load_bundle(bundle).embedding_dim
    parts = Parts(prefix, dim)
    done = parts.resume(batch) if resume else 0
    report = EmbedReport(resumed_after=done)
    t0 = time.perf_counter()
    rows_f, vecs_f = parts.open(append=done > 0)
    todo = paths[done:]
    bar = tqdm(total=len(paths), initial=done, unit="img", desc="embedding on ray", disable=not progress)
    with rows_f, vecs_f:
        if todo:
            actors = _start_data(address, actors)
            # The paths go out in blocks of ~16 batches and each actor reads its own images: Ray
            # Data's read tasks on top of a full actor pool cost 10x the embedding itself here.
            ds = ray.data.from_items([{"path": str(p)} for p in todo], override_num_blocks=_blocks(len(todo), batch))
            ds = ds.map_batches(EmbedActor, fn_constructor_args=(bundle,), batch_size=batch, batch_format="numpy", concurrency=actors, num_cpus=1)
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors = [e or None for e in block["error"]]
                keys = [Path(p).relative_to(folder).as_posix() for p in block["path"]]
                good = np.array([e is None for e in errors], bool)
                write_batch(rows_f, vecs_f, keys, errors, np.asarray(block["vector"], np.float32)[good], report)
                bar.update(len(keys))
    bar.close()
    report.images = done + report.embedded + report.errors
    report.seconds = time.perf_counter() - t0
    finalize(parts, prefix)
    return report


class ScoreActor:
    """One Ray actor scoring whole batches of pairs: its own session and decoded-image cache."""

    def __init__(self, bundle: str | None, cols: tuple[str, str], root: str, cache_mb: float) -> None:
        from simserve.inference.engine import load_engine

        self.engine = load_engine(bundle, threads=1)
        self.decode = batch_decoder(self.engine.config, cols, Path(root), cache_mb)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"errors": [], "scores": [], "cosine": []}
        for rows in batch["rows"]:
            scored = score_batch(self.engine, self.decode(json.loads(rows)))
            out["errors"].append(json.dumps(scored.errors))
            out["scores"].append(np.asarray(scored.scores, np.float32).tobytes())
            out["cosine"].append(np.asarray(scored.cosine, np.float32).tobytes())
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def score_file_ray(
    bundle: str | None,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    root: str | os.PathLike | None = None,
    columns: tuple[str, str] | None = None,
    batch: int = 64,
    actors: int | None = None,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_mb: float = 256,
) -> ScoreReport:
    """``simserve score --engine ray``: a dataset row per batch of pairs (the rows themselves, not
    the images: actors read those where Ray runs them), scored whole by an actor, written by the
    driver in input order; the batches are one process's, so the output is too."""
    with ScoreRun(pairs, out, root, columns, threshold, batch, resume, progress=progress) as run:
        todo = list(run.todo())
        if todo:
            actors = _start_data(address, actors)
            rows = [{"rows": json.dumps(batch_rows, ensure_ascii=False)} for batch_rows in todo]  # a JSON string: one Arrow type
            ds = ray.data.from_items(rows, override_num_blocks=_blocks(len(rows), 1)).map_batches(
                ScoreActor, fn_constructor_args=(bundle, run.cols, str(run.root.resolve()), cache_mb), batch_size=1,
                batch_format="numpy", concurrency=actors, num_cpus=1,
            )  # fmt: skip
            for batch_rows, block in zip(todo, ds.iter_rows()):
                scores, cosine = np.frombuffer(block["scores"], np.float32), np.frombuffer(block["cosine"], np.float32)
                run.write(Scored(batch_rows, json.loads(block["errors"]), scores, cosine))
    return run.finish()
