"""Safe image decoding: untrusted bytes -> RGB PIL image, or a typed DecodeError.

The single place where bytes become pixels, for the server, the batch tools
and training alike. The pixel limit is checked from the header, before any
pixel is decoded, so a decompression bomb costs nothing.

JPEG, the common case, has a fast path: libjpeg-turbo (through simplejpeg)
scales in the IDCT by any M/8, so a 256 px photo for a 96 px model decodes
straight to 96 px (3/8) in under half the time Pillow takes to decode at
1/2 and resize. Anything unusual (CMYK, an EXIF rotation, a warning from
libjpeg) takes the Pillow path, which also names the error.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import warnings
from typing import Callable, Iterator

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,000 x 6,000 photo
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# The longest side JPEG and WebP can hold. Pillow keeps a pointer per row, so a 1 x 40M PNG
# (75 KB) costs 320 MB of pointers and a 180 ms allocation that holds the GIL: health stalls.
MAX_SIDE = 65_535
# The formats anyone shares photos in. Everything else (EPS would run Ghostscript, EMF / WMF,
# PSD, ICNS, ...) is refused before any decoder looks at the bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow feeds its decoders this many encoded bytes per call (64 KB by default): a caller that
# stops wanting the image is heard between blocks. 8 KB of the densest PNG is ~4 MB of pixels.
BLOCK = 8192

_stop: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("simserve_decode_stop", default=None)


class DecodeStopped(Exception):
    """The decode was abandoned because its caller asked (``stop_when``); not a fault of the image."""


@contextlib.contextmanager
def stop_when(wanted: Callable[[], bool]) -> Iterator[None]:
    """Decodes in this context give up (``DecodeStopped``) between blocks of encoded bytes once
    ``wanted()`` is true: a request past its deadline, or whose client left, stops mid-image
    (a 40 Mpx PNG is seconds of one decoder's work) instead of at the next image."""
    token = _stop.set(wanted)
    try:
        yield
    finally:
        _stop.reset(token)


class _Source(io.BytesIO):
    """The encoded bytes as the decoders read them, checking ``stop_when``'s wish at every read."""

    def __init__(self, data: bytes, wanted: Callable[[], bool]) -> None:
        super().__init__(data)
        self.wanted = wanted

    def read(self, n: int | None = -1) -> bytes:
        if self.wanted():
            raise DecodeStopped("the caller stopped waiting for this image")
        return super().read(n)


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is a stable machine-readable code.

    Reasons: ``empty``, ``too_large`` (bytes), ``too_many_pixels``,
    ``undecodable``, ``truncated``, ``bad_dimensions``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # travels back from decode worker processes intact
        return DecodeError, (self.reason, str(self))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int | None = None,
) -> Image.Image:
    """Decode any Pillow-readable image to RGB: EXIF orientation applied,
    first frame of an animation, transparency composited over white.

    ``min_side``: the caller will shrink the image to about this size, so a
    JPEG may be decoded at a reduced scale in the DCT domain (never below
    ``min_side`` on either side): several times faster for photos."""
    img = decode(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side)
    return Image.fromarray(img) if isinstance(img, np.ndarray) else img


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int | None = None,
) -> Image.Image | np.ndarray:
    """``decode_image``, except that the JPEG fast path gives its [H, W, 3] uint8 array
    as it is (wrapping it in a PIL image costs a fifth of the decode)."""
    if not data:
        raise DecodeError("empty", "image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"image is {len(data)} bytes; the limit is {max_bytes}")
    if min_side and data[:3] == b"\xff\xd8\xff":
        fast = _jpeg_plain(data, max_pixels, min_side)
        if fast is not None:
            return fast
    wanted = _stop.get()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_Source(data, wanted) if wanted else io.BytesIO(data), formats=FORMATS)
            _check_size(*img.size, max_pixels)
            if wanted:
                img.decodermaxblock = BLOCK
            # Frame 0 as opened: asking a TIFF for n_frames would walk every page (60,000 of them: minutes).
            if min_side and img.format == "JPEG":
                fast = _jpeg_scaled(data, img, min_side)
                if fast is not None:
                    return fast
                img.draft(img.mode, (min_side, min_side))
            img.load()
            if wanted and wanted():  # a decoder that reads its input at once (WebP, TIFF strips) is checked here
                raise DecodeStopped("the caller stopped waiting for this image")
            img = _reduced(img, min_side)
            img = ImageOps.exif_transpose(img) or img
    except (DecodeError, DecodeStopped):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("too_many_pixels", f"image exceeds the pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("undecodable", f"bytes are not an image in a format this server reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "undecodable"
        raise DecodeError(reason, f"image could not be decoded: {msg or type(e).__name__}") from None
    return to_rgb(img)


def _reduced(img: Image.Image, min_side: int | None) -> Image.Image:
    """Shrunk by whole factors that keep both sides >= ``min_side``, before any conversion: a
    6,000 px 16-bit scan is then converted at a few hundred pixels, not at 36 million. A strip
    (one side already under ``min_side``) is shrunk along its length alone: a 1 x 40,000,000 PNG
    would otherwise be converted and resized whole, seconds in calls that hold the GIL."""
    if not min_side:
        return img
    fx, fy = max(1, img.width // min_side), max(1, img.height // min_side)
    factor = (min(fx, fy),) * 2 if min(img.size) >= min_side else (fx, fy)
    if max(factor) < 2 or img.mode in ("1", "P"):
        return img
    try:
        return img.reduce(factor)
    except (ValueError, NotImplementedError):  # modes reduce() does not take
        return img.resize((max(1, img.width // factor[0]), max(1, img.height // factor[1])), Image.Resampling.BOX)


def _jpeg_plain(data: bytes, max_pixels: int, min_side: int) -> np.ndarray | None:
    """The common JPEG (no EXIF, YCbCr or grey) without opening it in Pillow: libjpeg-turbo
    reads the header in 1 us where Pillow takes 20 (a tenth of a 256 px decode). None:
    anything else, for the Pillow path to handle or name."""
    if data.find(b"Exif\x00", 0, 65536) != -1:  # APP1 sits right after SOI; its orientation needs Pillow
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or w <= 0 or h <= 0:
        return None  # Pillow names a zero-size image
    _check_size(w, h, max_pixels)
    return _scaled(data, min_side)


def _check_size(w: int, h: int, max_pixels: int) -> None:
    """Read from the header, before any pixel is decoded."""
    if w <= 0 or h <= 0:
        raise DecodeError("bad_dimensions", f"image has zero size ({w}x{h})")
    if max(w, h) > MAX_SIDE:
        raise DecodeError("bad_dimensions", f"image is {w}x{h}; a side may be at most {MAX_SIDE:,} pixels")
    if w * h > max_pixels:
        raise DecodeError("too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")


def _jpeg_scaled(data: bytes, img: Image.Image, min_side: int) -> np.ndarray | None:
    """RGB at the smallest M/8 scale with both sides >= ``min_side``; None: use Pillow."""
    if img.mode not in ("RGB", "L"):
        return None
    if "exif" in img.info and img.getexif().get(0x0112, 1) != 1:  # 0x0112: orientation, Pillow applies it
        return None
    return _scaled(data, min_side)


def _scaled(data: bytes, min_side: int) -> np.ndarray | None:
    try:
        return simplejpeg.decode_jpeg(data, "rgb", min_width=min_side, min_height=min_side)
    except ValueError:  # truncated, corrupt, or anything libjpeg warned about
        return None


def declared_pixels(data: bytes) -> int:
    """Width x height as the header declares them (0 when there is no readable header): what a
    decode will cost, known in microseconds, before deciding where to decode."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return max(0, w) * max(0, h)
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - anything unreadable is the decoder's to name
        return 0


def decode_file(path: str | os.PathLike, **limits: int) -> Image.Image:
    with open(path, "rb") as f:
        return decode_image(f.read(), **limits)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert every Pillow mode to 8-bit RGB, with the right scaling for deep modes."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _to_uint8(a: np.ndarray, rows: int = 256) -> np.ndarray:
    """Scale a 16/32-bit or float grey image to 0..255 by the range its type implies, a band of
    rows at a time in float32, so the working memory is a band's, not eight bytes a pixel."""
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    hi, lo = float(a.max()), float(a.min())
    if hi <= 1.0 and lo >= 0.0 and np.issubdtype(a.dtype, np.floating) and not np.all(a == np.round(a)):
        scale = 255.0  # float image in [0, 1]
    elif hi > 255.0:
        scale = 1 / (257.0 if hi <= 65535.0 else hi / 255.0)
    else:
        scale = 1.0
    out = np.empty(a.shape, np.uint8)
    for r in range(0, a.shape[0], rows):
        band = a[r : r + rows].astype(np.float32) * np.float32(scale)
        out[r : r + rows] = np.clip(np.rint(band), 0, 255)
    return out
