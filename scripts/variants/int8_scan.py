"""For scripts/ab-variants.py: the exact scan as a float matrix product alone, against a first
ranking by the vectors' int8 codes with the best ``depth(k)`` scored exactly
(docs/decisions/exact-scan.md). BUDGET_MS sets the search budget (default 0: none)."""

import dataclasses
import os

from simserve.index import exact_scan

_from = exact_scan.QUANTIZED_FROM
_budget = int(os.environ.get("BUDGET_MS", "0"))


def float_scan(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    exact_scan.QUANTIZED_FROM = 1 << 62


def int8_scan(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    exact_scan.QUANTIZED_FROM = _from


VARIANTS = {"float": float_scan, "int8": int8_scan}
