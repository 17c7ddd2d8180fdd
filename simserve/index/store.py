"""The item store: an embedded SQLite database, the source of truth for a collection.

Every item (key, vector, metadata, content hash, optional head features (in a table of their own),
crop-view embeddings and keypoints) is a row; every add and remove is also a row in
``changes`` with a rising sequence number, so a FAISS snapshot taken at
sequence S is brought up to date by replaying the changes after S. One transaction per batch: an add
that returned has been committed (WAL, synchronous=FULL by default), so it
survives kill -9 and nothing half-written is ever visible.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger("simserve.index.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    metadata TEXT,
    content_hash TEXT,
    features BLOB,
    added REAL NOT NULL,
    views BLOB,
    keypoints BLOB
);
-- The head features (24 KB an item) live apart: in the items row they came before the views and
-- keypoints, and reading those walked the features' overflow pages (docs/decisions/query-views.md).
CREATE TABLE IF NOT EXISTS item_features (id INTEGER PRIMARY KEY, features BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS item_features_follow AFTER DELETE ON items BEGIN
    DELETE FROM item_features WHERE id = OLD.id;
END;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op INTEGER NOT NULL,  -- 1 add, 0 remove
    id INTEGER NOT NULL
);
"""
ADD, REMOVE = 1, 0


@dataclass
class NewItem:
    key: str
    vector: np.ndarray
    metadata: dict[str, Any] | None = None
    content_hash: str | None = None
    features: np.ndarray | None = None  # float16 head features, for re-ranking
    views: np.ndarray | None = None  # [V, dim] crop-view embeddings (simserve/inference/crops.py), for re-scoring
    keypoints: bytes | None = None  # local features for geometric verification (simserve/ranking/verify.py)


@dataclass
class StoredItem:
    id: int
    key: str
    vector: np.ndarray
    metadata: dict[str, Any] | None
    content_hash: str | None
    added: float


@dataclass
class Candidate:
    """A search's candidate as the store holds it: what ranking needs to re-order it, read at once."""

    id: int
    key: str
    score: float  # the index's cosine
    metadata: dict[str, Any] | None
    views: np.ndarray | None = None  # [V, dim] float32, when asked for and stored
    features: np.ndarray | None = None  # flat float16 head features, when asked for and stored


class StoreError(RuntimeError):
    """A write the store refused or could not make. ``reason``: "full" (disk or quota),
    "read_only" (read-only file system or database), or "io" (anything else), so the
    server can answer RESOURCE_EXHAUSTED / FAILED_PRECONDITION / UNAVAILABLE."""

    WHAT = {"full": "the disk is full", "read_only": "the data directory is read-only", "io": "the write failed"}

    def __init__(self, path: Path | str, error: Exception) -> None:
        if isinstance(error, OSError):
            full, ro = error.errno in (errno.ENOSPC, errno.EDQUOT), error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            detail = error.strerror or str(error)
        else:
            name = getattr(error, "sqlite_errorname", "") or ""
            full, ro, detail = name.startswith("SQLITE_FULL"), name.startswith("SQLITE_READONLY"), str(error)
        self.reason = "full" if full else "read_only" if ro else "io"
        super().__init__(f"cannot write to {path}: {self.WHAT[self.reason]} ({detail})")


class ItemStore:
    def __init__(self, path: str | Path, dim: int, synchronous: str = "FULL") -> None:
        self.path, self.dim = Path(path), dim
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []  # every thread's, so close() can close them all
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._synchronous = synchronous
        # A read-only file system (a replica's read-only volume, a disk the kernel remounted
        # read-only after errors): serve reads, refuse writes with StoreError("read_only").
        self.read_only = self.path.exists() and not os.access(self.path.parent, os.W_OK)
        conn = self._conn()
        with self._write_lock:
            if not self.read_only:
                conn.executescript(SCHEMA)
                _add_missing_columns(conn)
                _move_features_apart(conn, self.path)
            columns = _columns(conn, "items")  # a read-only store from before a column has none of it
            self._has_views, self._has_keypoints = "views" in columns, "keypoints" in columns
            apart = conn.execute("SELECT 1 FROM sqlite_master WHERE name='item_features'").fetchone() is not None
            # Features of a row written before they moved (a read-only store that could not move them) stay readable.
            self._features = "COALESCE(f.features, i.features)" if apart else "i.features"
            self._items = "items i LEFT JOIN item_features f ON f.id = i.id" if apart else "items i"
            stored = conn.execute("SELECT v FROM meta WHERE k='dim'").fetchone()
            if stored is None:
                conn.execute("INSERT INTO meta VALUES ('dim', ?)", (str(dim),))
                conn.commit()
            elif int(stored[0]) != dim:
                raise ValueError(f"{self.path}: store holds {stored[0]}-d vectors, not {dim}-d")

    def _conn(self) -> sqlite3.Connection:
        """One connection per thread: SQLite serialises the writers, WAL lets readers run beside them."""
        conn = getattr(self._local, "conn", None)
        if conn is None and self.read_only:
            # immutable: nobody can write a read-only file system, so SQLite needs no -shm/-wal
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
            self._remember(conn)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=30000")
            self._remember(conn)
        return conn

    def _remember(self, conn: sqlite3.Connection) -> None:
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)

    # -- writes ---------------------------------------------------------------
    def add(self, items: Sequence[NewItem]) -> tuple[list[int], list[int]]:
        """Insert (or replace, by key) in one transaction. Returns (new ids, replaced ids)."""
        now = time.time()
        rows = []
        for it in items:
            v = np.ascontiguousarray(it.vector, dtype=np.float32).reshape(-1)
            if v.shape[0] != self.dim:
                raise ValueError(f"item {it.key!r}: vector has {v.shape[0]} dims, collection needs {self.dim}")
            feats = None if it.features is None else np.ascontiguousarray(it.features, np.float16).tobytes()
            views = None if it.views is None else _views_blob(it.key, it.views, self.dim)
            meta = None if it.metadata is None else json.dumps(it.metadata, separators=(",", ":"))
            rows.append((it.key, v.tobytes(), meta, it.content_hash, feats, now, views, it.keypoints))
        ids: list[int] = []
        replaced: list[int] = []
        with self._transaction() as c:
            replaced.extend(r[0] for r in _rows_in(c, "SELECT id FROM items", "key", [r[0] for r in rows]))
            if replaced:
                c.executemany("DELETE FROM items WHERE id=?", [(i,) for i in replaced])
                c.executemany("INSERT INTO changes(op, id) VALUES (0, ?)", [(i,) for i in replaced])
            for key, vec, meta, hash_, feats, added, views, kps in rows:
                cur = c.execute("INSERT INTO items(key, vector, metadata, content_hash, added, views, keypoints) VALUES (?,?,?,?,?,?,?)", (key, vec, meta, hash_, added, views, kps))
                ids.append(int(cur.lastrowid))
                if feats is not None:
                    c.execute("INSERT INTO item_features(id, features) VALUES (?, ?)", (ids[-1], feats))
            c.executemany("INSERT INTO changes(op, id) VALUES (1, ?)", [(i,) for i in ids])
        return ids, replaced

    def remove(self, keys: Sequence[str]) -> dict[str, int]:
        """Remove by key in one transaction; returns {key: id} of those that existed."""
        found: dict[str, int] = {}
        with self._transaction() as c:
            found.update({k: int(i) for k, i in _rows_in(c, "SELECT key, id FROM items", "key", keys)})
            c.executemany("DELETE FROM items WHERE id=?", [(i,) for i in found.values()])
            c.executemany("INSERT INTO changes(op, id) VALUES (0, ?)", [(i,) for i in found.values()])
        return found

    def compact_changes(self, upto_seq: int) -> None:
        """Forget changes already folded into a snapshot."""
        with self._transaction() as c:
            c.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))

    class _Tx:
        def __init__(self, store: "ItemStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._write_lock.acquire()
            self.conn = self.store._conn()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                self.store._write_lock.release()
                raise StoreError(self.store.path, e) from None
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                if exc_type is None:
                    try:
                        self.conn.execute("COMMIT")
                    except sqlite3.Error as e:
                        self._rollback()
                        raise StoreError(self.store.path, e) from None
                else:
                    self._rollback()
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(self.store.path, exc) from None
            finally:
                self.store._write_lock.release()

        def _rollback(self) -> None:
            # On some errors (SQLITE_FULL, SQLITE_IOERR) SQLite has already rolled back.
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one worth reporting

    def _transaction(self) -> "_Tx":
        return ItemStore._Tx(self)

    # -- reads ----------------------------------------------------------------
    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def last_seq(self) -> int:
        row = self._conn().execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()
        return int(row[0]) if row else 0

    def get(self, keys: Sequence[str]) -> dict[str, StoredItem]:
        return {row[1]: self._item(row) for row in _rows_in(self._conn(), ITEM_SELECT, "key", keys)}

    def get_ids(self, ids: Sequence[int]) -> dict[int, StoredItem]:
        return {int(row[0]): self._item(row) for row in _rows_in(self._conn(), ITEM_SELECT, "id", [int(i) for i in ids])}

    def candidates(self, scored: dict[int, float], *, views: bool = False, features: bool = False) -> dict[int, Candidate]:
        """{id: cosine} -> {id: Candidate}, with the evidence asked for, in one read (ids removed
        meanwhile are absent). Keypoints are read apart (``keypoints``): only the few verified need them."""
        extra = {c: sql for c, sql, want in (("views", "i.views", views and self._has_views), ("features", self._features, features)) if want}
        out = {}
        for row in _rows_in(self._conn(), f"SELECT {', '.join(['i.id', 'i.key', 'i.metadata', *extra.values()])} FROM {self._items}", "i.id", list(scored)):
            got = dict(zip(extra, row[3:]))
            v, f = got.get("views"), got.get("features")
            out[int(row[0])] = Candidate(
                int(row[0]), row[1], scored[int(row[0])], json.loads(row[2]) if row[2] else None,
                None if v is None else np.frombuffer(v, dtype=np.float16).reshape(-1, self.dim).astype(np.float32),
                None if f is None else np.frombuffer(f, dtype=np.float16),
            )
        return out

    def features(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        rows = _rows_in(self._conn(), f"SELECT i.id, {self._features} FROM {self._items}", "i.id", [int(i) for i in ids])
        return {int(i): np.frombuffer(blob, dtype=np.float16) for i, blob in rows if blob is not None}

    def keypoints(self, ids: Sequence[int]) -> dict[int, bytes]:
        """{id: keypoint blob} for the items stored with keypoints (simserve/ranking/verify.py)."""
        if not self._has_keypoints:
            return {}
        rows = _rows_in(self._conn(), "SELECT id, keypoints FROM items", "id", [int(i) for i in ids])
        return {int(i): blob for i, blob in rows if blob is not None}

    def hashes(self, keys: Sequence[str]) -> dict[str, str | None]:
        return dict(_rows_in(self._conn(), "SELECT key, content_hash FROM items", "key", keys))

    def iter_vectors(self, batch: int = 65536) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """All (seq, ids, vectors) in id order, a chunk at a time, from one read transaction:
        the items are exactly those of sequence ``seq``, whatever writers do meanwhile."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("BEGIN")
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()
            seq = int(row[0]) if row else 0
            cur = conn.execute("SELECT id, vector FROM items ORDER BY id")
            while rows := cur.fetchmany(batch):
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                yield seq, ids, vecs
            conn.execute("COMMIT")
        finally:
            conn.close()

    def changes_after(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Since ``seq``: (ids still present to add, their vectors, ids to remove, last seq)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            rows = conn.execute("SELECT seq, op, id FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
            last = rows[-1][0] if rows else seq
            added = sorted({r[2] for r in rows if r[1] == ADD})
            removed = np.array(sorted({r[2] for r in rows if r[1] == REMOVE}), dtype=np.int64)
            ids, vecs = [], []
            for i, v in _rows_in(conn, "SELECT id, vector FROM items", "id", added):
                ids.append(i)
                vecs.append(v)
        finally:
            conn.execute("COMMIT")
        vec_arr = np.frombuffer(b"".join(vecs), dtype=np.float32).reshape(len(ids), self.dim) if ids else np.zeros((0, self.dim), np.float32)
        return np.array(ids, dtype=np.int64), vec_arr, removed, int(last)

    def ids_matching(self, where: dict[str, Any]) -> np.ndarray:
        """Ids whose metadata has every given field equal to the given value (JSON equality)."""
        clauses, args = [], []
        for field, value in where.items():
            if not valid_filter_field(field):
                raise ValueError(f"filter field {field!r}: use 1-64 ASCII letters, digits, '_' or '-'")
            clauses.append(f"json_extract(metadata, '$.\"{field}\"') IS ?")
            args.append(json.dumps(value) if isinstance(value, (dict, list)) else value)
        q = "SELECT id FROM items WHERE " + (" AND ".join(clauses) if clauses else "1")
        return np.fromiter((r[0] for r in self._conn().execute(q, args)), dtype=np.int64)

    def close(self) -> None:
        """Close every thread's connection (handler threads outlive a collection)."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def _item(self, row) -> StoredItem:
        return StoredItem(int(row[0]), row[1], np.frombuffer(row[2], dtype=np.float32), json.loads(row[3]) if row[3] else None, row[4], float(row[5]))


def valid_filter_field(name: object) -> bool:
    """Field names are spliced into a JSON path, so only a safe alphabet is accepted."""
    return isinstance(name, str) and 0 < len(name) <= 64 and name.isascii() and name.replace("_", "").replace("-", "").isalnum()


ITEM_SELECT = "SELECT id, key, vector, metadata, content_hash, added FROM items"


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Stores written before a column existed gain it (empty for their old rows)."""
    for column in ("views", "keypoints"):
        if column not in _columns(conn, "items"):
            try:
                conn.execute(f"ALTER TABLE items ADD COLUMN {column} BLOB")
            except sqlite3.OperationalError as e:  # another process opening the same store got there first
                if "duplicate column" not in str(e):
                    raise


def _move_features_apart(conn: sqlite3.Connection, path: Path, batch: int = 1000) -> None:
    """Rows written before the features moved to ``item_features`` hand them over, a range of ids
    per transaction (each can be repeated: an interrupted move resumes), once per store."""
    if conn.execute("SELECT 1 FROM meta WHERE k='features_apart'").fetchone():
        return
    top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]
    if top:
        log.info("%s: moving the head features of rows up to id %d to their own table (once)", path, top)
    try:
        for lo in range(0, top + 1, batch):
            hi = lo + batch - 1
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO item_features(id, features) SELECT id, features FROM items WHERE id BETWEEN ? AND ? AND features IS NOT NULL", (lo, hi))
            conn.execute("UPDATE items SET features = NULL WHERE id BETWEEN ? AND ? AND features IS NOT NULL", (lo, hi))
            conn.execute("COMMIT")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('features_apart', '1')")
    except sqlite3.Error as e:  # a full disk: the store still opens, and reads features wherever they are
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.warning("%s: head features not moved yet (%s); the next start tries again", path, e)


def _views_blob(key: str, views: np.ndarray, dim: int) -> bytes:
    v = np.ascontiguousarray(views, np.float16)
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"item {key!r}: view embeddings must be [views, {dim}], not {list(v.shape)}")
    return v.tobytes()


def _rows_in(conn: sqlite3.Connection, select: str, column: str, values: Sequence) -> Iterator[tuple]:
    """``select ... WHERE column IN (values)``, in chunks under SQLite's variable limit."""
    values = list(values)
    for i in range(0, len(values), 500):
        chunk = values[i : i + 500]
        yield from conn.execute(f"{select} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)
