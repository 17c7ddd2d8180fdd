"""For scripts/ab-variants.py: flat searches through FAISS (as before) against the exact scan in
ONNX Runtime (docs/decisions/exact-scan.md)."""

from simserve.index import exact_scan

_flat_rows = exact_scan.flat_rows

VARIANTS = {
    "faiss": lambda service: setattr(exact_scan, "flat_rows", lambda index: None),
    "ort": lambda service: setattr(exact_scan, "flat_rows", _flat_rows),
}
