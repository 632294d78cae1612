"""The search core's last step for a batch of queries: the float64 re-rank of each query's
candidates and their order by (distance, id), all queries together (`retrieval.search._ranked`)
against the same done query by query (the loop the core ran before, written out here), timed
alternately in one process (medians), with the answers checked equal.

Random float32 features, N items x 8 chunks x 64; each query gets --candidates random rows, about
what the scan's windows hold for k = 10.

    python bench/rerank_bench.py [--n 20000] [--candidates 12] [--repeats 2000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from retrieval.search import ChunkStore, _ranked, _rerank  # noqa: E402

K = 10


def query_by_query(store, q, sel, w, positions, k, offset):
    """The reference: each query's candidates re-ranked and ordered on their own."""
    out = []
    for i, pos in enumerate(positions):
        dist = _rerank(store, q[i], sel, w, pos)
        best = np.lexsort((store.ids[pos], dist))[offset:offset + k]
        out.append((store.ids[pos[best]], dist[best]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, a.n, 64), dtype=np.float32)
    store = ChunkStore(feats, np.arange(1, a.n + 1))
    print(f"{a.n} items x 8 chunks x 64, {a.candidates} candidates a query, k = {K}; "
          f"load average at the start: {os.getloadavg()[0]:.2f}\n")
    print("| queries | chunks | query by query (µs) | together (µs) | **ratio** |")
    print("|---|---|---|---|---|")
    for n_queries in (1, 4, 16):
        for n_chunks in (1, 2, 8):
            sel, w = list(range(n_chunks)), np.ones(n_chunks)
            q = np.ascontiguousarray(feats[:, :n_queries].transpose(1, 0, 2))
            positions = [rng.choice(a.n, a.candidates, replace=False) for _ in range(n_queries)]
            args = (store, q, sel, w, positions, K, 0)
            for (ids_a, dist_a), (ids_b, dist_b) in zip(query_by_query(*args), _ranked(*args), strict=True):
                if not (np.array_equal(ids_a, ids_b) and np.array_equal(dist_a, dist_b)):
                    raise SystemExit("the two orders disagree")
            times = {"alone": [], "together": []}
            steps = [("alone", query_by_query), ("together", _ranked)]
            for r in range(a.repeats):
                for name, fn in steps if r % 2 else steps[::-1]:
                    t = time.perf_counter()
                    fn(*args)
                    times[name].append(time.perf_counter() - t)
            alone, together = (statistics.median(times[s]) * 1e6 for s in ("alone", "together"))
            print(f"| {n_queries} | {n_chunks} | {alone:.1f} | {together:.1f} | **{alone / together:.2f}** |")


if __name__ == "__main__":
    main()
