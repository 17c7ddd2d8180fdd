"""Offline batch jobs on real images: score, embed, dedupe (+ HTML), resume, torchrun sharding."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
CLI = [sys.executable, "-m", "simserve.cli"]


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def pairs_file(stamp_folder, tmp_path_factory) -> Path:
    """~300 pairs of real stamps (same file, two different files), plus a missing and a broken image."""
    files = sorted(p.relative_to(stamp_folder).as_posix() for p in stamp_folder.rglob("*.png") if p.name != "broken.png")
    d = tmp_path_factory.mktemp("pairs")
    path = d / "pairs.csv"
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["left", "right", "note"])
        for i in range(300):
            a = files[i % len(files)]
            b = a if i % 3 == 0 else files[int(rng.integers(len(files)))]
            w.writerow([a, b, f"row {i}, with a comma"])
            if i == 100:
                w.writerow([a, "no/such/file.png", "missing"])
            if i == 200:
                w.writerow(["a/broken.png", b, "broken"])
    return path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_writes_every_row_in_order_with_errors_in_place(pairs_file, stamp_folder, tmp_path):
    out = tmp_path / "scores.csv"
    r = run("score", str(pairs_file), "--out", str(out), "--root", str(stamp_folder), "--threshold", "--columns", "left,right", "-q")
    rows = _rows(out)
    assert len(rows) == 302 and "300 scored, 2 with errors" in r.stderr
    assert [x["note"] for x in rows[:2]] == ["row 0, with a comma", "row 1, with a comma"]  # passed through, in order
    same = [float(x["score"]) for x in rows if x["left"] == x["right"]]
    # The head alone scores these (no keypoints in a batch run): an image against itself is sure,
    # a thin, mostly empty stamp (a thermometer) least so, at 0.966 under the grouped head.
    assert min(same) > 0.95 and all(x["match"] == "True" for x in rows if x["left"] == x["right"])
    errs = {x["note"]: x["error"] for x in rows if x["error"]}
    assert set(errs) == {"missing", "broken"} and "No such file" in errs["missing"]


def test_killed_score_run_resumes_to_exactly_the_uninterrupted_output(pairs_file, stamp_folder, tmp_path):
    full, partial = tmp_path / "full.jsonl", tmp_path / "partial.jsonl"
    args = [str(pairs_file), "--root", str(stamp_folder), "--columns", "left,right", "--batch", "8", "--workers", "1", "-q"]
    run("score", *args, "--out", str(full))
    proc = subprocess.Popen([*CLI, "score", *args, "--out", str(partial)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not partial.exists() or partial.read_bytes().count(b"\n") < 60):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(partial, "ab") as f:
        f.write(b'{"left": "half-writ')  # what a kill in the middle of a write leaves
    written = partial.read_bytes().count(b"\n")
    assert 0 < written < 302, "the run was not interrupted"
    r = run("score", *args, "--out", str(partial), "--resume")
    assert "kept from the interrupted run" in r.stderr
    assert partial.read_bytes() == full.read_bytes()


def test_resume_cuts_a_part_batch_back_to_whole_batches(pairs_file, stamp_folder, tmp_path):
    """An output whose complete rows end mid-batch (written with another --batch, or cut by
    hand) is cut back to whole batches and continued: same bytes as an uninterrupted run."""
    from simserve.inference.engine import load_engine
    from simserve.jobs.score import score_file

    engine = load_engine(None)
    kw = dict(root=stamp_folder, columns=("left", "right"), batch=8, progress=False)
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    score_file(engine, pairs_file, full, **kw)
    lines = full.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[: 1 + 21]))  # header + 21 rows: two whole batches and 5 rows
    r = score_file(engine, pairs_file, part, resume=True, **kw)
    assert r.resumed_after == 16
    assert part.read_bytes() == full.read_bytes()


def test_score_decodes_each_image_once_and_writes_what_an_uncached_run_writes(pairs_file, stamp_folder, tmp_path, monkeypatch):
    from simserve.inference.engine import load_engine
    from simserve.jobs import score as score_job
    from simserve.jobs.score import score_file

    requested: list[str] = []
    real = score_job.load_file

    def counting(path, **kw):
        requested.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(score_job, "load_file", counting)
    engine = load_engine(None)
    kw = dict(root=stamp_folder, columns=("left", "right"), batch=8, progress=False)
    score_file(engine, pairs_file, tmp_path / "cached.csv", **kw)
    distinct = {r[c] for r in _rows(pairs_file) for c in ("left", "right")}
    assert sorted(requested) == sorted(str(stamp_folder / p) for p in distinct)  # each once, across 38 batches
    requested.clear()
    score_file(engine, pairs_file, tmp_path / "uncached.csv", cache_mb=0, **kw)
    assert len(requested) > len(distinct)
    assert (tmp_path / "cached.csv").read_bytes() == (tmp_path / "uncached.csv").read_bytes()


@pytest.mark.slow
def test_score_and_embed_under_torchrun_equal_one_process(pairs_file, stamp_folder, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = [str(pairs_file), "--root", str(stamp_folder), "--columns", "left,right", "--batch", "16", "-q"]
    run("score", *args, "--out", str(tmp_path / "one.csv"))
    r = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "simserve.cli", "score", *args, "--out", str(tmp_path / "two.csv")],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert not list(tmp_path.glob("*.part-*"))  # parts merged and removed
    run("embed", str(stamp_folder), "--out", str(tmp_path / "e1"), "--batch", "8", "-q")
    r = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "simserve.cli", "embed", str(stamp_folder), "--out", str(tmp_path / "e2"), "--batch", "8", "-q"],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "e1.npy"), np.load(tmp_path / "e2.npy"))
    assert (tmp_path / "e1.keys.txt").read_text() == (tmp_path / "e2.keys.txt").read_text()


def test_embed_writes_aligned_vectors_keys_and_errors_and_resumes(stamp_folder, tmp_path):
    run("embed", str(stamp_folder), "--out", str(tmp_path / "e"), "--batch", "8", "-q")
    vecs = np.load(tmp_path / "e.npy")
    keys = (tmp_path / "e.keys.txt").read_text().splitlines()
    errors = [json.loads(x) for x in (tmp_path / "e.errors.jsonl").read_text().splitlines()]
    assert vecs.shape == (40, 128) and len(keys) == 40 and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert [e["key"] for e in errors] == ["a/broken.png"]
    # the same image gives the same vector wherever it sits: row i is keys[i]
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(stamp_folder / keys[7], single / "x.png")
    run("embed", str(single), "--out", str(tmp_path / "s"), "-q")
    assert np.allclose(np.load(tmp_path / "s.npy")[0], vecs[7], atol=1e-5)


def _planted(stamp_folder: Path, root: Path) -> dict[str, set[str]]:
    """Real stamps, and for 6 of them: an exact copy, a resized copy, a recompressed JPEG,
    a brightened copy. Returns {original: its copies}."""
    originals = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")
    planted: dict[str, set[str]] = {}
    for i, p in enumerate(originals):
        img = Image.open(p).convert("RGBA")
        name = f"img{i:02d}.png"
        img.save(root / name)
        if i % 6 == 0:
            flat = Image.new("RGB", img.size, "white")
            flat.paste(img, mask=img.getchannel("A"))
            shutil.copy(root / name, root / f"img{i:02d}-copy.png")
            img.resize((img.width * 2, img.height * 2)).save(root / f"img{i:02d}-big.png")
            flat.save(root / f"img{i:02d}-q60.jpg", quality=60)
            ImageEnhance.Brightness(flat).enhance(1.15).save(root / f"img{i:02d}-bright.png")
            planted[name] = {f"img{i:02d}-copy.png", f"img{i:02d}-big.png", f"img{i:02d}-q60.jpg", f"img{i:02d}-bright.png"}
    return planted


def test_dedupe_finds_planted_duplicates_no_false_groups_and_caches(stamp_folder, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    planted = _planted(stamp_folder, root)
    out, html = tmp_path / "groups.jsonl", tmp_path / "report.html"
    env = {"SIMSERVE_DATA_DIR": str(tmp_path / "data")}
    r = run("dedupe", str(root), "--out", str(out), "--html", str(html), "-q", env=env)
    groups = [json.loads(x) for x in out.read_text().splitlines()]
    by_member = {m["path"]: g for g in groups for m in g["members"]}
    for orig, copies in planted.items():
        g = by_member.get(orig)
        assert g is not None, f"{orig} not grouped"
        members = {m["path"] for m in g["members"]}
        assert members >= {orig, f"{orig[:-4]}-copy.png", f"{orig[:-4]}-big.png"}, members  # exact + resized always
        assert len(members & copies) >= 3
        assert g["keep"] == f"{orig[:-4]}-big.png"  # the highest resolution
    strays = [g for g in groups if not any(m["path"] in planted for m in g["members"])]
    assert len(strays) <= 1, strays  # distinct stamps stay apart (allow one genuinely similar pair)
    assert "0 from the cache" in r.stderr
    again = run("dedupe", str(root), "--out", str(tmp_path / "again.jsonl"), "-q", env=env)
    assert " 0 embedded" in again.stderr and (tmp_path / "again.jsonl").read_text() == out.read_text()
    page = html.read_text()
    assert page.count("<img") == sum(len(g["members"]) for g in groups) and "data:image/jpeg;base64," in page


def test_dedupe_report_renders_thumbnails_in_headless_chromium(stamp_folder, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing: scripts/install-data.sh installs it")
        pytest.skip("chromium not installed (Debian package chromium; scripts/install-data.sh installs it)")
    root = tmp_path / "photos"
    root.mkdir()
    _planted(stamp_folder, root)
    html = tmp_path / "report.html"
    run("dedupe", str(root), "--out", str(tmp_path / "g.jsonl"), "--html", str(html), "-q", env={"SIMSERVE_DATA_DIR": str(tmp_path / "data")})
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,900", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # photos bring thousands of colours and some saturated ones; text on grey/white brings neither
    saturation = px.max(axis=2) - px.min(axis=2)
    assert (saturation > 60).mean() > 0.005, "no colourful thumbnails visible in the screenshot"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 5000
    green = (px[..., 1] > 140) & (px[..., 0] < 80) & (px[..., 2] < 110)  # the keep frame (#2a9d4b)
    assert green.sum() > 200


def test_pixel_cache_shared_by_lanes_loads_each_key_once_and_never_strands_a_waiter():
    """Two lanes asking for overlapping images at once: each image is loaded once (the second
    asker waits for the first); a load that blows up releases everything it had claimed, so
    the other lane gets an error for those images instead of waiting forever."""
    import threading

    from simserve.inference.decode import DecodeError
    from simserve.jobs.score import PixelCache

    loads: list[str] = []
    gate = threading.Event()

    def slow(key):
        loads.append(key)
        gate.wait(5)
        if key == "boom":
            raise MemoryError("simulated")
        return np.full((3, 2, 2), ord(key[0]), np.uint8)

    cache = PixelCache(1 << 20)
    got: dict[str, dict] = {}
    t1 = threading.Thread(daemon=True, target=lambda: got.__setitem__("1", cache.fetch(["a", "b", "c"], slow)))
    t1.start()
    while len(loads) < 1:
        time.sleep(0.001)
    t2 = threading.Thread(daemon=True, target=lambda: got.__setitem__("2", cache.fetch(["b", "c", "d"], slow)))
    t2.start()
    time.sleep(0.05)
    gate.set()
    t1.join(5), t2.join(5)
    assert sorted(loads) == ["a", "b", "c", "d"]  # b and c once, though both lanes wanted them
    assert all(np.array_equal(got["1"][k], got["2"][k]) for k in "bc")

    stuck = PixelCache(1 << 20)
    gate.clear()
    errors: list[BaseException] = []

    def first():
        try:
            stuck.fetch(["boom", "x"], slow)
        except MemoryError as e:
            errors.append(e)

    t1 = threading.Thread(daemon=True, target=first)
    t1.start()
    while "boom" not in loads:
        time.sleep(0.001)
    result: dict = {}
    t2 = threading.Thread(daemon=True, target=lambda: result.update(stuck.fetch(["x"], slow)))
    t2.start()
    time.sleep(0.05)
    gate.set()
    t1.join(5), t2.join(5)
    assert not t2.is_alive() and errors and isinstance(result["x"], DecodeError)
