import json
import os
import shutil

import numpy as np
import pytest
import torch

from simserve.inference.bundle import BundleError, load_bundle
from simserve.inference.config import ModelConfig
from simserve.inference.engine import load_engine
from simserve.model import build_model
from simserve.model.export import export_bundle
from simserve.model.heads import HEAD_REGISTRY

CFG = ModelConfig(input_size=48, stages=((16, 2, 1), (32, 2, 1), (48, 1, 1)), stem_width=8, embed_dim=24, head_width=16)


def _exported(head: str, path):
    torch.manual_seed(1)
    m = build_model(CFG.replace(head=head))
    m.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for _ in range(3):
            m(torch.randn(8, 3, 48, 48), torch.randn(8, 3, 48, 48))
    return export_bundle(m.eval(), path, metrics={"threshold": 0.7, "precision": 0.9, "recall": 0.8, "pair_accuracy": 0.85})


@pytest.mark.parametrize("head", sorted(HEAD_REGISTRY))
def test_onnx_matches_torch_for_every_head(head, tmp_path):
    path = _exported(head, tmp_path / head)
    onnx, ref = load_engine(path, "onnx"), load_engine(path, "torch")
    x = np.random.default_rng(0).normal(size=(70, 3, 48, 48)).astype(np.float32)  # > max_batch: chunked
    fo, eo = onnx.embed(x)
    ft, et = ref.embed(x)
    assert eo.shape == (70, 24) and np.allclose(np.linalg.norm(eo, axis=1), 1, atol=1e-5)
    assert np.abs(eo - et).max() <= 1e-4
    so, st = onnx.fuse(fo, fo[::-1]), ref.fuse(ft, ft[::-1])
    assert so.shape == (70,)
    assert np.abs(so - st).max() <= 1e-4
    assert np.allclose(so, so[::-1], atol=1e-6)  # symmetric through ONNX too
    one_f, one_e = onnx.embed(x[:1])  # batch of one: dynamic batch dimension
    assert np.abs(one_e - eo[:1]).max() <= 1e-5


def test_manifest_describes_the_model(tmp_path):
    b = load_bundle(_exported("grouped", tmp_path / "b"))
    m = b.manifest
    assert b.config.head == "grouped" and b.embedding_dim == 24
    assert m["preprocess"]["input_size"] == 48 and m["preprocess"]["mean"] == list(CFG.mean)
    assert b.threshold == 0.7 and m["threshold"]["precision"] == 0.9
    assert set(m["files"]) == {"tower.onnx", "head.onnx", "weights.npz"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_tampered_missing_and_wrong_version_are_refused(tmp_path):
    good = _exported("concat", tmp_path / "good")
    bad = tmp_path / "tampered"
    shutil.copytree(good, bad)
    with open(bad / "head.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"head\.onnx: sha256 does not match"):
        load_bundle(bad)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "weights.npz").unlink()
    with pytest.raises(BundleError, match=r"weights\.npz: listed in the manifest but missing"):
        load_bundle(missing)

    old = tmp_path / "version"
    shutil.copytree(good, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(old)

    escape = tmp_path / "escape"
    shutil.copytree(good, escape)
    manifest = json.loads((escape / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0"}
    (escape / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(escape)

    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")


def test_onnx_lanes_cut_batches_without_changing_a_single_bit(tmp_path):
    """One single-threaded session per lane, a slice of the batch each: the same numbers as
    one session, for every batch size (slices of unequal length included) and for callers
    on several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    path = _exported("dynamic", tmp_path / "b")
    one, four = load_engine(path, "onnx", threads=4, lanes=1), load_engine(path, "onnx", threads=4, lanes=4)
    assert (one.lanes, four.lanes) == (1, 4)
    x = np.random.default_rng(2).integers(0, 256, size=(70, 3, 48, 48), dtype=np.uint8)
    for n in (1, 3, 7, 16, 33, 70):
        f1, e1 = one.embed(x[:n])
        f4, e4 = four.embed(x[:n])
        assert np.array_equal(f1, f4) and np.array_equal(e1, e4)
        assert np.array_equal(one.fuse(f1, f1[::-1]), four.fuse(f1, f1[::-1]))
    with ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda i: four.embed(x[i : i + 20])[1], range(0, 50, 5)))
    assert all(np.array_equal(o, one.embed(x[i : i + 20])[1]) for o, i in zip(outs, range(0, 50, 5)))
    lane_threads = list(four._pool._threads)
    assert lane_threads and all(t.is_alive() for t in lane_threads)
    with one, four:  # close() on leaving: the lanes' threads end with the engine
        pass
    assert not any(t.is_alive() for t in lane_threads)


def test_lane_views_and_map_lanes_give_the_engines_numbers_in_input_order(tmp_path):
    """The bulk jobs' shape (simserve/jobs/lanes.py): each lane a whole batch of its own. Same bits
    as the engine, results in input order however the lanes finish, the input pulled lazily
    (a stream stays a stream), and a failure surfaces at its item."""
    import itertools

    from simserve.jobs.lanes import map_lanes

    path = _exported("grouped", tmp_path / "b")
    engine = load_engine(path, "onnx", threads=3, lanes=3)
    views = engine.split()
    assert len(views) == 3 and len({id(v.towers[0]) for v in views}) == 3 and all(v.lanes == 1 for v in views)
    assert len(engine.split(2)) == 2
    x = np.random.default_rng(3).integers(0, 256, size=(40, 3, 48, 48), dtype=np.uint8)
    batches = [x[s : s + n] for s, n in zip(range(0, 40, 8), (8, 3, 8, 1, 8))]

    def run(lane, b):
        assert lane.lanes == 1
        return lane.embed(b)[1]

    out = list(map_lanes(engine, batches, lambda b: b, run))
    assert len(out) == len(batches) and all(np.array_equal(o, engine.embed(b)[1]) for o, b in zip(out, batches))

    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield x[:2]

    first = next(map_lanes(engine, endless(), lambda b: b, run))
    assert first.shape == (2, 24) and len(pulled) == 4  # a batch per lane in flight, one waiting

    def broken(b):
        if len(b) == 1:
            raise ValueError("item 3 is bad")
        return b

    got = map_lanes(engine, batches, broken, run)
    assert [len(next(got)) for _ in range(3)] == [8, 3, 8]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(got)


def _variant(good, where, edit=None, files=None):
    """A copy of a good bundle with its manifest edited and/or files replaced (hashes updated)."""
    from simserve.inference.bundle import sha256_file

    shutil.copytree(good, where)
    for name, data in (files or {}).items():
        (where / name).write_bytes(data) if isinstance(data, bytes) else shutil.copy(data, where / name)
    m = json.loads((where / "manifest.json").read_text())
    for name in files or {}:
        m["files"][name]["sha256"] = sha256_file(where / name)
    if edit:
        edit(m)
    (where / "manifest.json").write_text(json.dumps(m))
    return where


def test_a_bundle_that_would_fail_every_request_is_refused_before_serving(tmp_path):
    """Each of these once started a server that was SERVING and answered UNKNOWN (or gave a
    traceback): now each is one clear line, at load, naming what is wrong."""
    import subprocess
    import sys

    from simserve.inference.engine import load_engine

    good = _exported("concat", tmp_path / "good")
    other = export_bundle(build_model(CFG.replace(embed_dim=32)).eval(), tmp_path / "other", metrics={})
    cases = {
        "embedding_dim": (lambda m: m.update(embedding_dim=64), None, "embedding_dim 64 must be the model's embed_dim"),
        "threshold string": (lambda m: m.update(threshold={"score": "0.5"}), None, "threshold.score '0.5' must be a number in"),
        "threshold range": (lambda m: m.update(threshold={"score": 1.5}), None, r"threshold.score 1.5 must be a number in \[0, 1\]"),
        "mean length": (lambda m: m["model"].update(mean=[0.5]), None, "mean/std need one value per input channel"),
        "std zero": (lambda m: m["model"].update(std=[0.2, 0.0, 0.2]), None, "std must be positive"),
        "feature_shape": (lambda m: m.update(feature_shape=[48, "x", 3]), None, "feature_shape"),
        "random onnx": (None, {"tower.onnx": b"\x08\x01garbage" * 100}, "does not load in ONNX Runtime"),
        "swapped models": (None, {"tower.onnx": other / "tower.onnx", "head.onnx": other / "head.onnx"}, "model files do not match the manifest"),
    }
    for name, (edit, files, message) in cases.items():
        b = _variant(good, tmp_path / name.replace(" ", "-"), edit, files)
        with pytest.raises(BundleError, match=message):
            load_engine(b)
    link = _variant(good, tmp_path / "link")
    (link / "weights.npz").unlink()
    (link / "weights.npz").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="a symbolic link"):
        load_bundle(link)
    deep = tmp_path / "deep"
    shutil.copytree(good, deep)
    (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply|unreadable manifest"):
        load_bundle(deep)
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "serve", "--port", "0", "--bundle", str(tmp_path / "swapped-models")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SIMSERVE_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("simserve: error:")
    assert "model files do not match the manifest" in r.stderr


def test_query_views_from_a_tower_of_any_size_and_from_an_older_fixed_size_one(tmp_path, photo_jpeg):
    """A new bundle's tower takes any image size, so a query's regions are pooled from one larger
    pass (as PyTorch pools them); a bundle exported before, whose tower takes only its input size,
    still searches: its regions are embedded as crops."""
    from simserve.inference.bundle import TOWER_FILE, sha256_file
    from simserve.inference.crops import N_QUERY_VIEWS, query_view_embeddings, query_view_pixels
    from simserve.model.export import _onnx_export

    path = _exported("grouped", tmp_path / "b")
    onnx, ref = load_engine(path, "onnx"), load_engine(path, "torch")
    assert onnx.any_size
    views = query_view_embeddings(onnx, photo_jpeg)
    assert views.shape == (N_QUERY_VIEWS - 1, 24) and np.abs(views - query_view_embeddings(ref, photo_jpeg)).max() <= 1e-4

    m = ref.model  # the older export: only the batch dynamic
    _onnx_export(
        m.tower, (torch.zeros(2, 3, 48, 48),), str(path / TOWER_FILE), dynamo=False, opset_version=17,
        input_names=["images"], output_names=["features", "embeddings"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}, "embeddings": {0: "batch"}},
    )  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][TOWER_FILE]["sha256"] = sha256_file(path / TOWER_FILE)
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = load_engine(path, "onnx")
    assert not old.any_size
    crops = old.embed(query_view_pixels(photo_jpeg, 48, 3)[1:])[1]
    assert np.abs(query_view_embeddings(old, photo_jpeg) - crops).max() <= 1e-6
