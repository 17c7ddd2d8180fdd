"""Crop views for indexing: a stored original is described by its crops as well as by the whole.

Copies found in the wild are often crops, while the stored item is the whole
original, and one global embedding of the whole image sits far from the
embedding of a 30%-area crop of it. Indexing the normalised weighted mean of
six embeddings (the whole image and five crops of 75% of each side: four
corners and the centre) moves the stored vector towards what crops look like, for
six engine passes per *added* item and nothing extra per query. On the
default model's held-out copies (crops down to 30% area) among 1,028
originals, recall@1 goes from 0.832 to 0.880, crop-only queries 0.862 ->
0.930, uncropped ones 0.968 -> 0.959 (``python -m training.robustness
runs/default``). It is a per-collection choice fixed at creation, so every
vector in a collection is made the same way.

The pooled vector is what FAISS searches, but averaging blurs the one view a
crop matches best. So the six view embeddings are stored too (float16, 1.5 KB
an item at 128-d), and a search re-scores its top ``RESCORE_DEPTH`` by the
mean of the pooled cosine and the best view's cosine (``view_scores``):
recall@1 0.880 -> 0.900 on the same queries, crop-only queries 0.930 -> 0.943,
uncropped ones 0.959 -> 0.964, for one SQLite read and 20 x 6 dot products a
query and no extra engine work (``python -m training.robustness runs/default``;
the search cost: ``simserve bench index --parts views``).

Tried and left out (session 10, default model, ``runs/s10/*.py`` then): 24 views instead of 6
(adding 3x3 grids of 55% and 65% side crops) re-scored 0.916 vs 0.901 (whitened: 0.929 vs
0.916) for four times the engine passes and storage; regional embeddings pooled from one pass
at 2x size (R-MAC style, 819 windows) 0.903; scoring flipped / rotated versions of the query
too, no gain (0.902).
Session 11 (whitened default, ``runs/s11/chamfer.py`` and ``stack.py``): cell-level MaxSim
("chamfer": each of the query's 64 feature-map cells, projected and normalised, against its best
cell among a candidate's stored maps, averaged) added to the view score lifts 0.916 to 0.923-0.925
with the six views' maps (98 KB an item at float16), to 0.913 with the whole image's map alone;
on top of 24 views 0.928 -> 0.931. Stacked with the head, no better. Session 13: geometric
verification of the re-scored top 20 (simserve/ranking/verify.py, a collection's ``verify``) lifts
0.916 to 0.947; with 24 views under it, 0.941.
"""

from __future__ import annotations

import numpy as np

from simserve.inference.decode import DEFAULT_MAX_PIXELS, decode
from simserve.inference.pixels import to_pixels

CROP_SIDE = 0.75  # each crop keeps 75% of the width and of the height (56% of the area)
N_VIEWS = 6
# The whole image counts as three views: with equal weights an uncropped copy is found less
# often (recall@1 0.959 -> 0.927); at 3 it keeps 0.943 and crops lose little (0.922 -> 0.911)
# (measured on the earlier 96 px default model).
WHOLE_WEIGHT = 3.0
def crop_view_pixels(data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> [6, C, size, size] uint8: the whole image, then the four corner crops and the centre crop.

    The crops are cut from the image squashed to size / 0.75, so each is exactly ``size``
    pixels with no second resize, and the whole view is the ordinary model input.
    """
    img = decode(data, max_pixels=max_pixels, min_side=round(size / CROP_SIDE))
    whole = to_pixels(img, size, channels)
    wide = to_pixels(img, round(size / CROP_SIDE), channels)
    m = wide.shape[-1] - size
    corners = [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]
    return np.stack([whole] + [wide[:, y : y + size, x : x + size] for y, x in corners])


def collapse_views(features: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Engine outputs for n items x 6 views, item by item -> per item the whole image's
    features (what the head re-ranks with), the views' pooled embedding (what is searched)
    and the [6, d] view embeddings themselves (what a search re-scores with)."""
    views = embeddings.reshape(-1, N_VIEWS, embeddings.shape[-1])
    return features[::N_VIEWS], pool_views(views), views


def pool_views(embeddings: np.ndarray) -> np.ndarray:
    """[n, 6, d] view embeddings (whole image first) -> [n, d]: their weighted mean, L2-normalised."""
    w = np.ones(embeddings.shape[1], np.float32)
    w[0] = WHOLE_WEIGHT
    mean = np.einsum("nvd,v->nd", embeddings, w)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)
