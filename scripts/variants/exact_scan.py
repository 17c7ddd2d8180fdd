"""For scripts/ab-variants.py: flat searches through FAISS and each query region's points found on
its own crop (as before), against the exact scan in ONNX Runtime and the regions' points found
once on the whole query (docs/decisions/exact-scan.md)."""

import threading

from simserve.index import exact_scan
from simserve.ranking import verify

_flat_rows, _region = exact_scan.flat_rows, verify.QueryFeatures.region
_lock = threading.Lock()


def _region_on_its_crop(self, box):
    if self._image is None:
        return None
    with _lock:
        lock = self.__dict__.setdefault("_crop_locks", {}).setdefault(box, threading.Lock())
    with lock:
        found = self.__dict__.setdefault("_crop_regions", {})
        if box not in found:
            w, h = self._image.size
            grey = verify._grey(self._image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))))
            s, o = verify._detect(grey, sift=False)
            found[box] = [verify._query_side(s, o, (grey.shape[1] / verify.SIDE, grey.shape[0] / verify.SIDE))]
        return found[box]


def before(service) -> None:
    exact_scan.flat_rows = lambda index: None
    verify.QueryFeatures.region = _region_on_its_crop


def after(service) -> None:
    exact_scan.flat_rows, verify.QueryFeatures.region = _flat_rows, _region


VARIANTS = {"before": before, "after": after}
