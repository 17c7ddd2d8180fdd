"""For scripts/ab-variants.py: a box's share of the query's points matched in full against every
candidate (as now), against a coarse pass on the candidate's strongest points first, the full
match only where it found COARSE_MIN inliers, as the whole query's matching does
(docs/decisions/search-budget.md)."""

from simserve.ranking import verify

_full = verify.part_inliers


def _coarse_first(query, stored):
    strong, best = verify._strongest(stored), 0
    for q in query:
        if verify._inliers(q, strong, verify.COARSE_MIN, verify.COARSE_ITERS) >= verify.COARSE_MIN:
            best = max(best, verify._inliers(q, stored))
    return best


VARIANTS = {
    "full": lambda service: setattr(verify, "part_inliers", _full),
    "coarse_first": lambda service: setattr(verify, "part_inliers", _coarse_first),
}
