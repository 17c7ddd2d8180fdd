"""Could an 8-bit scan with an exact re-rank replace the flat scan a search makes at 100,000 items?

Reads the 100,100-item collection scripts/bench-copydetect-100k.py caches under runs/bench/, embeds
150 of the copydetect set's queries and their 19 views with the shipped model, and for each faiss
8-bit scalar quantizer wrapped in IndexRefineFlat (the codes scanned for k x k_factor, those
re-scored exactly) prints how much of the exact top 100 (the search's shortlist) and of each view's
exact top 10 it returns, and its time for one query and for one query's 19 views, beside the flat
index's. QT_8bit_direct_signed reads the vectors as whole numbers, so they are scaled by
127 / their largest magnitude first (a uniform scale: the order of inner products is unchanged).

    python scripts/bench-refine-scan.py
"""

import pickle
from pathlib import Path

import faiss
import numpy as np

from simserve.bench.common import median_seconds
from simserve.index.collection import Collections
from simserve.inference.crops import query_view_pixels
from simserve.inference.engine import load_engine

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


def median_ms(f) -> float:
    return median_seconds(f, repeats=9) * 1000


def main() -> None:
    col = Collections(RUNS / "col-100k").get("bench")
    flat_in_store = faiss.downcast_index(col.index.index.index)  # the collection's IndexIDMap2 -> its IndexFlatIP
    n, d = flat_in_store.ntotal, flat_in_store.d
    x = faiss.rev_swig_ptr(flat_in_store.get_xb(), n * d).reshape(n, d).copy()
    engine = load_engine(None)
    cs, _ = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    queries, views = [], []
    for q in cs.queries[::12][:150]:
        _, e = engine.embed(query_view_pixels(q.data, engine.config.input_size, engine.config.in_channels))
        queries.append(e[0])
        views.append(e[1:])
    q, v = np.array(queries, np.float32), np.concatenate(views).astype(np.float32)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    faiss.cvar.distance_compute_blas_threshold = 8  # as simserve.index.vector_index sets it
    _, top100 = flat.search(q, 100)
    _, top10 = flat.search(v, 10)
    print(f"flat: 1 query {median_ms(lambda: flat.search(q[:1], 100)):.2f} ms, 19 views {median_ms(lambda: flat.search(v[:19], 10)):.2f} ms")
    direct = 127 / float(np.abs(x).max())
    for name, qt, scale in (
        ("SQ8", faiss.ScalarQuantizer.QT_8bit, 1.0),
        ("SQ8 uniform", faiss.ScalarQuantizer.QT_8bit_uniform, 1.0),
        ("SQ8 direct signed", faiss.ScalarQuantizer.QT_8bit_direct_signed, direct),
    ):
        for k_factor in (1, 2, 4):
            index = faiss.IndexRefineFlat(faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT))
            index.train(x * scale)
            index.add(x * scale)
            index.k_factor = k_factor
            _, got100 = index.search(q * scale, 100)
            _, got10 = index.search(v * scale, 10)
            kept100 = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(top100, got100)])
            kept10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10, got10)])
            one = median_ms(lambda: index.search(q[:1] * scale, 100))
            nineteen = median_ms(lambda: index.search(v[:19] * scale, 10))
            print(f"{name}, k_factor {k_factor}: exact top 100 kept {kept100:.4f}, views' top 10 {kept10:.4f}; 1 query {one:.2f} ms, 19 views {nineteen:.2f} ms")


if __name__ == "__main__":
    main()
