"""``simserve embed DIR --out PREFIX``: every image's embedding, for other tools.

Writes ``PREFIX.npy`` (float32 [n, d], L2-normalised), ``PREFIX.keys.txt``
(the image paths relative to DIR, one per line, aligned with the rows) and
``PREFIX.errors.jsonl`` (images that could not be read or decoded).

While running it appends to ``PREFIX.rows.jsonl`` (one line per image, in
order) and ``PREFIX.f32`` (the vectors), flushed per batch; ``--resume``
keeps the whole batches already there. Under torchrun each rank embeds every
N-th batch and rank 0 merges, so the output equals one process's.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from simserve.inference.decode_pool import load_file
from simserve.inference.engine import Engine
from simserve.jobs.files import find_images
from simserve.jobs.lanes import decode_each, embed_decoded, map_lanes
from simserve.jobs.shard import Shard, interleave


@dataclass
class EmbedReport:
    images: int = 0
    embedded: int = 0
    errors: int = 0
    resumed_after: int = 0
    seconds: float = 0.0


class Parts:
    """The two growing files of one run: rows (JSONL) and raw float32 vectors."""

    def __init__(self, prefix: Path, dim: int) -> None:
        self.rows, self.vecs, self.dim = Path(f"{prefix}.rows.jsonl"), Path(f"{prefix}.f32"), dim

    def resume(self, batch: int) -> int:
        """Cut both files back to the last whole batch; return how many images that keeps."""
        if not self.rows.exists():
            return 0
        lines = self.rows.read_bytes().split(b"\n")[:-1]  # a partial last line has no newline
        keep = len(lines) - len(lines) % batch
        ok = sum(1 for ln in lines[:keep] if json.loads(ln).get("error") is None)
        with open(self.rows, "r+b") as f:
            f.truncate(sum(len(ln) + 1 for ln in lines[:keep]))
        if self.vecs.exists():
            with open(self.vecs, "r+b") as f:
                f.truncate(ok * self.dim * 4)
        return keep

    def open(self, append: bool):
        mode = "ab" if append else "wb"
        return open(self.rows, mode), open(self.vecs, mode)


def embed_folder(
    engine: Engine,
    folder: str | os.PathLike,
    prefix: str | os.PathLike,
    *,
    batch: int = 64,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: Shard = Shard(),
) -> EmbedReport:
    folder, prefix = Path(folder), Path(prefix)
    paths = find_images(folder)
    dim, cfg = engine.bundle.embedding_dim, engine.config
    parts = Parts(shard.part(prefix), dim)
    done = parts.resume(batch) if resume else 0
    report = EmbedReport(resumed_after=done)
    t0 = time.perf_counter()
    rows_f, vecs_f = parts.open(append=done > 0)
    bar = tqdm(total=len(paths) // shard.world, initial=done, unit="img", desc="embedding", disable=not progress)
    load = partial(load_file, size=cfg.input_size, channels=cfg.in_channels)
    todo = itertools.islice(shard.batches(paths, batch), done // batch, None)
    with rows_f, vecs_f:
        for chunk, arrays, out in map_lanes(engine, todo, partial(decode_each, load=load), embed_decoded, lanes=workers):
            errors = [None if isinstance(a, np.ndarray) else str(a) for a in arrays]
            write_batch(rows_f, vecs_f, [p.relative_to(folder).as_posix() for p in chunk], errors, None if out is None else out[1], report)
            bar.update(len(chunk))
    bar.close()
    report.images = done + report.embedded + report.errors
    report.seconds = time.perf_counter() - t0
    if shard.finish(prefix, lambda part_paths, dest: _merge(prefix, shard.world, dim, batch)):
        finalize(Parts(prefix, dim), prefix)
    return report


def write_batch(rows_f, vecs_f, keys: list[str], errors: list[str | None], embs: np.ndarray | None, report: EmbedReport) -> None:
    """One batch appended to the run's two files and made durable: vectors of the images that
    decoded (in order), a row per image."""
    if embs is not None and len(embs):
        vecs_f.write(np.ascontiguousarray(embs, np.float32).tobytes())
    for key, err in zip(keys, errors):
        rows_f.write((json.dumps({"key": key, "error": err}, ensure_ascii=False) + "\n").encode())
        report.errors += err is not None
    report.embedded += 0 if embs is None else len(embs)
    vecs_f.flush()
    rows_f.flush()
    os.fsync(vecs_f.fileno())  # vectors first: a counted row always has its vector
    os.fsync(rows_f.fileno())


def _merge(prefix: Path, world: int, dim: int, batch: int) -> None:
    """Interleave the ranks' rows and vectors batch by batch into the one-process files."""
    parts = [Parts(Shard(r, world).part(prefix), dim) for r in range(world)]
    out = Parts(prefix, dim)
    vec_files = [open(p.vecs, "rb") for p in parts]
    tagged = [_tagged_rows(r, p.rows) for r, p in enumerate(parts)]
    with open(out.rows, "w", encoding="utf-8") as rows_out, open(out.vecs, "wb") as vecs_out:
        for r, row in interleave(tagged, batch):
            rows_out.write(json.dumps(row, ensure_ascii=False) + "\n")
            if row["error"] is None:
                vecs_out.write(vec_files[r].read(dim * 4))
    for f in vec_files:
        f.close()
    for p in parts:
        p.rows.unlink()
        p.vecs.unlink()


def _tagged_rows(rank: int, path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield rank, json.loads(line)


def finalize(parts: Parts, prefix: Path) -> None:
    """rows + raw vectors -> PREFIX.npy, PREFIX.keys.txt, PREFIX.errors.jsonl (then drop the working files)."""
    n = os.path.getsize(parts.vecs) // (4 * parts.dim)
    src = np.memmap(parts.vecs, dtype=np.float32, mode="r", shape=(n, parts.dim)) if n else np.zeros((0, parts.dim), np.float32)
    dst = np.lib.format.open_memmap(f"{prefix}.npy", mode="w+", dtype=np.float32, shape=(n, parts.dim))
    for s in range(0, n, 1 << 16):  # streamed: memory stays flat for any n
        dst[s : s + (1 << 16)] = src[s : s + (1 << 16)]
    dst.flush()
    del src, dst
    with open(parts.rows, encoding="utf-8") as rows, open(f"{prefix}.keys.txt", "w", encoding="utf-8") as keys, open(
        f"{prefix}.errors.jsonl", "w", encoding="utf-8"
    ) as errors:
        for line in rows:
            r = json.loads(line)
            if r["error"] is None:
                keys.write(r["key"] + "\n")
            else:
                errors.write(line)
    parts.rows.unlink()
    parts.vecs.unlink()
