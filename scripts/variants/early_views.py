"""For scripts/ab-variants.py: the query's views asked for after the upright query's best
candidate is left uncertain, against asked for at once when that candidate's cosine is below
EARLY_VIEWS_BELOW (or each of EARLIES, comma-separated) (docs/decisions/search-budget.md).
BUDGET_MS sets the search budget (default 0: none)."""

import dataclasses
import math
import os

from simserve.ranking import pipeline

_budget = int(os.environ.get("BUDGET_MS", "0"))
_early = pipeline.EARLY_VIEWS_BELOW


def after_first(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    pipeline.EARLY_VIEWS_BELOW = -math.inf


def early(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    pipeline.EARLY_VIEWS_BELOW = _early


def _at(x):
    def switch(service) -> None:
        service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
        pipeline.EARLY_VIEWS_BELOW = x

    return switch


VARIANTS = {"after_first": after_first, "early": early} if "EARLIES" not in os.environ else {f"early {x}": _at(float(x)) for x in os.environ["EARLIES"].split(",")}
