"""Shared benchmark helpers: timing by medians, real test images, result output."""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from simserve.inference.decode import DecodeError, decode_file


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time (every thread of this process) that ``fn`` takes."""
    c = time.process_time()
    fn()
    return time.process_time() - c


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, settle_s: float = 0.02) -> dict[str, float]:
    """Time several candidates in alternation, so machine noise hits all of them alike.

    The order rotates every round and each candidate starts after ``settle_s`` of
    quiet: a spin-waiting thread pool (ORT's default) keeps burning CPU for a
    while after its run, which would otherwise be charged to whoever runs next."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(settle_s)
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


TUXPAINT = Path("/usr/share/tuxpaint/stamps")  # mostly photos of objects (GPL-2)
OPENCLIPART = Path("/usr/share/openclipart/png")  # drawings (public domain)


def photo_sources(drawings: bool = False, folders: tuple[Path, ...] = (TUXPAINT, OPENCLIPART)) -> list[Image.Image]:
    """Real images to derive test images from: scikit-image's bundled photos, and with
    ``drawings`` (or when no photos are installed) every image in ``folders`` (the Tux Paint
    stamps and Open Clip Art drawings installed), downsized to 256 px."""
    images: list[Image.Image] = []
    try:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "coins.png"):
            if (root / name).exists():
                images.append(Image.open(root / name).convert("RGB"))
    except ImportError:
        pass
    if drawings or not images:
        for folder in folders:
            for p in sorted(folder.rglob("*.png")) if folder.is_dir() else []:
                try:
                    img = decode_file(p)
                except (DecodeError, OSError):
                    continue
                img.thumbnail((256, 256))
                images.append(img)
    if not images:
        raise SystemExit("no real images found: install the dev extras (scikit-image) or tuxpaint-stamps-default")
    return images


def jpeg_crops(n: int, size: int = 256, quality: int = 90, seed: int = 0, sources: list[Image.Image] | None = None) -> list[bytes]:
    """``n`` distinct size x size JPEGs: random crops of real photos (or of ``sources``)."""
    rng = random.Random(seed)
    sources = sources or photo_sources()
    out = []
    for _ in range(n):
        src = rng.choice(sources)
        w, h = src.size
        side = rng.randint(min(w, h) // 3, min(w, h))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = src.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def matmul_gflops(n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """FP32 matmul throughput, the practical peak of this machine (numpy, and torch if present)."""
    out = {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out["numpy"] = 2 * n**3 / median_seconds(lambda: a @ a, repeats) / 1e9
    try:
        import torch

        t = torch.from_numpy(a)
        out["torch"] = 2 * n**3 / median_seconds(lambda: t @ t, repeats) / 1e9
    except ImportError:
        pass
    return out


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text, file=sys.stdout)


def start_server(data_dir: str, bundle: str | None, extra: list[str], preexec: Callable[[], object] | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Start ``simserve serve`` on a free port in its own process; returns (process, address, log).
    Its log goes to a file (a pipe would fill and stall it). ``preexec`` runs in the child before
    the server starts (e.g. to join a memory cgroup)."""
    env = {**os.environ, "SIMSERVE_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "simserve.cli", "serve", "--port", "0", *extra]
    if bundle:
        cmd += ["--bundle", bundle]
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(data_dir) / f"server-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log, stdout=subprocess.DEVNULL, preexec_fn=preexec)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        for line in log_path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "serving":
                return proc, json.loads(line)["address"], log_path
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start:\n" + log_path.read_text()[-3000:])


def start_milvus_lite(data_dir: str | Path) -> tuple[subprocess.Popen, str]:
    """A real Milvus gRPC server (``milvus-lite server``, from the ``milvus`` extra) on a free
    loopback port; returns (process, uri). Its log is ``data_dir/milvus.log``."""
    import socket

    from pymilvus import MilvusClient

    with socket.socket() as s:  # a free port: milvus-lite server does not take 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("milvus-lite")
    cmd = [str(exe) if exe.exists() else "milvus-lite", "server", "--data-dir", str(Path(data_dir) / "milvus"), "--host", "127.0.0.1", "--port", str(port)]
    with open(Path(data_dir) / "milvus.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            MilvusClient(uri=uri, timeout=2).list_collections()
            return proc, uri
        except Exception:  # not listening yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("milvus-lite server did not start:\n" + (Path(data_dir) / "milvus.log").read_text()[-3000:])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process from /proc (Linux): now (VmRSS) or its peak (VmHWM).
    NaN once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_threads(fn: Callable[[int], object], n: int) -> None:
    """``fn(0) .. fn(n-1)`` on ``n`` threads at once; returns when all are done."""
    import threading

    ts = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
