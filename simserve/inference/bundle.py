"""Model bundles: a folder of ONNX graphs + weights, described by manifest.json.

A bundle is self-describing (architecture, preprocessing, suggested
threshold, metrics) and self-checking: loading verifies the format version
and the sha256 of every file it lists, and names the file that is wrong.
Nothing in a bundle is unpickled: graphs are ONNX protobufs, weights are a
numpy ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simserve.inference.config import ModelConfig

FORMAT = "simserve-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOWER_FILE = "tower.onnx"
HEAD_FILE = "head.onnx"
WEIGHTS_FILE = "weights.npz"
MAX_MANIFEST_BYTES = 1 << 20
DEFAULT_BUNDLE = Path(__file__).parents[1] / "bundles" / "default"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @functools.cached_property
    def config(self) -> ModelConfig:  # cached: the server asks for it on every request
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def threshold(self) -> float:
        return float(self.manifest.get("threshold", {}).get("score", 0.5))

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(path: str | os.PathLike | None = None, verify: bool = True) -> Bundle:
    """Read and check a bundle folder (the shipped default model when ``path`` is None)."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: manifest missing; not a simserve bundle")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: manifest is {mpath.stat().st_size} bytes; a manifest is a few KB")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    except RecursionError:
        raise BundleError(f"{mpath}: manifest is nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a simserve bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {version!r}; this simserve reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {TOWER_FILE, HEAD_FILE} <= set(files):
        raise BundleError(f"{mpath}: manifest must list {TOWER_FILE} and {HEAD_FILE} under 'files'")
    for name, meta in files.items():
        if Path(name).name != name:  # no paths out of the bundle folder
            raise BundleError(f"{mpath}: file entry {name!r} is not a plain file name")
        fpath = root / name
        if fpath.is_symlink() or not fpath.is_file():  # a link could point anywhere: /etc/passwd
            raise BundleError(f"{fpath}: listed in the manifest but {'a symbolic link' if fpath.is_symlink() else 'missing'}")
        if not isinstance(meta, dict):
            raise BundleError(f"{mpath}: files[{name!r}] must be an object with its sha256")
        if verify and sha256_file(fpath) != meta.get("sha256"):
            raise BundleError(f"{fpath}: sha256 does not match the manifest (file changed or corrupt)")
    try:
        cfg = ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: bad model config ({e})") from None
    _check_fields(mpath, manifest, cfg)
    return Bundle(root, manifest)


def _check_fields(mpath: Path, m: dict[str, Any], cfg: ModelConfig) -> None:
    """The manifest's numbers, each of the type and range the server relies on, and in step with the
    model config; a wrong one would otherwise start a server that fails every request."""
    def bad(what: str) -> BundleError:
        return BundleError(f"{mpath}: {what}")

    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (*cfg.std, cfg.input_size, cfg.embed_dim)):
        raise bad("model input_size, embed_dim and std must be positive numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.mean):
        raise bad("model mean must be numbers")
    dim = m.get("embedding_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim != cfg.embed_dim:
        raise bad(f"embedding_dim {dim!r} must be the model's embed_dim ({cfg.embed_dim})")
    shape = m.get("feature_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise bad(f"feature_shape {shape!r} must be three positive integers (channels, height, width)")
    thr = m.get("threshold", {})
    score = thr.get("score", 0.5) if isinstance(thr, dict) else None
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
        raise bad(f"threshold.score {score!r} must be a number in [0, 1]")
