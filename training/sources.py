"""Image sources: labelled collections of images that pair samplers draw from.

Every source yields in-memory PIL images (decoded once with the safe decoder,
downsized to ``max_side``) and an integer label: the class for class data,
the image's own index for self-supervised copy pairs. Where each source
comes from, and its licence, is in its docstring and in the model card.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from simserve.inference.decode import DecodeError, decode_file
from simserve.jobs.files import find_images

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist, MIT
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")  # Debian tuxpaint-stamps-default, GPL-2
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")  # Debian openclipart-png, public domain


@dataclass
class ImageSet:
    """Images with integer labels and a name for each (for reports)."""

    images: list[Image.Image]
    labels: np.ndarray
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int]) -> "ImageSet":
        idx = list(idx)
        return ImageSet(
            [self.images[i] for i in idx],
            self.labels[idx],
            [self.names[i] for i in idx] if self.names else [],
            self.classes,
        )

    def __add__(self, other: "ImageSet") -> "ImageSet":
        offset = int(self.labels.max()) + 1 if len(self) else 0
        return ImageSet(
            self.images + other.images,
            np.concatenate([self.labels, other.labels + offset]),
            self.names + other.names,
            self.classes + other.classes,
        )


def list_images(root: str | os.PathLike) -> list[Path]:
    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (is the Debian package installed? see README)")
    return find_images(root)


def _load_one(path: Path, max_side: int, trim: bool) -> Image.Image | None:
    try:
        img = decode_file(path)
    except (DecodeError, OSError):
        return None
    if trim:  # clip art: cut the empty white margin so crops land on content
        bbox = Image.eval(img.convert("L"), lambda v: 255 - v).getbbox()
        if bbox is None:
            return None
        img = img.crop(bbox)
    if min(img.size) < 8:
        return None
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def load_paths(paths: list[Path], labels: list[int], max_side: int, root: Path, trim: bool = False, workers: int = 4) -> ImageSet:
    """Decode many files in threads (Pillow releases the GIL while decoding).

    Each image is named by its path inside ``root``: the holdout split hashes
    names, so the same data must split the same wherever it lives (another
    machine, another checkout, a venv elsewhere, a temporary directory)."""
    with ThreadPoolExecutor(workers) as ex:
        imgs = list(ex.map(lambda p: _load_one(p, max_side, trim), paths))
    keep = [i for i, im in enumerate(imgs) if im is not None]
    names = [paths[i].relative_to(root).as_posix() for i in keep]
    return ImageSet([imgs[i] for i in keep], np.asarray([labels[i] for i in keep], dtype=np.int64), names)


def image_folder(root: str | os.PathLike, max_side: int = 192, trim: bool = False) -> ImageSet:
    """A user's folder of class sub-folders (torchvision ImageFolder layout): label = sub-folder."""
    root = Path(root)
    paths = list_images(root)
    classes = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    if not classes:
        raise ValueError(f"{root}: expected class sub-folders (ImageFolder layout), found none")
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for p in paths if len(p.relative_to(root).parts) > 1]
    s = load_paths(paths, [index[p.relative_to(root).parts[0]] for p in paths], max_side, root, trim)
    s.classes = classes
    return s


def instance_folder(root: str | os.PathLike, max_side: int = 192, trim: bool = False) -> ImageSet:
    """Every image in a folder tree as its own instance (label = index): copy-pair data."""
    paths = list_images(root)
    s = load_paths(paths, list(range(len(paths))), max_side, Path(root), trim)
    s.labels = np.arange(len(s), dtype=np.int64)
    return s


def tuxpaint(max_side: int = 192) -> ImageSet:
    """Tux Paint stamps (Debian tuxpaint-stamps-default, GPL-2): ~800 object cut-outs, 121 categories."""
    return image_folder(TUXPAINT_DIR, max_side, trim=True)


def openclipart(max_side: int = 192) -> ImageSet:
    """Open Clip Art Library (Debian openclipart-png, public domain dedication): ~8,000 drawings."""
    return image_folder(OPENCLIPART_DIR, max_side, trim=True)


def skimage_photos(max_side: int = 192) -> ImageSet:
    """The natural photos bundled with scikit-image (skimage/data; BSD/CC0/public domain, see its README)."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    keep = [p for p in sorted(root.glob("*")) if p.suffix.lower() in {".png", ".jpg"}]
    return load_paths(keep, list(range(len(keep))), max_side, root)


def wallpaper_crops(max_side: int = 192, crops_per_scene: int = 160, seed: int = 0) -> ImageSet:
    """Random crops of the *training* scenes of Debian's wallpaper packages (simserve/photos.py
    names each package and its licence; the benchmark's scenes are never read here). A wallpaper
    is 2,560-6,000 px, so one scene gives many different training images: each crop keeps 4-40%
    of the scene's area at an aspect between 3:4 and 4:3, drawn from a generator seeded by the
    scene's name, so the same crops come out on every machine. Crops of one scene overlap, and so
    may be near-copies of each other; each is still its own identity, as Open Clip Art's colourways are."""
    import random

    from simserve.photos import scenes

    images, names = [], []
    for scene in scenes("train"):
        big = decode_file(scene.path, min_side=2048)
        big.thumbnail((2048, 2048), Image.Resampling.LANCZOS)
        rng = random.Random(f"{seed}:{scene.name}")
        for i in range(crops_per_scene):
            area, aspect = rng.uniform(0.04, 0.4), 2 ** rng.uniform(-0.415, 0.415)
            w = min(big.width, round((area * big.width * big.height * aspect) ** 0.5))
            h = min(big.height, round((area * big.width * big.height / aspect) ** 0.5))
            x, y = rng.randint(0, big.width - w), rng.randint(0, big.height - h)
            crop = big.crop((x, y, x + w, y + h))
            crop.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            images.append(crop.convert("RGB"))
            names.append(f"{scene.name}/{i:04d}")
    return ImageSet(images, np.arange(len(images), dtype=np.int64), names)


def fashion_mnist(split: str = "train") -> ImageSet:
    """Fashion-MNIST (Debian dataset-fashion-mnist, MIT licence): 28x28 grey, 10 classes."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return ImageSet([Image.fromarray(a, "L") for a in images], labels, [f"{split}/{i}" for i in range(len(labels))], classes)


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the Debian package dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", data[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: unsupported idx dtype {dtype:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def holdout_split(names: list[str], fraction: float, salt: str = "simserve") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split by a hash of each name: stable across runs, machines and ordering."""
    h = np.array([int(hashlib.sha256(f"{salt}:{n}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for n in names])
    held = h < fraction
    return np.flatnonzero(~held), np.flatnonzero(held)


def distinct_subset(images: list[Image.Image], threshold: float = 0.95, side: int = 16, chunk: int = 2048) -> np.ndarray:
    """Indices of a subset in which no two images are near-identical: an image is
    kept unless its grey ``side``-px thumbnail correlates above ``threshold`` with
    an image already kept (greedy, in order; no transitive chaining).

    Why: Open Clip Art ships the same drawing in several colourways. Colour jitter
    and greyscale are copy augmentations, so such variants *are* copies of each
    other: as negatives they teach the model to separate what its own
    augmentations make identical, and as evaluation distractors they make the
    "right" neighbour ambiguous. The test is deliberately model-free (no model
    judges its own evaluation set)."""
    t = np.stack([np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), np.float32).ravel() for im in images])
    t -= t.mean(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
    earlier: list[np.ndarray] = []  # for each image, the earlier images it is near-identical to
    for s in range(0, len(t), chunk):
        close = t[s : s + chunk] @ t[: s + chunk].T > threshold
        earlier += [np.flatnonzero(row[: s + i]) for i, row in enumerate(close)]
    kept = np.zeros(len(images), bool)
    for i, prev in enumerate(earlier):
        kept[i] = not kept[prev].any()
    return np.flatnonzero(kept)


def drop_near_identical(images: "ImageSet", threshold: float = 0.95) -> "ImageSet":
    """``images`` without near-identical repeats (see ``distinct_subset``)."""
    return images.subset(distinct_subset(images.images, threshold))


SOURCES = {
    "tuxpaint": tuxpaint,
    "openclipart": openclipart,
    "skimage": skimage_photos,
    "wallpapers": wallpaper_crops,
}


def load_sources(names: list[str], max_side: int) -> ImageSet:
    """Several named sources as one instance set (every image its own label).

    Names become ``source/path-inside-it`` (a folder source by its last
    component), so the split is the same on every machine."""
    out: ImageSet | None = None
    for n in names:
        if n in SOURCES:
            s, prefix = SOURCES[n](max_side), n
        elif Path(n).is_dir():
            s, prefix = instance_folder(n, max_side), Path(n).resolve().name
        else:
            raise ValueError(f"unknown source {n!r}; known: {sorted(SOURCES)}, or a folder path")
        s.names = [f"{prefix}/{name}" for name in s.names]
        out = s if out is None else out + s
    assert out is not None
    out.labels = np.arange(len(out), dtype=np.int64)
    return out
