"""Copy-detection augmentations: what people do to an image they re-post.

Two strongly augmented views of one image are a positive pair. Each call
takes its own ``random.Random``, so a sample's views depend only on
(seed, epoch, image, draw): training is reproducible whatever the worker count,
and evaluation draws its transformed queries from a fixed seed.
"""

from __future__ import annotations

import io
import random
import string
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps


@dataclass(frozen=True)
class CopyAugment:
    """The augmentation recipe; probabilities and ranges are its knobs."""

    size: int
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_p: float = 0.85
    aspect_p: float = 0.25
    pad_p: float = 0.2
    flip_p: float = 0.5
    rotate_p: float = 0.3
    rotate_deg: float = 20.0
    jitter_p: float = 0.8
    jitter: float = 0.4
    grey_p: float = 0.2
    blur_p: float = 0.3
    overlay_p: float = 0.35
    jpeg_p: float = 0.6
    jpeg_quality: tuple[int, int] = (30, 90)
    # An image pasted into another (DISC21's overlay-onto-background): the chance, the images it
    # may be pasted into, and its width as a share of theirs. Off without backgrounds.
    paste_p: float = 0.0
    backgrounds: tuple[Image.Image, ...] = field(default=(), repr=False, compare=False)
    paste_width: tuple[float, float] = (0.3, 0.8)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        img = img.convert("RGB")
        if rng.random() < self.crop_p:
            img = random_resized_crop(img, rng, self.crop_scale)
        # Drawn only when enabled, so recipes without it keep their exact random stream.
        if self.backgrounds and self.paste_p > 0 and rng.random() < self.paste_p:
            img = paste_into(img, self.backgrounds[rng.randrange(len(self.backgrounds))], rng, self.paste_width)
        if rng.random() < self.aspect_p:
            w, h = img.size
            f = rng.uniform(0.6, 1.6)
            img = img.resize((max(1, int(w * f)), h), Image.Resampling.BILINEAR)
        if rng.random() < self.pad_p:
            img = pad(img, rng)
        # Everything below works at the output size: cheap.
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        if rng.random() < self.flip_p:
            img = ImageOps.mirror(img)
        if rng.random() < self.rotate_p:
            img = img.rotate(rng.uniform(-self.rotate_deg, self.rotate_deg), Image.Resampling.BILINEAR, fillcolor=_colour(rng))
        if rng.random() < self.jitter_p:
            img = colour_jitter(img, rng, self.jitter)
        if rng.random() < self.grey_p:
            img = ImageOps.grayscale(img).convert("RGB")
        if rng.random() < self.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
        if rng.random() < self.overlay_p:
            img = overlay(img, rng)
        if rng.random() < self.jpeg_p:
            img = jpeg(img, rng.randint(*self.jpeg_quality))
        return img


def random_resized_crop(img: Image.Image, rng: random.Random, scale: tuple[float, float]) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch))
    return img


def paste_into(img: Image.Image, background: Image.Image, rng: random.Random, width: tuple[float, float]) -> Image.Image:
    """``img`` pasted at a random place into a random crop of ``background``, ``width`` of its width."""
    bg = random_resized_crop(background.convert("RGB"), rng, (0.5, 1.0)).copy()
    w = max(1, int(bg.width * rng.uniform(*width)))
    h = max(1, min(bg.height, int(img.height * w / img.width)))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    bg.paste(img, (rng.randint(0, bg.width - w), rng.randint(0, bg.height - h)))
    return bg


def pad(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    border = tuple(int(rng.uniform(0, 0.2) * s) for s in (w, h, w, h))
    return ImageOps.expand(img, border, fill=_colour(rng))


def colour_jitter(img: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        img = op(img).enhance(rng.uniform(1 - strength, 1 + strength))
    if rng.random() < 0.3:  # hue shift
        hsv = img.convert("HSV")
        h, s, v = hsv.split()
        shift = rng.randint(-25, 25)
        h = h.point(lambda x: (x + shift) % 256)
        img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


def overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    """Text (a caption, a watermark) or a shape drawn over part of the image."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    w, h = img.size
    if rng.random() < 0.6:
        text = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(rng.randint(3, 12)))
        font = ImageFont.load_default(size=rng.randint(max(6, h // 12), max(8, h // 5)))
        draw.text((rng.randint(0, w // 2), rng.randint(0, h - h // 6)), text, fill=_colour(rng), font=font)
    else:
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        x1, y1 = x0 + rng.randint(w // 10, w // 3), y0 + rng.randint(h // 10, h // 3)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=_colour(rng))
    return img


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


@dataclass(frozen=True)
class LightAugment:
    """Small shifts and flips, for class data (Fashion-MNIST) where identity is the class."""

    size: int
    pad: int = 2
    flip_p: float = 0.5

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        w, h = img.size
        img = ImageOps.expand(img, self.pad, fill=0)
        dx, dy = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
        img = img.crop((dx, dy, dx + w, dy + h))
        if rng.random() < self.flip_p:
            img = ImageOps.mirror(img)
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR) if img.size != (self.size, self.size) else img
