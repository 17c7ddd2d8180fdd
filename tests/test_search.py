"""Index a folder of real images, search it, re-rank with the head; the CLI end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from simserve.index.collection import Collections
from simserve.inference.decode import decode_file
from simserve.inference.engine import load_engine
from simserve.jobs.index_folder import index_folder
from simserve.ranking.pipeline import Query, search
from simserve.ranking.scores import HEAD_WEIGHT, fused_scores

ROOT = Path(__file__).resolve().parents[1]


def test_index_folder_then_rerank_orders_by_cosine_and_head(tiny_bundle, stamp_folder, tmp_path):
    engine = load_engine(tiny_bundle)
    cols = Collections(tmp_path)
    col = cols.create("s", engine.bundle.embedding_dim, "Flat", engine.bundle.manifest["feature_shape"])
    report = index_folder(engine, col, stamp_folder, batch=8, progress=False)
    assert report.added == 40 and list(report.failed) == ["a/broken.png"]
    again = index_folder(engine, col, stamp_folder, batch=8, progress=False)
    assert again.added == 0 and again.skipped_unchanged == 40  # resumable by content hash

    paths = sorted(stamp_folder.rglob("*.png"))[:6]
    images = [decode_file(p) for p in paths if p.name != "broken.png"][:5]
    feats, emb = engine.embed_images(images)
    plain = [search(col, Query(e), 10) for e in emb]
    ranked = [search(col, Query(e, features=f), 10, rerank=20, engine=engine) for e, f in zip(emb, feats)]
    changed = 0
    for qi, (p_hits, r_hits) in enumerate(zip(plain, ranked)):
        assert p_hits[0].cosine > 0.999  # the image itself, by embedding
        scores = [h.head_score for h in r_hits]
        fused = fused_scores(np.array([h.rank for h in r_hits]), np.array(scores)).tolist()
        assert fused == sorted(fused, reverse=True)  # ordered by cosine and head together
        stored = col.features([h.id for h in r_hits])
        redo = engine.fuse(np.repeat(feats[qi : qi + 1], len(r_hits), 0), np.stack([stored[h.id] for h in r_hits]))
        assert np.allclose(redo, scores, atol=1e-5)  # the head's own verdict, not a re-sort of cosine
        changed += [h.key for h in p_hits] != [h.key for h in r_hits]
    assert changed > 0
    cols.close()


def _cli(*args, env_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simserve.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"SIMSERVE_DATA_DIR": str(env_dir), "PATH": "/usr/bin:/bin", "HOME": str(env_dir)},
    )


def test_index_cli_build_search_remove_stats(tiny_bundle, stamp_folder, tmp_path):
    b = ["--bundle", str(tiny_bundle)]
    r = _cli("index", "build", str(stamp_folder), "--collection", "stamps", "--quiet", *b, env_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["added"] == 40 and out["failed"] == 1 and "broken.png" in r.stderr
    key = sorted(p.relative_to(stamp_folder).as_posix() for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[3]
    r = _cli("index", "search", str(stamp_folder / key), "--collection", "stamps", "-k", "3", "--json", *b, env_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert hits[0]["key"] == key and len(hits) == 3
    r = _cli("index", "search", "--key", key, "--collection", "stamps", "--rerank", "10", "--json", *b, env_dir=tmp_path)
    hits = json.loads(r.stdout)
    assert key not in [h["key"] for h in hits] and all(h["head_score"] is not None for h in hits)
    r = _cli("index", "search", "--key", key, "--collection", "stamps", "--where", f"path={key}", "--json", *b, env_dir=tmp_path)
    assert json.loads(r.stdout) == []  # the only match is the query itself, excluded
    r = _cli("index", "remove", key, "no-such-key", "--collection", "stamps", env_dir=tmp_path)
    assert json.loads(r.stdout) == {"removed": [key], "not_found": ["no-such-key"]}
    r = _cli("index", "stats", env_dir=tmp_path)
    stats = json.loads(r.stdout)
    assert stats[0]["name"] == "stamps" and stats[0]["items"] == 39 and stats[0]["indexed"] == 39
    r = _cli("index", "stats", "--collection", "nope", env_dir=tmp_path)
    assert r.returncode != 0 and "collection 'nope' not found" in r.stderr


def test_fused_scores_weigh_the_heads_log_odds_beside_the_cosine():
    cos = np.array([0.90, 0.88, 0.80, 0.80])
    head = np.array([0.5, 0.99, 1.0, 0.0])  # a float32 sigmoid saturates to exactly 0 and 1
    fused = fused_scores(cos, head)
    assert np.isfinite(fused).all()
    assert fused[0] == cos[0]  # an undecided head (p = 0.5, logit 0) leaves the cosine
    assert fused[1] > fused[0]  # a confident head outweighs a 0.02 cosine gap
    assert np.isclose(fused[1] - cos[1], HEAD_WEIGHT * np.log(99))
    assert fused[2] > fused[1] > fused[3]


BLOCK = "import sys; sys.modules[{mod!r}] = None; from simserve.cli import main; sys.exit(main({argv!r}))"


def test_missing_extras_and_empty_results_read_as_sentences(tmp_path, stamp_folder, tiny_bundle):
    """What the serving install lacks (torch for train / export, OpenCV for --verify) is one line
    naming the pip command, and a search that finds nothing says so instead of a blank line."""
    env = {**os.environ, "SIMSERVE_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", BLOCK.format(mod="torch", argv=["train", "--recipe", "default", "--out", str(tmp_path / "r")])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "pip install 'simserve[train]'" in r.stderr
    r = subprocess.run([sys.executable, "-c", BLOCK.format(mod="cv2", argv=["index", "build", str(stamp_folder), "--collection", "v", "--verify", "--quiet"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "pip install opencv-python-headless" in r.stderr
    r = _cli("index", "build", str(stamp_folder), "--collection", "s", "--quiet", "--bundle", str(tiny_bundle), env_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("index", "search", str(stamp_folder / "a" / "broken.png"), "--collection", "s", "--bundle", str(tiny_bundle), env_dir=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    some = next(p for p in sorted(stamp_folder.rglob("*.png")) if p.name != "broken.png")
    r = _cli("index", "search", str(some), "--collection", "s", "--where", "nope=1", "--bundle", str(tiny_bundle), env_dir=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "no matches (the collection is empty, or nothing passed the filter)"
