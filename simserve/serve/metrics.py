"""Prometheus metrics, in a registry of their own (several servers can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import GC_COLLECTOR, CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from simserve.serve.batcher import BatchDone

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # What an operator expects of any process: RSS, CPU seconds, open and max descriptors, GC.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        if GC_COLLECTOR is not None:
            GCCollector(registry=r)
        self.requests = Counter("simserve_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram("simserve_request_seconds", "RPC latency", ["method"], registry=r, buckets=_SECONDS[1:])
        self.in_flight = Gauge("simserve_in_flight_requests", "RPCs being handled now", ["method"], registry=r)
        self.batch_size = Histogram("simserve_batch_size", "images per engine call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("simserve_queue_depth", "images waiting for the engine", registry=r)
        self.queue_wait = Histogram("simserve_queue_wait_seconds", "time an image waited for the engine", registry=r, buckets=_SECONDS)
        self.engine = Histogram("simserve_engine_seconds", "time of one engine call (a batch)", registry=r, buckets=_SECONDS)
        self.searches_cut = Counter("simserve_searches_cut", "searches that answered at their budget (--search-budget-ms) with candidates left unverified", registry=r)
        self.decode = Histogram("simserve_decode_seconds", "time to decode one image (model pixels or keypoint image)", registry=r, buckets=_SECONDS)

    def on_batch(self, done: BatchDone) -> None:
        self.batch_size.observe(done.size)
        self.queue_depth.set(done.depth)
        self.engine.observe(done.seconds)
        for w in done.waits:
            self.queue_wait.observe(w)

    def watch_collections(self, census: Callable[[], dict[str, tuple[int, int | None]]]) -> None:
        """Items and bytes of every collection on disk, read at each scrape (``census``:
        ``Collections.census``), not only those used since start."""
        self.registry.register(_Collections(census))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class _Collections:
    def __init__(self, census: Callable[[], dict[str, tuple[int, int | None]]]) -> None:
        self.census = census

    def describe(self) -> list:
        return []  # unknown until scraped: the registry then calls collect() only at scrape time

    def collect(self):
        items = GaugeMetricFamily("simserve_collection_items", "items per collection on disk", labels=["collection"])
        size = GaugeMetricFamily("simserve_collection_bytes", "bytes on disk per collection (SQLite, WAL, index snapshot)", labels=["collection"])
        for name, (n, b) in self.census().items():
            items.add_metric([name], n)
            if b is not None:  # an index held elsewhere (Milvus) has no bytes here
                size.add_metric([name], b)
        yield items
        yield size
