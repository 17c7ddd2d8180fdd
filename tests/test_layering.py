"""The layering the folders promise: each layer imports only the layers beneath it, and the
serving path imports neither torch nor the training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the simserve packages it must never import (anywhere, lazily included)
FORBIDDEN = {
    "simserve.inference": ("simserve.index", "simserve.ranking", "simserve.serve", "simserve.jobs", "simserve.bench", "simserve.cli"),
    "simserve.index": ("simserve.inference", "simserve.ranking", "simserve.serve", "simserve.jobs", "simserve.model", "simserve.bench", "simserve.cli"),
    "simserve.ranking": ("simserve.serve", "simserve.jobs", "simserve.model", "simserve.bench", "simserve.cli", "training"),
    "simserve.jobs": ("simserve.serve", "simserve.bench", "simserve.cli", "training"),
    "simserve.serve": ("simserve.jobs", "simserve.bench", "simserve.cli", "simserve.model", "training"),
    "simserve.model": ("simserve.index", "simserve.ranking", "simserve.serve", "simserve.jobs", "simserve.bench", "simserve.cli", "training"),
    "training": ("simserve.index", "simserve.serve", "simserve.bench", "simserve.cli"),
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from simserve import jobs`
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_beneath_it(package):
    folder = ROOT.joinpath(*package.split("."))
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(folder.rglob("*.py"))
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


PROBE = """
import sys
import simserve.cli, simserve.serve.app, simserve.client, simserve.jobs.index_folder, simserve.ranking.pipeline
from simserve.inference.engine import load_engine
e = load_engine()
e.score_images([])
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))
print(','.join(bad))
"""


def test_serving_modules_do_not_import_torch_or_training():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"serving path imported: {r.stdout.strip()}"


def test_training_does_not_load_the_index_or_the_server():
    probe = "import sys, training.trainer, training.evaluate, training.robustness; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'grpc', 'sqlite3'))))"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"training loaded: {r.stdout.strip()}"
