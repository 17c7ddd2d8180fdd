"""Collections in Milvus: one index that every replica shares.

The same surface as ``index/collection.py``'s ``Collections``, through pymilvus's
``MilvusClient``, so one code path talks to an embedded Milvus Lite file (``./index.db``),
a Milvus Lite server and a Milvus cluster (``http://host:19530``). Milvus is store and
index both: an add is acknowledged after Milvus acknowledged the upsert, and every
collection is created with Strong consistency, so the next search on any replica sees it.

An item's id is a 63-bit hash of its key: replicas agree on it without asking anyone,
and adding a key again replaces the item, as the embedded store does. What verification
and re-ranking need (head features, crop-view embeddings, keypoints) lives in the same
row, as base64 in VARCHAR fields (Milvus has no byte-string scalar), split over as many
fields as the largest value needs. Why and what it costs: docs/decisions/milvus.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from simserve.index.collection import NAME_RE, CollectionConfig, CollectionNotFound, check_name
from simserve.index.store import Candidate, NewItem, StoredItem, StoreError, valid_filter_field
from simserve.index.vector_index import IndexTuning

log = logging.getLogger("simserve.index.milvus")
T = TypeVar("T")

PREFIX = "simserve_"  # Milvus collections this project owns; others on the same server are left alone
CONFIG_PROPERTY = "simserve.config"
CHUNK = 49_149  # raw bytes per VARCHAR field: base64 of it is 65,532 characters, Milvus allows 65,535
KEYPOINT_BYTES = 96 * 1024  # verify.py keeps at most 400 SIFT + 1,000 ORB points: 88,804 bytes
MAX_VIEWS = 8  # inference/crops.py makes 6
KEY_CHARS = 4096
UPSERT_BYTES = 32 * 1024 * 1024  # one upsert message at most this big (Milvus's gRPC limit is larger)
FACTORY_HELP = "the milvus backend maps the FAISS factories Flat, HNSW<M>, IVF<n>,Flat, IVF<n>,SQ8 and IVF<n>,PQ<m>"


class MilvusUnavailable(StoreError):
    """Milvus refused or did not answer: UNAVAILABLE to the client, who may retry."""

    def __init__(self, uri: str, error: Exception) -> None:
        RuntimeError.__init__(self, f"the Milvus index at {uri} failed: {getattr(error, 'message', None) or error}")
        self.reason = "io"


def item_id(key: str) -> int:
    """The item's primary key: 63 bits of BLAKE2b (a collision among 10 million keys: ~5e-6)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def milvus_name(name: str) -> str:
    """A simserve name as a Milvus collection name (letters, digits and '_' only), reversibly."""
    return PREFIX + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)


def simserve_name(milvus: str) -> str | None:
    if not milvus.startswith(PREFIX):
        return None
    name = re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), milvus[len(PREFIX) :])
    return name if NAME_RE.match(name) and milvus_name(name) == milvus else None


@dataclass(frozen=True)
class MilvusIndex:
    """A FAISS factory string as Milvus's index type, build and search parameters."""

    index_type: str
    build: dict[str, Any]
    search: dict[str, Any]

    @classmethod
    def from_factory(cls, factory: str, tuning: IndexTuning) -> "MilvusIndex":
        f = factory.replace(" ", "")
        if f == "Flat":
            return cls("FLAT", {}, {})
        if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
            return cls("HNSW", {"M": int(m[1]), "efConstruction": 200}, {"ef": tuning.ef_search})  # as vector_index builds it
        if m := re.fullmatch(r"IVF(\d+),(Flat|SQ8|PQ(\d+)(x8)?)", f):
            kind, build = m[2], {"nlist": int(m[1])}
            if kind.startswith("PQ"):
                kind, build = "PQ", {**build, "m": int(m[3]), "nbits": 8}
            return cls(f"IVF_{kind.upper()}", build, {"nprobe": tuning.nprobe})
        raise ValueError(f"factory {factory!r}: {FACTORY_HELP}")


def _chunks(nbytes: int) -> int:
    return max(1, math.ceil(nbytes / CHUNK))


def _to_fields(name: str, n: int, blob: bytes | None) -> dict[str, str | None]:
    parts = [blob[i * CHUNK : (i + 1) * CHUNK] for i in range(n)] if blob is not None else [None] * n
    if blob is not None and len(blob) > n * CHUNK:
        raise ValueError(f"{name}: {len(blob)} bytes; this collection holds at most {n * CHUNK}")
    return {f"{name}_{i}": None if p is None else base64.b64encode(p).decode() for i, p in enumerate(parts)}


def _from_fields(name: str, n: int, row: dict[str, Any]) -> bytes | None:
    parts = [row.get(f"{name}_{i}") for i in range(n)]
    return None if parts[0] is None else b"".join(base64.b64decode(p) for p in parts if p)


class MilvusCollection:
    """One collection: the calls the service, the ranking pipeline and the batch jobs make."""

    def __init__(self, owner: "MilvusCollections", config: CollectionConfig, blobs: dict[str, int]) -> None:
        self.owner, self.config, self.blobs = owner, config, blobs
        self.name, self.dim = config.name, config.dim
        self.table = milvus_name(config.name)
        self.index = MilvusIndex.from_factory(config.factory, owner.tuning)

    def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self.owner._call(fn, *args, **kw)

    def _blob_fields(self, *names: str) -> list[str]:
        return [f"{n}_{i}" for n in names if n in self.blobs for i in range(self.blobs[n])]

    # -- writes ------------------------------------------------------------------
    def add(self, items: Sequence[NewItem]) -> list[int]:
        """Upserted in messages of at most UPSERT_BYTES; a request larger than one message is
        acknowledged part by part (each part durable once Milvus answers)."""
        rows = [self._row(it) for it in items]
        part: list[dict] = []
        size = 0
        for row in rows:
            n = sum(len(v) for v in row.values() if isinstance(v, str)) + 4 * self.dim
            if part and size + n > UPSERT_BYTES:
                self._call(self.owner.client.upsert, self.table, part)
                part, size = [], 0
            part.append(row)
            size += n
        if part:
            self._call(self.owner.client.upsert, self.table, part)
        return [row["id"] for row in rows]

    def _row(self, it: NewItem) -> dict[str, Any]:
        vec = np.asarray(it.vector, np.float32).reshape(-1)
        if len(vec) != self.dim:
            raise ValueError(f"item {it.key!r}: vector has {len(vec)} dimensions, the collection {self.dim}")
        row: dict[str, Any] = {
            "id": item_id(it.key), "key": it.key, "vector": vec.tolist(), "metadata": it.metadata,
            "content_hash": it.content_hash, "added": time.time(),
        }
        views = None if it.views is None else np.ascontiguousarray(it.views, np.float16)
        if views is not None and (views.ndim != 2 or views.shape[1] != self.dim):
            raise ValueError(f"item {it.key!r}: view embeddings must be [views, {self.dim}], not {list(views.shape)}")
        feats = None if it.features is None or not self.config.store_features else np.ascontiguousarray(it.features, np.float16)
        for name, blob in (("features", feats), ("views", views), ("keypoints", it.keypoints)):
            data = blob.tobytes() if isinstance(blob, np.ndarray) else blob
            row.update(_to_fields(name, self.blobs[name], data))
        return row

    def remove(self, keys: Sequence[str]) -> dict[str, int]:
        found = self._keys_present(keys)
        if found:
            self._call(self.owner.client.delete, self.table, ids=list(found.values()))
        return found

    # -- reads --------------------------------------------------------------------
    def _by_ids(self, ids: Sequence[int], fields: list[str]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        out: list[dict[str, Any]] = []
        for s in range(0, len(ids), 1000):
            expr = f"id in {ids[s : s + 1000]}"
            out += self._call(self.owner.client.query, self.table, filter=expr, output_fields=fields)
        return out

    def _by_keys(self, keys: Sequence[str], fields: list[str]) -> list[dict[str, Any]]:
        wanted = set(keys)
        return [r for r in self._by_ids([item_id(k) for k in wanted], ["key", *fields]) if r["key"] in wanted]

    def _keys_present(self, keys: Sequence[str]) -> dict[str, int]:
        return {r["key"]: int(r["id"]) for r in self._by_keys(keys, [])}

    def get(self, keys: Sequence[str]) -> dict[str, StoredItem]:
        rows = self._by_keys(keys, ["vector", "metadata", "content_hash", "added"])
        return {
            r["key"]: StoredItem(int(r["id"]), r["key"], np.asarray(r["vector"], np.float32), r["metadata"] or None, r["content_hash"], float(r["added"]))
            for r in rows
        }

    def hashes(self, keys: Sequence[str]) -> dict[str, str | None]:
        return {r["key"]: r["content_hash"] for r in self._by_keys(keys, ["content_hash"])}

    def count(self) -> int:
        return int(self._call(self.owner.client.query, self.table, filter="", output_fields=["count(*)"])[0]["count(*)"])

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
        """Top k per query vector by Milvus's index, each with the evidence asked for read in the same call."""
        fields = ["key", "metadata", *self._blob_fields(*(["views"] if views else []), *(["features"] if features else []))]
        hits = self._call(
            self.owner.client.search, self.table, data=np.asarray(vectors, np.float32).tolist(), limit=k,
            filter=_filter(where, exclude_ids), output_fields=fields, search_params={"metric_type": "IP", "params": self.index.search},
        )
        return [[self._candidate(h) for h in row] for row in hits]

    def _candidate(self, hit: dict[str, Any]) -> Candidate:
        e = hit["entity"]
        v, f = _from_fields("views", self.blobs["views"], e), _from_fields("features", self.blobs["features"], e)
        return Candidate(
            int(hit["id"]), e["key"], float(hit["distance"]), e.get("metadata") or None,
            None if v is None else np.frombuffer(v, np.float16).reshape(-1, self.dim).astype(np.float32),
            None if f is None else np.frombuffer(f, np.float16),
        )

    def keypoints(self, ids: Sequence[int]) -> dict[int, bytes]:
        rows = self._by_ids(ids, self._blob_fields("keypoints"))
        return {int(r["id"]): blob for r in rows if (blob := _from_fields("keypoints", self.blobs["keypoints"], r)) is not None}

    def features(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        shape = tuple(self.config.feature_shape)
        rows = self._by_ids(ids, self._blob_fields("features"))
        return {
            int(r["id"]): np.frombuffer(blob, np.float16).reshape(shape).astype(np.float32)
            for r in rows if (blob := _from_fields("features", self.blobs["features"], r)) is not None
        }

    def stats(self) -> dict[str, Any]:
        n = self.count()
        return {
            "name": self.name, "items": n, "indexed": n, "dim": self.dim, "factory": self.config.factory,
            "crop_views": self.config.crop_views, "verify": self.config.verify, "index_type": f"milvus:{self.index.index_type}",
            "pending_training": False, "deleted_pending": 0, "buffered": 0, "index_bytes": 0, "seq": 0, "rebuilds": 0,
            "backend": "milvus", "uri": self.owner.uri,
        }

    def wait_indexed(self, timeout: float | None = None) -> bool:
        return True  # Strong consistency: what was acknowledged is searched

    def close(self, snapshot: bool = True) -> None:
        pass  # Milvus holds the data; the client is the owner's


def _filter(where: dict[str, Any] | None, exclude_ids: Sequence[int]) -> str:
    """A Milvus boolean expression. Field names are checked against a safe alphabet and values
    written as JSON string literals (the expression grammar's own escapes), never spliced raw."""
    clauses = []
    for field, value in (where or {}).items():
        if not valid_filter_field(field):
            raise ValueError(f"filter field {field!r}: use 1-64 ASCII letters, digits, '_' or '-'")
        if not isinstance(value, str):
            raise ValueError(f"filter field {field!r}: the milvus backend compares strings")
        clauses.append(f'metadata["{field}"] == {_literal(field, value)}')
    if len(exclude_ids):
        clauses.append(f"id not in {[int(i) for i in exclude_ids]}")
    return " and ".join(clauses)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _literal(field: str, value: str) -> str:
    """A double-quoted string in Milvus's expression grammar (it knows \\ \" \n \t \r, not \\u)."""
    if any(ord(c) < 32 and c not in _ESCAPES for c in value):
        raise ValueError(f"filter field {field!r}: the milvus backend cannot compare control characters")
    return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'


class MilvusCollections:
    """Every ``simserve_*`` collection of one Milvus (a Lite file, a Lite server, a cluster)."""

    def __init__(self, uri: str, token: str = "", tuning: IndexTuning | None = None) -> None:
        from pymilvus import MilvusClient  # an extra: the embedded default serves without it

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors reach the client and our log as ours
        self.uri, self.tuning = uri, tuning or IndexTuning()
        self.client = self._call(MilvusClient, uri=uri, token=token)
        self._open: dict[str, MilvusCollection] = {}

    @property
    def location(self) -> str:
        return self.uri

    def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kw)
        except MilvusException as e:
            raise MilvusUnavailable(self.uri, e) from None

    def names(self) -> list[str]:
        return sorted(n for m in self._call(self.client.list_collections) if (n := simserve_name(m)) is not None)

    def census(self) -> dict[str, tuple[int, int | None]]:
        """(items, None) per collection: Milvus keeps the bytes, not this process."""
        out: dict[str, tuple[int, int | None]] = {}
        for name in self.names():
            try:
                out[name] = (self.get(name).count(), None)
            except (StoreError, CollectionNotFound):  # dropped meanwhile, or Milvus away: left out this time
                continue
        return out

    def exists(self, name: str) -> bool:
        if name in self._open:
            return True
        return NAME_RE.match(name) is not None and self._call(self.client.has_collection, milvus_name(name))

    def get(self, name: str) -> MilvusCollection:
        if name in self._open:
            return self._open[name]
        if not self.exists(name):
            raise CollectionNotFound(f"collection {name!r} not found")
        table = milvus_name(name)
        desc = self._call(self.client.describe_collection, table)
        text = desc.get("properties", {}).get(CONFIG_PROPERTY)
        if text is None:
            raise CollectionNotFound(f"collection {name!r}: the Milvus collection {table} is not one of simserve's (no {CONFIG_PROPERTY} property)")
        cfg = CollectionConfig(**json.loads(text))
        blobs = {b: sum(1 for f in desc["fields"] if re.fullmatch(rf"{b}_\d+", f["name"])) for b in ("features", "views", "keypoints")}
        self._call(self.client.load_collection, table)  # a no-op when loaded; after a Milvus restart it is not
        return self._open.setdefault(name, MilvusCollection(self, cfg, blobs))

    def create(
        self,
        name: str,
        dim: int,
        factory: str = "Flat",
        feature_shape: Sequence[int] = (),
        store_features: bool = True,
        crop_views: bool = False,
        verify: bool = False,
    ) -> MilvusCollection:
        from pymilvus import DataType, MilvusClient

        check_name(name)
        index = MilvusIndex.from_factory(factory, self.tuning)
        if self.exists(name):
            raise ValueError(f"collection {name!r} already exists")
        cfg = CollectionConfig(name, dim, factory, store_features, list(feature_shape), crop_views=crop_views, verify=verify)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.VARCHAR, max_length=KEY_CHARS)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("metadata", DataType.JSON, nullable=True)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=256, nullable=True)
        schema.add_field("added", DataType.DOUBLE)
        sizes = {"features": 2 * math.prod(feature_shape), "views": 2 * MAX_VIEWS * dim, "keypoints": KEYPOINT_BYTES}
        for blob, nbytes in sizes.items():
            for i in range(_chunks(nbytes)):
                schema.add_field(f"{blob}_{i}", DataType.VARCHAR, max_length=65_535, nullable=True)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type=index.index_type, metric_type="IP", params=index.build)
        try:
            self.client.create_collection(
                milvus_name(name), schema=schema, index_params=params, consistency_level="Strong", properties={CONFIG_PROPERTY: cfg.to_json()}
            )
        except Exception as e:
            if self.exists(name):  # another replica created it first
                raise ValueError(f"collection {name!r} already exists") from None
            raise MilvusUnavailable(self.uri, e) from None
        return self.get(name)

    def get_or_create(
        self, name: str, dim: int, factory: str = "Flat", feature_shape: Sequence[int] = (), crop_views: bool = False, verify: bool = False
    ) -> MilvusCollection:
        try:
            return self.get(name)
        except CollectionNotFound:
            try:
                return self.create(name, dim, factory, feature_shape, crop_views=crop_views, verify=verify)
            except ValueError:
                if not self.exists(name):
                    raise
                return self.get(name)

    def close(self, snapshot: bool = True) -> None:
        self._open.clear()
        try:
            self.client.close()
        except Exception as e:  # closing a channel to a server that went away
            log.warning("closing the Milvus client failed", extra={"error": str(e)})
