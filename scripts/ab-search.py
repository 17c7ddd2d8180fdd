"""Search latency and quality with this checkout's ranking (ranking/pipeline.py, ranking/verify.py
and the regions of inference/crops.py) beside an earlier revision's, each query through both in
turn (the machine's noise falls on both alike), on the copydetect set's 10,100-item collection
(scripts/ab-variants.py, with the two rankings as the variants). The query views are made by this
checkout's service for both; searches are not budgeted. N_QUERIES are drawn at random (seed 0).

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/. An earlier ``inliers``
that takes no ``enough`` is called without it. TRANSFORMS (comma-separated, e.g.
paste_into,crop_paste) keeps only those queries.

    python scripts/ab-search.py REVISION [N_QUERIES] [TRANSFORMS]
"""

import asyncio
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from simserve.ranking import pipeline, verify
from simserve.serve import service

ROOT = Path(__file__).resolve().parents[1]


def _module(rev: str, path: str, name: str):
    """``path`` as it was at ``rev``, imported as ``name``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


def earlier(rev: str):
    """(pipeline, verify) as they were at ``rev``, each calling the other, with that revision's regions."""
    old_verify = _module(rev, "simserve/ranking/verify.py", "verify_earlier")
    old_crops = _module(rev, "simserve/inference/crops.py", "crops_earlier")
    old_pipeline = _module(rev, "simserve/ranking/pipeline.py", "pipeline_earlier")
    old_pipeline.verify = old_verify
    old_pipeline.REGION_BOXES, old_pipeline.TURNS = old_crops.REGION_BOXES, old_crops.TURNS
    search = old_pipeline.search
    old_pipeline.search = lambda *a, deadline=None, **kw: search(*a, **kw)  # before search budgets
    return old_pipeline, old_verify


def _ranking(modules):
    def switch(svc) -> None:
        service.pipeline, service.verify = modules

    return switch


if __name__ == "__main__":
    rev = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    transforms = sys.argv[3] if len(sys.argv) > 3 else ""
    spec = importlib.util.spec_from_file_location("ab_variants", Path(__file__).with_name("ab-variants.py"))
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    variants = {rev: _ranking(earlier(rev)), "checkout": _ranking((pipeline, verify))}
    asyncio.run(ab.compare("col-detail8", n, variants, 0, transforms))
