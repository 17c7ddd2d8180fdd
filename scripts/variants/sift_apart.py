"""For scripts/ab-variants.py: a query's SIFT and ORB points found one after the other on one
thread, against SIFT on another thread beside ORB (docs/decisions/search-budget.md)."""

from simserve.ranking import verify

_apart = verify._detect_apart

VARIANTS = {
    "one_thread": lambda service: setattr(verify, "_detect_apart", verify._detect),
    "apart": lambda service: setattr(verify, "_detect_apart", _apart),
}
