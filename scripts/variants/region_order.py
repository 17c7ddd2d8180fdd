"""For scripts/ab-variants.py: regions' picks verified every region's first before any second,
best-scored first, against the hits most regions picked first (docs/decisions/search-budget.md).
BUDGET_MS sets the search budget (default 0: none)."""

import dataclasses
import os

from simserve.ranking import pipeline

_budget = int(os.environ.get("BUDGET_MS", "0"))
_by_count = pipeline._region_order


def _by_rank(by_region):
    return [id_ for _, _, id_, _ in by_region]


def by_rank(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    pipeline._region_order = _by_rank


def by_count(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    pipeline._region_order = _by_count


VARIANTS = {"by_rank": by_rank, "by_count": by_count}
