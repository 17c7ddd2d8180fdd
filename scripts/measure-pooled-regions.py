"""Region embeddings two ways: the 16 region crops a search embeds today (inference/crops.py,
128 px each), against windows of one feature map of the query at 320 px, GeM-pooled and projected
as the tower pools a whole image (the regions are 128 px windows of that 320 px image, on the
tower's stride-16 grid). For random pasted queries of the copydetect set: how often some region
ranks the original first / in its first two (what a search verifies) / in its first ten, against
the 10,100-item collection; and the tower's time for each way (eager PyTorch, 2 threads).

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/.

    python scripts/measure-pooled-regions.py [--n 120]
"""

import argparse
import pickle
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simserve.index.collection import Collections
from simserve.inference.crops import REGION_BOXES, REGION_SIDE, TURNS, query_view_pixels
from simserve.inference.decode import decode
from simserve.inference.engine import load_engine
from simserve.inference.pixels import normalize, to_pixels

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


def main(n: int) -> None:
    torch.set_num_threads(2)
    cs, _ = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    engine = load_engine(None, backend="torch")
    tower, c = engine.model.tower, engine.config
    col = Collections(RUNS / "col-detail8").get("bench")
    size, wide_side = c.input_size, round(c.input_size / REGION_SIDE)

    def cropped(data: bytes) -> np.ndarray:
        return engine.embed(query_view_pixels(data, size, c.in_channels)[1 + len(TURNS) :])[1]

    def pooled(data: bytes) -> np.ndarray:
        wide = to_pixels(decode(data, min_side=wide_side), wide_side, c.in_channels)[None]
        with torch.inference_mode():
            fmap = tower.feature_map(torch.from_numpy(normalize(wide, c.mean, c.std)))
            cell = wide_side / fmap.shape[-1]
            w = round(size / cell)
            at = [(round(y0 * wide_side / cell), round(x0 * wide_side / cell)) for x0, y0, _, _ in REGION_BOXES]
            return np.stack([F.normalize(tower.project(fmap[:, :, y : y + w, x : x + w]), dim=1)[0].numpy() for y, x in at])

    queries = random.Random(0).sample([q for q in cs.queries if q.transform in ("paste_into", "crop_paste") and q.truth], n)
    best = {"16 crops at 128 px": [], "one 320 px map, pooled windows": []}
    for q in queries:
        truth = col.get([q.truth])[q.truth].id
        for name, f in zip(best, (cropped, pooled)):
            rows = col.search(f(q.data), 10, views=True)
            best[name].append(min(next((i for i, cand in enumerate(row) if cand.id == truth), 99) for row in rows))
    for name, ranks in best.items():
        r = np.array(ranks)
        print(f"{name}: original first in some region {(r < 1).mean():.3f}, in its first two {(r < 2).mean():.3f}, first ten {(r < 10).mean():.3f}")
    r = np.minimum(*[np.array(v) for v in best.values()])
    print(f"either way, in some region's first two: {(r < 2).mean():.3f} ({len(queries)} pasted queries)")

    def ms(x: torch.Tensor) -> float:
        with torch.inference_mode():
            tower.feature_map(x)
            times = []
            for _ in range(15):
                t = time.perf_counter()
                tower.feature_map(x)
                times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    crops, wide, turned = ms(torch.randn(16, 3, size, size)), ms(torch.randn(1, 3, wide_side, wide_side)), ms(torch.randn(3, 3, size, size))
    print(f"tower: 16 crops {crops:.1f} ms, one {wide_side} px image {wide:.1f} ms ({wide / crops:.2f}x); the 3 turned views {turned:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=120)
    main(p.parse_args().n)
