"""For scripts/ab-variants.py: a region's share of the query's points cut from all three of its
sides (given, mirrored, zoomed out) against the first two only (docs/decisions/geometric-verification.md).

    python scripts/ab-variants.py col-100k 248 scripts/variants/zoom_shares.py --budget-ms 90 --transforms paste_into,crop_paste
"""

from simserve.ranking import verify

_all = verify.QueryFeatures.share


def _two(self, box):
    if box not in self._shares:
        self._shares[box] = verify.within(self[:2], box)
    return self._shares[box]


VARIANTS = {
    "shares of all sides": lambda service: setattr(verify.QueryFeatures, "share", _all),
    "shares of given and mirrored": lambda service: setattr(verify.QueryFeatures, "share", _two),
}
