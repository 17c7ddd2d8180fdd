"""A copy-detection set of natural photos, DISC21-style: references, distractors, transformed
queries (copies of a reference, or of nothing), and distinct look-alikes.

Built from the benchmark's scenes only (``simserve.photos``, split 'eval'), which no training
run sees. Each scene is cut into a grid of square tiles, so images never overlap unless they are
meant to: per scene, some tiles are references, one is a look-alike (same scene, other place:
queried as it is and transformed, it has no copy in the index), one is a background (what
references are pasted into: never indexed, or the query would hold a copy of a distractor), and
the rest are the regions distractors are cut from. Everything is drawn from one seed.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

TILE = 512  # references are this many pixels square
# A reference or look-alike tile has at least this much detail (``detail``). Below it are open
# sky, a bare wall, a colour field or a soft gradient: a copy of such a tile is, pixel for pixel,
# a crop of its neighbours, which distractors are cut from, so no answer to it is the right one
# (at 2.0: a tile of a flat grey wall reads 0.5, a clear sky 1.0, a textured sea 2.3-6).
MIN_DETAIL = 2.0
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # fonts-noto-color-emoji (OFL-1.1)
TEXT_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")  # fonts-dejavu-core
WORDS = "sale new photo copy share like today best free summer view city look wow live original".split()
EMOJI = ["\U0001F600", "\U0001F525", "\u2764\ufe0f", "\U0001F44D", "\U0001F4F7", "\U0001F389", "\u2b50", "\U0001F60E"]


@dataclass
class Query:
    name: str
    data: bytes
    transform: str
    truth: str | None  # the reference's key, or None: nothing in the index is a copy of it


@dataclass
class CopySet:
    references: dict[str, bytes]
    distractors: dict[str, bytes]
    queries: list[Query]
    scenes: list[dict] = field(default_factory=list)  # name, package, licence of every scene used


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _grid(img: Image.Image) -> list[Image.Image]:
    """The scene scaled so three tiles span its shorter side, cut into whole tiles."""
    s = 3 * TILE / min(img.size)
    img = img.resize((max(TILE, round(img.width * s)), max(TILE, round(img.height * s))), Image.Resampling.LANCZOS)
    return [img.crop((x, y, x + TILE, y + TILE)) for y in range(0, img.height - TILE + 1, TILE) for x in range(0, img.width - TILE + 1, TILE)]


def detail(tile: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels (across and down) of the tile in grey at
    256 px: how much there is to tell it from another place of its scene."""
    a = np.asarray(tile.convert("L").resize((256, 256), Image.Resampling.BILINEAR), np.float32)
    return float(np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(a, axis=0)).mean())


def _crop(img: Image.Image, rng: random.Random, area: float) -> Image.Image:
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(img.width, round(img.width * math.sqrt(area * aspect)))
    h = min(img.height, round(img.height * math.sqrt(area / aspect)))
    x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    return img.crop((x, y, x + w, y + h))


def _colour(img: Image.Image, rng: random.Random) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
    h, s, v = img.convert("HSV").split()
    shift = rng.randint(-25, 25)
    return Image.merge("HSV", (h.point(lambda p: (p + shift) % 256), s, v)).convert("RGB")


def _text(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(TEXT_FONT), max(12, round(img.height * rng.uniform(0.07, 0.14))))
    for _ in range(rng.randint(1, 3)):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        xy = (rng.randint(0, img.width // 2), rng.randint(0, max(1, img.height - font.size)))
        draw.text(xy, words, font=font, fill=tuple(rng.randint(0, 255) for _ in range(3)), stroke_width=1, stroke_fill=(0, 0, 0))
    return img


def _emoji(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.copy()
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the one size the bitmap font has
    for _ in range(rng.randint(1, 3)):
        glyph = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((0, 0), rng.choice(EMOJI), font=font, embedded_color=True)
        side = max(8, round(img.width * rng.uniform(0.15, 0.3)))
        glyph = glyph.resize((side, side), Image.Resampling.LANCZOS)
        img.paste(glyph, (rng.randint(0, img.width - side), rng.randint(0, img.height - side)), glyph)
    return img


def _paste(img: Image.Image, rng: random.Random, background: Image.Image) -> Image.Image:
    """The image at 30-50% of the background's width, pasted somewhere into it."""
    bg = background.copy()
    w = round(bg.width * rng.uniform(0.3, 0.5))
    small = img.resize((w, max(1, round(img.height * w / img.width))), Image.Resampling.LANCZOS)
    bg.paste(small, (rng.randint(0, bg.width - small.width), rng.randint(0, bg.height - small.height)))
    return bg


Transform = Callable[[Image.Image, random.Random, Image.Image], Image.Image]
# name -> (image, rng, a background that is in no indexed image) -> the copy
TRANSFORMS: dict[str, Transform] = {
    "crop_50": lambda im, r, bg: _crop(im, r, 0.5),
    "crop_25": lambda im, r, bg: _crop(im, r, 0.25),
    "paste_into": lambda im, r, bg: _paste(im, r, bg),
    "rotate_15": lambda im, r, bg: im.rotate(r.choice((-15, 15)), Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0)),
    "rotate_90": lambda im, r, bg: im.rotate(r.choice((90, 270)), expand=True),
    "flip": lambda im, r, bg: ImageOps.mirror(im),
    "text": lambda im, r, bg: _text(im, r),
    "emoji": lambda im, r, bg: _emoji(im, r),
    "colour": lambda im, r, bg: _colour(im, r),
    "grey": lambda im, r, bg: ImageOps.grayscale(im).convert("RGB"),
    "blur": lambda im, r, bg: im.filter(ImageFilter.GaussianBlur(r.uniform(2, 4))),
    "small": lambda im, r, bg: im.resize((im.width // 4, im.height // 4), Image.Resampling.BILINEAR),
    "crop_colour_text": lambda im, r, bg: _text(_colour(_crop(im, r, 0.5), r), r),
    "flip_rotate_emoji": lambda im, r, bg: _emoji(ImageOps.mirror(im).rotate(r.uniform(-10, 10), Image.Resampling.BICUBIC, expand=True), r),
    "crop_paste": lambda im, r, bg: _paste(_crop(im, r, 0.5), r, bg),
}
JPEG_QUALITY = {"small": 50}  # every query is a JPEG; most at 75, as shared photos are


def build(scenes: list, *, refs_per_scene: int = 5, distractors: int = 10_000, transforms: tuple[str, ...] = tuple(TRANSFORMS), seed: int = 0, progress: Callable[[str], None] = lambda s: None) -> CopySet:
    """The set from these scenes (``simserve.photos.Scene``s, or anything with .name and .path)."""
    rng = random.Random(seed)
    references: dict[str, bytes] = {}
    ref_tiles: list[tuple[str, Image.Image]] = []
    lookalikes: list[tuple[str, Image.Image]] = []
    regions: list[tuple[str, Image.Image]] = []
    backgrounds: list[Image.Image] = []
    for s in scenes:
        progress(f"cutting {s.name}")
        tiles = _grid(Image.open(s.path).convert("RGB"))
        order = rng.sample(range(len(tiles)), len(tiles))
        # References and the look-alike come from the tiles with detail, in that random order;
        # a scene with few gives fewer references. Every scene keeps a background and a region.
        detailed = [t for t in order if detail(tiles[t]) >= MIN_DETAIL]
        refs = detailed[: max(0, min(refs_per_scene, len(tiles) - 3))]
        rest = [t for t in order if t not in refs]
        look = next((t for t in detailed if t not in refs), rest[0])
        rest.remove(look)
        for n, t in enumerate(refs):
            key = f"{s.name}/ref{n}"
            references[key] = _jpeg(tiles[t], 95)
            ref_tiles.append((key, tiles[t]))
        lookalikes.append((f"{s.name}/lookalike", tiles[look]))
        backgrounds.append(tiles[rest[0]])
        regions += [(s.name, tiles[t]) for t in rest[1:]]
    progress(f"cutting {distractors} distractors")
    dist = {}
    for i in range(distractors):
        scene, region = regions[i % len(regions)]  # every region alike, whatever the scene's size
        d = _crop(region, rng, rng.uniform(0.3, 1.0))
        d.thumbnail((TILE, TILE))
        dist[f"{scene}/distractor{i:05d}"] = _jpeg(d, 90)
    progress("transforming queries")
    queries = []
    for key, tile in ref_tiles + lookalikes:
        truth = None if key.endswith("/lookalike") else key
        if truth is None:
            queries.append(Query(key, _jpeg(tile, 90), "lookalike", None))
        for name in transforms:
            out = TRANSFORMS[name](tile, rng, rng.choice(backgrounds))
            queries.append(Query(f"{key}~{name}", _jpeg(out, JPEG_QUALITY.get(name, 75)), name, truth))
    return CopySet(references, dist, queries, [{"name": s.name, "package": getattr(s, "package", ""), "licence": getattr(s, "licence", "")} for s in scenes])
