"""The gRPC servicers: protobuf in, the service's coroutines, protobuf out; errors -> status codes."""

from __future__ import annotations

import json
import math
from concurrent.futures import CancelledError
from typing import Callable

import grpc

from simserve.index.store import StoreError
from simserve.ranking.verify import VerifyUnavailable
from simserve.serve.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from simserve.serve.service import ImageRef, RequestError, Service
from simserve.v1 import simserve_pb2 as pb
from simserve.v1 import simserve_pb2_grpc as pb_grpc

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
}

_STORE_CODES = {
    "full": grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's own example: "the entire file system is out of space"
    "read_only": grpc.StatusCode.FAILED_PRECONDITION,  # the system is not in a state that allows writes
    "io": grpc.StatusCode.UNAVAILABLE,  # possibly transient: the client may retry
}

_OURS = (CancelledError, RequestError, QueueFull, DeadlineExceeded, TimeoutError, BatcherClosed, StoreError, VerifyUnavailable, OSError)


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status for one of the service's exceptions (``_OURS``); anything else escapes."""
    if isinstance(e, CancelledError):
        return grpc.StatusCode.CANCELLED, "the client cancelled the request"
    if isinstance(e, RequestError):
        return _CODES[e.kind], str(e)
    if isinstance(e, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, (DeadlineExceeded, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was computed"
    if isinstance(e, BatcherClosed):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, StoreError):
        return _STORE_CODES[e.reason], str(e)
    if isinstance(e, VerifyUnavailable):  # a verifying collection on a server without OpenCV
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    assert isinstance(e, OSError), e  # e.g. creating a collection's folder on a full or read-only disk
    err = StoreError(e.filename or "the data directory", e)
    return _STORE_CODES[err.reason], str(err)


def _guard(fn: Callable) -> Callable:
    """Map the service's exceptions to status codes; nothing else escapes as UNKNOWN. gRPC
    cancels the handler's task when the client leaves or its deadline passes, and the
    batcher drops the task's queued work then."""

    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except _OURS as e:
            await context.abort(*_status(e))

    wrapper.__name__ = fn.__name__
    return wrapper


def _ref(img: pb.Image) -> ImageRef:
    which = img.WhichOneof("source")
    return ImageRef(data=img.data if which == "data" else None, key=img.key if which == "key" else None)


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


def _no_constants(name: str) -> None:
    # NaN / Infinity are not JSON (RFC 8259); SQLite's json functions reject them, so one
    # such item would break every filtered search of its collection.
    raise ValueError(f"{name} is not allowed in JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as Infinity: the same harm as the constant
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _metadata(text: str, where: str, limit: int) -> dict | None:
    if not text:
        return None
    if len(text.encode()) > limit:
        raise RequestError("too_large", f"{where}: metadata is {len(text.encode())} bytes; the limit is {limit}")
    try:
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except (json.JSONDecodeError, ValueError) as e:
        raise RequestError("invalid", f"{where}: metadata_json is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError("invalid", f"{where}: metadata_json is nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError("invalid", f"{where}: metadata_json must be a JSON object")
    return value


class SimilarityService(pb_grpc.SimilarityServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    @_guard
    async def ScorePairs(self, request, context):
        pairs = [(_ref(p.a), _ref(p.b)) for p in request.pairs]
        scores, head, cosine, thr = await self.service.score_pairs(pairs, request.collection or None, request.threshold, _timeout(context))
        return pb.ScorePairsResponse(
            scores=[pb.PairScore(score=float(s), match=bool(s >= thr), cosine=float(c), head_score=float(h)) for s, h, c in zip(scores, head, cosine)],
            threshold=thr,
            model=self.service.model_name,
        )

    @_guard
    async def Embed(self, request, context):
        embs = await self.service.embed([_ref(i) for i in request.images], request.collection or None, _timeout(context))
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=e.tolist()) for e in embs], dim=embs.shape[1], model=self.service.model_name)

    @_guard
    async def Search(self, request, context):
        if not request.HasField("query") or request.query.WhichOneof("source") is None:
            raise RequestError("invalid", "query: set image data or key")
        hits = await self.service.search(_ref(request.query), request.collection or None, request.k, request.rerank, dict(request.filter), _timeout(context))
        return pb.SearchResponse(
            neighbors=[
                pb.Neighbor(key=h.key, score=h.score, cosine=h.cosine, metadata_json=json.dumps(h.metadata) if h.metadata else "", head_score=h.head_score, inliers=h.inliers)
                for h in hits
            ]
        )


class IndexService(pb_grpc.IndexServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def _add(self, request, context) -> list[str]:
        lim = self.service.config.max_metadata_bytes
        items = [(it.key, it.image, _metadata(it.metadata_json, f"items[{i}]", lim)) for i, it in enumerate(request.items)]
        return await self.service.add(request.collection or None, items, _timeout(context))

    @_guard
    async def Add(self, request, context):
        keys = await self._add(request, context)
        return pb.AddResponse(added=len(keys), keys=keys)

    @_guard
    async def AddStream(self, request_iterator, context):
        keys: list[str] = []
        async for request in request_iterator:
            keys.extend(await self._add(request, context))  # each message committed as it arrives
        return pb.AddResponse(added=len(keys), keys=keys)

    @_guard
    async def Remove(self, request, context):
        found = await self.service.remove(request.collection or None, list(request.keys))
        return pb.RemoveResponse(removed=len(found), not_found=[k for k in request.keys if k not in found])

    @_guard
    async def Get(self, request, context):
        got = await self.service.get(request.collection or None, list(request.keys))
        items = [
            pb.Item(key=k, metadata_json=json.dumps(it.metadata) if it.metadata else "", vector=it.vector.tolist() if request.include_vectors else [], added_unix=it.added)
            for k, it in got.items()
        ]
        return pb.GetResponse(items=items, not_found=[k for k in request.keys if k not in got])

    @_guard
    async def Stats(self, request, context):
        s = await self.service.stats(request.collection or None)
        return pb.StatsResponse(
            collection=s["name"], items=s["items"], indexed=s["indexed"], dim=s["dim"], factory=s["factory"],
            index_type=s["index_type"], index_bytes=s["index_bytes"], pending_training=s["pending_training"],
            buffered=s["buffered"], crop_views=s["crop_views"], verify=s["verify"],
        )

    @_guard
    async def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(collections=await self.service.names())
