"""``simserve bench engine``: ONNX Runtime vs eager torch, the decode pool, a roofline figure.

All candidates run in one process, in alternation, on the same inputs; the
figures are medians and the ratios are what to read.
"""

from __future__ import annotations

import os
import platform

import numpy as np

from simserve.bench.common import interleaved_medians, jpeg_crops, matmul_gflops, median_seconds
from simserve.inference.bundle import load_bundle
from simserve.inference.decode_pool import DecodePool
from simserve.inference.engine import default_threads, load_engine


def run(bundle: str | None = None, batch: int = 64, repeats: int = 15, threads: int | None = None, images: int = 512) -> dict:
    threads = threads or default_threads()
    b = load_bundle(bundle)
    cfg = b.config
    onnx = load_engine(b, "onnx", threads=threads, max_batch=batch)
    # onnx: as served (one single-threaded session per core, no spin-waiting); onnx_spin: ORT's
    # own defaults (one session, an intra-op pool that spin-waits between runs).
    engines = {"onnx": onnx, "onnx_spin": load_engine(b, "onnx", threads=threads, max_batch=batch, spin=True, lanes=1)}
    try:
        engines["torch"] = load_engine(b, "torch", threads=threads, max_batch=batch)
    except ImportError:
        pass

    blobs = jpeg_crops(images, 256)
    x = np.stack([a for a in DecodePool(cfg.input_size, cfg.in_channels, workers=1).map(blobs[:batch])])
    x2 = np.stack([a for a in DecodePool(cfg.input_size, cfg.in_channels, workers=1).map(blobs[batch : 2 * batch])])

    embed_t = interleaved_medians({k: (lambda e=e: e.embed(x)) for k, e in engines.items()}, repeats)

    def pair_fn(e):
        def f():
            fa, _ = e.embed(x)
            fb, _ = e.embed(x2)
            return e.fuse(fa, fb)

        return f

    pair_t = interleaved_medians({k: pair_fn(e) for k, e in engines.items()}, repeats)

    decode = {}
    for workers, processes in sorted({(1, False), (threads, False), (threads, True)}):
        with DecodePool(cfg.input_size, cfg.in_channels, workers=workers, processes=processes) as pool:
            secs = median_seconds(lambda: list(pool.map(blobs)), max(3, repeats // 3), warmup=1)
        decode[f"{'processes' if processes else 'threads'}_{workers}"] = len(blobs) / secs

    peak = matmul_gflops()
    tower_flops = b.manifest.get("cost", {}).get("tower_mflops", 0.0) * 1e6
    onnx_ips = batch / embed_t["onnx"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {threads} threads",
        "bundle": str(b.path),
        "batch": batch,
        "input_size": cfg.input_size,
        "embed_images_per_s": {k: batch / v for k, v in embed_t.items()},
        "pairs_per_s": {k: batch / v for k, v in pair_t.items()},
        "decode_images_per_s_256px_jpeg": decode,
        "matmul_peak_gflops": peak,
        "tower_mflops_per_image": tower_flops / 1e6,
        "achieved_tower_gflops_onnx": tower_flops * onnx_ips / 1e9,
    }
    if "torch" in engines:  # ORT as served (no spin-waiting) and with ORT's own default (spinning)
        for k in ("onnx", "onnx_spin"):
            result[f"{k}_vs_torch_embed"] = embed_t["torch"] / embed_t[k]
            result[f"{k}_vs_torch_pairs"] = pair_t["torch"] / pair_t[k]
    result["decode_vs_engine"] = max(decode[f"threads_{threads}"], decode[f"processes_{threads}"]) / onnx_ips
    result["roofline_fraction"] = result["achieved_tower_gflops_onnx"] / max(peak.values())
    return result
