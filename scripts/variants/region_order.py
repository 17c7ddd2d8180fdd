"""For scripts/ab-variants.py: regions' picks verified every region's first before any second,
best-scored first, against the hits most regions picked first (docs/decisions/search-budget.md)."""

from simserve.ranking import pipeline

_by_count = pipeline._region_order


def _by_rank(by_region):
    return [id_ for _, _, id_, _ in by_region]


VARIANTS = {
    "by_rank": lambda service: setattr(pipeline, "_region_order", _by_rank),
    "by_count": lambda service: setattr(pipeline, "_region_order", _by_count),
}
