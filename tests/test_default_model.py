"""The shipped default model: verified on load, tells a copy from a different image."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from simserve.inference.bundle import DEFAULT_BUNDLE, load_bundle
from simserve.inference.engine import load_engine

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def _repost(img: Image.Image) -> Image.Image:
    """What a re-post does: crop, resize, caption, JPEG at quality 40."""
    w, h = img.size
    out = img.crop((int(w * 0.1), int(h * 0.05), int(w * 0.92), int(h * 0.9))).resize((300, 260))
    ImageDraw.Draw(out).text((10, 230), "reposted", fill=(255, 255, 0))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_default_bundle_is_shipped_small_and_verified():
    b = load_bundle()  # checks every sha256
    assert b.path == DEFAULT_BUNDLE
    size = sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir())
    assert size < 20 * 1024 * 1024
    m = b.manifest["metrics"]
    assert 0 < m["recall@1"] <= 1 and m["pair_auc"] > 0.98  # the card's figures, recorded at export
    assert (DEFAULT_BUNDLE / "MODEL_CARD.md").read_text().count("GPL-2") >= 1


def test_default_model_scores_copies_above_different_images(photos):
    engine = load_engine()
    names = list(photos)
    pairs, labels = [], []
    for i, n in enumerate(names):
        pairs.append((photos[n], _repost(photos[n])))
        labels.append(1)
        pairs.append((photos[n], photos[names[(i + 1) % len(names)]]))
        labels.append(0)
    scores = engine.score_images(pairs)
    dup, diff = scores[np.array(labels) == 1], scores[np.array(labels) == 0]
    assert dup.min() > diff.max(), (dup, diff)
    thr = engine.bundle.threshold
    assert (dup >= thr).mean() >= 0.8 and (diff < thr).mean() >= 0.8


def test_compare_cli_on_the_example_images():
    def run(a, b):
        r = subprocess.run([sys.executable, "-m", "simserve.cli", "compare", str(EX / a), str(EX / b), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    copy, other = run("seagull.png", "seagull-copy.jpg"), run("seagull.png", "bee.png")
    assert copy["match"] and not other["match"]
    assert copy["score"] > other["score"] and copy["cosine"] > other["cosine"]
