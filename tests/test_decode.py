import io

import numpy as np
import pytest
from PIL import Image

from simserve.bench.hostile import encode, png_claiming
from simserve.inference.decode import DecodeError, decode_image
from tests.conftest import grainy_png

_bytes = encode  # shared with the fuzz corpus
_png_header_claiming = png_claiming


def _rgb_at(img: Image.Image, xy=(0, 0)):
    return img.getpixel(xy)


@pytest.mark.parametrize(
    "make, fmt, expected",
    [
        (lambda: Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("L", (8, 8), 100), "PNG", (100, 100, 100)),
        (lambda: Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", (10, 200, 30)),
        (lambda: Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "WEBP", (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "TIFF", (255, 255, 255)),
        (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG", (255, 255, 255)),
        (lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG", (128, 128, 128)),
        (lambda: Image.fromarray(np.full((8, 8), 1000, np.int32)), "TIFF", (4, 4, 4)),
        (lambda: Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF", (128, 128, 128)),
        (lambda: Image.new("YCbCr", (8, 8), (128, 128, 128)), "JPEG", None),
    ],
)
def test_every_mode_becomes_rgb(make, fmt, expected):
    out = decode_image(_bytes(make(), fmt))
    assert out.mode == "RGB" and out.size == (8, 8)
    if expected is not None:
        assert np.abs(np.subtract(_rgb_at(out), expected)).max() <= 3, _rgb_at(out)


def test_palette_with_transparency_composites_over_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    data = _bytes(img, "PNG", transparency=0)
    assert _rgb_at(decode_image(data)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_bytes(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = _rgb_at(decode_image(buf.getvalue()))
    assert r > 200 and b < 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_images_are_rejected(fmt):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _bytes(img, fmt)
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason in ("truncated", "undecodable")


def test_garbage_empty_oversize_and_bombs():
    with pytest.raises(DecodeError, match="not an image") as e:
        decode_image(b"this is not an image at all" * 10)
    assert e.value.reason == "undecodable"
    with pytest.raises(DecodeError) as e:
        decode_image(b"")
    assert e.value.reason == "empty"
    with pytest.raises(DecodeError) as e:
        decode_image(b"x" * 2000, max_bytes=1000)
    assert e.value.reason == "too_large"
    bomb = _png_header_claiming(100_000, 100_000)  # 10 gigapixels in 70 bytes
    assert len(bomb) < 100
    with pytest.raises(DecodeError, match="pixel") as e:
        decode_image(bomb)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(DecodeError) as e:
        decode_image(_bytes(Image.new("RGB", (200, 100)), "PNG"), max_pixels=10_000)
    assert e.value.reason == "too_many_pixels"


def test_long_strip_within_limits_decodes():
    out = decode_image(_bytes(Image.new("L", (20_000, 1), 7), "PNG"))
    assert out.size == (20_000, 1)


def test_a_side_longer_than_jpeg_allows_is_refused_from_the_header():
    # 75 KB that Pillow would hold as 40M row pointers (320 MB), allocated with the GIL held
    with pytest.raises(DecodeError) as e:
        decode_image(_bytes(Image.new("L", (1, 39_999_999), 7), "PNG"))
    assert e.value.reason == "bad_dimensions" and "65,535" in str(e.value)
    assert decode_image(_bytes(Image.new("L", (65_535, 2), 7), "PNG")).size == (65_535, 2)


def test_decode_pool_keeps_order_and_reports_bad_images_in_place():
    from simserve.inference.decode_pool import DecodePool

    rng = np.random.default_rng(1)
    good = [_bytes(Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)), "JPEG") for i in range(20)]
    blobs = good[:10] + [b"garbage"] + good[10:]
    with DecodePool(32, 3, workers=3) as pool:
        out = list(pool.map(blobs))
    assert isinstance(out[10], DecodeError) and out[10].reason == "undecodable"
    rest = out[:10] + out[11:]
    assert all(a.shape == (3, 32, 32) and a.dtype == np.uint8 for a in rest)
    with DecodePool(32, 3, workers=1) as single:
        for a, blob in zip(rest, good):
            assert np.array_equal(a, single.load(blob))  # same pixels whatever the worker count


def test_process_and_thread_decode_pools_agree_and_keep_errors_typed():
    from simserve.bench.common import jpeg_crops
    from simserve.inference.decode_pool import DecodePool

    blobs = jpeg_crops(12, 200) + [b"not an image"]
    with DecodePool(48, 3, 2) as threads, DecodePool(48, 3, 2, processes=True) as procs:
        a, b = list(threads.map(blobs)), list(procs.map(blobs))
    assert all(np.array_equal(x, y) for x, y in zip(a[:-1], b[:-1]))
    assert isinstance(b[-1], DecodeError) and b[-1].reason == a[-1].reason == "undecodable"


def test_jpeg_fast_path_decodes_straight_to_model_size_close_to_pillow():
    from simserve.bench.common import jpeg_crops
    from simserve.inference.decode import decode
    from simserve.inference.pixels import to_pixels

    for data in jpeg_crops(12, 256, seed=11):  # real photos
        fast = decode(data, min_side=96)
        assert isinstance(fast, np.ndarray) and fast.shape == (96, 96, 3)  # 3/8 scale in the IDCT, no resize
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR))
        assert np.abs(fast.astype(int) - ref).mean() < 5
        assert (to_pixels(fast, 96) == fast.transpose(2, 0, 1)).all()
    wide = decode(_bytes(Image.new("RGB", (320, 200), (0, 128, 255)), "JPEG"), min_side=96)
    assert wide.shape == (100, 160, 3)  # the smallest M/8 scale keeping both sides >= 96
    assert to_pixels(wide, 96).shape == (3, 96, 96)
    grey = decode(_bytes(Image.new("L", (256, 256), 77), "JPEG"), min_side=96)
    assert grey.shape == (96, 96, 3) and np.abs(grey.astype(int) - 77).max() <= 1


def test_jpeg_fast_path_hands_odd_jpegs_to_pillow():
    from simserve.inference.decode import decode

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode(_bytes(Image.new("RGB", (400, 200), (255, 0, 0)), "JPEG", exif=exif), min_side=96)
    h, w = np.asarray(rotated).shape[:2]
    assert h == 2 * w >= 2 * 96  # portrait, as displayed (Pillow's draft: 1/2 scale)
    cmyk = decode(_bytes(Image.new("CMYK", (256, 256), (0, 0, 0, 0)), "JPEG"), min_side=96)
    assert np.abs(np.asarray(cmyk).astype(int) - 255).max() <= 3
    data = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(DecodeError) as e:
        decode(data[: len(data) // 2], min_side=96)
    assert e.value.reason in ("truncated", "undecodable")


def test_jpeg_header_claiming_too_many_pixels_is_refused_before_decoding():
    from simserve.inference.decode import decode

    data = bytearray(_bytes(Image.new("RGB", (64, 48), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")
    with pytest.raises(DecodeError) as e:
        decode(bytes(data), min_side=96)  # the libjpeg-turbo header path
    assert e.value.reason == "too_many_pixels"
    assert decode(_bytes(Image.new("RGB", (64, 48), (9, 9, 9)), "JPEG"), min_side=32).shape == (36, 48, 3)  # 6/8 scale


def test_normalize_gives_a_contiguous_batch_equal_to_the_textbook_formula():
    """A batch stacked from to_pixels' HWC->CHW views is strided; normalising must not keep
    that layout (5x slower to write, and copied again by ONNX Runtime)."""
    from simserve.inference.pixels import normalize, to_pixels

    rng = np.random.default_rng(3)
    x = np.stack([to_pixels(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 32) for _ in range(5)])
    assert not x.flags.c_contiguous
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(x, mean, std)
    ref = (x.astype(np.float64) / 255 - np.array(mean).reshape(3, 1, 1)) / np.array(std).reshape(3, 1, 1)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.abs(out - ref).max() < 1e-5


DEEP_PROBE = """
import resource, sys
from simserve.inference.decode_pool import pixels
data = open(sys.argv[1], 'rb').read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = pixels(data, 128, 3)
print(x.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_a_small_deep_png_decodes_in_bounded_memory(tmp_path):
    """A 72 KB 16-bit greyscale PNG of 6000 x 6000 (under the pixel limit) once took ~825 MB to
    become model pixels (a float64 copy of every pixel, then more); now the decoded image is
    reduced before any conversion. Peak RSS of a fresh process, beyond what it held before."""
    import subprocess
    import sys

    a = np.zeros((6000, 6000), np.uint16)
    a[::7] = 40000
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert path.stat().st_size < 200_000
    r = subprocess.run([sys.executable, "-c", DEEP_PROBE, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shape, grew_mb = r.stdout.rsplit(" ", 1)
    assert shape == "(3, 128, 128)" and int(grew_mb) < 200, r.stdout  # the decoded 16-bit image alone is 72 MB


def test_formats_outside_the_allowlist_are_refused_before_decoding():
    """EPS would run Ghostscript where it is installed; ICO, PPM and friends are not what
    anyone shares photos in. All are refused by name, whatever Pillow could read."""
    from simserve.inference.decode import FORMATS

    for fmt in ("PPM", "ICO", "TGA", "PCX", "EPS"):
        buf = io.BytesIO()
        try:
            Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, fmt)
        except (OSError, KeyError):  # EPS needs Ghostscript to *write*; its header is enough here
            buf = io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n")
        with pytest.raises(DecodeError, match="format this server reads") as e:
            decode_image(buf.getvalue())
        assert e.value.reason == "undecodable"
    for fmt in FORMATS:  # and every allowed one still decodes
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, fmt)
        assert decode_image(buf.getvalue()).size == (16, 16)


def test_only_the_first_page_of_a_many_page_tiff_is_read():
    """Asking a TIFF how many pages it has walks all of them: 3,000 pages took 0.5 s (60,000 took
    over a minute); the first page is all a model sees, so it is all that is read."""
    import time

    pages = [Image.new("L", (2, 2), (200 if i == 0 else 10)) for i in range(3000)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    t = time.perf_counter()
    img = decode_image(buf.getvalue())
    assert time.perf_counter() - t < 0.1 and img.getpixel((0, 0)) == (200, 200, 200)


def test_a_decode_stops_between_blocks_once_its_caller_gives_up():
    from simserve.inference.decode import BLOCK, DecodeStopped, decode, stop_when

    data = grainy_png(1500)
    reads = []
    with stop_when(lambda: reads.append(1) and False):  # never stops: counts the reads
        whole = decode(data, min_side=128)
    assert np.array_equal(np.asarray(whole), np.asarray(decode(data, min_side=128)))  # same pixels either way
    assert len(reads) >= len(data) // BLOCK > 10  # the decoder is fed block by block
    asked = []
    with stop_when(lambda: asked.append(1) or len(asked) > 8), pytest.raises(DecodeStopped):
        decode(data, min_side=128)
    assert len(asked) == 9  # stopped mid-image, at the first read after the wish



def test_a_decoder_that_reads_its_input_at_once_is_stopped_before_the_resize():
    """libwebp decodes a frame in one call that cannot be stopped midway; the wish is asked once
    more after it, so a stopped request pays for that call and not for the reduce after it (bench
    fuzz, one 40 Mpx WebP with a 0.5 s deadline: the server worked on 1.0-1.1 s after it, now 0.4 s)."""
    from simserve.inference.decode import DecodeStopped, decode, stop_when

    buf = io.BytesIO()
    Image.new("RGB", (600, 400), (5, 6, 7)).save(buf, "WEBP")
    asked = []
    with stop_when(lambda: asked.append(1) and False):
        decode(buf.getvalue(), min_side=64)
    n = len(asked)
    with stop_when(lambda: asked.append(1) or len(asked) > 2 * n - 1), pytest.raises(DecodeStopped):
        decode(buf.getvalue(), min_side=64)  # every read answered, then stopped at the last look
