"""The training loop: one function, ``train``, driven by a recipe.

Reproducible: a run is fixed by (recipe, seed). Data order and every
augmentation are seeded by (seed, epoch, image, draw), the model by the seed, and
checkpoints (written atomically at every epoch end) carry the optimiser and
the epoch, so ``--resume`` continues exactly where the run stopped. Under
``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import simserve
from simserve.inference.config import ModelConfig
from simserve.model import SiameseNet, build_model, save_checkpoint
from simserve.model.heads import set_temperature
from training import sources
from training.augment import CopyAugment, LightAugment
from training.evaluate import evaluate_class, evaluate_copy
from training.losses import CrossBatchMemory, hardest_negatives, koleo, metric_loss, pair_bce, random_negatives
from training.pairs import EpochBatchSampler, PairDataset
from training.recipe import Recipe, TrainSettings
from training.whiten import whiten


class TrainStep(nn.Module):
    """The whole forward pass of one step, in one module so DDP syncs all of it.

    Both views go through the tower as one batch; the head sees every
    positive pair, each anchor's hardest in-batch negative and a random one.
    """

    def __init__(self, model: SiameseNet, settings: TrainSettings) -> None:
        super().__init__()
        self.model = model
        self.metric = metric_loss(settings.metric_loss, settings.tau, settings.memory, model.cfg.embed_dim)
        self.metric_weight = settings.metric_weight
        self.koleo_weight = settings.koleo

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, use_memory: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        # channels_last: ~1.7x faster depthwise convs on CPU; eager and fp32 on purpose
        # (docs/decisions/training-speed.md).
        fmap, emb = self.model.tower(torch.cat([a, b]).contiguous(memory_format=torch.channels_last))
        fa, fb = fmap.split(a.shape[0])
        za, zb = emb.split(a.shape[0])
        if isinstance(self.metric, CrossBatchMemory):
            self.metric.active = use_memory
        metric = self.metric(za, zb, labels)
        hard = hardest_negatives(za, zb, labels)
        rand = random_negatives(za, zb, labels, gen)
        valid = labels[rand] != labels  # a batch of one class has no negative
        neg_b = torch.cat([fb[hard], fb[rand][valid]])
        neg_a = torch.cat([fa, fa[valid]])
        # One head call over positives and negatives together: with separate
        # calls, batch norm could tell them apart by batch statistics alone.
        logits = self.model.head(torch.cat([fa, neg_a]), torch.cat([fb, neg_b]))
        pos_logits, neg_logits = logits[: fa.shape[0]], logits[fa.shape[0] :]
        bce = pair_bce(pos_logits, neg_logits)
        loss = bce + self.metric_weight * metric
        stats = {"bce": bce.item(), "metric": metric.item()}
        if self.koleo_weight:
            spread = koleo(za, zb, labels)
            loss = loss + self.koleo_weight * spread
            stats["koleo"] = spread.item()
        with torch.no_grad():
            acc = 0.5 * ((pos_logits > 0).float().mean() + (neg_logits < 0).float().mean())
        return loss, {"loss": loss.item(), **stats, "pair_acc": acc.item()}


@dataclass
class Data:
    train: sources.ImageSet
    held_out: sources.ImageSet
    mode: str
    augment: Any
    held_out_split: int  # images the split held out, before the distinct-gallery filter
    # What the held-out queries are made with: the recipe's defaults, so models trained with
    # other augmentation knobs are evaluated on the same queries.
    eval_augment: Any


def load_data(recipe: Recipe, cfg: ModelConfig) -> Data:
    d = recipe.data
    mode = d.mode
    augment = CopyAugment(cfg.input_size) if d.augment == "copy" else LightAugment(cfg.input_size)
    if d.dataset == "fashion-mnist":
        test = sources.fashion_mnist("test")
        return Data(sources.fashion_mnist("train"), test, mode, augment, held_out_split=len(test), eval_augment=augment)
    if d.dataset:
        raise ValueError(f"data.dataset {d.dataset!r}: the one dataset is 'fashion-mnist' (or give data.sources or data.folder)")
    if d.folder:
        loader = sources.image_folder if mode == "class" else sources.instance_folder
        everything = loader(d.folder, d.max_side)  # named by the path inside the folder
    else:
        everything = sources.load_sources(d.sources, d.max_side)
    tr, ho = sources.holdout_split(everything.names, d.holdout)
    train_set, held = everything.subset(tr), everything.subset(ho)
    if mode == "copy" and recipe.eval.distinct:  # a gallery of distinct originals: see distinct_subset
        held = sources.drop_near_identical(held, recipe.eval.distinct)
    if mode == "copy":  # every image its own identity
        train_set.labels = np.arange(len(train_set), dtype=np.int64)
        held.labels = np.arange(len(held), dtype=np.int64)
    train_augment = augment
    if d.augment == "copy":
        pasted_into = tuple(train_set.images) if d.paste else ()
        train_augment = CopyAugment(cfg.input_size, crop_scale=(d.crop_min_area, 1.0), paste_p=d.paste, backgrounds=pasted_into)
    return Data(train_set, held, mode, train_augment, held_out_split=len(ho), eval_augment=augment)


def evaluate(model: SiameseNet, data: Data, recipe: Recipe, quick: bool = False) -> dict[str, float]:
    e = recipe.eval
    if data.mode == "copy":
        return evaluate_copy(model, data.held_out, data.eval_augment, n_queries=200 if quick else e.queries)
    return evaluate_class(model, data.held_out, n_pairs=1000 if quick else e.pairs, n_queries=500 if quick else e.queries)


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    p = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def temperature_at(step: int, total: int, s: TrainSettings) -> float:
    p = min(1.0, step / max(1.0, s.temperature_fraction * total))
    return s.temperature_start * (s.temperature_end / s.temperature_start) ** p


def _dist_setup() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group and so must end it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world, started) if world > 1 else (0, 1, False)


def _average_buffers(model: nn.Module) -> None:
    """DDP syncs gradients, not batch-norm statistics: average those over ranks at the end."""
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def _max_weight_diff_across_ranks(model: nn.Module) -> float:
    """Largest |w_rank - w_rank0| over all parameters and buffers: 0.0 when DDP kept ranks in sync."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def train(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    final_eval: bool = True,
    data: Data | None = None,
) -> dict[str, Any]:
    """Train per ``recipe`` into ``out_dir`` (last.pt, model.pt, metrics.json, log.jsonl)."""
    out = Path(out_dir)
    rank, world, started_group = _dist_setup()
    s = recipe.train
    threads = s.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(recipe.seed)
    cfg = ModelConfig.from_dict(recipe.model)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    step_module: nn.Module = TrainStep(model, s)
    data = data or load_data(recipe, cfg)
    if s.whiten_rounds and data.mode != "copy":  # fail now, not after the training
        raise ValueError(f"train.whiten_rounds needs a copy-mode recipe (pairs of a copy and its original), not {data.mode!r}")
    k = recipe.data.pairs_per_image
    dataset = PairDataset(data.train, data.mode, data.augment, cfg, recipe.seed, recipe.data.clean_anchor, k)
    sampler = EpochBatchSampler(len(data.train), s.batch_size, s.steps_per_epoch, recipe.seed, rank, world, k)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=s.workers, persistent_workers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    start_epoch, history = 0, []
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        start_epoch, history = int(payload["epoch"]), json.loads(payload["history"])
        if rank == 0:
            print(f"resuming {ckpt} at epoch {start_epoch}", file=sys.stderr)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    total = s.epochs * s.steps_per_epoch
    t_start = time.time()
    for epoch in range(start_epoch, s.epochs):
        model.train()
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not progress or rank != 0, unit="step", leave=False)
        sums: dict[str, float] = {}
        t0 = time.time()
        for i, (a, b, labels) in enumerate(bar):
            gstep = epoch * s.steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(gstep, total, s)
            set_temperature(model, temperature_at(gstep, total, s))
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + gstep)
            loss, stats = step_module(a, b, labels, gen, gstep >= s.memory_start * total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['pair_acc']:.3f}")
        n = max(1, len(loader))
        row = {k: v / n for k, v in sums.items()}
        row.update(epoch=epoch + 1, seconds=time.time() - t0, pairs_per_s=len(loader) * s.batch_size / (time.time() - t0))
        history.append(row)
        if rank == 0:
            save_checkpoint(ckpt, model, optimizer=opt.state_dict(), epoch=epoch + 1, history=json.dumps(history), recipe=json.dumps(recipe.to_dict()))
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print(f"epoch {epoch + 1}/{s.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"), file=sys.stderr)
        if world > 1:
            dist.barrier()
    set_temperature(model, s.temperature_end)
    result: dict[str, Any] = {"history": history, "train_seconds": time.time() - t_start}
    if world > 1:
        _average_buffers(model)
        result["ddp_max_weight_diff"] = _max_weight_diff_across_ranks(model)
    if rank == 0 and s.whiten_rounds:
        result["whitening"] = whiten(model, data.train, data.augment, s.whiten_rounds, s.whiten_eps, recipe.seed)
    if rank == 0:
        metrics = evaluate(model, data, recipe) if final_eval else {}
        result.update(
            metrics=metrics,
            recipe=recipe.to_dict(),
            config=cfg.to_dict(),
            seed=recipe.seed,
            world_size=world,
            simserve_version=simserve.__version__,
            torch_version=torch.__version__,
            machine=f"{platform.machine()} {os.cpu_count()} cpus",
            train_images=len(data.train),
            held_out_images=len(data.held_out),
            held_out_split_images=data.held_out_split,
        )
        save_checkpoint(out / "model.pt", model, metrics=json.dumps(metrics), recipe=json.dumps(recipe.to_dict()))
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    if started_group:
        # Left to interpreter shutdown, gloo's worker threads can die with SIGABRT ("terminate
        # called without an active exception"): it failed a fresh-clone CI run of the torchrun test.
        dist.destroy_process_group()
    return result
