"""Exact inner-product top-k over a flat index's vectors, as one matrix product in ONNX Runtime.

faiss-cpu's BLAS runs generic kernels on this CPU, so a search's 19 query views against 100,100
vectors took 26 ms through ``IndexFlatIP``; ORT's MLAS has kernels for the CPU it runs on and
takes 10.5 (one query 100 deep: 3.8 against 5.5), with the same top k
(docs/decisions/exact-scan.md). The vectors are read where FAISS keeps them, not copied.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import faiss
import numpy as np

# At most this many scores are held at once (64 MB): queries are scanned in blocks, so a batch
# of thousands against a million vectors does not build a [queries, vectors] matrix.
MAX_SCORES = 16 * 2**20

# The graph: Gemm (queries x vectors^T) then TopK, built by ``graph()`` and kept as a file so the
# serving install needs no ``onnx`` package (tests/test_exact_scan.py checks the two agree).
GRAPH = Path(__file__).with_name("exact_scan.onnx")

_sessions: dict[int, object] = {}
_lock = threading.Lock()


def flat_rows(index: faiss.Index) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(vectors [n, d], their ids or None for row numbers) of an inner-product flat index, with or
    without an id map, as views of FAISS's memory (valid until it next changes); None for others."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if type(inner) not in (faiss.IndexFlat, faiss.IndexFlatIP) or inner.metric_type != faiss.METRIC_INNER_PRODUCT or inner.ntotal == 0:
        return None
    n, d = int(inner.ntotal), int(inner.d)
    vectors = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), n) if isinstance(index, faiss.IndexIDMap2) else None
    return vectors, ids


def search(vectors: np.ndarray, queries: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top k (scores, row numbers) per query by inner product, best first; k <= len(vectors)."""
    session = _session(threads or os.cpu_count() or 1)
    q = np.ascontiguousarray(queries, np.float32)
    kk = np.array([k], np.int64)
    block = max(1, MAX_SCORES // len(vectors))
    parts = [session.run(None, {"q": q[i : i + block], "x": vectors, "k": kk}) for i in range(0, len(q), block)]
    return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])


def _session(threads: int):
    with _lock:
        if threads not in _sessions:
            _sessions[threads] = _build(threads)
        return _sessions[threads]


def graph() -> bytes:
    """The scan's ONNX graph (needs the ``onnx`` package, which training installs)."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Gemm", ["q", "x"], ["s"], transB=1), helper.make_node("TopK", ["s", "k"], ["scores", "rows"], axis=1)],
        "exact_scan",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["n", "d"]), helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "d"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "k"]), helper.make_tensor_value_info("rows", TensorProto.INT64, ["n", "k"])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="simserve")
    model.ir_version = 8
    return model.SerializeToString()


def _build(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle pool threads would otherwise spin on the cores the engine and verification need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(GRAPH.read_bytes(), opts, providers=["CPUExecutionProvider"])
