"""For scripts/ab-variants.py: a verification round that waits for all its candidates, one hit's
boxes tried one after another (as before), against a round that stops at its first certain hit,
with and without its regions' points found ahead on idle threads (docs/decisions/search-budget.md)."""

import subprocess
import sys
import types
from pathlib import Path

from simserve.ranking import pipeline

_root = Path(__file__).resolve().parents[2]
_before = types.ModuleType("pipeline_before")
sys.modules[_before.__name__] = _before  # its dataclasses look their module up
exec(subprocess.check_output(["git", "-C", str(_root), "show", "fd4b52a:simserve/ranking/pipeline.py"], text=True), _before.__dict__)
_now, _ahead = pipeline._verify, pipeline._regions_ahead


def _set(verify, ahead):
    return lambda service: (setattr(pipeline, "_verify", verify), setattr(pipeline, "_regions_ahead", ahead))


VARIANTS = {
    "before": _set(_before._verify, _ahead),
    "stop": _set(_now, lambda *a: None),
    "stop+ahead": _set(_now, _ahead),
}
