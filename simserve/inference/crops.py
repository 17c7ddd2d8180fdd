"""Crop views for indexing: a stored original is described by its crops as well as by the whole.

Copies found in the wild are often crops, and one global embedding of a whole image sits far
from a 30%-area crop's. A crop-views collection indexes the weighted mean of six embeddings
(the whole image and five 75%-side crops) and keeps the six, so a search can re-score its
shortlist by the best-matching view (ranking/views.py): recall@1 0.832 -> 0.900 for six engine
passes per added item and nothing per query. docs/decisions/crop-views.md has the figures.

A search describes its query by views too (``query_view_embeddings``), never stored: the query
turned on its side, and regions of it, pooled from one pass over the query at 320 px
(``query_view_pixels`` cuts the same regions as crops: how they were first embedded). docs/decisions/query-views.md has the figures.
"""

from __future__ import annotations

import numpy as np

from simserve.inference.decode import DEFAULT_MAX_PIXELS, decode
from simserve.inference.pixels import to_pixels

CROP_SIDE = 0.75  # each crop keeps 75% of the width and of the height (56% of the area)
N_VIEWS = 6
# The whole image counts as three views: at 1, uncropped copies were found less often (0.959 -> 0.927).
WHOLE_WEIGHT = 3.0
# A query's views: the whole image, turned by these quarter turns (a copy turned on its side is far
# from its original by embedding), then regions 0.4 of a side on a 4 x 4 grid (an image pasted at
# 30-50% of a photo's width fills much of one: half-side regions on a 3 x 3 grid cut through
# most pastes, pasted copies found first 0.70 -> 0.84; docs/decisions/query-views.md).
TURNS = (1, 2, 3)
REGION_SIDE = 0.4
REGION_STEPS = 4
N_QUERY_VIEWS = 1 + len(TURNS) + REGION_STEPS**2
# Each region as (x0, y0, x1, y1), fractions of the image, in the order the views hold them.
REGION_BOXES = tuple(
    (x, y, x + REGION_SIDE, y + REGION_SIDE)
    for y in (i * (1 - REGION_SIDE) / (REGION_STEPS - 1) for i in range(REGION_STEPS))
    for x in (i * (1 - REGION_SIDE) / (REGION_STEPS - 1) for i in range(REGION_STEPS))
)


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


def query_view_pixels(data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> [N_QUERY_VIEWS, C, S, S] uint8: the whole image, turned a quarter, a half and three
    quarters, then the regions cut as crops (``query_view_inputs`` with ``pooled=False``)."""
    return query_view_inputs(data, size, channels, max_pixels, pooled=False)[0]


def query_view_inputs(data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, pooled: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Bytes -> (the S px views to embed: the whole image, turned a quarter, a half and three
    quarters, and unless ``pooled`` the regions cut as crops; [1, C, W, W], the image squashed to
    W = S / REGION_SIDE, whose feature map's windows are the regions (``region_windows``;
    Engine.pool), or None). A square's turn is the turned image squashed, so turning costs nothing;
    the regions are cut from the image at W, as crop views are. Pooled, the regions cost one pass
    instead of 16 and find a pasted original as often (docs/decisions/query-views.md); a tower
    that takes only S px (``Engine.any_size`` False) needs the crops."""
    img = decode(data, max_pixels=max_pixels, min_side=round(size / REGION_SIDE))
    whole = to_pixels(img, size, channels)
    turned = [np.rot90(whole, t, axes=(1, 2)) for t in TURNS]
    wide = to_pixels(img, round(size / REGION_SIDE), channels)
    if pooled:
        return np.ascontiguousarray(np.stack([whole, *turned])), wide[None]
    at = [(round(y * wide.shape[-1]), round(x * wide.shape[-1])) for x, y, _, _ in REGION_BOXES]
    return np.ascontiguousarray(np.stack([whole, *turned] + [wide[:, y : y + size, x : x + size] for y, x in at])), None


def region_windows(rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """REGION_BOXES as (row, col, height, width) windows of a rows x cols feature map of the image
    ``query_view_inputs`` squashes (20 x 20 for this tower: each window 8 x 8, on its 16 px grid)."""
    return [(round(y0 * rows), round(x0 * cols), round(REGION_SIDE * rows), round(REGION_SIDE * cols)) for x0, y0, _, _ in REGION_BOXES]


def query_view_embeddings(engine, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> [N_QUERY_VIEWS - 1, d], as a search makes them: the turned views' embeddings, then
    the regions', pooled from one pass over the image at S / REGION_SIDE where the engine's tower
    takes that size (``engine``: an Engine)."""
    c = engine.config
    views, wide = query_view_inputs(data, c.input_size, c.in_channels, max_pixels, pooled=engine.any_size)
    return np.concatenate([engine.embed(views[1:])[1], *pooled_regions(engine, wide)])


def pooled_regions(engine, wide: np.ndarray | None) -> list[np.ndarray]:
    """The regions' [16, d] embeddings pooled from one pass over ``wide`` (``query_view_inputs``);
    none when the regions were cut as crops (``wide`` None)."""
    if wide is None:
        return []
    fmap, _ = engine.embed(wide)
    return [engine.pool(fmap, region_windows(*fmap.shape[-2:]))]


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
