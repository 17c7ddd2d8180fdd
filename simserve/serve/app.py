"""The gRPC server: Similarity + Index services, health, reflection, auth, metrics.

``simserve serve`` with no options serves the shipped default model and a
``default`` collection on 127.0.0.1:50051. Every request is logged as one
JSON line with a request id; errors are status codes whose message says
exactly what was wrong. SIGTERM: health goes NOT_SERVING, new RPCs are
refused, in-flight ones finish, the index is snapshotted, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from simserve.index.backends import open_collections
from simserve.index.vector_index import IndexTuning
from simserve.inference.engine import default_threads, load_engine
from simserve.ranking.verify import require as require_opencv
from simserve.serve.config import ServerConfig
from simserve.serve.handlers import IndexService, SimilarityService
from simserve.serve.interceptor import Interceptor
from simserve.serve.metrics import Metrics
from simserve.serve.service import Service
from simserve.v1 import simserve_pb2_grpc as pb_grpc

__all__ = ["RunningServer", "ServerConfig", "serve_forever", "start"]

log = logging.getLogger("simserve.server")
SERVICES = ("simserve.v1.Similarity", "simserve.v1.Index")


class _Loop:
    """An asyncio event loop on its own thread: the aio server lives there, and the
    synchronous world (CLI, tests, signal handlers) drives it with ``call``. Its default
    executor, which ``asyncio.to_thread`` uses, holds the ``workers`` threads for blocking work."""

    def __init__(self, workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"))
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
    service: Service
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
        self.service.close()
        self._loop.close()
        log.info("stopped")

    def wait(self) -> None:
        self._loop.call(self.server.wait_for_termination())


def _raise_descriptor_limit() -> int:
    """Soft open-file limit up to the hard one: each open collection holds SQLite files on every
    worker thread that used it, and a 1,024 default runs out long before memory does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start(cfg: ServerConfig) -> RunningServer:
    """Load the model and the index, then open the port; health says SERVING only after both."""
    t0 = time.perf_counter()
    descriptors = _raise_descriptor_limit()
    if cfg.verify:
        require_opencv()
    metrics = Metrics()
    engine = load_engine(cfg.bundle or None, cfg.backend, threads=cfg.threads or default_threads(), max_batch=max(cfg.max_batch, 64))
    # OpenMP's thread count is per thread, so it is set in each worker thread as it searches
    # (the main thread's setting does not reach them): single queries are ~3x faster on 1 thread.
    tuning = IndexTuning(search_threads=cfg.faiss_threads or default_threads())
    collections = open_collections(cfg.index_backend, cfg.data_dir or None, cfg.milvus_uri, cfg.milvus_token, tuning)
    service = Service(engine, collections, cfg, on_batch=metrics.on_batch, on_decode=metrics.decode.observe, on_cut=metrics.searches_cut.inc)
    metrics.watch_collections(collections.census)
    loop = _Loop(cfg.workers)
    try:
        server, health_servicer, port = loop.call(_open(cfg, service, metrics))
    except BaseException:
        loop.close()
        service.close()
        raise
    metrics_port = metrics.serve(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    # What startup loaded (the model's runtime, OpenCV, FAISS, gRPC: ~60k objects) lives as long as
    # the server; left to the collector, each full pass walks all of it with the GIL held (25-45 ms
    # here), in the middle of whichever request triggers it. Frozen, a pass walks only what came after.
    gc.collect()
    gc.freeze()
    for name in ("",) + SERVICES:
        loop.call(health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    log.info(
        "serving",
        extra={
            "address": f"{cfg.host}:{port}", "tls": bool(cfg.tls_cert), "mtls": bool(cfg.tls_client_ca), "auth": bool(cfg.token),
            "metrics_port": metrics_port, "model": service.model_name, "index": f"{cfg.index_backend}:{collections.location}",
            "startup_s": round(time.perf_counter() - t0, 3), "open_files_limit": descriptors,
        },
    )
    return RunningServer(server, service, health_servicer, port, metrics_port, cfg, loop)


async def _open(cfg: ServerConfig, service: Service, metrics: Metrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The aio server, on the loop's thread: every handler is a coroutine on the loop."""
    size = cfg.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=[Interceptor(metrics, cfg.token)],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size), ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("",) + SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pb_grpc.add_SimilarityServicer_to_server(SimilarityService(service), server)
    pb_grpc.add_IndexServicer_to_server(IndexService(service), server)
    reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(_read(cfg.tls_key), _read(cfg.tls_cert))],
            root_certificates=_read(cfg.tls_client_ca) if cfg.tls_client_ca else None,
            require_client_auth=bool(cfg.tls_client_ca),
        )
    try:
        port = server.add_secure_port(address, creds) if cfg.tls_cert else server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind": the port is taken, or the host is not ours
        port = 0
    if port == 0:
        raise OSError(f"could not listen on {address}: the port is in use or the address is not this machine's (--host, --port)")
    await server.start()
    return server, health_servicer, port


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


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
