"""The FAISS side of a collection: built from a factory string, derived from the store.

Vectors are L2-normalised embeddings, so inner product is cosine similarity.
Ids are the store's row ids. Flat and HNSW are wrapped in ``IndexIDMap2``
(so they take our ids); IVF types take ids natively. Removal: where FAISS
can remove (Flat, IVF) it does; HNSW cannot, so removed ids go into a
``deleted`` set that every search excludes with an ``IDSelector``, until the
owner rebuilds. IVF types need training: until the collection is large
enough an exact Flat index stands in (``pending_training``).

Snapshots are written atomically (temp file, fsync, rename) next to a JSON
sidecar holding their sha256 and the store sequence they include.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from simserve.atomic import atomic_write
from simserve.index import exact_scan

# Several query vectors at once are scored by FAISS as one matrix product from this many on, not
# scanned one by one: 12 views 10 deep on a flat 100,000-item index 68 -> 35 ms, one query unchanged
# (faiss's default here is 128,000: never, for a search). Unfiltered flat searches skip FAISS for
# the exact scan (exact_scan.py); filtered ones still come here.
faiss.cvar.distance_compute_blas_threshold = 8

SNAPSHOT_FORMAT = 1


class SnapshotError(ValueError):
    """A snapshot that is missing, corrupt or does not match; rebuild from the store."""


@dataclass(frozen=True)
class IndexTuning:
    ef_search: int = 64  # HNSW: recall@10 0.974 at 1M with efConstruction 200 (docs/bench/index-1m.json)
    nprobe: int = 32  # IVF
    # HNSW only (see tiered_index): adds wait while this many vectors are buffered ...
    buffer_limit: int = 100_000
    # ... and the drainer moves this many per step, holding off searches meanwhile.
    drain_batch: int = 64
    # OpenMP threads per search, set in the searching thread (None: leave FAISS's default).
    search_threads: int | None = None


def _ivf_lists(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def min_train_size(factory: str) -> int:
    """FAISS wants ~39 training points per IVF list; we ask for at least that."""
    n = _ivf_lists(factory)
    return 0 if n is None else max(39 * n, 1000)


def validate_factory(factory: str, dim: int) -> None:
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"bad FAISS factory string {factory!r}: {str(e).splitlines()[0][:200]}") from None


class VectorIndex:
    def __init__(self, dim: int, factory: str = "Flat", tuning: IndexTuning | None = None) -> None:
        validate_factory(factory, dim)
        self.dim, self.factory = dim, factory
        self.tuning = tuning or IndexTuning()
        self.deleted: set[int] = set()
        self.seq = 0  # store sequence folded in
        self.max_id = -1  # ids only grow, so this tells which removals concern this index
        self.index = self._empty(trained_type=min_train_size(factory) == 0)
        self._codes = exact_scan.Codes()  # a flat index's rows as int8, for the exact scan's first ranking

    def _empty(self, trained_type: bool) -> faiss.Index:
        if not trained_type:  # IVF before training: exact search stands in
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        inner = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if isinstance(inner, faiss.IndexHNSW):
            # A better graph costs insert time (the buffer hides it) and buys recall at a
            # small efSearch: at 1M, efC 80 gave 0.927 at ef 128, efC 200 gives 0.974 at ef 64.
            inner.hnsw.efConstruction = max(inner.hnsw.efConstruction, 200)
        return inner if _ivf_lists(self.factory) else faiss.IndexIDMap2(inner)

    @property
    def slow_adds(self) -> bool:
        """HNSW: inserting means searching the graph, a few thousand a second (see tiered_index)."""
        return isinstance(self._inner(), faiss.IndexHNSW)

    @property
    def kind(self) -> str:
        """The FAISS index searched now (IndexFlatIP, IndexHNSWFlat, IndexIVFPQ...): for an IVF
        factory, whether the trained index has replaced the exact stand-in yet."""
        return type(self._inner()).__name__

    def _inner(self) -> faiss.Index:
        return faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap2) else self.index

    @property
    def pending_training(self) -> bool:
        return _ivf_lists(self.factory) is not None and not self._is_ivf()

    def _is_ivf(self) -> bool:
        return faiss.try_extract_index_ivf(self.index) is not None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self.deleted)

    def train(self, sample: np.ndarray) -> None:
        """Replace the stand-in with a trained (empty) index of the real type."""
        idx = self._empty(trained_type=True)
        idx.train(np.ascontiguousarray(sample, np.float32))
        self.index = idx
        self._codes.reset()
        self.deleted = set()
        self._excl = None
        self.max_id = -1

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            ids = np.ascontiguousarray(ids, np.int64)
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
            self.max_id = max(self.max_id, int(ids.max()))

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, np.int64)
        # The rows removed, marked before FAISS compacts them, for the codes to follow (none made: nothing to mark).
        flat = exact_scan.flat_rows(self.index) if len(self._codes) else None
        gone = None if flat is None or flat[1] is None else np.isin(flat[1], ids)
        try:
            self.index.remove_ids(ids)
            if gone is None:
                self._codes.reset()
            else:
                self._codes.drop(gone)
        except RuntimeError:  # HNSW: cannot remove, exclude from searches instead
            self.deleted.update(int(i) for i in ids)
            self._excl = None

    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ``allow`` restricts to those ids. Missing slots are id -1."""
        sel = None
        if allow is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allow, np.int64))
        if self.deleted:
            not_deleted = self._exclusion()
            sel = not_deleted if sel is None else faiss.IDSelectorAnd(sel, not_deleted)
        q = np.ascontiguousarray(queries, np.float32)
        k = max(1, min(k, max(1, self.index.ntotal)))
        flat = exact_scan.flat_rows(self.index) if sel is None else None
        if flat is not None:  # exact and unfiltered: one matrix product on this CPU's own kernels
            vectors, ids = flat
            scores, rows = exact_scan.search(vectors, q, k, self.tuning.search_threads, self._codes)
            return scores, (rows if ids is None else ids[rows])
        params = self._params(sel)
        want = self.tuning.search_threads
        if want and faiss.omp_get_max_threads() != want:  # per-thread setting: once per thread
            faiss.omp_set_num_threads(want)
        return self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)

    def _exclusion(self) -> faiss.IDSelector:
        """The selector that hides deleted ids, rebuilt only when the set changed (not per search)."""
        if getattr(self, "_excl", None) is None:
            ids = np.fromiter(self.deleted, np.int64, len(self.deleted))
            self._excl = faiss.IDSelectorNot(faiss.IDSelectorBatch(ids))
        return self._excl

    def _params(self, sel) -> faiss.SearchParameters | None:
        """Search parameters for the index type, built with keyword arguments: faiss's
        Python layer then keeps the selector alive as long as the parameters."""
        kw = {} if sel is None else {"sel": sel}
        inner = self._inner()
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=self.tuning.ef_search, **kw)
        if faiss.try_extract_index_ivf(inner) is not None:
            return faiss.SearchParametersIVF(nprobe=self.tuning.nprobe, **kw)
        return faiss.SearchParameters(**kw) if kw else None

    def memory_bytes(self) -> int:
        """Serialized size, measured again only when the index has changed size by over 5%
        since the last measure (serializing a 1M-vector HNSW copies ~800 MB): Stats stays cheap."""
        n = int(self.index.ntotal)
        last = getattr(self, "_sized", None)
        if last is None or last[0] != id(self.index) or abs(n - last[1]) > 0.05 * max(last[1], 1000):
            self._sized = last = (id(self.index), n, int(faiss.serialize_index(self.index).nbytes))
        return (int(last[2] * n / last[1]) if last[1] else last[2]) + self._codes.nbytes

    # -- snapshots --------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        data = faiss.serialize_index(self.index).tobytes()
        deleted = np.fromiter(sorted(self.deleted), np.int64, len(self.deleted)).tobytes()
        meta = {
            "format": SNAPSHOT_FORMAT,
            "factory": self.factory,
            "dim": self.dim,
            "seq": self.seq,
            "ntotal": self.ntotal,
            "max_id": self.max_id,
            "sha256": hashlib.sha256(data).hexdigest(),
            "deleted_sha256": hashlib.sha256(deleted).hexdigest(),
        }
        atomic_write(path, data)
        atomic_write(path.with_suffix(".deleted"), deleted)
        atomic_write(path.with_suffix(".json"), json.dumps(meta).encode())  # last: marks the pair complete

    @classmethod
    def load(cls, path: str | Path, dim: int, factory: str, tuning: IndexTuning | None = None) -> "VectorIndex":
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            data = path.read_bytes()
            deleted = path.with_suffix(".deleted").read_bytes()
        except (OSError, ValueError) as e:
            raise SnapshotError(f"snapshot {path} unreadable: {e}") from None
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("dim") != dim or meta.get("factory") != factory:
            raise SnapshotError(f"snapshot {path} is for another index (format/dim/factory differ)")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256") or hashlib.sha256(deleted).hexdigest() != meta.get("deleted_sha256"):
            raise SnapshotError(f"snapshot {path} fails its checksum (corrupt or partly written)")
        self = cls(dim, factory, tuning)
        try:
            self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise SnapshotError(f"snapshot {path} does not deserialize: {e}") from None
        self.deleted = set(np.frombuffer(deleted, np.int64).tolist())
        self.seq = int(meta["seq"])
        self.max_id = int(meta["max_id"]) if "max_id" in meta else self._highest_id()
        return self

    def _highest_id(self) -> int:
        """For snapshots written before ``max_id`` was recorded (IVF lists are not scanned: -1 keeps every replayed add)."""
        if isinstance(self.index, faiss.IndexIDMap2) and self.index.ntotal:
            return int(faiss.vector_to_array(self.index.id_map).max())
        return -1

