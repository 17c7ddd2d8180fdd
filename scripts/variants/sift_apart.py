"""For scripts/ab-variants.py: a query's SIFT and ORB points found one after the other on one
thread, against SIFT on another thread beside ORB (docs/decisions/search-budget.md). BUDGET_MS
sets the search budget (default 0: none)."""

import dataclasses
import os

from simserve.ranking import verify

_budget = int(os.environ.get("BUDGET_MS", "0"))
_apart = verify._detect_apart


def one_thread(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    verify._detect_apart = verify._detect


def apart(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    verify._detect_apart = _apart


VARIANTS = {"one_thread": one_thread, "apart": apart}
