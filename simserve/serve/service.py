"""The service core, free of gRPC: engine + micro-batcher + collections, async all the way.

The handlers translate protobuf to these coroutines and their errors to status codes. Data
flows one way: bytes -> decode -> micro-batcher -> engine -> ranking / collections ->
response. Nothing here blocks the event loop for long: a small request decodes on the loop
(a hand-off to a thread costs more than a 256 px JPEG's 0.2 ms decode), a heavy one on a
worker thread, and every SQLite read or write, index scan and keypoint extraction runs on a
worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from PIL import Image

from simserve.index.collection import NAME_RE, Collection, CollectionNotFound, Collections
from simserve.index.store import NewItem, StoredItem, valid_filter_field
from simserve.inference.bundle import Bundle, BundleError
from simserve.inference.crops import collapse_views, pooled_regions, query_view_inputs
from simserve.inference.decode import DecodeError, DecodeStopped, declared_pixels, stop_when
from simserve.inference.decode_pool import pixels
from simserve.inference.engine import Engine, default_threads
from simserve.ranking import calibration, pipeline, verify
from simserve.serve.batcher import BatchDone, DeadlineExceeded, MicroBatcher
from simserve.serve.budget import DecodeBudget
from simserve.serve.config import ServerConfig

T = TypeVar("T")
# A request above any limit is "heavy": it decodes on a worker thread, not the event loop.
INLINE_MAX_BYTES = 256 * 1024  # about a dozen 256 px JPEGs, or one 1,000 px photo: ~3 ms of decoding
INLINE_MAX_IMAGES = 32
# Declared by the headers, not the compressed size: a 78 KB PNG of 1 x 40 M pixels decodes for seconds.
INLINE_MAX_PIXELS = 2_000_000


class RequestError(ValueError):
    """A bad request; ``kind`` picks the status: invalid, not_found, too_large, precondition."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ImageRef:
    """An image as a request gives it: encoded bytes, or the key of a stored item."""

    data: bytes | None = None
    key: str | None = None


@dataclass
class Embedded:
    """Images as the engine saw them: head features (NaN where a stored item has none), embeddings
    and, for stored items, their ids."""

    features: np.ndarray
    embeddings: np.ndarray
    ids: list[int | None]


class Service:
    def __init__(
        self,
        engine: Engine,
        collections: Collections,
        config: ServerConfig | None = None,
        on_batch: Callable[[BatchDone], None] | None = None,
        on_decode: Callable[[float], None] | None = None,
        on_cut: Callable[[], None] | None = None,
    ) -> None:
        """``on_batch`` hears of each engine call, ``on_decode`` of each image's decode (seconds),
        ``on_cut`` of each search its budget cut short: for metrics."""
        self.engine, self.collections = engine, collections
        self._on_decode = on_decode or (lambda seconds: None)
        self._on_cut = on_cut or (lambda: None)
        self.config = cfg = config or ServerConfig()
        self.bundle: Bundle = engine.bundle
        try:
            self.calibrations = calibration.from_manifest(self.bundle.manifest)
        except ValueError as e:
            raise BundleError(f"{self.bundle.root}: {e}") from None
        self.batcher: MicroBatcher[np.ndarray, tuple[np.ndarray, np.ndarray]] = MicroBatcher(
            self._embed_batch, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms, max_queue=cfg.max_queue, name="engine-batcher", on_batch=on_batch
        )
        self.budget = DecodeBudget(cfg.decode_budget_mb * 1024 * 1024)
        self._get_or_create(cfg.collection)

    @property
    def model_name(self) -> str:
        return f"{self.bundle.config.head}@{self.bundle.manifest.get('created', '?')}"

    def _embed_batch(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        feats, embs = self.engine.embed(np.stack(pixels))
        return list(zip(feats, embs))

    # -- operations ----------------------------------------------------------------------
    async def score_pairs(
        self, pairs: Sequence[tuple[ImageRef, ImageRef]], collection: str | None, threshold: float, timeout: float | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(scores, head scores, cosines, the threshold that decides a match) for each pair. With a
        calibrated bundle the score is P(copy) given the cosine and the inliers between the two
        images; otherwise the head's score."""
        deadline = _deadline(timeout)
        self._check_count(2 * len(pairs), f"images ({len(pairs)} pairs)")  # the limit counts images: a pair is two
        if not pairs:
            raise RequestError("invalid", "pairs: at least one pair is required")
        refs = [r for p in pairs for r in p]
        where = [f"pairs[{i // 2}].{'ab'[i % 2]}" for i in range(len(refs))]
        heavy = _heavy(refs)
        got = await self._embed_refs(refs, where, collection, heavy, deadline)
        if np.isnan(got.features).any():
            raise RequestError("precondition", "an item referenced by key was stored without head features; pass its image bytes")
        head = await _off_loop(heavy, self.engine.fuse, got.features[0::2], got.features[1::2])
        cosine = np.einsum("ij,ij->i", got.embeddings[0::2], got.embeddings[1::2])
        cal = calibration.pair_model(self.calibrations)
        if cal is None:  # an uncalibrated bundle: the head decides, at its own threshold
            return head, head, cosine, threshold if threshold > 0 else self.bundle.threshold
        # P(copy) from the cosine, the inliers (OpenCV: off the loop) and the head's score.
        inliers = await asyncio.to_thread(self._pair_inliers, refs, where, got.ids, collection)
        return cal.probability(cosine, inliers, head), head, cosine, threshold if threshold > 0 else cal.threshold

    async def embed(self, refs: Sequence[ImageRef], collection: str | None, timeout: float | None) -> np.ndarray:
        if not refs:
            raise RequestError("invalid", "images: at least one image is required")
        got = await self._embed_refs(refs, [f"images[{i}]" for i in range(len(refs))], collection, _heavy(refs), _deadline(timeout))
        return got.embeddings

    async def search(self, query: ImageRef, collection: str | None, k: int, rerank: int, where: dict[str, str], timeout: float | None) -> list[pipeline.Hit]:
        deadline = _deadline(timeout)
        answer_by = _answer_by(self.config.search_budget_ms, timeout)
        k = k or 10
        if not 0 < k <= self.config.max_k:
            raise RequestError("invalid", f"k must be between 1 and {self.config.max_k}, got {k}")
        if not 0 <= rerank <= self.config.max_rerank:
            raise RequestError("invalid", f"rerank must be between 0 and {self.config.max_rerank}, got {rerank}")
        if len(where or {}) > self.config.max_filter_fields:
            raise RequestError("invalid", f"filter has {len(where)} fields; the limit is {self.config.max_filter_fields}")
        bad = [f for f in where or {} if not valid_filter_field(f)]
        if bad:
            raise RequestError("invalid", f"filter field {bad[0][:80]!r}: use 1-64 ASCII letters, digits, '_' or '-'")
        col = await asyncio.to_thread(self.collection, collection)
        heavy = _heavy([query])
        # A small image's keypoints are found on a worker thread while the model embeds it and the
        # index is searched (~7 + 5 ms at 100,000 items, the keypoints ~12); a heavy one's after,
        # so that its two decodes are never held at once.
        early = col.config.verify and query.data is not None and not heavy
        loop = asyncio.get_running_loop()
        found = asyncio.run_coroutine_threadsafe(asyncio.to_thread(self._query_keypoints, col, query, None), loop) if early else None
        views: np.ndarray | Callable[[], Future] | None = None
        try:
            wanted = col.config.crop_views and self.config.query_views and query.data is not None
            if wanted and not col.config.verify:
                got, views = await self.embed_query_views(query.data, deadline)
            else:
                got = await self._embed_refs([query], ["query"], col.name, heavy, deadline)
                if wanted:  # made only if verifying the upright query's best candidate leaves it uncertain
                    views = lambda: asyncio.run_coroutine_threadsafe(self.query_views(query.data, deadline), loop)  # noqa: E731
        except BaseException:
            if found is not None:
                _read_later(found)
            raise
        feats = None if rerank == 0 or np.isnan(got.features).any() else got.features[0]

        def scan() -> list[pipeline.Hit]:  # the index, the store, a stored query's keypoints: all off the loop
            q = pipeline.Query(got.embeddings[0], feats, found.result if found is not None else None, got.ids[0], views)
            if col.config.verify and found is None:
                q.keypoints = self._query_keypoints(col, query, got.ids[0])
            return pipeline.search(col, q, k, rerank=rerank, where=where or None, engine=self.engine, calibrations=self.calibrations, deadline=answer_by)

        try:
            return await asyncio.to_thread(scan)
        finally:
            if answer_by is not None and answer_by.cut:
                self._on_cut()
            if found is not None:
                _read_later(found)  # a search that failed before its verification never asked for them

    async def add(self, collection: str | None, items: Sequence[tuple[str, bytes, dict | None]], timeout: float | None) -> list[str]:
        """Embeds and stores the items; all or nothing (a bad image fails the whole request)."""
        deadline = _deadline(timeout)
        self._check_count(len(items), "items")
        name = collection or self.config.collection
        if not NAME_RE.match(name):
            raise RequestError("invalid", f"collection name {name!r}: 1-64 of letters, digits, '_', '.', '-'")
        seen: set[str] = set()
        for i, (key, _, _) in enumerate(items):
            if not key or len(key.encode()) > self.config.max_key_bytes:
                raise RequestError("invalid", f"items[{i}].key must be 1-{self.config.max_key_bytes} bytes")
            if key in seen:
                raise RequestError("invalid", f"items[{i}].key {key!r} appears twice in one request")
            seen.add(key)
        # A new collection is created only once every item is ready: a failed Add creates nothing.
        existing = await asyncio.to_thread(self._existing, name)
        if existing is not None and existing.dim != self.bundle.embedding_dim:
            raise RequestError("precondition", f"collection {name!r} holds {existing.dim}-d vectors; the served model makes {self.bundle.embedding_dim}-d")
        views = existing.config.crop_views if existing else self.config.crop_views
        verifying = existing.config.verify if existing else self.config.verify
        features = existing.config.store_features if existing else True
        blobs = [(data, f"items[{i}].image") for i, (_, data, _) in enumerate(items)]
        # Keypoints (a decode and ~4 ms of OpenCV an image) are found on every core while the
        # model embeds; an error in either stops the other.
        found = asyncio.ensure_future(self._decode_all(blobs, True, deadline, self._keypoints, lanes=default_threads())) if verifying else None
        try:
            # Always off the loop: an add commits to SQLite anyway, and crop views decode six ways.
            decoded = await self._decode_all(blobs, True, deadline, lambda data, where: self.decode(data, where, views))
            flat = [v for d in decoded for v in d] if views else decoded
            results = await self.batcher.run_async(flat, _left(deadline)) if flat else []
            kps = await found if found is not None else [None] * len(items)
        except BaseException:
            if found is not None:
                found.cancel()
                _read_later(found)
            raise
        if views and results:
            results = list(zip(*collapse_views(np.stack([f for f, _ in results]), np.stack([e for _, e in results]))))
        else:
            results = [(f, e, None) for f, e in results]
        new = [
            NewItem(key, e, meta, None, f.astype(np.float16) if features else None, v, kp)
            for (key, _, meta), (f, e, v), kp in zip(items, results, kps)
        ]
        col = existing or await asyncio.to_thread(self._get_or_create, name)
        await asyncio.to_thread(col.add, new)
        return [it.key for it in new]

    async def remove(self, collection: str | None, keys: Sequence[str]) -> dict[str, int]:
        return await asyncio.to_thread(lambda: self.collection(collection).remove(list(keys)))

    async def get(self, collection: str | None, keys: Sequence[str]) -> dict[str, StoredItem]:
        return await asyncio.to_thread(lambda: self.collection(collection).get(list(keys)))

    async def count(self, collection: str | None) -> int:
        return await asyncio.to_thread(lambda: self.collection(collection).count())

    async def stats(self, collection: str | None) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self.collection(collection).stats())

    async def names(self) -> list[str]:
        return await asyncio.to_thread(self.collections.names)

    # -- images --------------------------------------------------------------------
    async def _decode_all(self, blobs: Sequence[tuple[bytes, str]], heavy: bool, deadline: float | None, one: Callable[[bytes, str], T] | None = None, lanes: int = 1) -> list[T]:
        """``one(bytes, where)`` (by default: model pixels) for each blob. A small request decodes
        on the loop; a heavy one on ``lanes`` worker threads, each taking its share in turn, one
        image at a time within the server's decode budget, stopping within a block of encoded
        bytes once its deadline passes or its caller is gone (decode.stop_when)."""
        one = one or self.decode
        if not heavy:
            return [one(data, where) for data, where in blobs]
        stop = threading.Event()

        def run(part: Sequence[tuple[bytes, str]]) -> list[T]:
            out = []
            with stop_when(lambda: stop.is_set() or (deadline is not None and time.monotonic() > deadline)):
                for data, where in part:
                    if stop.is_set():
                        raise CancelledError()
                    with self.budget.hold(declared_pixels(data), deadline, stop):
                        try:
                            out.append(one(data, where))
                        except DecodeStopped:
                            raise (CancelledError() if stop.is_set() else DeadlineExceeded("deadline passed while decoding the images")) from None
            return out

        size = max(1, -(-len(blobs) // max(1, lanes)))
        try:
            parts = await asyncio.gather(*(asyncio.to_thread(run, blobs[s : s + size]) for s in range(0, len(blobs), size)))
        except BaseException:
            stop.set()  # the other lanes stop before their next image
            raise
        return [x for part in parts for x in part]

    def _keypoints(self, data: bytes, where: str) -> bytes:
        return verify.keypoints(self.verify_image(data, where))

    def decode(self, data: bytes, where: str, crop_views: bool = False) -> np.ndarray:
        """[C, S, S] model pixels; with ``crop_views`` [6, C, S, S] (inference/crops.py)."""
        c = self.bundle.config
        return self._timed(lambda: pixels(data, c.input_size, c.in_channels, self.config.max_pixels, crop_views), where)

    def verify_image(self, data: bytes, where: str) -> Image.Image:
        """Bytes -> the image geometric verification reads (ranking/verify.py)."""
        return self._timed(lambda: verify.decode(data, self.config.max_pixels), where)

    def _timed(self, decode: Callable[[], T], where: str) -> T:
        t = time.perf_counter()
        try:
            return decode()
        except DecodeError as e:
            raise _request_error(e, where) from None
        finally:
            self._on_decode(time.perf_counter() - t)

    async def _embed_refs(self, refs: Sequence[ImageRef], where: Sequence[str], collection: str | None, heavy: bool, deadline: float | None) -> Embedded:
        """Features and embeddings for each ref: bytes are decoded and embedded, keys read from the store."""
        self._check_count(len(refs), "images")
        for r, w in zip(refs, where):
            if r.key is None and r.data is None:
                raise RequestError("invalid", f"{w}: image is empty (set data or key)")
        shape = tuple(self.bundle.manifest["feature_shape"])
        out = Embedded(np.zeros((len(refs), *shape), np.float32), np.zeros((len(refs), self.bundle.embedding_dim), np.float32), [None] * len(refs))
        keyed = {i: r.key for i, r in enumerate(refs) if r.key is not None}
        if keyed:
            await asyncio.to_thread(self._read_stored, out, keyed, where, collection)
        to_embed = [i for i, r in enumerate(refs) if r.key is None]
        if to_embed:
            decoded = await self._decode_all([(refs[i].data, where[i]) for i in to_embed], heavy, deadline)
            for i, (f, e) in zip(to_embed, await self.batcher.run_async(decoded, _left(deadline))):
                out.features[i], out.embeddings[i] = f, e
        return out

    async def embed_query_views(self, data: bytes, deadline: float | None) -> tuple[Embedded, np.ndarray]:
        """A query and its views (inference/crops.query_view_inputs), embedded together: the
        query as ``_embed_refs`` gives it, and the views' embeddings [N_QUERY_VIEWS - 1, d]."""
        feats, embs = await self._view_outputs(data, deadline, whole=True)
        return Embedded(feats[:1], embs[:1], [None]), embs[1:]

    async def query_views(self, data: bytes, deadline: float | None) -> np.ndarray:
        """The query's views' embeddings [N_QUERY_VIEWS - 1, d] alone, for a search that found the query itself uncertain."""
        return (await self._view_outputs(data, deadline, whole=False))[1]

    async def _view_outputs(self, data: bytes, deadline: float | None, whole: bool) -> tuple[np.ndarray, np.ndarray]:
        """Always decoded off the loop: a 320 px decode and its cuts are ~2 ms, which the loop would hold from everyone.
        The turned views go through the batcher; the regions are pooled from one pass over the
        image at 320 px, beside it (another shape: it is not batched with the others)."""
        c = self.bundle.config
        decode = lambda data, where: self._timed(  # noqa: E731
            lambda: query_view_inputs(data, c.input_size, c.in_channels, self.config.max_pixels, pooled=self.engine.any_size), where
        )
        [(views, wide)] = await self._decode_all([(data, "query")], True, deadline, decode)
        out, regions = await asyncio.gather(self.batcher.run_async(list(views if whole else views[1:]), _left(deadline)), asyncio.to_thread(pooled_regions, self.engine, wide))
        return np.stack([f for f, _ in out]), np.concatenate([np.stack([e for _, e in out]), *regions])

    def _read_stored(self, out: Embedded, keyed: dict[int, str], where: Sequence[str], collection: str | None) -> None:
        col = self.collection(collection)
        items = col.get(sorted(set(keyed.values())))
        for i, key in keyed.items():
            if key not in items:
                raise RequestError("not_found", f"{where[i]}: no item with key {key!r} in collection {col.name!r}")
        fmap = col.features([it.id for it in items.values()])
        for i, key in keyed.items():
            it = items[key]
            out.embeddings[i], out.ids[i] = it.vector, it.id
            out.features[i] = fmap[it.id] if it.id in fmap else np.nan  # no features stored: no head scores

    def _pair_inliers(self, refs: Sequence[ImageRef], where: Sequence[str], ids: Sequence[int | None], collection: str | None) -> np.ndarray:
        """Inliers of each pair (refs in pairs), the better of both directions, so (a, b) and (b, a)
        agree. Bytes are described as given, mirrored and zoomed out; a stored item by its stored keypoints
        (none stored: 0 inliers, as a search scores a hit it did not verify)."""
        stored = {}
        if any(i is not None for i in ids):
            stored = self.collection(collection).keypoints([i for i in ids if i is not None])
        feats: list[list[verify.LocalFeatures] | None] = []
        for r, w, i in zip(refs, where, ids):
            if r.data is not None:
                feats.append(verify.query_features(self.verify_image(r.data, w)))
            else:
                feats.append([verify.unpack(stored[i])] if i in stored else None)
        pairs = zip(feats[0::2], feats[1::2])
        return np.array([verify.pair_inliers(a, b) if a is not None and b is not None else 0 for a, b in pairs], np.float64)

    def _query_keypoints(self, col: Collection, query: ImageRef, stored_id: int | None) -> list[verify.LocalFeatures] | None:
        """A verifying collection's query keypoints: from the image bytes, or a stored query's own
        (as stored: not mirrored). None when a stored query has none: it is searched unverified."""
        if query.data is not None:
            return verify.query_features(self.verify_image(query.data, "query"), regions=True)
        return pipeline.stored_keypoints(col, stored_id) if stored_id is not None else None

    def _existing(self, name: str) -> Collection | None:
        return self.collections.get(name) if self.collections.exists(name) else None

    def _get_or_create(self, name: str) -> Collection:
        """The named collection; a new one gets this server's factory, crop-views and verify settings,
        while there are fewer than ``max_collections`` (each holds open files and memory)."""
        c = self.config
        if not self.collections.exists(name) and len(self.collections.names()) >= c.max_collections:
            raise RequestError("too_large", f"collection {name!r} would be one more than this server's {c.max_collections} (--max-collections)")
        return self.collections.get_or_create(name, self.bundle.embedding_dim, c.factory, self.bundle.manifest["feature_shape"], c.crop_views, verify=c.verify)

    def collection(self, name: str | None) -> Collection:
        name = name or self.config.collection
        try:
            return self.collections.get(name)
        except CollectionNotFound:
            raise RequestError("not_found", f"collection {name!r} not found") from None

    def _check_count(self, n: int, what: str) -> None:
        if n > self.config.max_items:
            raise RequestError("too_large", f"{n} {what} in one request; the limit is {self.config.max_items} (split the request)")

    def close(self) -> None:
        self.batcher.close(drain=True)
        self.collections.close(snapshot=True)
        self.engine.close()


async def _off_loop(heavy: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread for a heavy request, on the event loop for a small one."""
    return await asyncio.to_thread(fn, *args) if heavy else fn(*args)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _answer_by(budget_ms: float, timeout: float | None) -> pipeline.Deadline | None:
    """When a search stops verifying: its budget after now, or sooner, at 80% of the request's
    own timeout, leaving the rest to finish the candidate in hand and answer."""
    limits = ([budget_ms / 1000] if budget_ms > 0 else []) + ([0.8 * timeout] if timeout is not None else [])
    return pipeline.Deadline.after(min(limits)) if limits else None


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _request_error(e: DecodeError, where: str) -> RequestError:
    kind = "too_large" if e.reason in ("too_many_pixels", "too_large") else "invalid"
    return RequestError(kind, f"{where}: {e}")


def _read_later(task: asyncio.Future | Future) -> None:
    """Marks a task's outcome read once it ends: another error is the one reported."""
    task.add_done_callback(lambda f: f.cancelled() or f.exception())


def _heavy(refs: Sequence[ImageRef]) -> bool:
    blobs = [r.data for r in refs if r.data is not None]
    return len(refs) > INLINE_MAX_IMAGES or sum(map(len, blobs)) > INLINE_MAX_BYTES or sum(map(declared_pixels, blobs)) > INLINE_MAX_PIXELS
