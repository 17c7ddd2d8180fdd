"""``simserve score PAIRS --out SCORES``: score a file of image pairs, streamed.

rows (CSV/JSONL) -> batches -> lanes (simserve/jobs/lanes.py: each lane reads and
decodes a batch's distinct images, then runs one tower pass over them and one
head pass over its pairs, while the other lanes do the same with the next
batches) -> rows out, in order.
Pair lists repeat images (one query against many candidates, all pairs of
a group), so decoded pixels stay in a bounded LRU (``cache_mb``): an image
is read and decoded once per run, not once per pair. The engine's work is
unchanged, so the output is byte-identical with or without it.

A row whose image is missing or broken gets an ``error`` and the run goes
on. Output is flushed per batch; ``--resume`` keeps the complete batches
already written and continues after them, so the result equals an
uninterrupted run's, byte for byte. Under torchrun each rank scores every
N-th batch and rank 0 merges (see ``simserve.jobs.shard``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from simserve.atomic import atomic_path
from simserve.inference.decode import DecodeError
from simserve.inference.decode_pool import load_file
from simserve.inference.engine import Engine
from simserve.jobs.lanes import map_lanes
from simserve.jobs.rows import RowWriter, file_format, read_rows
from simserve.jobs.shard import Shard, interleave

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
    with ScoreRun(pairs, out, root, columns, threshold, batch, resume, shard, progress) as run:
        decode = batch_decoder(engine.config, run.cols, run.root, cache_mb)
        for scored in map_lanes(engine, run.todo(), decode, score_batch, lanes=workers):
            run.write(scored)
    return run.finish()


class ScoreRun:
    """What every way of running ``score`` shares: the pair columns, the output (resumed after
    its whole batches), the batches still to score, the progress bar and the report. A context:
    leaving it closes the output."""

    def __init__(self, pairs, out, root, columns, threshold, batch: int, resume: bool, shard: Shard = Shard(), progress: bool = True) -> None:
        self.pairs, self.out, self.threshold, self.batch, self.shard = Path(pairs), out, threshold, batch, shard
        self.root = Path(root) if root is not None else self.pairs.parent
        first = next(read_rows(self.pairs), None)
        if first is None:
            raise ValueError(f"{self.pairs}: no rows")
        self.cols = pair_columns(first, columns)
        in_columns = [k for k in first if not k.startswith("__")]
        self.columns = in_columns + [c for c in RESULT_COLUMNS if c not in in_columns and (c != "match" or threshold is not None)]
        self.report = ScoreReport()
        total = max(0, _count_lines(self.pairs) - (1 if file_format(self.pairs) == "csv" else 0))
        self.t0 = time.perf_counter()
        part = shard.part(out)
        self.writer = RowWriter(part, self.columns, resume=resume)
        self.done = self.writer.done - self.writer.done % batch  # whole batches only: they are what a fresh run would write
        if self.done != self.writer.done:
            self.writer.close()
            _truncate_rows(part, self.done, self.columns)
            self.writer = RowWriter(part, self.columns, resume=True)
        self.report.resumed_after = self.done
        self.bar = tqdm(total=total // shard.world, initial=self.done, unit="pair", desc="scoring", disable=not progress, smoothing=0.05)

    def __enter__(self) -> "ScoreRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        self.writer.close()

    def todo(self) -> Iterator[list[dict[str, Any]]]:
        return itertools.islice(self.shard.batches(read_rows(self.pairs), self.batch), self.done // self.batch, None)

    def write(self, scored: "Scored") -> None:
        _write(scored, self.threshold, self.writer, self.report, self.bar)

    def finish(self) -> ScoreReport:
        self.report.seconds = time.perf_counter() - self.t0
        self.report.rows += self.done
        self.shard.finish(self.out, lambda parts, dest: _merge(parts, dest, self.columns, self.batch))
        return self.report


@dataclass
class _Decoded:
    rows: list[dict[str, Any]]
    errors: list[str | None]  # per row; None where the row is scored
    pixels: np.ndarray | None  # the batch's distinct decoded images
    ia: list[int]  # per scored row, in row order: its two images in ``pixels``
    ib: list[int]


@dataclass
class Scored:
    rows: list[dict[str, Any]]
    errors: list[str | None]
    scores: np.ndarray  # one per scored row, in row order
    cosine: np.ndarray


Pixels = np.ndarray | DecodeError


class PixelCache:
    """Decoded images by path, least recently used out first, within a byte budget; shared by
    the lanes. An image another lane is decoding right now is waited for, not decoded again.
    Failures are not kept (a file fixed mid-run is read again)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()

    def fetch(self, keys: list[str], load: Callable[[str], Pixels]) -> dict[str, Pixels]:
        """Every key's pixels (or its DecodeError): from the cache, from the lane already
        loading it, or loaded here."""
        out: dict[str, Pixels] = {}
        mine: list[str] = []
        theirs: dict[str, Future] = {}
        with self._lock:
            for k in keys:
                if (a := self._items.get(k)) is not None:
                    self._items.move_to_end(k)
                    out[k] = a
                elif k in self._loading:
                    theirs[k] = self._loading[k]
                else:
                    self._loading[k] = Future()
                    mine.append(k)
        for i, k in enumerate(mine):  # our own loads before waiting on anyone's: no deadlock
            try:
                out[k] = load(k)
            except BaseException:  # not a DecodeError (those are returned): release every claim
                for rest in mine[i:]:
                    self._done(rest, DecodeError("unreadable", "the batch loading it failed"))
                raise
            self._done(k, out[k])
        for k, f in theirs.items():
            out[k] = f.result()
        return out

    def _done(self, key: str, a: Pixels) -> None:
        with self._lock:
            f = self._loading.pop(key, None)
            if isinstance(a, np.ndarray) and a.nbytes <= self.max_bytes:
                self._items[key] = a
                self.bytes += a.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._items.popitem(last=False)[1].nbytes
        if f is not None:
            f.set_result(a)


def batch_decoder(config: Any, cols: tuple[str, str], root: Path, cache_mb: float) -> Callable[[list[dict[str, Any]]], _Decoded]:
    """A batch's rows -> its distinct images decoded at the model's size, through one process's
    cache of ``cache_mb`` (an image in many pairs is decoded once)."""
    load = partial(load_file, size=config.input_size, channels=config.in_channels)
    return partial(_decode_batch, cols=cols, root=root, cache=PixelCache(int(cache_mb * 2**20)), load=load)


def _decode_batch(rows: list[dict[str, Any]], cols: tuple[str, str], root: Path, cache: PixelCache, load: Callable[[Path], Pixels]) -> _Decoded:
    """Read and decode a batch's distinct images; say which rows cannot be scored, and why."""
    order = list(dict.fromkeys(p for r in rows for p in (r.get(c) for c in cols) if isinstance(p, str) and p))
    got = cache.fetch(order, lambda p: load(root / p))
    good = {p: a for p, a in got.items() if isinstance(a, np.ndarray)}
    slot = {p: i for i, p in enumerate(good)}
    ia: list[int] = []
    ib: list[int] = []
    errors: list[str | None] = []
    for r in rows:
        a, b = r.get(cols[0]), r.get(cols[1])
        missing = [c for c, v in zip(cols, (a, b)) if not isinstance(v, str) or not v]
        if "__error__" in r:
            errors.append(r["__error__"])
        elif missing:
            errors.append(f"column {missing[0]!r} is empty")
        elif a not in good or b not in good:
            bad = a if a not in good else b
            errors.append(f"{bad}: {got[bad]}")
        else:
            ia.append(slot[a])
            ib.append(slot[b])
            errors.append(None)
    return _Decoded(rows, errors, np.stack(list(good.values())) if ia else None, ia, ib)


def score_batch(lane: Engine, d: _Decoded) -> Scored:
    """One tower pass over the batch's distinct images, one head pass over its pairs."""
    scores = cosine = np.zeros(0, np.float32)
    if d.ia:
        feats, embs = lane.embed(d.pixels)
        scores = lane.fuse(feats[d.ia], feats[d.ib])
        cosine = np.einsum("ij,ij->i", embs[d.ia], embs[d.ib])
    return Scored(d.rows, d.errors, scores, cosine)


def _write(d: Scored, threshold: float | None, writer: RowWriter, report: ScoreReport, bar: tqdm) -> None:
    out = []
    k = 0
    for r, err in zip(d.rows, d.errors):
        row = {key: v for key, v in r.items() if not key.startswith("__")}
        if err is not None:
            row.update(score=None, cosine=None, error=err)
            if threshold is not None:
                row["match"] = None
            report.errors += 1
            if len(report.error_examples) < 5:
                report.error_examples.append(err)
        else:
            row.update(score=round(float(d.scores[k]), 6), cosine=round(float(d.cosine[k]), 6), error=None)
            if threshold is not None:
                row["match"] = bool(d.scores[k] >= threshold)
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
    with atomic_path(dest) as tmp, RowWriter(tmp, columns) as w:
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= 4096:
                w.write(chunk)
                chunk = []
        w.write(chunk)
