"""Where collections live, chosen by name: the embedded SQLite + FAISS default, or a shared Milvus."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simserve.index.collection import Collections, default_data_dir
from simserve.index.vector_index import IndexTuning

if TYPE_CHECKING:
    from simserve.index.milvus import MilvusCollections

BACKENDS = ("embedded", "milvus")


def open_collections(
    backend: str = "embedded", data_dir: str | Path | None = None, milvus_uri: str = "", milvus_token: str = "", tuning: IndexTuning | None = None
) -> "Collections | MilvusCollections":
    """``embedded``: one process owns ``data_dir``; ``milvus``: every process pointed at
    ``milvus_uri`` (a Milvus Lite file, or http://host:port of a Milvus server) shares it."""
    if backend == "embedded":
        return Collections(data_dir or default_data_dir(), tuning=tuning)
    if backend != "milvus":
        raise ValueError(f"index backend {backend!r}: one of {', '.join(BACKENDS)}")
    if not milvus_uri:
        raise ValueError("the milvus index backend needs --milvus-uri (http://host:19530, or a Milvus Lite file such as ./index.db)")
    try:
        from simserve.index.milvus import MilvusCollections
    except ImportError:
        raise ValueError("the milvus index backend needs pymilvus: pip install 'simserve[milvus]'") from None
    return MilvusCollections(milvus_uri, milvus_token, tuning)
