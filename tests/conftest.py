"""Shared fixtures: small sets of real images, written to disk in the test."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("XDG_CACHE_HOME", str(Path(__file__).parent / ".cache"))

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_folder(tmp_path_factory) -> Path:
    """An ImageFolder of real Fashion-MNIST test images: 10 classes x 24 PNGs."""
    if not FASHION.exists():
        pytest.fail("Fashion-MNIST missing: run ./scripts/install-data.sh (Debian dataset-fashion-mnist)")
    from training.sources import fashion_mnist

    data = fashion_mnist("test")
    root = tmp_path_factory.mktemp("fmnist")
    for c in range(10):
        (root / f"class{c}").mkdir()
        for k, i in enumerate(np.flatnonzero(data.labels == c)[:24]):
            data.images[i].save(root / f"class{c}" / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Natural photos bundled with scikit-image (no download)."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]
    return {n.split(".")[0]: Image.open(root / n).convert("RGB") for n in names}


@pytest.fixture(scope="session")
def photo_jpeg(photos) -> bytes:
    """One natural photo as a JPEG, as most queries arrive."""
    buf = io.BytesIO()
    photos["chelsea"].save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tiny_recipe_dict(folder: Path, **train) -> dict:
    """A recipe small enough to train in seconds on 2 cores."""
    t = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "workers": 0}
    t.update(train)
    return {
        "name": "tiny",
        "data": {"mode": "class", "folder": str(folder), "holdout": 0.25, "augment": "light", "max_side": 32},
        "model": {
            "input_size": 32, "in_channels": 1, "mean": [0.286], "std": [0.353], "stem_width": 8,
            "stages": [[16, 2, 1], [32, 2, 1], [48, 1, 1]], "embed_dim": 16, "head": "concat", "head_width": 16,
        },
        "train": t,
        "eval": {"pairs": 100, "queries": 50},
        "seed": 3,
    }


STAMPS = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small, untrained-but-calibrated model exported as a real bundle (fast to run)."""
    import torch

    from simserve.inference.config import ModelConfig
    from simserve.model import build_model
    from simserve.model.export import export_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(input_size=48, stages=((16, 2, 1), (32, 2, 1), (48, 1, 1)), stem_width=8, embed_dim=24, head_width=16)
    m = build_model(cfg).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 48, 48), torch.randn(8, 3, 48, 48))
    return export_bundle(m.eval(), tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def stamp_folder(tmp_path_factory) -> Path:
    """40 real Tux Paint stamps in two sub-folders, plus one broken file."""
    if not STAMPS.exists():
        pytest.fail("Tux Paint stamps missing: run ./scripts/install-data.sh (Debian tuxpaint-stamps-default)")
    root = tmp_path_factory.mktemp("stamps")
    files = sorted(STAMPS.rglob("*.png"))[::20][:40]
    for i, f in enumerate(files):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"{i:02d}-{f.name}").write_bytes(f.read_bytes())
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _old_schema(path: Path, dim: int, columns: str):
    """An item store's tables as an earlier version created them (``columns``: the optional BLOB
    columns it had); returns the open connection."""
    import sqlite3

    old = sqlite3.connect(path)
    old.executescript(
        f"""
        PRAGMA journal_mode=WAL;
        CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
        CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, vector BLOB NOT NULL,
                            metadata TEXT, content_hash TEXT, features BLOB, added REAL NOT NULL{columns});
        CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op INTEGER NOT NULL, id INTEGER NOT NULL);
        INSERT INTO meta VALUES ('dim', '{dim}');
        """
    )
    return old


def store_with_inline_features(path: Path, vectors: np.ndarray, features: np.ndarray) -> None:
    """An item store as written before head features moved to a table of their own: each row
    keeps them inline, before its views and keypoints; keys k0, k1, ..."""
    old = _old_schema(path, vectors.shape[1], ", views BLOB, keypoints BLOB")
    rows = [(f"k{i}", np.asarray(v, np.float32).tobytes(), np.asarray(f, np.float16).tobytes()) for i, (v, f) in enumerate(zip(vectors, features))]
    old.executemany("INSERT INTO items(key, vector, features, added) VALUES (?, ?, ?, 0)", rows)
    old.commit()
    old.close()


def old_store(path: Path, columns: str = "") -> None:
    """A 4-d item store as an earlier version wrote it (``columns``: the optional BLOB columns
    it had, e.g. ", views BLOB"), holding one item, key 'old'."""
    old = _old_schema(path, 4, columns)
    old.execute("INSERT INTO items(key, vector, added) VALUES ('old', ?, 0)", (np.ones(4, np.float32).tobytes(),))
    old.commit()
    old.close()


def stored_views(store, ids) -> dict:
    """{id: [V, d] view embeddings} of the items stored with views."""
    got = store.candidates({int(i): 0.0 for i in ids}, views=True)
    return {i: c.views for i, c in got.items() if c.views is not None}


def grainy_png(side: int) -> bytes:
    """An example image blown up to side x side, with grain so it compresses as a photo does
    (many blocks of encoded bytes for a decoder to read)."""
    img = Image.open(Path(__file__).parents[1] / "examples" / "seagull.png").convert("RGB")
    px = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.int16)
    grain = np.random.default_rng(0).integers(-6, 7, px.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(px + grain, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def kill_9_mid_add(proc, addr: str, files: list, per: int, after: int) -> tuple[list[str], list[str]]:
    """Adds requests of ``per`` images (keys ``b<n>-<i>``, metadata ``batch=n``) through ``addr``
    until ``after`` keys are acknowledged, then kill -9s ``proc``: (acknowledged, attempted)."""
    from simserve.client import Client

    acked: list[str] = []
    attempted: list[str] = []

    def bulk():
        with Client(addr, timeout=10, retries=0) as c:
            for n in range(10_000):
                keys = [f"b{n}-{i}" for i in range(per)]
                attempted.extend(keys)
                try:
                    c.add([(k, files[(n * per + i) % len(files)], {"batch": str(n)}) for i, k in enumerate(keys)])
                except grpc.RpcError:
                    return
                acked.extend(keys)

    t = threading.Thread(target=bulk)
    t.start()
    deadline = time.time() + 60
    while len(acked) < after and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t.join(30)
    return acked, attempted
