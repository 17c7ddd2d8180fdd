"""``simserve bench batch --engine local,torchrun,ray``: ``simserve embed`` of one folder by one
process, by torchrun ranks and on a local Ray cluster, against the engine alone, in one run.

Each way runs as a user would run it, a whole command in its own process(es), start-up
included (Ray starts its cluster, torchrun its ranks), ``rounds`` times in alternation; the
figure is the median. ``ray-warm`` is the job alone on a Ray cluster already running (started
by this process after the other rounds), as on a real cluster. The engine alone embeds the
same images, decoded beforehand, on every core (a batch per lane), so the ratio says what
reading, decoding, writing and the launcher cost. Every way's output is checked equal to one
process's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simserve.bench.common import jpeg_crops
from simserve.inference.decode_pool import DecodePool
from simserve.inference.engine import default_threads, load_engine
from simserve.jobs.lanes import map_lanes

ENGINES = ("local", "torchrun", "ray", "ray-warm")


def _command(engine: str, folder: Path, out: Path, bundle: str | None, batch: int) -> list[str]:
    cli = ["-m", "simserve.cli", "embed", str(folder), "--out", str(out), "--batch", str(batch), "-q"] + (["--bundle", bundle] if bundle else [])
    if engine == "local":
        return [sys.executable, *cli]
    if engine == "torchrun":  # a rank per core, one lane each
        torchrun = Path(sys.executable).with_name("torchrun")
        return [str(torchrun), f"--nproc_per_node={default_threads()}", "--standalone", *cli, "--workers", "1"]
    if engine == "ray":
        return [sys.executable, *cli, "--engine", "ray"]
    raise ValueError(f"embed engine {engine!r}: one of {', '.join(ENGINES)}")


def run(bundle: str | None = None, images: int = 8192, engines: tuple[str, ...] = ENGINES, batch: int = 64, rounds: int = 3) -> dict:
    engine = load_engine(bundle)
    cfg = engine.config
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as d:
        root = Path(d)
        folder = root / "images"
        folder.mkdir()
        blobs = jpeg_crops(images, 256, seed=11)
        for i, b in enumerate(blobs):
            (folder / f"{i:05d}.jpg").write_bytes(b)
        with DecodePool(cfg.input_size, cfg.in_channels) as pool:
            px = np.stack(list(pool.map(blobs)))
        chunks = [px[s : s + batch] for s in range(0, images, batch)]

        def engine_alone() -> None:
            for _ in map_lanes(engine, chunks, lambda b: b, lambda lane, b: lane.embed(b)):
                pass

        engine_alone()  # warm up
        times: dict[str, list[float]] = {"engine": [], **{e: [] for e in engines}}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for _ in range(rounds):
            t = time.perf_counter()
            engine_alone()
            times["engine"].append(time.perf_counter() - t)
            for e in (e for e in engines if e != "ray-warm"):
                t = time.perf_counter()
                subprocess.run(_command(e, folder, root / f"out-{e}", bundle, batch), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[e].append(time.perf_counter() - t)
        if "ray-warm" in engines:  # after the others: no command above may find this process's cluster
            from simserve.jobs.on_ray import embed_folder_ray, start_ray

            start_ray()
            for _ in range(rounds):
                t = time.perf_counter()
                embed_folder_ray(bundle, folder, root / "out-ray-warm", batch=batch, progress=False)
                times["ray-warm"].append(time.perf_counter() - t)
        reference = np.load(root / f"out-{engines[0]}.npy")
        identical = {e: bool(np.array_equal(np.load(root / f"out-{e}.npy"), reference)) for e in engines}
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "images": images, "batch": batch, "rounds": rounds, "cores": default_threads(),
        "images_per_s": {k: round(images / v, 1) for k, v in median.items()},
        "ratio_to_engine": {e: round(median["engine"] / median[e], 3) for e in engines},
        "output_identical_to_first": identical,
    }  # fmt: skip
