"""The gRPC server: Similarity + Index services, health, reflection, auth, metrics.

``simserve serve`` with no options serves the shipped default model and a
``default`` collection on 127.0.0.1:50051. Every request is logged as one
JSON line with a request id; errors are status codes whose message says
exactly what was wrong. SIGTERM: health goes NOT_SERVING, new RPCs are
refused, in-flight ones finish, the index is snapshotted, exit 0.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from simserve.batcher import BatcherClosed, CancelScope, DeadlineExceeded, QueueFull
from simserve.collection import Collections, default_data_dir
from simserve.engine import default_threads, load_engine
from simserve.metrics import Metrics
from simserve.runtime import ImageRef, Limits, RequestError, Runtime
from simserve.store import StoreError
from simserve.vector_index import IndexTuning
from simserve.verify import VerifyUnavailable, require as require_opencv
from simserve.v1 import simserve_pb2 as pb
from simserve.v1 import simserve_pb2_grpc as pb_grpc

log = logging.getLogger("simserve.server")
SERVICES = ("simserve.v1.Similarity", "simserve.v1.Index")
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes work without a token


@dataclass
class ServerConfig:
    """Every option; each is also settable as SIMSERVE_<NAME> in the environment."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = ""
    bundle: str = ""
    backend: str = "onnx"
    threads: int = 0  # engine threads (one single-threaded ORT session each); 0 = all cores
    faiss_threads: int = 1  # per search: concurrent requests already use every core
    workers: int = 32  # threads for the Index methods (SQLite); Embed, ScorePairs and Search run on the event loop
    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    max_message_mb: int = 64
    max_pixels: int = 40_000_000
    max_items: int = 1024
    collection: str = "default"
    factory: str = "Flat"
    crop_views: bool = False  # new collections index whole image + 5 crops (simserve/views.py)
    verify: bool = False  # new collections keep keypoints and verify their searches (simserve/verify.py)
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # require client certificates signed by this CA (mutual TLS)
    metrics_port: int = -1  # -1 off, 0 any free port
    grace_s: float = 30.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            env = os.environ.get(f"SIMSERVE_{f.name.upper()}")
            if env is not None:
                kw[f.name] = type(f.default)(env) if not isinstance(f.default, bool) else env.lower() in ("1", "true", "yes")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


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
    """The status for one of the runtime's exceptions (``_OURS``); anything else escapes."""
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
    """Map the runtime's exceptions to status codes; nothing else escapes as UNKNOWN.

    Wraps plain handlers (run on the server's thread pool) and ``async def`` ones
    (run on its event loop) alike. A plain handler's RPC gets a CancelScope that the
    end of the RPC (cancelled, timed out or done) cancels, so abandoned work leaves
    the queue."""
    if inspect.iscoroutinefunction(fn):

        async def async_wrapper(self, request, context):
            # No CancelScope: gRPC cancels this task when the client leaves or its deadline
            # passes, and the batcher's run_async cancels the task's queued work then.
            try:
                return await fn(self, request, context)
            except _OURS as e:
                await context.abort(*_status(e))

        async_wrapper.__name__ = fn.__name__
        return async_wrapper

    def wrapper(self, request, context):
        scope = CancelScope(_timeout(context))
        context.add_callback(scope.cancel)
        try:
            with scope.active():
                return fn(self, request, context)
        except _OURS as e:
            context.abort(*_status(e))

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


def _metadata(text: str, where: str, limit: int) -> dict | None:
    if not text:
        return None
    if len(text.encode()) > limit:
        raise RequestError("too_large", f"{where}: metadata is {len(text.encode())} bytes; the limit is {limit}")
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError) as e:
        raise RequestError("invalid", f"{where}: metadata_json is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError("invalid", f"{where}: metadata_json is nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError("invalid", f"{where}: metadata_json must be a JSON object")
    return value


class SimilarityService(pb_grpc.SimilarityServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # Embed, ScorePairs and Search are coroutines: they decode on the event loop and await
    # the batcher, so a waiting request holds no thread (1.28x the thread-per-request server
    # in interleaved rounds); Search scans the index on a worker thread. The Index methods
    # block on SQLite and run on the thread pool.
    @_guard
    async def ScorePairs(self, request, context):
        pairs = [(_ref(p.a), _ref(p.b)) for p in request.pairs]
        scores, cosine, thr = await self.rt.score_pairs_async(pairs, request.collection or None, request.threshold, _timeout(context))
        return pb.ScorePairsResponse(
            scores=[pb.PairScore(score=float(s), match=bool(s >= thr), cosine=float(c)) for s, c in zip(scores, cosine)],
            threshold=thr,
            model=self.rt.model_name,
        )

    @_guard
    async def Embed(self, request, context):
        embs = await self.rt.embed_async([_ref(i) for i in request.images], request.collection or None, _timeout(context))
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=e.tolist()) for e in embs], dim=embs.shape[1], model=self.rt.model_name)

    @_guard
    async def Search(self, request, context):
        if not request.HasField("query") or request.query.WhichOneof("source") is None:
            raise RequestError("invalid", "query: set image data or key")
        hits = await self.rt.search_async(_ref(request.query), request.collection or None, request.k, request.rerank, dict(request.filter), _timeout(context))
        return pb.SearchResponse(
            neighbors=[
                pb.Neighbor(key=h.key, score=h.score, metadata_json=json.dumps(h.metadata) if h.metadata else "", head_score=h.head_score, inliers=h.inliers)
                for h in hits
            ]
        )


class IndexService(pb_grpc.IndexServicer):
    def __init__(self, rt: Runtime, metrics: Metrics) -> None:
        self.rt, self.metrics = rt, metrics

    def _add(self, request, context) -> list[str]:
        lim = self.rt.limits.max_metadata_bytes
        items = [(it.key, it.image, _metadata(it.metadata_json, f"items[{i}]", lim)) for i, it in enumerate(request.items)]
        keys = self.rt.add(request.collection or None, items, _timeout(context))
        name = request.collection or self.rt.default_collection
        self.metrics.items.labels(name).set(self.rt.collection(name).store.count())
        return keys

    @_guard
    def Add(self, request, context):
        keys = self._add(request, context)
        return pb.AddResponse(added=len(keys), keys=keys)

    @_guard
    def AddStream(self, request_iterator, context):
        keys: list[str] = []
        for request in request_iterator:
            keys.extend(self._add(request, context))  # each message committed as it arrives
        return pb.AddResponse(added=len(keys), keys=keys)

    @_guard
    def Remove(self, request, context):
        col = self.rt.collection(request.collection or None)
        found = col.remove(list(request.keys))
        return pb.RemoveResponse(removed=len(found), not_found=[k for k in request.keys if k not in found])

    @_guard
    def Get(self, request, context):
        col = self.rt.collection(request.collection or None)
        got = col.get(list(request.keys))
        items = [
            pb.Item(key=k, metadata_json=json.dumps(it.metadata) if it.metadata else "", vector=it.vector.tolist() if request.include_vectors else [], added_unix=it.added)
            for k, it in got.items()
        ]
        return pb.GetResponse(items=items, not_found=[k for k in request.keys if k not in got])

    @_guard
    def Stats(self, request, context):
        s = self.rt.collection(request.collection or None).stats()
        self.metrics.items.labels(s["name"]).set(s["items"])
        return pb.StatsResponse(
            collection=s["name"], items=s["items"], indexed=s["indexed"], dim=s["dim"], factory=s["factory"],
            index_type=s["index_type"], index_bytes=s["index_bytes"], pending_training=s["pending_training"],
            buffered=s["buffered"], crop_views=s["crop_views"], verify=s["verify"],
        )

    @_guard
    def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(collections=self.rt.collections.names())


class _Interceptor(grpc.aio.ServerInterceptor):
    """Auth (bearer token), request ids, metrics and one JSON log line per RPC."""

    def __init__(self, metrics: Metrics, token: str) -> None:
        self.metrics, self.token = metrics, token
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (its handler, the wrapped one)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        # A method's handler is the same object on every call: wrap it once, not per RPC
        # (building closures and a handler per call was measurable on the event loop).
        hit = self._wrapped.get(details.method)
        if hit is None or hit[0] is not handler:
            hit = self._wrapped[details.method] = (handler, self._wrap(details.method, handler))
        return hit[1]

    def _wrap(self, method: str, handler):
        def start(context) -> tuple["_Call", "_Recorded", bool]:
            md = dict(context.invocation_metadata() or ())
            call = _Call(self.metrics, method, md.get("x-request-id") or os.urandom(8).hex())
            authorized = not self.token or method.startswith(OPEN_METHODS) or md.get("authorization") == f"Bearer {self.token}"
            return call, call.begin(context), authorized

        def refusal(request, authorized: bool) -> tuple[grpc.StatusCode, str] | None:
            if not authorized:
                return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
            if isinstance(request, _Malformed):
                return grpc.StatusCode.INVALID_ARGUMENT, request.message(method)
            return None

        def wrap(behaviour, streaming_request: bool):
            if inspect.iscoroutinefunction(behaviour):

                async def async_inner(request, context):
                    call, context, authorized = start(context)
                    try:
                        if (err := refusal(request, authorized)) is not None:
                            await context.abort(*err)
                        return await behaviour(request, context)
                    except BaseException as e:
                        call.failed(e)
                        raise
                    finally:
                        call.end()

                return async_inner

            def inner(request_or_iter, context):
                call, context, authorized = start(context)
                try:
                    if (err := refusal(None if streaming_request else request_or_iter, authorized)) is not None:
                        context.abort(*err)
                    if streaming_request:
                        request_or_iter = _parsed_or_abort(request_or_iter, context, method)
                    return behaviour(request_or_iter, context)
                except BaseException as e:
                    call.failed(e)
                    raise
                finally:
                    call.end()

            return inner

        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), parse, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True), parse, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False), parse, handler.response_serializer)
        return handler  # stream-stream (reflection): no wrapping


class _Call:
    """One RPC's bookkeeping: its request id in the trailers, its status in the metrics and the log."""

    def __init__(self, metrics: Metrics, method: str, request_id: str) -> None:
        self.metrics, self.method, self.request_id = metrics, method, request_id
        self.code = ""

    def begin(self, context) -> "_Recorded":
        self.t0 = time.perf_counter()
        context.set_trailing_metadata((("x-request-id", self.request_id),))
        self.context = _Recorded(context)
        return self.context

    def failed(self, e: BaseException) -> None:
        if self.context.status is None:
            self.code = "CANCELLED" if isinstance(e, asyncio.CancelledError) else "UNKNOWN"
        if self.code == "UNKNOWN":
            log.error("unhandled error", exc_info=e, extra={"request_id": self.request_id, "method": self.method})

    def end(self) -> None:
        context = self.context
        code = context.status.name if context.status is not None else self.code or "OK"
        ms = (time.perf_counter() - self.t0) * 1e3
        self.metrics.requests.labels(self.method, code).inc()
        self.metrics.latency.labels(self.method).observe(ms / 1e3)
        if not self.method.startswith(OPEN_METHODS):
            log.info("rpc", extra={"request_id": self.request_id, "method": self.method, "code": code, "ms": round(ms, 2), "peer": context.peer()})


class _Recorded:
    """A handler's context that notes the status the handler sets: the aio server's context
    for thread-pool handlers has no ``code()`` to ask afterwards."""

    def __init__(self, context) -> None:
        self._context, self.status = context, None

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self.status = code
        return self._context.abort(code, details, trailing_metadata)  # a coroutine on the event loop

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = code
        self._context.set_code(code)

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class _Malformed:
    """Request bytes that are not the method's message. gRPC would answer INTERNAL
    ("Exception deserializing request!"); it is the client's error, so the handler
    answers INVALID_ARGUMENT instead."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self, method: str) -> str:
        return f"the request is not a valid {method.rsplit('/', 1)[-1]} message ({type(self.error).__name__}: {self.error})"


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises on garbage
            return _Malformed(e)

    return parse


def _parsed_or_abort(requests, context, method: str):
    for r in requests:
        if isinstance(r, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, r.message(method))
        yield r


class _Loop:
    """An asyncio event loop on its own thread: the aio server lives there, and the
    synchronous world (CLI, tests, signal handlers) drives it with ``call``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    runtime: Runtime
    health: health.aio.HealthServicer
    port: int
    metrics_port: int | None
    config: ServerConfig
    _loop: _Loop
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, let in-flight ones finish, flush the index."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = grace if grace is not None else self.config.grace_s
        log.info("shutting down", extra={"grace_s": grace})
        self._loop.call(self.health.enter_graceful_shutdown())
        self._loop.call(self.server.stop(grace))
        self.runtime.close()
        self._loop.close()
        log.info("stopped")

    def wait(self) -> None:
        self._loop.call(self.server.wait_for_termination())


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def start(cfg: ServerConfig) -> RunningServer:
    """Load the model and the index, then open the port; health says SERVING only after both."""
    t0 = time.perf_counter()
    if cfg.verify:
        require_opencv()
    metrics = Metrics()
    engine = load_engine(cfg.bundle or None, cfg.backend, threads=cfg.threads or default_threads(), max_batch=max(cfg.max_batch, 64))
    # OpenMP's thread count is per thread, so it is set in each handler thread as it searches
    # (the main thread's setting does not reach them): single queries are ~3x faster on 1 thread.
    collections = Collections(cfg.data_dir or default_data_dir(), tuning=IndexTuning(search_threads=cfg.faiss_threads or default_threads()))
    runtime = Runtime(
        engine, collections, default_collection=cfg.collection, factory=cfg.factory, crop_views=cfg.crop_views, verify=cfg.verify,
        max_batch=cfg.max_batch,
        max_delay_ms=cfg.max_delay_ms, max_queue=cfg.max_queue, limits=Limits(max_pixels=cfg.max_pixels, max_items=cfg.max_items),
        on_batch=metrics.on_batch,
    )
    loop = _Loop()
    try:
        server, health_servicer, port = loop.call(_open(cfg, runtime, metrics))
    except BaseException:
        loop.close()
        runtime.close()
        raise
    metrics_port = metrics.serve(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    for name in ("",) + SERVICES:
        loop.call(health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    log.info(
        "serving",
        extra={
            "address": f"{cfg.host}:{port}", "tls": bool(cfg.tls_cert), "mtls": bool(cfg.tls_client_ca), "auth": bool(cfg.token),
            "metrics_port": metrics_port, "model": runtime.model_name, "data_dir": str(collections.root.parent),
            "startup_s": round(time.perf_counter() - t0, 3),
        },
    )
    return RunningServer(server, runtime, health_servicer, port, metrics_port, cfg, loop)


async def _open(cfg: ServerConfig, runtime: Runtime, metrics: Metrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The aio server, on the loop's thread: coroutine handlers run on the loop, plain ones on
    ``cfg.workers`` threads."""
    size = cfg.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="rpc"),
        interceptors=[_Interceptor(metrics, cfg.token)],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size), ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("",) + SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pb_grpc.add_SimilarityServicer_to_server(SimilarityService(runtime), server)
    pb_grpc.add_IndexServicer_to_server(IndexService(runtime, metrics), server)
    reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(_read(cfg.tls_key), _read(cfg.tls_cert))],
            root_certificates=_read(cfg.tls_client_ca) if cfg.tls_client_ca else None,
            require_client_auth=bool(cfg.tls_client_ca),
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    return server, health_servicer, port


def serve_forever(cfg: ServerConfig) -> int:
    running = start(cfg)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal", extra={"signal": signal.Signals(signum).name})
        threading.Thread(target=lambda: (running.stop(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(0.5):
        pass
    return 0
