"""A named collection: SQLite store (truth) + FAISS index (derived) + snapshots.

Open: load the latest snapshot if its checksum holds, else rebuild from the
store (and log why); then replay the store's changes after the snapshot's
sequence. Writes go to SQLite first (committed = acknowledged), then to the
index under the write lock. Searches take the read lock, so they never see
a half-updated index; background work (IVF training, HNSW compaction)
builds a new index off to the side and swaps it in under the write lock
after replaying what changed meanwhile. HNSW collections acknowledge adds
into an exactly-searched buffer that a drainer thread feeds into the graph
in small steps (tiered_index), so adds run at SQLite speed and no search
waits behind a big insert.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from simserve.atomic import atomic_write
from simserve.index.rwlock import RWLock
from simserve.index.store import Candidate, ItemStore, NewItem, StoredItem, StoreError
from simserve.index.tiered_index import TieredIndex
from simserve.index.vector_index import IndexTuning, SnapshotError, VectorIndex, min_train_size, validate_factory

log = logging.getLogger("simserve.index.collection")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONFIG_FILE = "collection.json"
SNAPSHOT_FILE = "index.faiss"
STORE_FILE = "items.sqlite"


def default_data_dir() -> Path:
    """$SIMSERVE_DATA_DIR, else $XDG_DATA_HOME/simserve (~/.local/share/simserve)."""
    env = os.environ.get("SIMSERVE_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "simserve"


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"collection name {name!r}: 1-64 of letters, digits, '_', '.', '-', starting with a letter or digit")


class CollectionNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "collection not found"


@dataclass
class CollectionConfig:
    name: str
    dim: int
    factory: str = "Flat"
    store_features: bool = True  # keep head features so searches can be re-ranked
    feature_shape: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    crop_views: bool = False  # vectors pool whole-image and crop embeddings; items keep the views (inference/crops.py)
    verify: bool = False  # items keep keypoints for geometric verification (ranking/verify.py)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


class Collection:
    def __init__(self, root: Path, config: CollectionConfig, tuning: IndexTuning | None = None, synchronous: str = "FULL") -> None:
        self.root, self.config = root, config
        self.name, self.dim = config.name, config.dim
        self.tuning = tuning or IndexTuning()
        self.store = ItemStore(root / STORE_FILE, config.dim, synchronous)
        self.lock = RWLock()  # searches (read) vs index mutation (write)
        # Writers hold this from the SQLite commit to the index update, so the
        # index's sequence always means "every change up to here, none after".
        self._writer = threading.Lock()
        self._bg: threading.Thread | None = None
        self._bg_lock = threading.Lock()
        self._drainer: threading.Thread | None = None
        self._drained = threading.Condition()  # guards _drainer; notified as the buffer shrinks
        self._closing = False
        self.rebuilds = 0
        self.index = self._open_index()
        self._warm()
        self._kick_drainer()
        self._maybe_background_work()  # an IVF collection that grew past its stand-in but stopped before training
        if self.store.read_only:
            log.warning("collection %s: the data directory is read-only; serving reads, refusing writes", self.name)

    # -- opening ------------------------------------------------------------------
    def _open_index(self) -> TieredIndex:
        path = self.root / SNAPSHOT_FILE
        try:
            idx = TieredIndex.load(path, self.dim, self.config.factory, self.tuning)
            log.info("collection %s: loaded snapshot at seq %d (%d vectors)", self.name, idx.seq, idx.ntotal)
        except SnapshotError as e:
            if path.with_suffix(".json").exists() or path.exists():
                log.warning("collection %s: %s; rebuilding the index from SQLite", self.name, e)
            idx = self._build_from_store()
            return idx
        ids, removed = self._catch_up(idx)
        if ids or removed:
            log.info("collection %s: replayed %d adds, %d removes after the snapshot", self.name, ids, removed)
        return idx

    def _warm(self) -> None:
        """One search now makes what the first would otherwise make while a user waits: the exact
        scan's int8 codes and ONNX session (a first search at 100,000 items took 87 ms, the next 2;
        ~10x the codes at 1M). A server opens its collection before it says SERVING."""
        if self.index.ntotal:
            self.index.search(np.zeros((1, self.dim), np.float32), 1)

    def _catch_up(self, idx: TieredIndex) -> tuple[int, int]:
        """Fold the store's changes after ``idx.seq`` into ``idx``. Ids are never
        reused, so every id added after the sequence is new to the index."""
        ids, vecs, removed, last = self.store.changes_after(idx.seq)
        idx.apply(removed, ids, vecs, last)
        return len(ids), len(removed)

    def _build_from_store(self) -> TieredIndex:
        """A fresh index of the store as of one sequence (trained first, for IVF types, when big enough)."""
        idx = VectorIndex(self.dim, self.config.factory, self.tuning)
        n = self.store.count()
        if idx.pending_training and n >= min_train_size(self.config.factory):
            idx.train(self._sample(min(n, 256 * 1024)))
        idx.seq = self.store.last_seq()  # for an empty store; else the read's own sequence
        for seq, ids, vecs in self.store.iter_vectors():
            idx.seq = seq
            idx.add(ids, vecs)
        return TieredIndex(idx)

    def _sample(self, n: int) -> np.ndarray:
        parts, got = [], 0
        for _, _, vecs in self.store.iter_vectors():
            parts.append(vecs)
            got += len(vecs)
            if got >= n:
                break
        x = np.concatenate(parts)
        rng = np.random.default_rng(0)
        return x[rng.choice(len(x), size=min(n, len(x)), replace=False)]

    # -- writes ------------------------------------------------------------------
    def add(self, items: Sequence[NewItem]) -> list[int]:
        if not items:
            return []
        vecs = np.stack([np.asarray(it.vector, np.float32).reshape(-1) for it in items])
        self._wait_for_buffer_room()
        with self._writer:
            ids, replaced = self.store.add(items)  # committed: acknowledged from here on
            seq = self.store.last_seq()
            with self.lock.write():
                self.index.apply(replaced, ids, vecs, seq)
        self._kick_drainer()
        self._maybe_background_work()
        return ids

    def remove(self, keys: Sequence[str]) -> dict[str, int]:
        with self._writer:
            found = self.store.remove(keys)
            if found:
                with self.lock.write():
                    self.index.apply(list(found.values()), [], [], self.store.last_seq())
        if found:
            self._maybe_background_work()
        return found

    # -- reads --------------------------------------------------------------------
    def get(self, keys: Sequence[str]) -> dict[str, StoredItem]:
        return self.store.get(keys)

    def count(self) -> int:
        return self.store.count()

    def hashes(self, keys: Sequence[str]) -> dict[str, str | None]:
        """{key: content hash} of the keys present: what a folder re-index skips."""
        return self.store.hashes(keys)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        exclude_ids: Sequence[int] = (),
        *,
        views: bool = False,
        features: bool = False,
    ) -> list[list[Candidate]]:
        """Top k per query vector by the index, each with the stored evidence asked for
        (views, head features) read in the same query of the store."""
        allow = self.store.ids_matching(where) if where else None
        if allow is not None and not len(allow):
            return [[] for _ in range(len(vectors))]
        with self.lock.read():
            scores, ids = self.index.search(vectors, k + len(exclude_ids), allow)
        skip = {int(i) for i in exclude_ids}
        rows = [[(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0 and int(i) not in skip][:k] for srow, irow in zip(scores, ids)]
        # One read for every query's candidates; an id removed meanwhile is absent and skipped.
        found = self.store.candidates({i: s for row in rows for i, s in row}, views=views, features=features)
        return [[_rescored(found[i], s) for i, s in row if i in found] for row in rows]

    def keypoints(self, ids: Sequence[int]) -> dict[int, bytes]:
        return self.store.keypoints(ids)

    def features(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        shape = tuple(self.config.feature_shape)
        return {i: f.reshape(shape).astype(np.float32) for i, f in self.store.features(ids).items()}

    def stats(self) -> dict[str, Any]:
        with self.lock.read():
            return {
                "name": self.name,
                "items": self.store.count(),
                "indexed": self.index.ntotal,
                "dim": self.dim,
                "factory": self.config.factory,
                "crop_views": self.config.crop_views,
                "verify": self.config.verify,
                "index_type": self.index.kind,
                "pending_training": self.index.pending_training,
                "deleted_pending": len(self.index.deleted),
                "buffered": self.index.buffered,
                "index_bytes": self.index.memory_bytes(),
                "seq": self.index.seq,
                "rebuilds": self.rebuilds,
            }

    # -- snapshots and background work ---------------------------------------------
    def snapshot(self) -> None:
        """Write the index atomically; then the changes it includes can be forgotten."""
        with self._writer, self.lock.read():
            seq = self.index.save(self.root / SNAPSHOT_FILE)  # complete up to seq; the buffer replays
        self.store.compact_changes(seq)

    def _needs_rebuild(self) -> bool:
        idx = self.index
        if idx.pending_training and self.store.count() >= min_train_size(self.config.factory):
            return True
        return len(idx.deleted) > max(1000, 0.2 * max(1, idx.ntotal))

    def _maybe_background_work(self) -> None:
        if not self._needs_rebuild():
            return
        with self._bg_lock:
            if self._bg is not None and self._bg.is_alive():
                return
            self._bg = threading.Thread(target=self.rebuild, name=f"rebuild-{self.name}", daemon=True)
            self._bg.start()

    def rebuild(self) -> None:
        """Build a new index from the store off to the side, catch up, swap atomically."""
        new = self._build_from_store()
        with self._writer, self.lock.write():
            self._catch_up(new)
            self.index = new
            self.rebuilds += 1
        self._kick_drainer()
        log.info("collection %s: index rebuilt (%s, %d vectors)", self.name, type(new.index).__name__, new.ntotal)

    def wait_background(self, timeout: float | None = None) -> None:
        t = self._bg
        if t is not None:
            t.join(timeout)

    # -- the HNSW buffer's drainer ---------------------------------------------------
    def _kick_drainer(self) -> None:
        with self._drained:
            if self.index.buffered and self._drainer is None and not self._closing:
                self._drainer = threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True)
                self._drainer.start()

    def _drain(self) -> None:
        """Feed buffered rows into the main index, one short write-locked step at a time."""
        while True:
            with self.lock.write():
                moved = 0 if self._closing else self.index.drain(self.tuning.drain_batch)
            with self._drained:
                self._drained.notify_all()
                if not moved and (self._closing or not self.index.buffered):
                    self._drainer = None  # an add that buffers after this starts a new drainer
                    return

    def _wait_for_buffer_room(self) -> None:
        """Backpressure: past ``buffer_limit`` buffered vectors, adds go at the graph's pace."""
        with self._drained:
            while self.index.buffered >= self.tuning.buffer_limit and self._drainer is not None:
                self._drained.wait(1.0)

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Block until the buffer is empty (every acknowledged vector in the main index)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._drained:
            while self.index.buffered and self._drainer is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._drained.wait(left if left is not None else 1.0)
        return not self.index.buffered

    def close(self, snapshot: bool = True) -> None:
        self.wait_background()
        with self._drained:
            self._closing = True  # the buffer is not waited for: the next start replays it from SQLite
            drainer = self._drainer
        if drainer is not None:
            drainer.join()
        if snapshot and not self.store.read_only:
            try:
                self.snapshot()
            except (OSError, StoreError) as e:  # full or read-only disk: SQLite still has every item
                log.error("snapshot failed; the next start replays the changes from SQLite", extra={"collection": self.name, "error": str(e)})
        self.store.close()


def _rescored(c: Candidate, score: float) -> Candidate:
    """The candidate with this query's cosine (two queries may share one candidate)."""
    return c if c.score == score else dataclasses.replace(c, score=score)


class Collections:
    """Every collection under ``data_dir/collections``, opened lazily."""

    def __init__(self, data_dir: str | Path, tuning: IndexTuning | None = None, synchronous: str = "FULL") -> None:
        self.root = Path(data_dir) / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tuning, self.synchronous = tuning, synchronous
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return str(self.root.parent)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).exists())

    def census(self) -> dict[str, tuple[int, int]]:
        """(items, bytes on disk) of every collection on disk, for metrics: an open collection
        answers from its store; another is counted through a read-only connection, not opened
        (opening holds descriptors and loads its index)."""
        out = {}
        for name in self.names():
            path = self.root / name
            with self._lock:
                live = self._open.get(name)
            try:
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                if live is not None:
                    items = live.store.count()
                else:
                    conn = sqlite3.connect(f"{(path / STORE_FILE).resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
                    try:
                        items = int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
                    finally:
                        conn.close()
            except (sqlite3.Error, StoreError, OSError):  # being created, or unreadable: left out this time
                continue
            out[name] = (items, size)
        return out

    def exists(self, name: str) -> bool:
        return NAME_RE.match(name) is not None and (self.root / name / CONFIG_FILE).exists()

    def get(self, name: str) -> Collection:
        with self._lock:
            if name in self._open:
                return self._open[name]
            if not self.exists(name):
                raise CollectionNotFound(f"collection {name!r} not found")
            cfg = CollectionConfig(**json.loads((self.root / name / CONFIG_FILE).read_text()))
            c = self._open[name] = Collection(self.root / name, cfg, self.tuning, self.synchronous)
            return c

    def create(
        self,
        name: str,
        dim: int,
        factory: str = "Flat",
        feature_shape: Sequence[int] = (),
        store_features: bool = True,
        crop_views: bool = False,
        verify: bool = False,
    ) -> Collection:
        check_name(name)
        validate_factory(factory, dim)
        with self._lock:
            path = self.root / name
            if (path / CONFIG_FILE).exists():
                raise ValueError(f"collection {name!r} already exists")
            path.mkdir(parents=True, exist_ok=True)
            cfg = CollectionConfig(name, dim, factory, store_features, list(feature_shape), crop_views=crop_views, verify=verify)
            atomic_write(path / CONFIG_FILE, cfg.to_json())
        return self.get(name)

    def get_or_create(
        self, name: str, dim: int, factory: str = "Flat", feature_shape: Sequence[int] = (), crop_views: bool = False, verify: bool = False
    ) -> Collection:
        """The named collection; created with these settings if it does not exist (an existing one keeps its own)."""
        try:
            return self.get(name)
        except CollectionNotFound:
            try:
                return self.create(name, dim, factory, feature_shape, crop_views=crop_views, verify=verify)
            except ValueError:
                return self.get(name)  # created concurrently

    def close(self, snapshot: bool = True) -> None:
        with self._lock:
            for c in self._open.values():
                c.close(snapshot)
            self._open.clear()
