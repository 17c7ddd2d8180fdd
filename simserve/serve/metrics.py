"""Prometheus metrics, in a registry of their own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("simserve_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram(
            "simserve_request_seconds", "RPC latency", ["method"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_size = Histogram("simserve_batch_size", "images per engine call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("simserve_queue_depth", "images waiting for the engine", registry=r)
        self.items = Gauge("simserve_collection_items", "items per collection", ["collection"], registry=r)

    def on_batch(self, size: int, depth: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(depth)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
