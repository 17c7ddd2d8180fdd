"""For scripts/ab-variants.py: a region's ORB points found on the region scaled to SIDE (256 px,
as now), against smaller sides (fewer pixels to detect on; ORB's pyramid spans the scale gap to
the stored points). SIDES=256,192,160 (docs/decisions/search-budget.md)."""

import os
import threading

from PIL import Image, ImageOps

from simserve.ranking import verify

_now = verify.QueryFeatures.region


def _at(side: int):
    def region(self, box):
        if self._image is None:
            return None
        with self._lock:
            lock = self._region_locks.setdefault(box, threading.Lock())
        with lock:
            if box not in self._regions:
                w, h = self._image.size
                crop = self._image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
                img = ImageOps.grayscale(crop) if crop.mode != "L" else crop
                s = side / max(img.size)
                grey = verify.np.asarray(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC))
                if min(grey.shape) < verify.MIN_SIDE:
                    o = verify.np.zeros(0, verify.ORB_POINT)
                else:
                    o = verify._points(verify.ORB_POINT, *verify._tools()[1].detectAndCompute(grey, None), side=side)
                self._regions[box] = [verify._query_side(verify.np.zeros(0, verify.SIFT_POINT), o, (grey.shape[1] / side, grey.shape[0] / side))]
            return self._regions[box]

    return region


VARIANTS = {f"side {n}": (lambda n: lambda service: setattr(verify.QueryFeatures, "region", _now if n == verify.SIDE else _at(n)))(int(n)) for n in os.environ.get("SIDES", "256,192").split(",")}
