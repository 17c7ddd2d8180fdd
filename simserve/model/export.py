"""Checkpoint -> bundle: ONNX tower and head with a dynamic batch, npz weights, manifest.

Uses the TorchScript-based exporter (``dynamo=False``): one self-contained
file per graph, no onnxscript dependency, and it keeps the batch dynamic.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import simserve
from simserve.inference.bundle import FORMAT, FORMAT_VERSION, HEAD_FILE, MANIFEST, TOWER_FILE, WEIGHTS_FILE, load_bundle, sha256_file
from simserve.model import SiameseNet, load_checkpoint
from simserve.model.profile import count_params, flops_per_pair

OPSET = 17


class _Head(nn.Module):
    def __init__(self, model: SiameseNet) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(fa, fb))


def _onnx_export(*args: Any, **kwargs: Any) -> None:
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # harmless, dynamic head
        torch.onnx.export(*args, **kwargs)


def _suggested_threshold(m: dict[str, Any]) -> dict[str, Any]:
    """Precision-first: the threshold that kept 99% precision on validation, when measured."""
    if "threshold_p99" in m:
        return {
            "score": float(m["threshold_p99"]), "precision": m.get("precision_p99"), "recall": m.get("recall_p99"),
            "note": "lowest score threshold with precision >= 0.99 on the held-out validation pairs",
            "best_accuracy": {"score": m.get("threshold"), "accuracy": m.get("pair_accuracy"), "precision": m.get("precision"), "recall": m.get("recall")},
        }
    return {
        "score": float(m.get("threshold", 0.5)), "precision": m.get("precision"), "recall": m.get("recall"),
        "accuracy": m.get("pair_accuracy"), "note": "best-accuracy threshold on the held-out validation pairs",
    }


def _export_tower(model: SiameseNet, path: Path) -> torch.Tensor:
    """The tower graph, batch, height and width dynamic: a search pools its regions' embeddings
    from one pass over the query at 320 px (inference/crops.py). Returns a feature map, for the head's export."""
    cfg = model.cfg
    x = torch.zeros(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        fmap, _ = model.tower(x)
    _onnx_export(
        model.tower, (x,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["images"], output_names=["features", "embeddings"],
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch", 2: "rows", 3: "cols"}, "embeddings": {0: "batch"}},
    )
    return fmap


def refresh_tower(bundle_dir: str | os.PathLike) -> None:
    """Export a bundle's tower graph again from its own weights (the same numbers, height and
    width dynamic), and its manifest's checksum with it."""
    from simserve.inference.engine import TorchEngine

    path = Path(bundle_dir) / TOWER_FILE
    _export_tower(TorchEngine(load_bundle(bundle_dir)).model, path)
    mpath = Path(bundle_dir) / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["files"][TOWER_FILE]["sha256"] = sha256_file(path)
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")


def export_bundle(model: SiameseNet, out_dir: str | os.PathLike, metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a bundle atomically: built in a temp folder, then renamed into place."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    cfg = model.cfg
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        fmap = _export_tower(model, tmp / TOWER_FILE)
        _onnx_export(
            _Head(model), (fmap, fmap.flip(0)), str(tmp / HEAD_FILE), dynamo=False, opset_version=OPSET,
            input_names=["features_a", "features_b"], output_names=["scores"],
            dynamic_axes={"features_a": {0: "batch"}, "features_b": {0: "batch"}, "scores": {0: "batch"}},
        )
        np.savez(tmp / WEIGHTS_FILE, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        metrics = metrics or {}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "simserve_version": simserve.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": cfg.to_dict(),
            "preprocess": {
                "input_size": cfg.input_size,
                "resize": "squash, bilinear (whole image to a square; no crop)",
                "colour_mode": cfg.colour_mode,
                "mean": list(cfg.mean),
                "std": list(cfg.std),
                "layout": "NCHW float32",
            },
            "embedding_dim": cfg.embed_dim,
            "feature_shape": list(fmap.shape[1:]),
            "threshold": _suggested_threshold(metrics),
            "metrics": metrics,
            "cost": {**flops_per_pair(model), "tower_params": count_params(model.tower), "head_params": count_params(model.head)},
            "onnx_opset": OPSET,
            "torch_version": torch.__version__,
            **(extra or {}),
        }
        manifest["files"] = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (TOWER_FILE, HEAD_FILE, WEIGHTS_FILE)
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: unreadable to a service user
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    model, payload = load_checkpoint(checkpoint)
    metrics = json.loads(payload["metrics"]) if isinstance(payload.get("metrics"), str) else {}
    recipe = json.loads(payload["recipe"]) if isinstance(payload.get("recipe"), str) else None
    return export_bundle(model, out_dir, metrics, {"recipe": recipe} if recipe else None)
