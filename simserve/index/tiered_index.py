"""A main FAISS index plus a buffer of acknowledged vectors it has not taken yet.

HNSW inserts a few thousand vectors a second on two cores, and FAISS cannot
search an HNSW graph while it grows, so inserting inside the add path would
both cap durable adds at that rate and stall every search behind each batch.
Instead an add lands here (a numpy append), searches scan this buffer
exactly next to the main index, and a background drainer hands rows to the
main index in small FIFO steps (LSM-style: Milvus's growing segment, Lucene's
in-memory buffer). Ids come from SQLite's AUTOINCREMENT, so FIFO order is id
order: the main index holds every live id up to its ``max_id`` and the
buffer every live id above it. That one fact routes removals and makes a
replay after a mid-drain snapshot exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simserve.index.vector_index import IndexTuning, VectorIndex


class FreshBuffer:
    """FIFO rows (id, vector, base seq), exact top-k search, O(1) hand-off from the front."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._ids = np.empty(0, np.int64)
        self._vecs = np.empty((0, dim), np.float32)
        self._alive = np.empty(0, bool)
        self._base = np.empty(0, np.int64)  # the index's seq before the row's add: where a replay must start
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def live(self) -> int:
        return int(self._alive[self._start : self._end].sum())

    @property
    def first_base_seq(self) -> int | None:
        return int(self._base[self._start]) if len(self) else None

    def append(self, ids: np.ndarray, vecs: np.ndarray, base_seq: int) -> None:
        m = len(ids)
        if not m:
            return
        if self._end + m > len(self._ids):
            self._grow(m)
        sl = slice(self._end, self._end + m)
        self._ids[sl], self._vecs[sl], self._alive[sl], self._base[sl] = ids, vecs, True, base_seq
        self._end += m

    def _grow(self, m: int) -> None:
        """Move the live rows to the front, doubling capacity when needed (amortised O(1))."""
        n = len(self)
        cap = max(1024, len(self._ids)) if n + m <= len(self._ids) // 2 else max(1024, 2 * (n + m))
        keep = slice(self._start, self._end)
        ids, vecs, alive, base = (np.empty(cap, np.int64), np.empty((cap, self.dim), np.float32), np.empty(cap, bool), np.empty(cap, np.int64))
        ids[:n], vecs[:n], alive[:n], base[:n] = self._ids[keep], self._vecs[keep], self._alive[keep], self._base[keep]
        self._ids, self._vecs, self._alive, self._base = ids, vecs, alive, base
        self._start, self._end = 0, n

    def kill(self, ids: np.ndarray) -> int:
        """Mark rows removed; they are skipped by searches and never handed on."""
        if not len(self) or not len(ids):
            return 0
        window = slice(self._start, self._end)
        hit = np.isin(self._ids[window], ids) & self._alive[window]
        self._alive[window] &= ~hit
        return int(hit.sum())

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Pop up to ``n`` rows from the front: (live ids, their vectors, the last id popped)."""
        n = min(n, len(self))
        sl = slice(self._start, self._start + n)
        alive = self._alive[sl]
        ids, vecs, last = self._ids[sl][alive].copy(), self._vecs[sl][alive].copy(), int(self._ids[self._start + n - 1])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return ids, vecs, last

    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k over live rows; empty slots are id -1, score -inf."""
        nq = len(queries)
        window = slice(self._start, self._end)
        ok = self._alive[window]
        if allow is not None:
            ok = ok & np.isin(self._ids[window], allow)
        rows = np.flatnonzero(ok)
        kk = min(k, len(rows))
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        if kk == 0:
            return scores, ids
        s = queries @ self._vecs[window][rows].T if len(rows) < len(ok) else queries @ self._vecs[window].T
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.broadcast_to(np.arange(s.shape[1]), (nq, s.shape[1]))
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        scores[:, :kk] = np.take_along_axis(top_s, order, axis=1)
        ids[:, :kk] = self._ids[window][rows][top]
        return scores, ids


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of two (scores, ids) result sets per query; missing slots (id -1) sink."""
    s = np.concatenate([np.where(a[1] >= 0, a[0], -np.inf), np.where(b[1] >= 0, b[0], -np.inf)], axis=1).astype(np.float32)
    i = np.concatenate([a[1], b[1]], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


class TieredIndex:
    """The main ``VectorIndex`` plus, for types that insert slowly (HNSW), a ``FreshBuffer``.

    Same surface as ``VectorIndex`` for the collection: add/remove/search under
    the collection's locks, ``seq`` = every store change folded in (main or
    buffer). ``drain`` moves buffered rows into the main index; a snapshot
    saves the main index with the sequence it is complete up to, so a restart
    replays the rest into a new buffer instead of waiting for HNSW.
    """

    def __init__(self, main: VectorIndex) -> None:
        self.main = main
        self.fresh = FreshBuffer(main.dim) if main.slow_adds else None
        self.seq = main.seq

    @classmethod
    def load(cls, path: str | Path, dim: int, factory: str, tuning: IndexTuning | None = None) -> "TieredIndex":
        return cls(VectorIndex.load(path, dim, factory, tuning))

    # what the collection reports and decides on
    @property
    def index(self):
        return self.main.index

    @property
    def ntotal(self) -> int:
        return self.main.ntotal + (self.fresh.live if self.fresh is not None else 0)

    @property
    def buffered(self) -> int:
        return len(self.fresh) if self.fresh is not None else 0

    @property
    def deleted(self) -> set[int]:
        return self.main.deleted

    @property
    def pending_training(self) -> bool:
        return self.main.pending_training

    @property
    def kind(self) -> str:
        return self.main.kind

    def memory_bytes(self) -> int:
        return self.main.memory_bytes() + self.buffered * (4 * self.main.dim + 8)

    # mutations, under the collection's write lock
    def apply(self, removed: np.ndarray, added: np.ndarray, vecs: np.ndarray, seq: int) -> None:
        """Fold in one batch of store changes that ends at ``seq``: removals, then additions."""
        removed, added = np.asarray(removed, np.int64), np.asarray(added, np.int64)
        keep = added > self.main.max_id  # a replay after a mid-drain snapshot repeats ids the main index has
        added, vecs = added[keep], np.asarray(vecs, np.float32).reshape(-1, self.main.dim)[keep]
        if self.fresh is None:
            self.main.remove(removed)
            self.main.add(added, vecs)
            self.main.seq = seq
        else:
            in_main = removed <= self.main.max_id
            self.main.remove(removed[in_main])
            self.fresh.kill(removed[~in_main])
            self.fresh.append(added, vecs, base_seq=self.seq)  # a replay from self.seq brings these back
        self.seq = seq

    def drain(self, n: int) -> int:
        """Move up to ``n`` buffered rows into the main index; returns how many were moved."""
        moved = min(n, self.buffered)
        if not moved:
            return 0
        ids, vecs, last = self.fresh.take(moved)
        self.main.add(ids, vecs)
        self.main.max_id = max(self.main.max_id, last)
        return moved

    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        found = self.main.search(queries, k, allow)
        if self.fresh is None or not self.fresh.live:
            return found
        return merge_topk(found, self.fresh.search(np.ascontiguousarray(queries, np.float32), k, allow), k)

    def save(self, path: str | Path) -> int:
        """Snapshot the main index; returns the store sequence it is complete up to."""
        first = self.fresh.first_base_seq if self.fresh is not None else None
        self.main.seq = self.seq if first is None else first
        self.main.save(path)
        return self.main.seq
