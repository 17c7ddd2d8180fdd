"""Inference engines: one interface, two backends.

- ``onnx`` (default, the serving backend): ONNX Runtime over the bundle's
  graphs; needs neither torch nor the training code.
- ``torch`` (the reference): the eager model rebuilt from the manifest's
  config and the bundle's npz weights; used to check parity.

Arrays in, arrays out: ``embed`` takes preprocessed NCHW float32 and returns
(features, L2-normalised embeddings); ``fuse`` takes two feature batches and
returns scores in [0, 1]. The image-level helpers sit on top.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from simserve.inference.bundle import HEAD_FILE, TOWER_FILE, WEIGHTS_FILE, Bundle, BundleError, load_bundle
from simserve.inference.pixels import normalize, to_pixels

BACKENDS = ("onnx", "torch")


SPIN = os.environ.get("SIMSERVE_ORT_SPIN", "0") == "1"  # see OnnxEngine


def default_threads() -> int:
    """All the cores this process may use (respects taskset / cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Engine(ABC):
    def __init__(self, bundle: Bundle, max_batch: int = 64) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.max_batch = max_batch

    @abstractmethod
    def _embed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def _fuse(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray: ...

    def embed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, C, S, S] -> (features [n, C', h, w], embeddings [n, d]).

        uint8 input is raw pixels (from ``to_pixels`` / the decode pool) and is
        normalised here, a batch at a time; float32 input is taken as normalised.
        """
        if x.dtype == np.uint8:
            x = normalize(x, self.config.mean, self.config.std)
        if len(x) == 0:
            d = self.bundle.embedding_dim
            return np.zeros((0, *self.bundle.manifest["feature_shape"]), np.float32), np.zeros((0, d), np.float32)
        parts = [self._embed(x[s : s + self.max_batch]) for s in range(0, len(x), self.max_batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def fuse(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        """Two feature batches -> similarity scores in [0, 1] (symmetric)."""
        if len(fa) == 0:
            return np.zeros((0,), np.float32)
        return np.concatenate([self._fuse(fa[s : s + self.max_batch], fb[s : s + self.max_batch]) for s in range(0, len(fa), self.max_batch)])

    # Whether the tower takes images of any size (bundles exported before it did take only
    # input_size: their query regions are embedded as 16 crops instead of pooled from one pass).
    any_size = True

    def pool(self, features: np.ndarray, windows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        """A [1, C', H, W] feature map -> [len(windows), d]: each (row, col, height, width) window
        pooled and projected as the tower pools a whole image (GeM, its projection, L2 norm), so a
        region of an image gets its embedding without a pass of its own (inference/crops.py)."""
        if not hasattr(self, "_pooling"):
            with np.load(self.bundle.file(WEIGHTS_FILE), allow_pickle=False) as w:
                self._pooling = float(np.clip(w["tower.gem_p"], 1.0, 8.0)), w["tower.proj.weight"].T.copy(), w["tower.proj.bias"].copy()
        p, weight, bias = self._pooling
        f = np.maximum(features[0], 1e-6)
        pooled = np.stack([(f[:, r : r + h, c : c + w] ** p).mean(axis=(1, 2)) ** (1 / p) for r, c, h, w in windows])
        out = pooled @ weight + bias
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def close(self) -> None:
        """Release the engine's threads; an engine is not used after this."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def split(self, lanes: int | None = None) -> list["Engine"]:
        """Engines that can run at the same time, one per thread (see simserve/jobs/lanes.py).
        By default the engine itself: one lane, however many threads it uses inside."""
        return [self]

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> uint8 pixels [n, C, S, S] for ``embed``."""
        c = self.config
        if not images:
            return np.zeros((0, c.in_channels, c.input_size, c.input_size), np.uint8)
        return np.stack([to_pixels(im, c.input_size, c.in_channels) for im in images])

    def embed_images(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return self.embed(self.preprocess(images))

    def score_images(self, pairs: Sequence[tuple[Image.Image, Image.Image]]) -> np.ndarray:
        """Each distinct image goes through the tower once, however many pairs use it."""
        index: dict[int, int] = {}
        unique: list[Image.Image] = []
        for a, b in pairs:
            for im in (a, b):
                if id(im) not in index:
                    index[id(im)] = len(unique)
                    unique.append(im)
        feats, _ = self.embed_images(unique)
        ia = np.array([index[id(a)] for a, _ in pairs], dtype=np.int64)
        ib = np.array([index[id(b)] for _, b in pairs], dtype=np.int64)
        return self.fuse(feats[ia], feats[ib])


class OnnxEngine(Engine):
    """ONNX Runtime over the bundle's graphs, as ``lanes`` single-threaded sessions.

    A batch is cut into one slice per lane and the lanes run at once (ORT releases
    the GIL). For this small tower on 2 cores that is ~1.1x one session with two
    intra-op threads and no spin-waiting (2,523 vs 2,300 img/s at batch 64, 2,782 vs
    2,460 at 16; each in its own process, alternated), about what ORT's spinning pool
    gets without burning idle CPU: an intra-op pool synchronises after every operator,
    and a 128 px depthwise conv is too short for that to pay (default model: lanes 1,766 img/s,
    ORT's default 1,439; `simserve bench engine`). ``lanes`` defaults to
    ``threads``; each session gets ``threads // lanes`` intra-op threads.
    """

    MIN_SLICE = 4  # fewer rows than this per lane are not worth a hand-off

    def __init__(self, bundle: Bundle, threads: int | None = None, max_batch: int = 64, spin: bool = SPIN, lanes: int | None = None) -> None:
        super().__init__(bundle, max_batch)
        import onnxruntime as ort

        threads = threads or default_threads()
        self.lanes = max(1, min(lanes or threads, threads))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads // self.lanes)
        # ORT's idle workers spin between ops by default, burning the cores that the decode
        # threads (batch jobs) and gRPC handlers (server) need at the same moment.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        try:
            self.towers = [ort.InferenceSession(str(bundle.file(TOWER_FILE)), opts, providers=providers) for _ in range(self.lanes)]
            self.heads = [ort.InferenceSession(str(bundle.file(HEAD_FILE)), opts, providers=providers) for _ in range(self.lanes)]
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for a file that is not a model
            raise BundleError(f"{bundle.path}: a model file does not load in ONNX Runtime ({str(e).splitlines()[0][:300]})") from None
        _check_graphs(bundle, self.towers[0], self.heads[0])
        self.any_size = all(isinstance(d, str) for d in self.towers[0].get_inputs()[0].shape[2:])
        # Lane 0 runs on the caller's thread; the others on these (one each, so never queued).
        self._pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="ort-lane") if self.lanes > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def split(self, lanes: int | None = None) -> list[Engine]:
        """One single-lane engine per lane (the first ``lanes`` of them), sharing this engine's sessions."""
        views = []
        for tower, head in list(zip(self.towers, self.heads))[: lanes or self.lanes]:
            v = copy.copy(self)
            v.lanes, v.towers, v.heads, v._pool = 1, [tower], [head], None
            views.append(v)
        return views

    def _parallel(self, sessions: list, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        k = min(self.lanes, max(1, n // self.MIN_SLICE))
        if k == 1:
            return sessions[0].run(None, feeds)
        bounds = np.linspace(0, n, k + 1).astype(int)
        parts = [{name: a[bounds[i] : bounds[i + 1]] for name, a in feeds.items()} for i in range(k)]
        futures = [self._pool.submit(sessions[i].run, None, parts[i]) for i in range(1, k)]
        outs = [sessions[0].run(None, parts[0])] + [f.result() for f in futures]
        return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]

    def _embed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, e = self._parallel(self.towers, {"images": np.ascontiguousarray(x, dtype=np.float32)})
        return f, e

    def _fuse(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        (s,) = self._parallel(self.heads, {"features_a": np.ascontiguousarray(fa, np.float32), "features_b": np.ascontiguousarray(fb, np.float32)})
        return s


def _fits(got: list, want: list) -> bool:
    """A graph's shape against the manifest's: a named (dynamic) size fits any (the tower's
    height and width are dynamic: a search pools its regions from one larger pass)."""
    return len(got) == len(want) and all(isinstance(g, str) or g == w for g, w in zip(got, want))


def _check_graphs(bundle: Bundle, tower, head) -> None:
    """The graphs' own shapes against the manifest: swapped or foreign model files fail here, at
    start, not on every request."""
    c, shape = bundle.config, list(bundle.manifest["feature_shape"])
    want_in = [c.in_channels, c.input_size, c.input_size]
    got_in = list(tower.get_inputs()[0].shape[1:])
    outs = {o.name: list(o.shape[1:]) for o in tower.get_outputs()}
    head_in = [list(i.shape[1:]) for i in head.get_inputs()]
    problems = []
    if len(tower.get_inputs()) != 1 or not _fits(got_in, want_in):
        problems.append(f"the tower takes {got_in}, the manifest says {want_in}")
    if len(outs) != 2 or not any(_fits(a, shape) and _fits(b, [bundle.embedding_dim]) for a, b in (list(outs.values()), list(outs.values())[::-1])):
        problems.append(f"the tower gives {list(outs.values())}, the manifest says features {shape} and a {bundle.embedding_dim}-d embedding")
    if len(head_in) != 2 or any(h != shape for h in head_in):
        problems.append(f"the head takes {head_in}, the manifest says two {shape} feature maps")
    if problems:
        raise BundleError(f"{bundle.path}: model files do not match the manifest: " + "; ".join(problems))


class TorchEngine(Engine):
    """Eager PyTorch, the reference for parity (imports torch and simserve.model)."""

    def __init__(self, bundle: Bundle, threads: int | None = None, max_batch: int = 64) -> None:
        super().__init__(bundle, max_batch)
        import torch

        from simserve.model import build_model

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = build_model(self.config)
        with np.load(bundle.file(WEIGHTS_FILE), allow_pickle=False) as w:
            self.model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files})
        self.model.eval()

    def _embed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.inference_mode():
            f, e = self.model.embed(self._torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return f.numpy(), e.numpy()

    def _fuse(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        t = self._torch
        with t.inference_mode():
            return t.sigmoid(self.model.fuse(t.from_numpy(np.ascontiguousarray(fa)), t.from_numpy(np.ascontiguousarray(fb)))).numpy()


def load_engine(
    bundle: str | os.PathLike | Bundle | None = None,
    backend: str = "onnx",
    threads: int | None = None,
    max_batch: int = 64,
    spin: bool = SPIN,
    lanes: int | None = None,
) -> Engine:
    """The engine for a bundle path (or the shipped default model when None)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if backend == "onnx":
        return OnnxEngine(b, threads, max_batch, spin, lanes)
    if backend == "torch":
        return TorchEngine(b, threads, max_batch)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
