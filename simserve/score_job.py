"""``simserve score PAIRS --out SCORES``: score a file of image pairs, streamed.

rows (CSV/JSONL) -> batches -> decode pool (reads + decodes the next batch
while the engine runs this one) -> engine (one tower pass over the batch's
distinct images, one head pass over its pairs) -> rows out, in order.
Pair lists repeat images (one query against many candidates, all pairs of
a group), so decoded pixels stay in a bounded LRU (``cache_mb``): an image
is read and decoded once per run, not once per pair. The engine's work is
unchanged, so the output is byte-identical with or without it.

A row whose image is missing or broken gets an ``error`` and the run goes
on. Output is flushed per batch; ``--resume`` keeps the complete batches
already written and continues after them, so the result equals an
uninterrupted run's, byte for byte. Under torchrun each rank scores every
N-th batch and rank 0 merges (see ``simserve.shard``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from simserve.decode import DecodeError
from simserve.decode_pool import DecodePool
from simserve.engine import Engine
from simserve.rows import RowWriter, file_format, read_rows
from simserve.shard import Shard, interleave

RESULT_COLUMNS = ["score", "cosine", "match", "error"]


@dataclass
class ScoreReport:
    rows: int = 0
    scored: int = 0
    errors: int = 0
    resumed_after: int = 0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return (self.rows - self.resumed_after) / self.seconds if self.seconds else 0.0


def pair_columns(row: dict[str, Any], columns: tuple[str, str] | None) -> tuple[str, str]:
    """``a``/``b`` if present, else the row's first two columns, unless named explicitly."""
    if columns:
        return columns
    if "a" in row and "b" in row:
        return "a", "b"
    keys = [k for k in row if not k.startswith("__")]
    if len(keys) < 2:
        raise ValueError(f"a pairs row needs two image columns, got {keys}")
    return keys[0], keys[1]


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def score_file(
    engine: Engine,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    root: str | os.PathLike | None = None,
    columns: tuple[str, str] | None = None,
    batch: int = 64,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: Shard = Shard(),
    cache_mb: float = 256,
) -> ScoreReport:
    pairs = Path(pairs)
    root = Path(root) if root is not None else pairs.parent
    first = next(read_rows(pairs), None)
    if first is None:
        raise ValueError(f"{pairs}: no rows")
    cols = pair_columns(first, columns)
    in_columns = [k for k in first if not k.startswith("__")]
    out_columns = in_columns + [c for c in RESULT_COLUMNS if c not in in_columns and (c != "match" or threshold is not None)]
    report = ScoreReport()
    cfg = engine.config
    total = max(0, _count_lines(pairs) - (1 if file_format(pairs) == "csv" else 0))
    part = shard.part(out)
    t0 = time.perf_counter()
    with RowWriter(part, out_columns, resume=resume) as writer, DecodePool(cfg.input_size, cfg.in_channels, workers) as pool:
        done = writer.done - writer.done % batch  # whole batches only: they are what a fresh run would write
        if done != writer.done:
            writer.close()
            _truncate_rows(part, done, out_columns)
            writer = RowWriter(part, out_columns, resume=True)
        report.resumed_after = done
        mine = shard.batches(read_rows(pairs), batch)
        skip = done // batch
        bar = tqdm(total=total // shard.world, initial=done, unit="pair", desc="scoring", disable=not progress, smoothing=0.05)
        reader = ThreadPoolExecutor(1, thread_name_prefix="prefetch")  # the cache's only user
        cache = PixelCache(int(cache_mb * 2**20))
        pending: Future | None = None
        for i, rows in enumerate(mine):
            if i < skip:
                continue
            nxt = reader.submit(_decode_batch, pool, rows, cols, root, cache)
            if pending is not None:
                _finish(engine, pending.result(), threshold, writer, report, bar)
            pending = nxt
        if pending is not None:
            _finish(engine, pending.result(), threshold, writer, report, bar)
        reader.shutdown()
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.rows += done
    shard.finish(out, lambda parts, dest: _merge(parts, dest, out_columns, batch))
    return report


@dataclass
class _Decoded:
    rows: list[dict[str, Any]]
    pixels: np.ndarray | None  # distinct images of the batch
    index: list[tuple[int, int] | None]  # per row: (a, b) positions in pixels, or None
    errors: list[str | None]


class PixelCache:
    """Decoded images by path, least recently used out first, within a byte budget. Failures
    are not kept (a file fixed mid-run is read again). One thread uses it: no lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        a = self._items.get(key)
        if a is not None:
            self._items.move_to_end(key)
        return a

    def put(self, key: str, a: np.ndarray) -> None:
        if a.nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = a
        self.bytes += a.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1].nbytes


def _decode_batch(pool: DecodePool, rows: list[dict[str, Any]], cols: tuple[str, str], root: Path, cache: PixelCache) -> _Decoded:
    order = list(dict.fromkeys(p for r in rows for p in (r.get(c) for c in cols) if isinstance(p, str) and p))
    hit = {p: cache.get(p) for p in order}
    todo = [p for p in order if hit[p] is None]
    for p, a in zip(todo, pool.map_files(root / p for p in todo)):
        hit[p] = a
        if isinstance(a, np.ndarray):
            cache.put(p, a)
    good = {p: a for p, a in hit.items() if isinstance(a, np.ndarray)}
    bad = {p: str(a) for p, a in hit.items() if not isinstance(a, np.ndarray)}
    slot = {p: i for i, p in enumerate(good)}
    index: list[tuple[int, int] | None] = []
    errors: list[str | None] = []
    for r in rows:
        if "__error__" in r:
            index.append(None)
            errors.append(r["__error__"])
            continue
        a, b = r.get(cols[0]), r.get(cols[1])
        missing = [c for c, v in zip(cols, (a, b)) if not isinstance(v, str) or not v]
        if missing:
            index.append(None)
            errors.append(f"column {missing[0]!r} is empty")
        elif a in bad or b in bad:
            index.append(None)
            errors.append(f"{a if a in bad else b}: {bad[a] if a in bad else bad[b]}")
        else:
            index.append((slot[a], slot[b]))
            errors.append(None)
    pixels = np.stack(list(good.values())) if good else None
    return _Decoded(rows, pixels, index, errors)


def _finish(engine: Engine, d: _Decoded, threshold: float | None, writer: RowWriter, report: ScoreReport, bar: tqdm) -> None:
    ok = [i for i, ix in enumerate(d.index) if ix is not None]
    scores = cosine = np.zeros(0, np.float32)
    if ok:
        feats, embs = engine.embed(d.pixels)
        ia = np.array([d.index[i][0] for i in ok])
        ib = np.array([d.index[i][1] for i in ok])
        scores = engine.fuse(feats[ia], feats[ib])
        cosine = np.einsum("ij,ij->i", embs[ia], embs[ib])
    out = []
    k = 0
    for r, ix, err in zip(d.rows, d.index, d.errors):
        row = {key: v for key, v in r.items() if not key.startswith("__")}
        if ix is None:
            row.update(score=None, cosine=None, error=err)
            if threshold is not None:
                row["match"] = None
            report.errors += 1
            if len(report.error_examples) < 5:
                report.error_examples.append(err or "")
        else:
            row.update(score=round(float(scores[k]), 6), cosine=round(float(cosine[k]), 6), error=None)
            if threshold is not None:
                row["match"] = bool(scores[k] >= threshold)
            k += 1
            report.scored += 1
        out.append(row)
    writer.write(out)
    report.rows += len(out)
    bar.update(len(out))


def _truncate_rows(path: Path, keep: int, columns: list[str]) -> None:
    """Keep the first ``keep`` rows (streamed through a temporary file)."""
    _rewrite(itertools.islice(read_rows(path), keep), path, columns)


def _merge(parts: list[Path], dest: Path, columns: list[str], batch: int) -> None:
    _rewrite(interleave([read_rows(p) for p in parts], batch), dest, columns)


def _rewrite(rows: Iterator[dict[str, Any]], dest: Path, columns: list[str]) -> None:
    tmp = dest.with_name(dest.name + ".tmp" + dest.suffix)
    with RowWriter(tmp, columns) as w:
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= 4096:
                w.write(chunk)
                chunk = []
        w.write(chunk)
    os.replace(tmp, dest)
