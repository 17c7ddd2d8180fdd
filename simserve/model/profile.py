"""Model cost figures: parameters, FLOPs per pair, CPU latency (medians)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from simserve.model import SiameseNet


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def flops_per_pair(model: SiameseNet) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of both towers and the head for one pair, counted by torch."""
    cfg = model.cfg
    model = model.eval()
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    with FlopCounterMode(display=False) as fc:
        fmap, _ = model.embed(x)
    tower = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.fuse(fmap, fmap)
    head = fc.get_total_flops()
    return {"tower_mflops": tower / 1e6, "head_mflops": head / 1e6, "pair_mflops": (2 * tower + head) / 1e6}


@torch.no_grad()
def interleaved_latency(models: dict[str, SiameseNet], batch: int = 64, repeats: int = 20, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Median eager-CPU milliseconds per batch of pairs, the whole pair and the head alone,
    for several models timed in alternation (so noise on a shared machine hits all alike)."""
    if threads:
        torch.set_num_threads(threads)
    fns: dict[tuple[str, str], object] = {}
    for name, model in models.items():
        cfg = model.cfg
        model = model.eval().to(memory_format=torch.contiguous_format)
        a = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        b = torch.randn_like(a)
        fa, _ = model.embed(a)
        fb, _ = model.embed(b)
        fns[(name, "pair_ms")] = lambda m=model, a=a, b=b: m.score(a, b)
        fns[(name, "head_ms")] = lambda m=model, fa=fa, fb=fb: m.fuse(fa, fb)
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for (name, what), ts in times.items():
        out[name][what] = statistics.median(ts)
    return out
