"""The serving path imports neither torch nor the training code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
import simserve.cli, simserve.server, simserve.client, simserve.engine, simserve.runtime, simserve.indexer, simserve.search
from simserve.engine import load_engine
e = load_engine()
e.score_images([])
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))
print(','.join(bad))
"""


def test_serving_modules_do_not_import_torch_or_training():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"serving path imported: {r.stdout.strip()}"
