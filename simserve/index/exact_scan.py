"""Exact inner-product top-k over a flat index's vectors, as one matrix product in ONNX Runtime.

faiss-cpu's BLAS runs generic kernels on this CPU, so a search's 19 query views against 100,100
vectors took 26 ms through ``IndexFlatIP``; ORT's MLAS has kernels for the CPU it runs on and
takes 10.5 (one query 100 deep: 3.8 against 5.5), with the same top k
(docs/decisions/exact-scan.md). The vectors are read where FAISS keeps them, not copied.

From QUANTIZED_FROM rows, a scan first ranks by int8 codes of the vectors (``Codes``: a quarter
of the memory to stream, and MLAS's integer kernels) and scores the best ``depth(k)`` of them
exactly: a third of the float scan's time at 100,100 rows. The scores returned are exact; which
rows make the top k differs from a float scan only among near-ties at its edge.
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

# The graphs, built by ``graph()`` and kept as files so the serving install needs no ``onnx``
# package (tests/test_exact_scan.py checks they agree): "float" is Gemm (queries x vectors^T) then
# TopK; "int8" is MatMulInteger (codes x queries' codes^T) then TopK over the rows.
GRAPHS = {"float": Path(__file__).with_name("exact_scan.onnx"), "int8": Path(__file__).with_name("int8_scan.onnx")}

# Below this many rows the float scan is ~1 ms a query already, and exact to the last rank.
QUANTIZED_FROM = 20_000
# A code is round(x * SCALE), clipped to +-127: the components of unit-length embeddings stay under
# 0.5 (0.43 the largest of 100,100), and a score's error is then ~0.002 (0.009 the largest seen).
SCALE = 254.0
_ZERO = np.array(128, np.uint8)  # codes are stored as uint8 (MLAS's fast u8 x s8 form): code + 128
_CHUNK = 4096  # rows encoded at a time, in a buffer that stays in cache: 100,100 rows in ~10 ms, not ~40

_sessions: dict[tuple[str, int], object] = {}
_lock = threading.Lock()


def depth(k: int) -> int:
    """How many rows the int8 ranking hands to the exact scores for a top k: scores of real
    embeddings crowd together (a hundred crops of one scene), and 2k + 32 kept the first hits
    of every search the same (docs/decisions/exact-scan.md)."""
    return 2 * k + 32


class Codes:
    """The int8 codes of a flat index's rows, kept beside FAISS's floats: grown as rows are
    appended, and compacted as FAISS compacts its rows on a removal (``drop``)."""

    def __init__(self) -> None:
        self._buf = np.zeros((0, 0), np.uint8)
        self._n = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def __len__(self) -> int:
        """Rows encoded: none for an index never scanned by codes (below QUANTIZED_FROM rows)."""
        return self._n

    def reset(self) -> None:
        with self._lock:
            self._n = 0

    def drop(self, gone: np.ndarray) -> None:
        """Rows marked in ``gone`` (a mask over the rows before a removal) were removed, the rest
        kept in order, as FAISS's flat indexes remove: a removal need not encode every row again."""
        with self._lock:
            if len(gone) != self._n:  # not the rows these codes describe: encode afresh when next asked
                self._n = 0
                return
            keep = self._buf[: self._n][~gone]
            self._buf[: len(keep)] = keep
            self._n = len(keep)

    def of(self, vectors: np.ndarray) -> np.ndarray:
        """The codes of ``vectors`` (the index's rows now), encoding only rows added since last asked."""
        n, d = vectors.shape
        with self._lock:
            if self._n > n or self._buf.shape[1] != d:
                self._n = 0
            if len(self._buf) < n:  # grown by a quarter at a time: a 1M-row index holds 128 MB of codes
                buf = np.empty((max(n, len(self._buf) * 5 // 4), d), np.uint8)
                if self._n:
                    buf[: self._n] = self._buf[: self._n]
                self._buf = buf
            tmp = np.empty((min(_CHUNK, n), d), np.float32)
            for i in range(self._n, n, _CHUNK):
                t = _codes_into(tmp[: min(n, i + _CHUNK) - i], vectors[i : i + _CHUNK])
                self._buf[i : i + len(t)] = np.add(t, 128, out=t)  # as stored: code + 128
            self._n = n
            return self._buf[:n]


def encode(x: np.ndarray) -> np.ndarray:
    """Vectors -> int8 codes, round(x * SCALE) clipped to +-127."""
    x = np.asarray(x, np.float32)
    return _codes_into(np.empty(x.shape, np.float32), x).astype(np.int8)


def _codes_into(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """round(x * SCALE) clipped to +-127, written into ``out`` (float32, x's shape) in place."""
    np.multiply(x, SCALE, out=out)
    np.rint(out, out=out)
    return np.clip(out, -127, 127, out=out)


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


def search(vectors: np.ndarray, queries: np.ndarray, k: int, threads: int | None = None, codes: Codes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top k (scores, row numbers) per query by inner product, best first; k <= len(vectors).
    With ``codes`` (the vectors' ``Codes``) and at least QUANTIZED_FROM rows, ranked by the codes first."""
    q = np.ascontiguousarray(queries, np.float32)
    block = max(1, MAX_SCORES // len(vectors))
    threads = threads or os.cpu_count() or 1
    if codes is None or len(vectors) < QUANTIZED_FROM or depth(k) >= len(vectors):
        session, kk = _session("float", threads), np.array([k], np.int64)
        parts = [session.run(None, {"q": q[i : i + block], "x": vectors, "k": kk}) for i in range(0, len(q), block)]
        return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])
    session, x, kk = _session("int8", threads), codes.of(vectors), np.array([depth(k)], np.int64)
    q8 = encode(q)
    rows = np.concatenate([session.run(["rows"], {"x": x, "qt": np.ascontiguousarray(q8[i : i + block].T), "zero": _ZERO, "k": kk})[0].T for i in range(0, len(q), block)])
    exact = np.einsum("nkd,nd->nk", vectors[rows], q)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, best, axis=1), np.take_along_axis(rows, best, axis=1)


def _session(kind: str, threads: int):
    with _lock:
        if (kind, threads) not in _sessions:
            _sessions[kind, threads] = _build(kind, threads)
        return _sessions[kind, threads]


def graph(kind: str = "float") -> bytes:
    """A scan's ONNX graph, "float" or "int8" (needs the ``onnx`` package, which training installs)."""
    from onnx import TensorProto, helper

    io = helper.make_tensor_value_info
    k = io("k", TensorProto.INT64, [1])
    if kind == "float":
        g = helper.make_graph(
            [helper.make_node("Gemm", ["q", "x"], ["s"], transB=1), helper.make_node("TopK", ["s", "k"], ["scores", "rows"], axis=1)],
            "exact_scan",
            [io("q", TensorProto.FLOAT, ["n", "d"]), io("x", TensorProto.FLOAT, ["N", "d"]), k],
            [io("scores", TensorProto.FLOAT, ["n", "k"]), io("rows", TensorProto.INT64, ["n", "k"])],
        )
    else:  # codes [N, d] (uint8, zero point 128) x queries' codes^T [d, n] (int8): [N, n] int32, top k of each column
        g = helper.make_graph(
            [helper.make_node("MatMulInteger", ["x", "qt", "zero"], ["s"]), helper.make_node("TopK", ["s", "k"], ["scores", "rows"], axis=0)],
            "int8_scan",
            [io("x", TensorProto.UINT8, ["N", "d"]), io("qt", TensorProto.INT8, ["d", "n"]), io("zero", TensorProto.UINT8, []), k],
            [io("scores", TensorProto.INT32, ["k", "n"]), io("rows", TensorProto.INT64, ["k", "n"])],
        )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="simserve")
    model.ir_version = 8
    return model.SerializeToString()


def _build(kind: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle pool threads would otherwise spin on the cores the engine and verification need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(GRAPHS[kind].read_bytes(), opts, providers=["CPUExecutionProvider"])
