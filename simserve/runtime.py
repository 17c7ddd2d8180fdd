"""The service core, free of gRPC: engine + micro-batcher + collections.

The server's handlers translate protobuf to these calls and these errors to
status codes. Data flows one way: bytes -> decode (in the caller's thread, or
on the event loop for the aio handlers) -> micro-batcher -> engine ->
collections / response.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence, TypeVar

import numpy as np
from PIL import Image

from simserve import verify
from simserve.batcher import MicroBatcher
from simserve.bundle import Bundle
from simserve.collection import Collection, Collections
from simserve.decode import DEFAULT_MAX_PIXELS, DecodeError
from simserve.decode_pool import pixels
from simserve.engine import Engine
from simserve.search import search as two_stage_search
from simserve.store import NewItem, valid_filter_field
from simserve.views import collapse_views

log = logging.getLogger("simserve.runtime")
T = TypeVar("T")
Steps = Generator[list[np.ndarray], list, T]  # yields pixels to embed, is sent their (features, embedding)s
# A request above either limit is "heavy": its steps run on a worker thread, not the event loop.
INLINE_MAX_BYTES = 256 * 1024  # about a dozen 256 px JPEGs, or one 1,000 px photo: ~3 ms of decoding
INLINE_MAX_IMAGES = 32


class RequestError(ValueError):
    """A bad request; ``kind`` picks the status: invalid, not_found, too_large, precondition."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_items: int = 1024  # images (or pairs) in one request
    max_k: int = 1000
    max_rerank: int = 1000
    max_key_bytes: int = 1024
    max_metadata_bytes: int = 64 * 1024


@dataclass
class ImageRef:
    """An image as a request gives it: encoded bytes, or the key of a stored item."""

    data: bytes | None = None
    key: str | None = None


class Runtime:
    def __init__(
        self,
        engine: Engine,
        collections: Collections,
        *,
        default_collection: str = "default",
        factory: str = "Flat",
        crop_views: bool = False,
        verify: bool = False,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        max_queue: int = 1024,
        limits: Limits | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.engine, self.collections = engine, collections
        self.bundle: Bundle = engine.bundle
        self.default_collection, self.factory, self.crop_views, self.verify = default_collection, factory, crop_views, verify
        self.limits = limits or Limits()
        self.batcher: MicroBatcher[np.ndarray, tuple[np.ndarray, np.ndarray]] = MicroBatcher(
            self._embed_batch, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, name="engine-batcher", on_batch=on_batch
        )
        self._get_or_create(default_collection)

    @property
    def model_name(self) -> str:
        return f"{self.bundle.config.head}@{self.bundle.manifest.get('created', '?')}"

    def _embed_batch(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        feats, embs = self.engine.embed(np.stack(pixels))
        return list(zip(feats, embs))

    # -- images --------------------------------------------------------------------
    def decode(self, data: bytes, where: str, crop_views: bool = False) -> np.ndarray:
        """[C, S, S] model pixels; with ``crop_views`` [6, C, S, S] (see simserve/views.py)."""
        c = self.bundle.config
        try:
            return pixels(data, c.input_size, c.in_channels, self.limits.max_pixels, crop_views)
        except DecodeError as e:
            raise _request_error(e, where) from None

    def verify_image(self, data: bytes, where: str) -> Image.Image:
        """Bytes -> the image geometric verification reads (simserve/verify.py). Extracting its
        keypoints costs milliseconds of OpenCV: callers run it on worker threads, never the event loop."""
        try:
            return verify.decode(data, self.limits.max_pixels)
        except DecodeError as e:
            raise _request_error(e, where) from None

    def _embed_refs(self, refs: Sequence[ImageRef], where: Sequence[str], collection: str | None) -> Steps[tuple[np.ndarray, np.ndarray, list[int | None]]]:
        """(features, embeddings, stored ids) for each ref. Keys resolve to stored items."""
        self._check_count(len(refs), "images")
        col = self.collection(collection) if any(r.key is not None for r in refs) else None
        stored: dict[int, Any] = {}
        to_embed: list[int] = []
        pixels: list[np.ndarray] = []
        for i, (r, w) in enumerate(zip(refs, where)):
            if r.key is not None:
                item = col.get([r.key]).get(r.key)
                if item is None:
                    raise RequestError("not_found", f"{w}: no item with key {r.key!r} in collection {col.name!r}")
                stored[i] = item
            elif r.data is not None:
                to_embed.append(i)
                pixels.append(self.decode(r.data, w))
            else:
                raise RequestError("invalid", f"{w}: image is empty (set data or key)")
        shape = tuple(self.bundle.manifest["feature_shape"])
        feats = np.zeros((len(refs), *shape), np.float32)
        embs = np.zeros((len(refs), self.bundle.embedding_dim), np.float32)
        ids: list[int | None] = [None] * len(refs)
        if pixels:
            for i, (f, e) in zip(to_embed, (yield pixels)):
                feats[i], embs[i] = f, e
        if stored:
            fmap = col.features([it.id for it in stored.values()])
            for i, it in stored.items():
                embs[i], ids[i] = it.vector, it.id
                if it.id in fmap:
                    feats[i] = fmap[it.id]
                else:
                    feats[i] = np.nan  # no features stored: head scores impossible
        return feats, embs, ids

    # -- operations ----------------------------------------------------------------------
    # Each operation is written once, as steps (a generator that yields the pixels it needs
    # embedded and is sent their results), and run two ways: ``op(...)`` blocks its thread on
    # the batcher, ``await op_async(...)`` suspends an asyncio task instead (gRPC aio handlers).
    def score_pairs(self, pairs: Sequence[tuple[ImageRef, ImageRef]], collection: str | None, threshold: float, timeout: float | None) -> tuple[np.ndarray, np.ndarray, float]:
        return self._run(self._score_pairs(pairs, collection, threshold), timeout)

    async def score_pairs_async(self, pairs: Sequence[tuple[ImageRef, ImageRef]], collection: str | None, threshold: float, timeout: float | None) -> tuple[np.ndarray, np.ndarray, float]:
        return await self._run_async(self._score_pairs(pairs, collection, threshold), timeout, _heavy([r for p in pairs for r in p]))

    def embed(self, refs: Sequence[ImageRef], collection: str | None, timeout: float | None) -> np.ndarray:
        return self._run(self._embed(refs, collection), timeout)

    async def embed_async(self, refs: Sequence[ImageRef], collection: str | None, timeout: float | None) -> np.ndarray:
        return await self._run_async(self._embed(refs, collection), timeout, _heavy(refs))

    def search(self, query: ImageRef, collection: str | None, k: int, rerank: int, where: dict[str, str], timeout: float | None):
        return self._scan(*self._run(self._search_query(query, collection, k, rerank, where), timeout))

    async def search_async(self, query: ImageRef, collection: str | None, k: int, rerank: int, where: dict[str, str], timeout: float | None):
        found = await self._run_async(self._search_query(query, collection, k, rerank, where), timeout, _heavy([query]))
        # The index scan (milliseconds for an exact search) always runs on a worker thread.
        return await asyncio.get_running_loop().run_in_executor(None, self._scan, *found)

    def add(self, collection: str | None, items: Sequence[tuple[str, bytes, dict | None]], timeout: float | None) -> list[str]:
        return self._run(self._add(collection, items), timeout)

    def _run(self, steps: Steps[T], timeout: float | None) -> T:
        done, value = _advance(steps)
        while not done:
            done, value = _advance(steps, self.batcher.run(value, timeout))
        return value

    async def _run_async(self, steps: Steps[T], timeout: float | None, heavy: bool) -> T:
        """The steps between the waits (decoding, the head, building the answer) run on the
        event loop itself for a small request (a hand-off to a thread costs more than a
        256 px JPEG's 0.2 ms decode) and on a worker thread for a heavy one, so that one
        request of large photos or many pairs does not stall every other request."""
        loop = asyncio.get_running_loop()

        async def advance(value: list | None = None) -> tuple[bool, Any]:
            return await loop.run_in_executor(None, _advance, steps, value) if heavy else _advance(steps, value)

        done, value = await advance()
        while not done:
            done, value = await advance(await self.batcher.run_async(value, timeout))
        return value

    def _score_pairs(self, pairs: Sequence[tuple[ImageRef, ImageRef]], collection: str | None, threshold: float) -> Steps[tuple[np.ndarray, np.ndarray, float]]:
        self._check_count(len(pairs), "pairs")
        if not pairs:
            raise RequestError("invalid", "pairs: at least one pair is required")
        refs = [r for p in pairs for r in p]
        where = [f"pairs[{i // 2}].{'ab'[i % 2]}" for i in range(len(refs))]
        feats, embs, _ = yield from self._embed_refs(refs, where, collection)
        if np.isnan(feats).any():
            raise RequestError("precondition", "an item referenced by key was stored without head features; pass its image bytes")
        scores = self.engine.fuse(feats[0::2], feats[1::2])
        cosine = np.einsum("ij,ij->i", embs[0::2], embs[1::2])
        thr = threshold if threshold > 0 else self.bundle.threshold
        return scores, cosine, thr

    def _embed(self, refs: Sequence[ImageRef], collection: str | None) -> Steps[np.ndarray]:
        if not refs:
            raise RequestError("invalid", "images: at least one image is required")
        _, embs, _ = yield from self._embed_refs(refs, [f"images[{i}]" for i in range(len(refs))], collection)
        return embs

    def _search_query(self, query: ImageRef, collection: str | None, k: int, rerank: int, where: dict[str, str]) -> Steps[tuple]:
        """Checks the request and embeds the query; returns ``_scan``'s arguments."""
        k = k or 10
        if not 0 < k <= self.limits.max_k:
            raise RequestError("invalid", f"k must be between 1 and {self.limits.max_k}, got {k}")
        if not 0 <= rerank <= self.limits.max_rerank:
            raise RequestError("invalid", f"rerank must be between 0 and {self.limits.max_rerank}, got {rerank}")
        bad = [f for f in where or {} if not valid_filter_field(f)]
        if bad:
            raise RequestError("invalid", f"filter field {bad[0][:80]!r}: use 1-64 ASCII letters, digits, '_' or '-'")
        col = self.collection(collection)
        feats, embs, ids = yield from self._embed_refs([query], ["query"], col.name)
        use_feats = None if (rerank == 0 or np.isnan(feats).any()) else feats
        exclude = [[ids[0]]] if ids[0] is not None else None
        return col, embs, k, use_feats, rerank, where or None, exclude, query

    def _scan(self, col: Collection, embs: np.ndarray, k: int, feats: np.ndarray | None, rerank: int, where: dict | None, exclude: list | None, query: ImageRef) -> list:
        keypoints = [self._query_keypoints(col, query, exclude[0][0] if exclude else None)] if col.config.verify else None
        return two_stage_search(self.engine, col, embs, k, features=feats, rerank=rerank, where=where, exclude_ids=exclude, keypoints=keypoints)[0]

    def _query_keypoints(self, col: Collection, query: ImageRef, stored_id: int | None) -> list[verify.LocalFeatures] | None:
        """A verifying collection's query keypoints: from the image bytes, or a stored query's own
        (as stored: not mirrored). None when a stored query has none: it is searched unverified."""
        if query.data is not None:
            return verify.query_features(self.verify_image(query.data, "query"))
        return col.query_keypoints(stored_id) if stored_id is not None else None

    def _add(self, collection: str | None, items: Sequence[tuple[str, bytes, dict | None]]) -> Steps[list[str]]:
        self._check_count(len(items), "items")
        name = collection or self.default_collection
        if not _valid_name(name):
            raise RequestError("invalid", f"collection name {name!r}: 1-64 of letters, digits, '_', '.', '-'")
        col = self._get_or_create(name)
        if col.dim != self.bundle.embedding_dim:
            raise RequestError("precondition", f"collection {name!r} holds {col.dim}-d vectors; the served model makes {self.bundle.embedding_dim}-d")
        seen: set[str] = set()
        for i, (key, data, meta) in enumerate(items):
            if not key or len(key.encode()) > self.limits.max_key_bytes:
                raise RequestError("invalid", f"items[{i}].key must be 1-{self.limits.max_key_bytes} bytes")
            if key in seen:
                raise RequestError("invalid", f"items[{i}].key {key!r} appears twice in one request")
            seen.add(key)
        views = col.config.crop_views
        decoded = [self.decode(data, f"items[{i}].image", views) for i, (_, data, _) in enumerate(items)]
        flat = [v for d in decoded for v in d] if views else decoded
        results = (yield flat) if flat else []
        if views:
            results = list(zip(*collapse_views(np.stack([f for f, _ in results]), np.stack([e for _, e in results]))))
        else:
            results = [(f, e, None) for f, e in results]
        kps = [verify.keypoints(self.verify_image(data, f"items[{i}].image")) if col.config.verify else None for i, (_, data, _) in enumerate(items)]
        new = [
            NewItem(key, e, meta, None, f.astype(np.float16) if col.config.store_features else None, v, kp)
            for (key, _, meta), (f, e, v), kp in zip(items, results, kps)
        ]
        col.add(new)
        return [it.key for it in new]

    def _get_or_create(self, name: str) -> Collection:
        """The named collection; a new one gets this server's factory, crop-views and verify settings."""
        return self.collections.get_or_create(
            name, self.bundle.embedding_dim, self.factory, self.bundle.manifest["feature_shape"], self.crop_views, verify=self.verify
        )

    def collection(self, name: str | None) -> Collection:
        from simserve.collection import CollectionNotFound

        name = name or self.default_collection
        try:
            return self.collections.get(name)
        except CollectionNotFound:
            raise RequestError("not_found", f"collection {name!r} not found") from None

    def _check_count(self, n: int, what: str) -> None:
        if n > self.limits.max_items:
            raise RequestError("too_large", f"{n} {what} in one request; the limit is {self.limits.max_items} (split the request)")

    def close(self) -> None:
        self.batcher.close(drain=True)
        self.collections.close(snapshot=True)


def _advance(steps: Steps[T], value: list | None = None) -> tuple[bool, Any]:
    """(False, the pixels the steps need next) or (True, their result)."""
    try:
        return False, steps.send(value)
    except StopIteration as finished:
        return True, finished.value


def _request_error(e: DecodeError, where: str) -> RequestError:
    kind = "too_large" if e.reason in ("too_many_pixels", "too_large") else "invalid"
    return RequestError(kind, f"{where}: {e}")


def _heavy(refs: Sequence[ImageRef]) -> bool:
    return len(refs) > INLINE_MAX_IMAGES or sum(len(r.data) for r in refs if r.data is not None) > INLINE_MAX_BYTES


def _valid_name(name: str) -> bool:
    from simserve.collection import NAME_RE

    return NAME_RE.match(name) is not None
