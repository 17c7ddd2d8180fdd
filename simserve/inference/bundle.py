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
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
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
        if not fpath.is_file():
            raise BundleError(f"{fpath}: listed in the manifest but missing")
        if verify and sha256_file(fpath) != meta.get("sha256"):
            raise BundleError(f"{fpath}: sha256 does not match the manifest (file changed or corrupt)")
    try:
        ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: bad model config ({e})") from None
    return Bundle(root, manifest)
