"""For scripts/ab-variants.py: a verification round that waits for all its candidates (fd4b52a's
``_verify``), against a round that stops at its first certain hit, with and without its regions'
points found ahead on idle threads (docs/decisions/search-budget.md; measured before
``_verify_picks``, which now calls whichever ``_verify`` is in place once a pass)."""

import runpy
from pathlib import Path

from simserve.ranking import pipeline

_before = runpy.run_path(str(Path(__file__).with_name("verify_order.py")))["_before"]  # pipeline.py at fd4b52a
_now, _ahead = pipeline._verify, pipeline._regions_ahead


def _set(verify, ahead):
    return lambda service: (setattr(pipeline, "_verify", verify), setattr(pipeline, "_regions_ahead", ahead))


VARIANTS = {
    "before": _set(_before._verify, _ahead),
    "stop": _set(_now, lambda *a: None),
    "stop+ahead": _set(_now, _ahead),
}
