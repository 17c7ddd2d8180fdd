"""The exact scan through a collection's own flat index: the float scan against the int8 codes'
ranking with the exact re-score, at one and two threads, median of 21 (docs/decisions/exact-scan.md).

    python scripts/bench-exact-scan.py [runs/bench/col-100k/collections/bench/index.faiss]
"""

import sys
import time

import numpy as np

from simserve.index import exact_scan
from simserve.index.vector_index import IndexTuning, VectorIndex

path = sys.argv[1] if len(sys.argv) > 1 else "runs/bench/col-100k/collections/bench/index.faiss"
index = VectorIndex.load(path, 128, "Flat")
vectors, _ = exact_scan.flat_rows(index.index)
t = time.perf_counter()
index._codes.of(vectors)
print(f"{len(vectors)} rows encoded in {(time.perf_counter() - t) * 1000:.1f} ms")
rng = np.random.default_rng(0)
for threads in (1, 2):
    index.tuning = IndexTuning(search_threads=threads)
    for n, k in ((1, 100), (19, 10)):  # the upright query, and its views
        q = np.array(vectors[rng.integers(0, len(vectors), n)]) + 0.1 * rng.standard_normal((n, vectors.shape[1])).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)  # a noisy copy of a stored vector
        got = {}
        for name, start in (("float", 1 << 62), ("int8", 0)):
            exact_scan.QUANTIZED_FROM = start
            index.search(q, k)
            times = []
            for _ in range(21):
                t = time.perf_counter()
                out = index.search(q, k)
                times.append(time.perf_counter() - t)
            got[name] = (np.median(times) * 1000, out)
        (f, (fs, fi)), (i, (is_, ii)) = got["float"], got["int8"]
        print(f"{threads} thread(s), {n} x {k} deep: float {f:.2f} ms, int8 {i:.2f} ms ({i / f:.2f}x); same ids {(fi == ii).mean():.3f}, largest score difference by rank {np.abs(fs - is_).max():.1e}")
