"""For scripts/ab-variants.py: flat searches through FAISS (as before) against the exact scan in
ONNX Runtime (docs/decisions/exact-scan.md). BUDGET_MS sets the search budget (default 0: none)."""

import dataclasses
import os

from simserve.index import exact_scan

_flat_rows = exact_scan.flat_rows
_budget = int(os.environ.get("BUDGET_MS", "0"))


def faiss_scan(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    exact_scan.flat_rows = lambda index: None


def ort_scan(service) -> None:
    service.config = dataclasses.replace(service.config, search_budget_ms=_budget)
    exact_scan.flat_rows = _flat_rows


VARIANTS = {"faiss": faiss_scan, "ort": ort_scan}
