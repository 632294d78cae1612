"""How long Table 2's mAP takes on a Sprites-`val`-sized problem (what `retrieval evaluate` pays):
12,816 images x 16 chunks of 16, the seven evaluated attributes with Sprites' numbers of values.

Times `query_ap` for one chunk on one thread and on every thread torch uses (the blocks of
queries run side by side; numpy's sorts release the GIL), medians over repeats, in one process,
and checks that both give the same APs.

    python bench/evaluate_bench.py [--n 12816] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from retrieval.evaluate import query_ap

# body, skin, vest, hair, arm, leg, pose: the numbers of values in Sprites `val`
VALUES = (2, 4, 3, 6, 2, 2, 178)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12_816)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=16, help="Chunks of the full evaluation (for its total).")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.n, a.dim)).astype(np.float32)
    codes = np.stack([rng.integers(0, v, a.n) for v in VALUES], axis=1)
    threads = torch.get_num_threads()
    print(f"{a.n} images x {a.dim} dims, {len(VALUES)} attributes; torch threads {threads}, "
          f"load average at the start: {os.getloadavg()[0]:.2f}")
    times, results = {}, {}
    for workers in sorted({1, threads}):
        runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            results[workers] = query_ap(x, codes, workers=workers)
            runs.append(time.perf_counter() - t)
        times[workers] = statistics.median(runs)
        print(f"workers {workers}: {times[workers]:.2f} s a chunk (median of {a.repeats}), "
              f"{times[workers] * a.chunks / 60:.1f} min for {a.chunks} chunks")
    same = all(np.array_equal(results[1], r, equal_nan=True) for r in results.values())
    print(f"speed-up of {threads} workers over 1: {times[1] / times[threads]:.2f}x; identical APs: {same}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
