"""For scripts/ab-variants.py: verification as it was at fd4b52a (a round waits for all its
candidates; each region pick tries all its boxes before the next; early views scanned after 15
upright candidates) against now (docs/decisions/search-budget.md, "Region work ordered")."""

import subprocess
import sys
import types
from pathlib import Path

from simserve.ranking import pipeline

_root = Path(__file__).resolve().parents[2]
_before = types.ModuleType("pipeline_fd4b52a")
sys.modules[_before.__name__] = _before  # its dataclasses look their module up
exec(subprocess.check_output(["git", "-C", str(_root), "show", "fd4b52a:simserve/ranking/pipeline.py"], text=True), _before.__dict__)
_now = (pipeline._verify, pipeline._verify_picks, pipeline.UPRIGHT_FIRST_EARLY)


def _set(verify, picks, upright):
    return lambda service: (setattr(pipeline, "_verify", verify), setattr(pipeline, "_verify_picks", picks), setattr(pipeline, "UPRIGHT_FIRST_EARLY", upright))


VARIANTS = {
    "fd4b52a": _set(_before._verify, _before._verify, pipeline.UPRIGHT_FIRST),
    "now": _set(*_now),
}
