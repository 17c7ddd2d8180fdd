"""The server's options: one object, read from flags and SIMSERVE_<NAME> variables, passed down whole."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from simserve.inference.decode import DEFAULT_MAX_PIXELS


@dataclass
class ServerConfig:
    """Every option; each is also settable as SIMSERVE_<NAME> in the environment."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = ""
    bundle: str = ""
    backend: str = "onnx"
    threads: int = 0  # engine threads (one single-threaded ORT session each); 0 = all cores
    faiss_threads: int = 1  # per index search (FAISS, or the exact scan): concurrent requests already use every core
    workers: int = 32  # threads for blocking work (SQLite, index scans, heavy decodes); handlers run on the event loop
    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    max_message_mb: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_budget_mb: int = 384  # decoded pixels in flight, server-wide: past it, heavy decodes wait their turn
    max_items: int = 1024  # images in one request; a pair is two
    max_k: int = 1000
    max_rerank: int = 1000
    max_key_bytes: int = 1024
    max_metadata_bytes: int = 64 * 1024
    max_filter_fields: int = 16  # each is a JSON path in one SQLite query
    collection: str = "default"
    max_collections: int = 100  # each open one holds SQLite connections (one per thread that used it) and its index
    factory: str = "Flat"
    index_backend: str = "embedded"  # or "milvus": every replica pointed at milvus_uri shares one index
    milvus_uri: str = ""  # http://host:19530 (Milvus, Milvus Lite server) or a Milvus Lite file
    milvus_token: str = ""  # "user:password" or an API key, when the Milvus server asks for one
    # The accurate configuration is the default (docs/decisions/deep-shortlist.md): new collections
    # index the whole image + 5 crops (inference/crops.py) and keep keypoints to verify their
    # searches (ranking/verify.py).
    crop_views: bool = True
    verify: bool = True
    # A crop-views collection's searches also look with the query turned and by regions of it
    # (inference/crops.query_view_inputs): 4 engine passes at 128 px and one at 320 a query, instead of 1.
    query_views: bool = True
    # A verifying search answers this long after its request came in, with what it has verified
    # (ranking/pipeline.Deadline; 0: never cut short). At 100,000 items on 2 cores, all 1,884
    # benchmark queries: p99 141 -> 95 ms, photographs recall@1 0.978 -> 0.975, µAP 0.975 -> 0.972
    # (the budget is wall-clock: µAP 0.967-0.972 by the hour; docs/decisions/search-budget.md).
    # A request's own timeout brings it forward.
    search_budget_ms: float = 90.0
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
