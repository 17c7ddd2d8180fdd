"""Geometric verification: a query and a stored image that share many local features in one
consistent layout are a copy and its original, whatever their embeddings say.

SIFT (blobs, RootSIFT) and ORB (FAST corners; drawings are mostly corners) correspondences go
into one RANSAC, so a candidate must explain both with the same affine map; a query counts as
given and mirrored. Crop-views collection: recall@1 0.916 -> 0.956 (docs/decisions/
geometric-verification.md). OpenCV (the ``verify`` extra) is imported only here, and only when a
verifying collection is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import threadpoolctl
from PIL import Image, ImageOps

from simserve.inference.decode import DEFAULT_MAX_PIXELS, decode_image

SIDE = 256  # keypoints are found on the image scaled to this longer side (192 / 384: fewer right)
# SIFT on it scaled to half that (OpenCV doubles its input first, so it still sees SIDE): a
# quarter of the cost (2.5 vs 11 ms), and 45.1% of copies reach 10 inliers against 45.4%.
SIFT_SIDE = SIDE // 2
MAX_SIFT = 400  # the strongest SIFT keypoints kept per image
MAX_ORB = 1000  # ORB keypoints kept per image (2,000 found no more copies)
ORB_FAST_THRESHOLD = 5  # OpenCV's default 20 finds too few corners on soft, small drawings
RATIO = 0.8  # Lowe's ratio test, both detectors (0.7 / 0.75 / 0.85 matched fewer copies)
RANSAC_PX = 0.02  # reprojection error an inlier may have, as a fraction of the longer side
MIN_SIDE = 16  # below this many pixels on the short side (at SIDE on the long one) an image has no keypoints
MIN_MATCHES = 4  # below this RANSAC fits noise: an affine map passes through any three points
# A first pass matches only the strongest keypoints (stored strongest first); the full match, ~20x
# the cost, runs only where that pass found COARSE_MIN inliers (docs/decisions/deep-shortlist.md).
COARSE_SIFT, COARSE_ORB, COARSE_MIN = 100, 200, 5
COARSE_ITERS = 300  # RANSAC tries on the coarse pass: as many copies pass as with 1,000, at 0.8x the time
# A query's points are ordered strongest first within each cell of this grid, cell by cell, so its
# coarse set covers the whole image: text or an emoji pasted on a copy holds its strongest corners,
# and the coarse pass then saw only those (copies of 15+ inliers passing, text 0.32 -> 0.47).
SPREAD_CELLS = 4
# A query cut from a larger photo shows its content bigger than the stored original does, and its
# strongest points at SIDE are then detail the original at SIDE never had: its points are found
# again on it at this fraction of SIDE (QueryFeatures' third side). Photographs' copies reaching
# 10 inliers, 600 random queries: 0.890 -> 0.916; crop to 25% 0.66 -> 0.76, crop + colour + text
# 0.82 -> 0.95, pasted 0.48 -> 0.59 (0.6: 0.905, 0.8: 0.919; scripts/zoom-inliers.py); hard negatives
# reaching 6: 0.025 -> 0.036. At 90 ms, all 1,884 queries at 100k: recall@1
# 0.943 -> 0.947, photographs 0.974 -> 0.977, p50 25.7 -> 25.4 ms (docs/decisions/
# geometric-verification.md). None: no such side.
ZOOM_OUT: float | None = 0.7

SIFT_POINT = np.dtype([("xy", "<f2", (2,)), ("desc", "u1", (128,))])  # 132 bytes
ORB_POINT = np.dtype([("xy", "<f2", (2,)), ("desc", "u1", (32,))])  # 36 bytes
_HEADER = np.dtype("<u4")  # the blob: SIFT point count, the SIFT points, then the ORB points


class VerifyUnavailable(RuntimeError):
    """OpenCV is missing, so a verifying collection cannot be built or searched."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise VerifyUnavailable("geometric verification needs OpenCV, which simserve's install brings: pip install opencv-python-headless") from None
    return cv2


def require() -> None:
    """Raise ``VerifyUnavailable`` now, at start-up, rather than at a verifying collection's first use."""
    _cv2()


_local = threading.local()  # OpenCV detectors and matchers are not documented thread-safe: one set per thread


def _tools():
    t = getattr(_local, "tools", None)
    if t is None:
        cv2 = _cv2()
        cv2.setNumThreads(1)  # callers run one image per thread; OpenCV's own pool would oversubscribe
        # So would OpenBLAS's, on the small descriptor products: 0.35 ms alone, 16 ms beside other work.
        threadpoolctl.threadpool_limits(1, user_api="blas")
        t = _local.tools = (
            cv2.SIFT_create(nfeatures=MAX_SIFT),
            cv2.ORB_create(nfeatures=MAX_ORB, fastThreshold=ORB_FAST_THRESHOLD, edgeThreshold=15),
        )
    return t


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints of one image, positions in units of its longer side."""

    sift_xy: np.ndarray  # [n, 2] float32
    sift: np.ndarray  # [n, 128] float32 RootSIFT, each of unit length
    orb_xy: np.ndarray  # [m, 2] float32
    orb: np.ndarray  # [m, 32] uint8, binary
    # The image's width and height in units of its longer side (a query's; stored items' are
    # not kept): where a fraction of the image lies in these coordinates.
    extent: tuple[float, float] = (1.0, 1.0)
    mirrored: bool = False  # a query's mirrored side: a box of the image as given lies mirrored in it


def _grey(image: Image.Image | np.ndarray) -> np.ndarray:
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    img = ImageOps.grayscale(img) if img.mode != "L" else img
    s = SIDE / max(img.size)
    return np.asarray(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC))


def _points(dtype: np.dtype, keypoints, desc, side: int = SIDE) -> np.ndarray:
    """Keypoints as stored: strongest first, so a prefix is the strongest few (the coarse pass)."""
    out = np.zeros(len(keypoints), dtype)
    if len(keypoints):
        response = np.fromiter((k.response for k in keypoints), np.float32, len(keypoints))
        order = np.argsort(-response, kind="stable")
        out["xy"] = (_cv2().KeyPoint_convert(keypoints).reshape(-1, 2) / side)[order]
        # ORB's descriptors are bytes already; SIFT's are whole numbers below 256 in float32.
        out["desc"] = desc[order] if desc.dtype == np.uint8 else np.clip(np.rint(desc[order]), 0, 255)
    return out


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> the image keypoints are found on (a JPEG decoded no smaller than SIDE);
    raises DecodeError. Decoded apart from the model's pixels, which are 128 px: too small here."""
    return decode_image(data, max_pixels=max_pixels, min_side=SIDE)


def keypoints(image: Image.Image | np.ndarray) -> bytes:
    """An RGB or grey image -> its keypoints, as the bytes a verifying collection stores
    (up to 400 x 132 + 1,000 x 36 bytes; a drawing at 256 px has far fewer)."""
    s, o = _detect(_grey(image))
    return _pack(s, o)


def _pack(s: np.ndarray, o: np.ndarray) -> bytes:
    return np.array([len(s)], _HEADER).tobytes() + s.tobytes() + o.tobytes()


def _detect(grey: np.ndarray, sift: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """SIFT (unless not wanted; on the image at SIFT_SIDE) and ORB points of a grey image at SIDE."""
    if min(grey.shape) < MIN_SIDE:  # a strip (1000 x 4 is 256 x 1 here): nothing to find, and OpenCV asserts
        return np.zeros(0, SIFT_POINT), np.zeros(0, ORB_POINT)
    return _sift_points(grey) if sift else np.zeros(0, SIFT_POINT), _orb_points(grey)


def _detect_apart(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_detect``, SIFT on another thread beside ORB: a search waits for its query's points before
    it verifies anything (~7 ms on one thread, ~4.5 on two)."""
    if min(grey.shape) < MIN_SIDE:
        return _detect(grey)
    sift = _APART.submit(_sift_points, grey)
    orb = _orb_points(grey)
    return sift.result(), orb


_APART = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="query-sift")


def _scaled(grey: np.ndarray, fraction: float) -> np.ndarray:
    """A grey image at ``fraction`` of its size (area-averaged, as a smaller copy would be saved)."""
    cv2 = _cv2()
    h, w = (max(1, round(n * fraction)) for n in grey.shape)
    return cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)


def _sift_points(grey: np.ndarray) -> np.ndarray:
    return _points(SIFT_POINT, *_tools()[0].detectAndCompute(_scaled(grey, SIFT_SIDE / SIDE), None), side=SIFT_SIDE)


def _orb_points(grey: np.ndarray) -> np.ndarray:
    return _points(ORB_POINT, *_tools()[1].detectAndCompute(grey, None))


def unpack(blob: bytes) -> LocalFeatures:
    """Stored bytes -> features ready to match. SIFT descriptors become RootSIFT (Arandjelovic &
    Zisserman, 2012: L1-normalise, square-root), whose Euclidean distance is the Hellinger kernel."""
    n = int(np.frombuffer(blob[: _HEADER.itemsize], _HEADER)[0]) if len(blob) >= _HEADER.itemsize else -1
    rest = len(blob) - _HEADER.itemsize - n * SIFT_POINT.itemsize
    if n < 0 or rest < 0 or rest % ORB_POINT.itemsize:
        raise ValueError(f"a keypoints blob of {len(blob)} bytes is not a count, SIFT points and ORB points")
    s = np.frombuffer(blob, SIFT_POINT, count=n, offset=_HEADER.itemsize)
    o = np.frombuffer(blob, ORB_POINT, offset=_HEADER.itemsize + n * SIFT_POINT.itemsize)
    d = s["desc"].astype(np.float32)
    d = np.sqrt(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7))
    return LocalFeatures(s["xy"].astype(np.float32).reshape(-1, 2), d, o["xy"].astype(np.float32).reshape(-1, 2), np.ascontiguousarray(o["desc"]).reshape(-1, 32))


def _mirror_permutation() -> np.ndarray:
    """Where each bin of a SIFT descriptor goes when the image is mirrored: in the keypoint's own
    frame (its angle mirrors too) the 4 x 4 grid's rows swap and orientation o becomes -o."""
    idx = np.arange(128).reshape(4, 4, 8)
    return np.array([idx[3 - r, c, (8 - o) % 8] for r in range(4) for c in range(4) for o in range(8)])


_MIRROR = _mirror_permutation()


class QueryFeatures(Sequence[LocalFeatures]):
    """A query's features as given, mirrored, then zoomed out (ORB points found again at ZOOM_OUT
    of the size, in the given frame). The later sides are found only when a match needs them (the
    mirrored ORB points run again on the flipped image, since ORB's binary tests have no mirror
    symmetry): a copy that is neither flipped nor cropped is usually certain on the given side
    alone, and found on another thread at once they took a core from the model and the index
    (docs/decisions/query-views.md). The mirrored side before the zoomed one: at 90 ms, 900
    random queries at 100k, p50 25.6 against 27.6 ms, the same answers."""

    def __init__(self, given: LocalFeatures, sift: np.ndarray, grey: np.ndarray, image: Image.Image | None = None) -> None:
        self._given, self._sift, self._grey = given, sift, grey
        self._mirrored: LocalFeatures | None = None
        self._zoomed: LocalFeatures | None = None
        self._sides = (self.given, self.mirrored, *((self.zoomed,) if ZOOM_OUT else ()))
        self._lock, self._zoom_lock = threading.Lock(), threading.Lock()
        self._image = image  # grey, at most 2 x SIDE (_for_regions): for regions found again at full detail
        self._regions: dict[tuple[float, float, float, float], list[LocalFeatures]] = {}
        self._region_locks: dict[tuple[float, float, float, float], threading.Lock] = {}
        self._shares: dict[tuple[float, float, float, float], list[LocalFeatures]] = {}

    def __len__(self) -> int:
        return len(self._sides)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._sides[i]()

    def given(self) -> LocalFeatures:
        return self._given

    def region(self, box: tuple[float, float, float, float]) -> list[LocalFeatures] | None:
        """ORB points of a region of the query (fractions x0, y0, x1, y1 of the image as given),
        found again on the region itself scaled to SIDE, as given only: a photo pasted small into
        another holds few of the whole query's points, and at twice the detail the region has
        many (pasted copies found first 0.49 -> 0.62 on nine regions). SIFT there (on half of SIDE) found none
        more, at twice the cost (docs/decisions/query-views.md). None without the image; ~5 ms."""
        if self._image is None:
            return None
        with self._lock:  # one lock a region: two verifying threads find two regions at once
            lock = self._region_locks.setdefault(box, threading.Lock())
        with lock:
            if box not in self._regions:
                w, h = self._image.size
                crop = self._image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
                grey = _grey(crop)
                s, o = _detect(grey, sift=False)
                self._regions[box] = [_query_side(s, o, (grey.shape[1] / SIDE, grey.shape[0] / SIDE))]
            return self._regions[box]

    def share(self, box: tuple[float, float, float, float]) -> list[LocalFeatures]:
        """The given and mirrored sides' points inside ``box`` (``within``), cut once: every
        candidate a region picked, in each pass over the picks, matches the same share. Not the
        zoomed side's: a photo pasted small is made smaller still there (all 248 pasted queries
        at 100k, 90 ms, two runs: photographs 0.895 / 0.904 with it, 0.912 / 0.904 without)."""
        if box not in self._shares:
            self._shares[box] = within(self[:2], box)  # two threads may cut one box at once: the same result
        return self._shares[box]

    def mirrored(self) -> LocalFeatures:
        with self._lock:
            if self._mirrored is None:
                s = self._sift.copy()  # SIFT mirrors by re-arranging its bins (_MIRROR), not by detecting again
                s["xy"][:, 0] = (self._given.extent[0] - self._sift["xy"][:, 0].astype(np.float32)).astype(np.float16)
                s["desc"] = self._sift["desc"][:, _MIRROR]
                orb = _detect(np.ascontiguousarray(self._grey[:, ::-1]), sift=False)[1]
                self._mirrored = dataclasses.replace(_query_side(s, orb, self._given.extent), mirrored=True)
            return self._mirrored

    def zoomed(self) -> LocalFeatures:
        """The query's ORB points found again on it at ZOOM_OUT of its size (~1 ms), placed in the
        given side's frame: what a crop's content looks like at the original's scale. SIFT there
        too (~2 ms more): copies reaching 10 inliers 0.916 -> 0.919 of 600, but at 90 ms, every
        query at 100k, photographs 0.977 -> 0.975 (scripts/variants/zoom_out.py)."""
        with self._zoom_lock:
            if self._zoomed is None:
                s, o = _detect(_scaled(self._grey, ZOOM_OUT), sift=False)
                o["xy"] = (o["xy"].astype(np.float32) / ZOOM_OUT).astype(np.float16)
                self._zoomed = _query_side(s, o, self._given.extent)
            return self._zoomed


def query_features(image: Image.Image | np.ndarray, regions: bool = False) -> QueryFeatures:
    """A query image -> its features as given, mirrored (copies are often flipped) and zoomed
    out (often cropped: ``QueryFeatures``); with ``regions``, able to find a region's points
    again (``QueryFeatures.region``): a search's query keeps a small grey copy of itself for
    that, which a batch of pairs has no use for."""
    grey = _grey(image)
    s, o = _detect_apart(grey)
    extent = (grey.shape[1] / SIDE, grey.shape[0] / SIDE)
    return QueryFeatures(_query_side(s, o, extent), s, grey, _for_regions(image) if regions else None)


def _for_regions(image: Image.Image | np.ndarray) -> Image.Image:
    """The query as its regions are cut from, grey (as keypoints are found): a region (at most half
    the side) needs no more than 2 x SIDE on the longer side, and a search holds it while it runs (a decoded PNG can
    be tens of megabytes)."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    img = ImageOps.grayscale(img) if img.mode != "L" else img
    s = 2 * SIDE / max(img.size)
    return img if s >= 1 else img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _query_side(s: np.ndarray, o: np.ndarray, extent: tuple[float, float]) -> LocalFeatures:
    return dataclasses.replace(unpack(_pack(_spread(s), _spread(o))), extent=extent)


def within(query: Sequence[LocalFeatures], box: tuple[float, float, float, float]) -> list[LocalFeatures]:
    """A query's features (each of its sides) with only the points inside ``box`` (x0, y0, x1, y1
    as fractions of the image as given; on the mirrored side, the box is mirrored too)."""
    out = []
    for f in query:
        x0, y0, x1, y1 = (1 - box[2], box[1], 1 - box[0], box[3]) if f.mirrored else box
        lo, hi = np.array([x0, y0]) * f.extent, np.array([x1, y1]) * f.extent
        s = np.all((f.sift_xy >= lo) & (f.sift_xy < hi), axis=1)
        o = np.all((f.orb_xy >= lo) & (f.orb_xy < hi), axis=1)
        out.append(LocalFeatures(f.sift_xy[s], f.sift[s], f.orb_xy[o], f.orb[o], f.extent, f.mirrored))
    return out


def part_inliers(query: Sequence[LocalFeatures], stored: LocalFeatures) -> int:
    """Inliers of a part of a query (``within``): every point matched, no cheap first pass, since
    a part holds few points and the strongest of the whole query may lie elsewhere."""
    return max((_inliers(q, stored) for q in query), default=0)


def _spread(points: np.ndarray) -> np.ndarray:
    """Points (strongest first) re-ordered to take the strongest of every SPREAD_CELLS^2 cell of
    the image, then the second strongest of each, and so on."""
    if not len(points):
        return points
    xy = points["xy"].astype(np.float32)
    cell = np.minimum((xy / np.maximum(xy.max(axis=0), 1e-6) * SPREAD_CELLS).astype(int), SPREAD_CELLS - 1)
    key = cell[:, 1] * SPREAD_CELLS + cell[:, 0]
    order = np.argsort(key, kind="stable")
    starts = np.searchsorted(key[order], key[order], side="left")
    rank = np.empty(len(points), int)
    rank[order] = np.arange(len(points)) - starts  # each point's place within its own cell
    return points[np.lexsort((np.arange(len(points)), rank))]


def inliers(query: Sequence[LocalFeatures], stored: LocalFeatures, enough: float = math.inf) -> int:
    """Distinct places in the stored image that one affine map carries the query's SIFT and ORB
    matches onto (RANSAC), the best over the query's orientations, or the first count that
    reaches ``enough`` (the other orientations are then not matched, nor waited for). Each
    orientation is matched on the strongest keypoints first, and in full only if that found some
    agreement."""
    best = 0
    strong = _strongest(stored)
    for q in query:  # a QueryFeatures builds its mirrored orientation only when the loop gets there
        coarse = _inliers(_strongest(q), strong, COARSE_MIN, COARSE_ITERS)
        if coarse >= enough:  # certain on the strongest points alone: the full match could only add to it
            return coarse
        best = max(best, coarse, _inliers(q, stored) if coarse >= COARSE_MIN else 0)
        if best >= enough:
            break
    return best


def pair_inliers(a: Sequence[LocalFeatures], b: Sequence[LocalFeatures]) -> int:
    """Inliers between two images, each described as a query is (``query_features``, or a stored
    item's one orientation): the better of both directions, so (a, b) and (b, a) agree. A query's
    first orientation is the image as given, which is what a stored item keeps."""
    return max(inliers(a, b[0]), inliers(b, a[0]))


def _strongest(f: LocalFeatures) -> LocalFeatures:
    return LocalFeatures(f.sift_xy[:COARSE_SIFT], f.sift[:COARSE_SIFT], f.orb_xy[:COARSE_ORB], f.orb[:COARSE_ORB])


def _sift_pairs(q: LocalFeatures, s: LocalFeatures) -> np.ndarray:
    if len(q.sift) < 2 or len(s.sift) < 2:
        return np.zeros((0, 4), np.float32)
    sim = q.sift @ s.sift.T  # unit vectors: squared distance = 2 - 2 cos
    top2 = np.argpartition(-sim, 1, axis=1)[:, :2]
    rows = np.arange(len(q.sift))
    a, b = sim[rows, top2[:, 0]], sim[rows, top2[:, 1]]
    first = np.where(a >= b, top2[:, 0], top2[:, 1])
    d1 = np.sqrt(np.maximum(2 - 2 * np.maximum(a, b), 0))
    d2 = np.sqrt(np.maximum(2 - 2 * np.minimum(a, b), 0))
    keep = d1 < RATIO * d2
    return np.concatenate([q.sift_xy[keep], s.sift_xy[first[keep]]], axis=1)


def _orb_pairs(q: LocalFeatures, s: LocalFeatures) -> np.ndarray:
    if len(q.orb) < 2 or len(s.orb) < 2:
        return np.zeros((0, 4), np.float32)
    import faiss  # here, not at the top: training evaluates verification without loading the index's library

    # FAISS's Hamming k-NN without an index: 2-3x OpenCV's brute-force matcher, no Python object a
    # match, and 0.6-0.9x the time of an IndexBinaryFlat's search (its blocked path), same neighbours.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one verification a thread, like OpenCV's and BLAS's pools
    try:
        d, idx = faiss.knn_hamming(q.orb, s.orb, 2)
    finally:
        faiss.omp_set_num_threads(threads)
    keep = d[:, 0] < RATIO * d[:, 1]
    return np.concatenate([q.orb_xy[keep], s.orb_xy[idx[keep, 0]]], axis=1)


def _inliers(q: LocalFeatures, s: LocalFeatures, least: int = MIN_MATCHES, iters: int = 1000) -> int:
    """Inliers of the best affine map (RANSAC, ``iters`` tries) between q's and s's matches; 0
    when there are fewer than ``least`` matches to fit."""
    pairs = np.concatenate([_sift_pairs(q, s), _orb_pairs(q, s)]).astype(np.float32)
    if len(pairs) < max(least, MIN_MATCHES):
        return 0
    src, dst = np.ascontiguousarray(pairs[:, :2]), np.ascontiguousarray(pairs[:, 2:])
    # No refinement: OpenCV refines the map on the inliers after RANSAC but keeps RANSAC's inlier
    # mask, which is all that is counted here (the refinement was a third of the call's time).
    _, mask = _cv2().estimateAffine2D(src, dst, ransacReprojThreshold=RANSAC_PX, maxIters=iters, confidence=0.995, refineIters=0)
    if mask is None:
        return 0
    # Distinct places, not keypoints: SIFT puts several (orientations) at one spot, ORB may too.
    return len(np.unique(np.rint(dst[mask.ravel().astype(bool)] * 1000), axis=0))

