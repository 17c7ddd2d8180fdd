"""Bulk indexing of a folder: read -> hash -> decode and embed (a batch per lane) -> keypoints
(verifying collections only) -> add.

Resumable: each batch is committed as it goes, and a key (the file's path
relative to the folder) already stored with the same content hash is
skipped, so a re-run after an interruption only does what is left.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from simserve.index.collection import Collection
from simserve.index.store import NewItem
from simserve.inference.crops import collapse_views
from simserve.inference.decode import DecodeError
from simserve.inference.decode_pool import load_bytes
from simserve.inference.engine import Engine
from simserve.jobs.files import find_images
from simserve.jobs.lanes import decode_each, embed_decoded, map_lanes
from simserve.ranking import verify


@dataclass
class IndexReport:
    added: int = 0
    skipped_unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def _read(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def index_folder(
    engine: Engine,
    collection: Collection,
    root: str | os.PathLike,
    *,
    batch: int = 64,
    workers: int | None = None,
    progress: bool = True,
    store_features: bool = True,
) -> IndexReport:
    root = Path(root)
    paths = find_images(root)
    keys = [p.relative_to(root).as_posix() for p in paths]
    report = IndexReport()
    cfg = engine.config
    views, verifying = collection.config.crop_views, collection.config.verify
    if verifying:
        verify.require()
    load = partial(load_bytes, size=cfg.input_size, channels=cfg.in_channels, crop_views=views)
    reader = ThreadPoolExecutor(4, thread_name_prefix="read")
    bar = tqdm(total=len(paths), unit="img", desc=f"indexing into {collection.name}", disable=not progress)

    def changed() -> Iterator[list[tuple[int, bytes, str]]]:
        """Batches of (path index, bytes, content hash) whose key is new or whose content changed."""
        for chunk_start in range(0, len(paths), batch * 8):
            chunk = list(range(chunk_start, min(len(paths), chunk_start + batch * 8)))
            known = collection.hashes([keys[i] for i in chunk])
            read = list(reader.map(lambda i: _read(paths[i]), chunk))
            todo = [(i, data, h) for i, (data, h) in zip(chunk, read) if known.get(keys[i]) != h]
            report.skipped_unchanged += len(chunk) - len(todo)
            bar.update(len(chunk) - len(todo))
            yield from (todo[s : s + batch] for s in range(0, len(todo), batch))

    try:
        decode = partial(decode_each, load=lambda item: load(item[1]))
        for part, arrays, out in map_lanes(engine, changed(), decode, embed_decoded, lanes=workers):
            good = [item for item, a in zip(part, arrays) if not isinstance(a, DecodeError)]  # (path index, bytes, hash)
            kps = list(reader.map(lambda item: verify.keypoints(verify.decode(item[1])), good)) if verifying else [None] * len(good)
            for (i, _, _), a in zip(part, arrays):
                if isinstance(a, DecodeError):
                    report.failed[keys[i]] = str(a)
            if out is not None:
                feats, emb, view_embs = collapse_views(*out) if views else (*out, None)  # views: six rows an image
                collection.add(
                    [
                        NewItem(
                            keys[i], emb[j], {"path": keys[i]}, h,
                            feats[j].astype(np.float16) if store_features else None,
                            None if view_embs is None else view_embs[j],
                            kps[j],
                        )
                        for j, (i, _, h) in enumerate(good)
                    ]
                )
                report.added += len(good)
            bar.update(len(part))
    finally:
        bar.close()
        reader.shutdown()
    return report
