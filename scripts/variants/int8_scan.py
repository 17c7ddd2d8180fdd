"""For scripts/ab-variants.py: the exact scan as a float matrix product alone, against a first
ranking by the vectors' int8 codes with the best ``depth(k)`` scored exactly
(docs/decisions/exact-scan.md)."""

from simserve.index import exact_scan

_from = exact_scan.QUANTIZED_FROM

VARIANTS = {
    "float": lambda service: setattr(exact_scan, "QUANTIZED_FROM", 1 << 62),
    "int8": lambda service: setattr(exact_scan, "QUANTIZED_FROM", _from),
}
