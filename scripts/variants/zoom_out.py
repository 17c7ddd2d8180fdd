"""For scripts/ab-variants.py: a query's points found again zoomed out (QueryFeatures' third
side, at ZOOMS' fractions of its size) against none, and with SIFT found there too
(docs/decisions/geometric-verification.md).

    ZOOMS=0.7,0.5 python scripts/ab-variants.py col-100k 600 scripts/variants/zoom_out.py --budget-ms 90
"""

import os

import numpy as np

from simserve.ranking import verify

_orb_only = verify.QueryFeatures.zoomed


def _with_sift(self) -> verify.LocalFeatures:
    with self._zoom_lock:
        if self._zoomed is None:
            s, o = verify._detect(verify._scaled(self._grey, verify.ZOOM_OUT))
            for points in (s, o):
                points["xy"] = (points["xy"].astype(np.float32) / verify.ZOOM_OUT).astype(np.float16)
            self._zoomed = verify._query_side(s, o, self._given.extent)
        return self._zoomed


def _use(zoom: float | None, sift: bool = False):
    def switch(service) -> None:
        verify.ZOOM_OUT = zoom
        verify.QueryFeatures.zoomed = _with_sift if sift else _orb_only

    return switch


VARIANTS = {"no zoom": _use(None)}
for z in os.environ.get("ZOOMS", "0.7").split(","):
    VARIANTS[f"zoom {z}"] = _use(float(z))
    if os.environ.get("SIFT"):
        VARIANTS[f"zoom {z} with SIFT"] = _use(float(z), sift=True)
