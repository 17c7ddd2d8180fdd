"""For scripts/ab-variants.py: the query's views asked for after the upright query's best
candidate is left uncertain, against asked for at once when that candidate's cosine is below
EARLY_VIEWS_BELOW (or each of EARLIES, comma-separated) (docs/decisions/search-budget.md)."""

import math
import os

from simserve.ranking import pipeline

_early = pipeline.EARLY_VIEWS_BELOW


def _below(x: float):
    return lambda service: setattr(pipeline, "EARLY_VIEWS_BELOW", x)


if "EARLIES" in os.environ:
    VARIANTS = {f"early {x}": _below(float(x)) for x in os.environ["EARLIES"].split(",")}
else:
    VARIANTS = {"after_first": _below(-math.inf), "early": _below(_early)}
