"""``simserve bench batch``: the offline jobs end to end.

1. ``score`` throughput vs the engine alone on the same pairs, in alternation
   (medians): the engine-only pass gets pixels decoded beforehand and runs the
   same batches (one tower pass over a batch's distinct images, one head pass).
2. ``dedupe`` of ``dedupe_images`` generated JPEGs (real photo crops) in its
   own process: wall time and peak RSS.
3. Near-duplicate detection against perceptual hashing: originals are real
   photos (scikit-image's, plus the Tux Paint stamps, which are mostly photos
   of objects); each gets exact, resized, recompressed, cropped, colour-shifted
   and text-overlaid copies. Negatives are pairs of different originals.
   Recall at precision 0.99 for the head score, the embedding cosine, and the
   ``imagehash`` pHash and dHash (similarity = -Hamming distance).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from simserve.bench.common import TUXPAINT, cpu_seconds, interleaved_medians, jpeg_crops, photo_sources, rss_mb
from simserve.inference.decode_pool import DecodePool
from simserve.inference.engine import default_threads, load_engine
from simserve.jobs.lanes import map_lanes
from simserve.jobs.score import score_file
from simserve.ranking.calibration import threshold_at_precision

TRANSFORMS = ("exact", "resized", "recompressed", "cropped", "colour-shifted", "overlaid")


def transform(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    w, h = img.size
    if kind == "exact":
        return img.copy()
    if kind == "resized":
        s = rng.uniform(0.4, 0.7)
        return img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.BILINEAR)
    if kind == "recompressed":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(25, 45))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "cropped":  # keep 70-85% of each side
        s = rng.uniform(0.7, 0.85)
        cw, ch = int(w * s), int(h * s)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch))
    if kind == "colour-shifted":
        out = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
        r, g, b = out.split()
        return Image.merge("RGB", (r.point(lambda v: min(255, v + 20)), g, b))
    if kind == "overlaid":
        out = img.copy()
        d = ImageDraw.Draw(out)
        d.rectangle((0, int(h * 0.8), w, h), fill=(0, 0, 0))
        d.text((4, int(h * 0.82)), "COPYRIGHT 2026 simserve", fill=(255, 255, 255))
        return out
    raise ValueError(kind)


def _originals(n: int, seed: int) -> list[Image.Image]:
    """Distinct real photos: crops of different regions of scikit-image's photos and the Tux Paint stamps."""
    rng = random.Random(seed)
    photos = [p.convert("RGB") for p in photo_sources(drawings=True, folders=(TUXPAINT,))]
    rng.shuffle(photos)
    out = []
    for src in photos:
        if len(out) >= n:
            break
        w, h = src.size
        if min(w, h) < 64:
            continue
        side = rng.randint(min(w, h) * 2 // 3, min(w, h))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        out.append(src.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BILINEAR))
    return out


def compare_with_hashing(bundle: str | None, originals: int = 400, negatives: int = 20_000, seed: int = 0) -> dict:
    try:
        import imagehash
    except ImportError:
        raise SystemExit("the perceptual-hashing baseline needs the imagehash package: pip install -e '.[dev]'") from None

    rng = random.Random(seed)
    engine = load_engine(bundle)
    base = _originals(originals, seed)
    pos = [(i, t, transform(base[i], t, rng)) for i in range(len(base)) for t in TRANSFORMS]
    neg = set()
    while len(neg) < min(negatives, len(base) * (len(base) - 1) // 2):
        a, b = rng.sample(range(len(base)), 2)
        neg.add((min(a, b), max(a, b)))
    neg_l = sorted(neg)
    feats, embs = engine.embed_images(base)
    pf, pe = engine.embed_images([im for _, _, im in pos])
    ia = np.array([i for i, _, _ in pos])
    na, nb = np.array([a for a, _ in neg_l]), np.array([b for _, b in neg_l])
    head = {"pos": engine.fuse(feats[ia], pf), "neg": engine.fuse(feats[na], feats[nb])}
    cos = {"pos": np.einsum("ij,ij->i", embs[ia], pe), "neg": np.einsum("ij,ij->i", embs[na], embs[nb])}
    methods = {"simserve head": head, "simserve embedding cosine": cos}
    for name, fn in (("pHash", imagehash.phash), ("dHash", imagehash.dhash)):
        hb = [fn(im) for im in base]
        hp = [fn(im) for _, _, im in pos]
        methods[f"imagehash {name}"] = {
            "pos": -np.array([hb[i] - h for (i, _, _), h in zip(pos, hp)], np.float64),
            "neg": -np.array([hb[a] - hb[b] for a, b in neg_l], np.float64),
        }
    kinds = np.array([t for _, t, _ in pos])
    table = {}
    for name, m in methods.items():
        scores = np.concatenate([m["pos"], m["neg"]])
        labels = np.r_[np.ones(len(m["pos"])), np.zeros(len(m["neg"]))]
        op = threshold_at_precision(scores, labels, 0.99)
        recall, thr = op["recall"], op["threshold"]
        row = {"recall_at_p99": round(recall, 4), "threshold": thr}
        for t in TRANSFORMS:  # recall per transformation at that same threshold
            row[t] = round(float((m["pos"][kinds == t] >= thr).mean()), 4)
        table[name] = row
    return {"originals": len(base), "positives": len(pos), "negatives": len(neg_l), "transforms": list(TRANSFORMS), "table": table}


def score_throughput(bundle: str | None, pairs: int = 4096, images: int = 1024, batch: int = 64, repeats: int = 3, distinct: bool = False) -> dict:
    """As served (nospin: a single-threaded ORT session per core) and with ORT's defaults (spin: one
    session whose pool spin-waits); the engine alone also runs a whole batch per lane (as ``score``
    does; the others cut each batch across lanes). The ratio is best end-to-end over best engine-only.
    Random pairs of ``images`` files (each in ~2 * pairs / images pairs), or with ``distinct``
    every image in exactly one pair (nothing for the decoded-image cache to save)."""
    engines = {"spin": load_engine(bundle, spin=True, lanes=1), "nospin": load_engine(bundle, spin=False)}
    cfg = engines["spin"].config
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        blobs = jpeg_crops(images, 256, seed=5)
        for i, b in enumerate(blobs):
            (root / f"{i:05d}.jpg").write_bytes(b)
        rng = random.Random(1)
        if distinct:
            rows = [(f"{2 * i:05d}.jpg", f"{2 * i + 1:05d}.jpg") for i in range(pairs)]
        else:
            rows = [(f"{rng.randrange(images):05d}.jpg", f"{rng.randrange(images):05d}.jpg") for _ in range(pairs)]
        with open(root / "pairs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["a", "b"])
            w.writerows(rows)
        with DecodePool(cfg.input_size, cfg.in_channels) as pool:
            pixels = dict(zip((f"{i:05d}.jpg" for i in range(images)), pool.map(blobs)))
        batches = []
        for s in range(0, pairs, batch):
            part = rows[s : s + batch]
            order = list(dict.fromkeys(p for r in part for p in r))
            slot = {p: i for i, p in enumerate(order)}
            batches.append((np.stack([pixels[p] for p in order]), np.array([slot[a] for a, _ in part]), np.array([slot[b] for _, b in part])))

        def engine_only(engine):
            def f():
                for x, ia, ib in batches:
                    feats, _ = engine.embed(x)
                    engine.fuse(feats[ia], feats[ib])

            return f

        def engine_lanes(engine):  # a whole batch per lane, as score runs them, with nothing to decode
            def run(lane, b):
                feats, _ = lane.embed(b[0])
                lane.fuse(feats[b[1]], feats[b[2]])

            def f():
                for _ in map_lanes(engine, batches, lambda b: b, run):
                    pass

            return f

        def end_to_end(engine):
            return lambda: score_file(engine, root / "pairs.csv", root / "out.csv", batch=batch, progress=False)

        fns = {f"engine_only_{k}": engine_only(e) for k, e in engines.items()} | {"engine_only_lanes": engine_lanes(engines["nospin"])}
        fns |= {f"score_{k}": end_to_end(e) for k, e in engines.items()}
        t = interleaved_medians(fns, repeats, warmup=1)
        # CPU per pair (all threads of this process), to say what the cores allow: reading and
        # decoding run on the same cores as the engine, so end-to-end can reach at best
        # cores / (engine + decode CPU per pair), however well the two overlap.
        fastest = min((k for k in t if k.startswith("engine_only")), key=t.__getitem__)
        with DecodePool(cfg.input_size, cfg.in_channels) as pool:
            decode_cpu = statistics.median(cpu_seconds(lambda: list(pool.map_files(root / f"{i:05d}.jpg" for i in range(images)))) for _ in range(3))
        engine_cpu = statistics.median(cpu_seconds(fns[fastest]) for _ in range(3))
    best_engine = t[fastest]
    best_score = min(v for k, v in t.items() if k.startswith("score"))
    cores = default_threads()
    return {
        "pairs": pairs,
        "distinct_images": images,
        "pairs_per_image": round(2 * pairs / images, 2),
        "batch": batch,
        "pairs_per_s": {k: round(pairs / v, 1) for k, v in t.items()},
        "score_vs_engine": best_engine / best_score,
        "engine_cpu_ms_per_pair": round(1e3 * engine_cpu / pairs, 3),
        "decode_cpu_ms_per_pair": round(1e3 * decode_cpu / pairs, 3),
        "ceiling_vs_engine": round(cores / ((engine_cpu + decode_cpu) / pairs) * best_engine / pairs, 3),
    }


def dedupe_scale(bundle: str | None, n: int, workdir: str | None = None) -> dict:
    """Generate ``n`` JPEGs (crops of every installed photo and drawing), run ``simserve dedupe``
    on them in a child process, and read its peak RSS."""
    sources = photo_sources(drawings=True)
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        root = Path(d) / "images"
        root.mkdir()
        t = time.perf_counter()
        made = 0
        for chunk in range(0, n, 2000):
            for i, b in enumerate(jpeg_crops(min(2000, n - chunk), 160, quality=85, seed=100 + chunk, sources=sources)):
                (root / f"{(chunk + i) // 1000:03d}").mkdir(exist_ok=True)
                (root / f"{(chunk + i) // 1000:03d}" / f"{chunk + i:07d}.jpg").write_bytes(b)
                made += 1
        gen_s = time.perf_counter() - t
        cmd = [sys.executable, "-m", "simserve.cli", "dedupe", str(root), "--out", str(Path(d) / "groups.jsonl"), "-q", "--cache", str(Path(d) / "cache")]
        if bundle:
            cmd += ["--bundle", bundle]
        log = Path(d) / "dedupe.log"
        wall, peak_mb = _child_peak(cmd, log)
        summary = log.read_text().strip().splitlines()
        groups = sum(1 for _ in open(Path(d) / "groups.jsonl"))
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        cached = time.perf_counter() - t
    return {
        "images": made,
        "generate_s": round(gen_s, 1),
        "dedupe_s": round(wall, 1),
        "dedupe_cached_rerun_s": round(cached, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "groups": groups,
        "summary": summary[-1] if summary else "",
    }


def _child_peak(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, its peak RSS in MB from VmHWM, sampled)."""
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL)
        peak = 0.0
        while proc.poll() is None:  # VmHWM: the child's own peak (ru_maxrss would count this parent's pages from fork)
            peak = max(peak, rss_mb(proc.pid, "VmHWM"))
            time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(log.read_text()[-2000:])
    return time.perf_counter() - t, peak


def score_memory(bundle: str | None, rows: tuple[int, ...] = (20_000, 200_000)) -> dict:
    """Peak RSS of ``simserve score`` at growing row counts: streaming keeps it flat.
    The rows cycle over 16 real images (so the run is about rows, not decoding)."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for i, b in enumerate(jpeg_crops(16, 256, seed=9)):
            (root / f"{i}.jpg").write_bytes(b)
        for n in rows:
            pairs = root / f"pairs-{n}.csv"
            with open(pairs, "w") as f:
                f.write("a,b,id\n")
                f.writelines(f"{i % 16}.jpg,{(i * 7 + 3) % 16}.jpg,{i}\n" for i in range(n))
            cmd = [sys.executable, "-m", "simserve.cli", "score", str(pairs), "--out", str(root / "out.csv"), "-q"]
            secs, peak = _child_peak(cmd + (["--bundle", bundle] if bundle else []), root / "score.log")
            out[str(n)] = {"seconds": round(secs, 1), "rows_per_s": round(n / secs), "peak_rss_mb": round(peak, 1)}
            (root / "out.csv").unlink()
    return out


def run(bundle: str | None = None, dedupe_images: int = 100_000, originals: int = 400) -> dict:
    result = {"machine": f"{os.cpu_count()} cpus"}
    result["score"] = score_throughput(bundle)
    result["score_every_image_once"] = score_throughput(bundle, images=8192, distinct=True)
    result["score_memory"] = score_memory(bundle)
    result["vs_perceptual_hashing"] = compare_with_hashing(bundle, originals=originals)
    if dedupe_images:
        result["dedupe"] = dedupe_scale(bundle, dedupe_images)
    print(json.dumps(result["vs_perceptual_hashing"]["table"], indent=1), file=sys.stderr)
    return result
