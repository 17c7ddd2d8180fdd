"""Geometric verification: a query and a stored image that share many local features in one
consistent layout are a copy and its original, whatever their embeddings say.

Why: the embedding summarises a whole image, so a 30%-area crop of a stored drawing lands
nearer to other drawings of the same style than to its own original. Local features (SIFT,
RootSIFT-normalised) are found at every scale, so the crop's corners and line ends match the
original's, and one affine map (RANSAC) that carries many of them onto the original is strong
evidence that chance rarely gives: on the default model's held-out copies among 1,028
originals, the true original shows a median of 11 such inliers, the best wrong candidate 5.
A verifying collection stores each item's features (about 132 bytes a point, at most
``MAX_POINTS`` points) and re-orders a search's top ``RESCORE_DEPTH`` by
``score + INLIER_WEIGHT x inliers``. Measured on three query draws of the shipped model
(crop-views collection): recall@1 0.916 / 0.918 / 0.913 -> 0.947 / 0.937 / 0.943
(``python -m training.robustness``; the search cost: ``simserve bench index --parts verify``).

Mirrored copies are common and SIFT is not mirror-invariant, so a query image is described
twice (as given and mirrored) and the better of the two counts.

OpenCV (the ``verify`` extra) is imported only here and only when a verifying collection is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

SIDE = 256  # features are found on the image scaled to this longer side (192 and 384: fewer right)
MAX_POINTS = 400  # the strongest keypoints kept per image: bounds storage and matching time
RATIO = 0.8  # Lowe's ratio test (0.7 / 0.75 / 0.85 matched fewer copies on the held-out draws)
RANSAC_PX = 0.02  # reprojection error an inlier may have, as a fraction of the longer side
MIN_MATCHES = 4  # below this RANSAC fits noise: an affine map passes through any three points
# Each inlier is worth this much cosine. Flat between 0.015 and 0.03 on three query draws; the
# inlier count is not capped (caps of 10-30 lost a little).
INLIER_WEIGHT = 0.02

POINT = np.dtype([("xy", "<f2", (2,)), ("desc", "u1", (128,))])  # one stored keypoint: 132 bytes


class VerifyUnavailable(RuntimeError):
    """OpenCV is missing, so a verifying collection cannot be built or searched."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise VerifyUnavailable("geometric verification needs OpenCV: pip install 'simserve[verify]' (opencv-python-headless)") from None
    return cv2


def require() -> None:
    """Raise ``VerifyUnavailable`` now, at start-up, rather than at a verifying collection's first use."""
    _cv2()


_sift = None


def _detector():
    global _sift
    if _sift is None:
        cv2 = _cv2()
        cv2.setNumThreads(1)  # callers run one image per thread; OpenCV's own pool would oversubscribe
        _sift = cv2.SIFT_create(nfeatures=MAX_POINTS)
    return _sift


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints of one image: positions in units of its longer side, RootSIFT descriptors."""

    points: np.ndarray  # [n, 2] float32
    descriptors: np.ndarray  # [n, 128] float32, each of unit length

    def __len__(self) -> int:
        return len(self.points)


def _grey(image: Image.Image | np.ndarray) -> np.ndarray:
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    img = ImageOps.grayscale(img) if img.mode != "L" else img
    s = SIDE / max(img.size)
    return np.asarray(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC))


def extract(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB or grey image -> its keypoints as a ``POINT`` array (what the store keeps).

    SIFT descriptors are whole numbers below 256, so uint8 keeps them exactly."""
    grey = _grey(image)
    keypoints, desc = _detector().detectAndCompute(grey, None)
    out = np.zeros(len(keypoints), POINT)
    if len(keypoints):
        out["xy"] = np.float32([k.pt for k in keypoints]) / SIDE
        out["desc"] = np.clip(np.rint(desc), 0, 255)
    return out


def query_features(image: Image.Image | np.ndarray) -> list[LocalFeatures]:
    """A query image -> its features as given and mirrored (copies are often flipped)."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return [load(extract(img)), load(extract(ImageOps.mirror(img)))]


def to_bytes(points: np.ndarray) -> bytes:
    return np.ascontiguousarray(points, POINT).tobytes()


def from_bytes(blob: bytes) -> LocalFeatures:
    if len(blob) % POINT.itemsize:
        raise ValueError(f"local features blob of {len(blob)} bytes is not a whole number of {POINT.itemsize}-byte points")
    return load(np.frombuffer(blob, POINT))


def load(points: np.ndarray) -> LocalFeatures:
    """Stored points -> RootSIFT (Arandjelovic & Zisserman, 2012): L1-normalise, square-root.
    Euclidean distance between RootSIFT vectors is the Hellinger kernel, which matches copies better."""
    d = points["desc"].astype(np.float32)
    d = np.sqrt(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7))
    return LocalFeatures(points["xy"].astype(np.float32).reshape(-1, 2), d)


def inliers(query: Sequence[LocalFeatures], stored: LocalFeatures) -> int:
    """Distinct stored keypoints that one affine map carries a query's matches onto (RANSAC),
    the best over the query's orientations."""
    return max((_inliers(q, stored) for q in query), default=0)


def _inliers(q: LocalFeatures, s: LocalFeatures) -> int:
    if len(q) < 2 or len(s) < 2:
        return 0
    # Unit vectors: squared distance = 2 - 2 cos. The ratio test compares distances.
    sim = q.descriptors @ s.descriptors.T
    top2 = np.argpartition(-sim, 1, axis=1)[:, :2]
    rows = np.arange(len(q))
    a, b = sim[rows, top2[:, 0]], sim[rows, top2[:, 1]]
    first = np.where(a >= b, top2[:, 0], top2[:, 1])
    d1 = np.sqrt(np.maximum(2 - 2 * np.maximum(a, b), 0))
    d2 = np.sqrt(np.maximum(2 - 2 * np.minimum(a, b), 0))
    keep = d1 < RATIO * d2
    if keep.sum() < MIN_MATCHES:
        return 0
    src = np.ascontiguousarray(q.points[keep])
    dst_idx = first[keep]
    dst = np.ascontiguousarray(s.points[dst_idx])
    _, mask = _cv2().estimateAffine2D(src, dst, ransacReprojThreshold=RANSAC_PX, maxIters=1000, confidence=0.995)
    if mask is None:
        return 0
    # Distinct places, not keypoints: SIFT puts several keypoints (orientations) at one spot.
    return len(np.unique(np.rint(dst[mask.ravel().astype(bool)] * 1000), axis=0))


def verified_score(score: float, count: int | None) -> float:
    """The order a verifying search returns: the embedding (or view) score plus the inliers' worth."""
    return score + INLIER_WEIGHT * (count or 0)
