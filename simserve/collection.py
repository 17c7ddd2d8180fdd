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

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from simserve import verify
from simserve.rwlock import RWLock
from simserve.store import ItemStore, NewItem, StoreError, StoredItem
from simserve.tiered_index import TieredIndex
from simserve.views import RESCORE_DEPTH, view_scores
from simserve.vector_index import IndexTuning, SnapshotError, VectorIndex, min_train_size, validate_factory

log = logging.getLogger("simserve.collection")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONFIG_FILE = "collection.json"
SNAPSHOT_FILE = "index.faiss"


def default_data_dir() -> Path:
    """$SIMSERVE_DATA_DIR, else $XDG_DATA_HOME/simserve (~/.local/share/simserve)."""
    env = os.environ.get("SIMSERVE_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "simserve"


class CollectionNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "collection not found"


@dataclass
class Hit:
    key: str
    # Cosine similarity of the embeddings; in a crop-views collection, the mean of that and
    # the best crop view's cosine (simserve/views.py: view_scores).
    score: float
    id: int
    metadata: dict[str, Any] | None = None
    head_score: float | None = None  # set when re-ranked by the fusion head
    inliers: int | None = None  # set by a verifying collection (simserve/verify.py)

    @property
    def rank(self) -> float:
        """What orders hits before any head re-ranking: the score, plus the inliers' worth when verified."""
        return verify.verified_score(self.score, self.inliers)


@dataclass
class CollectionConfig:
    name: str
    dim: int
    factory: str = "Flat"
    store_features: bool = True  # keep head features so searches can be re-ranked
    feature_shape: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    crop_views: bool = False  # vectors are the mean of whole-image and crop embeddings (simserve/views.py)
    verify: bool = False  # items keep keypoints; searches re-order their top hits by them (simserve/verify.py)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


class Collection:
    def __init__(self, root: Path, config: CollectionConfig, tuning: IndexTuning | None = None, synchronous: str = "FULL") -> None:
        self.root, self.config = root, config
        self.name, self.dim = config.name, config.dim
        self.tuning = tuning or IndexTuning()
        self.store = ItemStore(root / "items.sqlite", config.dim, synchronous)
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
        self._kick_drainer()
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

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        where: dict[str, Any] | None = None,
        exclude_ids: Sequence[int] = (),
        keypoints: Sequence[Sequence[verify.LocalFeatures] | None] | None = None,
    ) -> list[list[Hit]]:
        """Top k per query vector. A crop-views collection fetches the top RESCORE_DEPTH by
        the pooled vector and re-orders them by their view embeddings (simserve/views.py); a
        verifying one then re-orders them by the inliers each shares with its query's
        ``keypoints`` (``verify.query_features``; None for a query without them)."""
        allow = self.store.ids_matching(where) if where else None
        if allow is not None and not len(allow):
            return [[] for _ in range(len(vectors))]
        deep = self.config.crop_views or (self.config.verify and keypoints is not None)
        depth = max(k, RESCORE_DEPTH) if deep else k
        extra = len(exclude_ids)
        with self.lock.read():
            scores, ids = self.index.search(vectors, depth + extra, allow)
        wanted = {int(i) for row in ids for i in row if i >= 0}
        items = self.store.get_ids(sorted(wanted))  # removed meanwhile -> absent -> skipped
        skip = set(int(i) for i in exclude_ids)
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow, irow):
                it = items.get(int(i))
                if i < 0 or it is None or int(i) in skip:
                    continue
                hits.append(Hit(it.key, float(s), int(i), it.metadata))
                if len(hits) == depth:
                    break
            out.append(hits)
        if self.config.crop_views:
            out = [self._rescore(v, hits) for v, hits in zip(vectors, out)]
        if self.config.verify and keypoints is not None:
            # Only the top RESCORE_DEPTH: the rest score below all of them even before their inliers count.
            out = [self._verify(q, hits[:RESCORE_DEPTH]) + hits[RESCORE_DEPTH:] if q is not None else hits for q, hits in zip(keypoints, out)]
        return [hits[:k] for hits in out]

    def _verify(self, query: Sequence[verify.LocalFeatures], hits: list[Hit]) -> list[Hit]:
        """Hits with their inlier counts, re-ordered by ``verify.verified_score`` (items added
        without keypoints keep no count and their plain score)."""
        stored = self.store.keypoints([h.id for h in hits])
        for h in hits:
            if h.id in stored:
                h.inliers = verify.inliers(query, verify.unpack(stored[h.id]))
        return sorted(hits, key=lambda h: -h.rank)

    def _rescore(self, query: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """Hits re-scored by their stored views, best first (items added before views were
        stored keep the pooled cosine: their score if no view matched better than the pool)."""
        views = self.store.views([h.id for h in hits])
        have = [h for h in hits if h.id in views]
        if have:
            q = np.asarray(query, np.float32).reshape(-1)
            new = view_scores(q, np.array([h.score for h in have], np.float32), np.stack([views[h.id] for h in have]))
            for h, s in zip(have, new):
                h.score = float(s)
        return sorted(hits, key=lambda h: -h.score)

    def query_keypoints(self, id: int) -> list[verify.LocalFeatures] | None:
        """A stored item's keypoints as a query's (not mirrored: its image is not kept), or None."""
        blob = self.store.keypoints([id]).get(id)
        return None if blob is None else [verify.unpack(blob)]

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
                "index_type": type(self.index.index).__name__,
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


class Collections:
    """Every collection under ``data_dir/collections``, opened lazily."""

    def __init__(self, data_dir: str | Path, tuning: IndexTuning | None = None, synchronous: str = "FULL") -> None:
        self.root = Path(data_dir) / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tuning, self.synchronous = tuning, synchronous
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).exists())

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
        if not NAME_RE.match(name):
            raise ValueError(f"collection name {name!r}: 1-64 of letters, digits, '_', '.', '-', starting with a letter or digit")
        validate_factory(factory, dim)
        with self._lock:
            path = self.root / name
            if (path / CONFIG_FILE).exists():
                raise ValueError(f"collection {name!r} already exists")
            path.mkdir(parents=True, exist_ok=True)
            cfg = CollectionConfig(name, dim, factory, store_features, list(feature_shape), crop_views=crop_views, verify=verify)
            tmp = path / (CONFIG_FILE + ".tmp")
            tmp.write_text(cfg.to_json())
            tmp.replace(path / CONFIG_FILE)
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
