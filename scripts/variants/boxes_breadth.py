"""For scripts/ab-variants.py: each region pick tries all its boxes before the next pick is
verified, against every pick's first box before any pick's second (``pipeline._verify_picks``;
docs/decisions/search-budget.md)."""

from simserve.ranking import pipeline

_breadth_first = pipeline._verify_picks

VARIANTS = {
    "depth_first": lambda service: setattr(pipeline, "_verify_picks", pipeline._verify),
    "breadth_first": lambda service: setattr(pipeline, "_verify_picks", _breadth_first),
}
