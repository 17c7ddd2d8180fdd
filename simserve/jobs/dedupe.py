"""``simserve dedupe DIR --out GROUPS.jsonl``: near-duplicate groups in a folder.

1. Every file is hashed (sha256); its embedding and tower features are looked
   up in a cache keyed by that hash (an SQLite item store per model, under the
   data directory), and computed only when missing: a second run over the same
   files only reads the cache. Byte-identical files share one entry.
2. FAISS finds each image's nearest neighbours by embedding (recall).
3. The fusion head re-scores those candidate pairs (precision); pairs at or
   above the threshold (``DEFAULT_THRESHOLD`` unless given) are duplicates.
4. Connected components are the groups. Each suggests a file to keep: the
   highest resolution, then the largest file, then the first path.

Memory: n x d float32 embeddings plus one chunk of features at a time
(features of a candidate pair are read from the cache when it is scored).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from simserve.atomic import atomic_path
from simserve.index.store import ItemStore, NewItem
from simserve.inference.decode import DecodeError, decode
from simserve.inference.engine import Engine
from simserve.inference.pixels import to_pixels
from simserve.jobs.files import find_images
from simserve.jobs.lanes import decode_each, embed_decoded, map_lanes

# Stricter than the model's own threshold (precision 0.99 on pairs with random negatives):
# groups are connected components, so one false pair merges two whole groups, and a
# folder holds look-alikes (two pennies, two birds) that random negatives never test.
# Measured on the shipped model: resized / recompressed / brightened copies score >= 0.999,
# distinct but similar Tux Paint stamps up to 0.96 (tests/test_batch.py).
DEFAULT_THRESHOLD = 0.99


@dataclass
class FileInfo:
    path: str
    sha256: str
    bytes: int
    width: int = 0
    height: int = 0
    id: int = -1  # row in the embedding matrix (one per distinct content)


@dataclass
class DedupeReport:
    images: int = 0
    distinct: int = 0
    embedded: int = 0
    from_cache: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    candidates: int = 0
    duplicate_pairs: int = 0
    groups: int = 0
    in_groups: int = 0
    seconds: float = 0.0


def _hash(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _decode(content: str, folder: Path, by_hash: dict[str, list["FileInfo"]], size: int, channels: int) -> tuple[np.ndarray, int, int] | DecodeError:
    """Model pixels and the full resolution of the first file with this content hash (the
    decoder may shrink JPEGs while decoding)."""
    try:
        data = (folder / by_hash[content][0].path).read_bytes()
        img = decode(data, min_side=size)
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            w, h = header.size
    except DecodeError as e:
        return e
    except OSError as e:
        return DecodeError("unreadable", f"cannot read: {e.strerror or e}")
    return to_pixels(img, size, channels), w, h


def find_duplicates(
    engine: Engine,
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    k: int = 10,
    batch: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], DedupeReport]:
    t0 = time.perf_counter()
    folder = Path(folder)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    report = DedupeReport()
    paths = find_images(folder)
    report.images = len(paths)
    pool = ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="dedupe")
    try:
        hashed = list(tqdm(pool.map(_hash, paths), total=len(paths), unit="file", desc="hashing", disable=not progress))
        images = [FileInfo(p.relative_to(folder).as_posix(), h, n) for p, (h, n) in zip(paths, hashed)]
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = ItemStore(Path(cache_dir) / f"dedupe-{engine.bundle.manifest['files']['tower.onnx']['sha256'][:16]}.sqlite", engine.bundle.embedding_dim)
        by_hash: dict[str, list[FileInfo]] = {}
        for im in images:
            by_hash.setdefault(im.sha256, []).append(im)
        report.distinct = len(by_hash)
        failed = _fill_cache(engine, cache, folder, by_hash, batch, workers, report, progress)
        report.failed = {im.path: err for h, err in failed.items() for im in by_hash[h]}
        hashes = [h for h in by_hash if h not in failed]
        stored = cache.get(hashes)
        vecs = np.stack([stored[h].vector for h in hashes]) if hashes else np.zeros((0, engine.bundle.embedding_dim), np.float32)
        for i, h in enumerate(hashes):
            meta = stored[h].metadata or {}
            for im in by_hash[h]:
                im.id, im.width, im.height = i, meta.get("w", 0), meta.get("h", 0)
        pairs = _confirmed_pairs(engine, cache, hashes, [stored[h].id for h in hashes], vecs, k, threshold, report, progress)
    finally:
        pool.shutdown()
    groups = _groups(images, pairs)
    report.groups, report.in_groups = len(groups), sum(len(g["members"]) for g in groups)
    report.seconds = time.perf_counter() - t0
    return groups, report


def _fill_cache(engine, cache, folder, by_hash, batch, workers, report, progress) -> dict[str, str]:
    """Embed what the cache lacks; returns {content hash: error} for files that failed."""
    known = {h for h, v in cache.hashes(list(by_hash)).items() if v}  # key = content hash
    failed: dict[str, str] = {}
    todo = [h for h in by_hash if h not in known]
    report.from_cache = len(by_hash) - len(todo)
    bar = tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress or not todo)
    parts = (todo[s : s + batch] for s in range(0, len(todo), batch))
    load = partial(_decode, folder=folder, by_hash=by_hash, size=engine.config.input_size, channels=engine.config.in_channels)
    for part, out, embedded in map_lanes(engine, parts, partial(decode_each, load=load), embed_decoded, lanes=workers):
        good = [(h, o) for h, o in zip(part, out) if not isinstance(o, DecodeError)]
        failed.update((h, str(o)) for h, o in zip(part, out) if isinstance(o, DecodeError))
        if embedded is not None:
            feats, embs = embedded
            cache.add([NewItem(h, e, {"w": o[1], "h": o[2]}, h, f.astype(np.float16)) for (h, o), f, e in zip(good, feats, embs)])
            report.embedded += len(good)
        bar.update(len(part))
    bar.close()
    return failed


def _confirmed_pairs(engine, cache, hashes, store_ids, vecs, k, threshold, report, progress) -> list[tuple[int, int, float]]:
    """(i, j, head score) for neighbour pairs the head calls duplicates."""
    import faiss

    n = len(hashes)
    if n < 2:
        return []
    index = faiss.IndexFlatIP(vecs.shape[1]) if n <= 200_000 else faiss.IndexHNSWFlat(vecs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(vecs)
    kk = min(k + 1, n)
    cand: set[tuple[int, int]] = set()
    for s in range(0, n, 4096):
        _, nb = index.search(vecs[s : s + 4096], kk)
        for qi, row in enumerate(nb, start=s):
            cand.update((min(qi, int(j)), max(qi, int(j))) for j in row if j >= 0 and j != qi)
    cand_list = sorted(cand)
    report.candidates = len(cand_list)
    out = []
    bar = tqdm(total=len(cand_list), unit="pair", desc="confirming", disable=not progress or not cand_list)
    for s in range(0, len(cand_list), 1024):
        part = cand_list[s : s + 1024]
        need = sorted({i for p in part for i in p})
        feats = cache.features([store_ids[i] for i in need])
        shape = tuple(engine.bundle.manifest["feature_shape"])
        slot = {i: feats[store_ids[i]].astype(np.float32).reshape(shape) for i in need}
        fa = np.stack([slot[i] for i, _ in part])
        fb = np.stack([slot[j] for _, j in part])
        scores = engine.fuse(fa, fb)
        out += [(i, j, float(sc)) for (i, j), sc in zip(part, scores) if sc >= threshold]
        bar.update(len(part))
    bar.close()
    report.duplicate_pairs = len(out)
    return out


def _groups(images: list[FileInfo], pairs: list[tuple[int, int, float]]) -> list[dict]:
    """Connected components over duplicate pairs (and byte-identical files), largest first."""
    parent = list(range(len(images)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_id: dict[int, list[int]] = {}
    for n, im in enumerate(images):
        if im.id >= 0:
            by_id.setdefault(im.id, []).append(n)
    for members in by_id.values():  # byte-identical files
        for m in members[1:]:
            union(members[0], m)
    edges: list[tuple[int, int, float]] = []
    for i, j, sc in pairs:
        a, b = by_id[i][0], by_id[j][0]
        union(a, b)
        edges.append((a, b, sc))
    for members in by_id.values():
        edges += [(members[0], m, 1.0) for m in members[1:]]
    comps: dict[int, list[int]] = {}
    for n, im in enumerate(images):
        if im.id >= 0:
            comps.setdefault(find(n), []).append(n)
    groups = []
    for root, members in comps.items():
        if len(members) < 2:
            continue
        ims = [images[m] for m in members]
        keep = max(ims, key=lambda im: (im.width * im.height, im.bytes, [-ord(c) for c in im.path]))
        member_set = set(members)
        groups.append({
            "keep": keep.path,
            "members": [{"path": im.path, "width": im.width, "height": im.height, "bytes": im.bytes, "sha256": im.sha256} for im in ims],
            "pairs": [[images[a].path, images[b].path, round(sc, 4)] for a, b, sc in edges if a in member_set and b in member_set],
        })  # fmt: skip
    groups.sort(key=lambda g: (-len(g["members"]), g["keep"]))
    for n, g in enumerate(groups):
        g["group"] = n
    return groups


def write_groups(groups: list[dict], out: str | os.PathLike) -> None:
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for g in groups:
            f.write(json.dumps({"group": g["group"], **{k: v for k, v in g.items() if k != "group"}}, ensure_ascii=False) + "\n")

