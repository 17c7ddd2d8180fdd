"""``simserve embed --engine ray``: the embed job on a Ray cluster, through Ray Data.

Ray reads the images (``read_binary_files``: a folder on one machine, or any path every node
reaches, s3:// included); actors that each hold one single-threaded ONNX Runtime session
decode and embed a batch at a time (``map_batches``); the driver receives the blocks in input
order and appends each to the same files one process writes, made durable block by block.
Only the driver writes, so nothing needs a shared filesystem for output, and there is no
rendezvous (torchrun's ranks meet through files). ONNX Runtime's answer for an image does not
depend on the batch it rides in (checked bit for bit), so the output equals one process's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray  # the `ray` extra; the CLI says so when it is missing
from tqdm import tqdm

from simserve.inference.decode_pool import load_bytes
from simserve.jobs.embed import EmbedReport, Parts, finalize, write_batch
from simserve.jobs.files import find_images


class EmbedActor:
    """One Ray actor: one single-threaded ONNX Runtime session, a batch of image bytes at a time."""

    def __init__(self, bundle: str | None) -> None:
        from simserve.inference.engine import load_engine

        self.engine = load_engine(bundle, threads=1)
        self.size, self.channels = self.engine.config.input_size, self.engine.config.in_channels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        loaded = [load_bytes(bytes(b), self.size, self.channels) for b in batch["bytes"]]
        good = [a for a in loaded if isinstance(a, np.ndarray)]
        vecs = np.zeros((len(loaded), self.engine.bundle.embedding_dim), np.float32)
        if good:
            vecs[[i for i, a in enumerate(loaded) if isinstance(a, np.ndarray)]] = self.engine.embed(np.stack(good))[1]
        return {"path": batch["path"], "vector": vecs, "error": np.array(["" if isinstance(a, np.ndarray) else str(a) for a in loaded], dtype=object)}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` ("auto": the one this machine belongs to), or start a
    local one with ``num_cpus``; nothing when this process already joined one (a test's)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


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
            start_ray(address)
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # blocks reach the driver in input order
            ctx.enable_progress_bars = False  # the job's own bar says how far it is
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
            # Reading is I/O: it takes no CPU from the actors, else a full actor pool starves it.
            ds = ray.data.read_binary_files(
                [str(p) for p in todo], include_paths=True, override_num_blocks=max(1, len(todo) // batch), num_cpus=0
            )
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
    finalize(Parts(prefix, dim), prefix)
    return report
