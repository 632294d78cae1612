"""Exact chunk-subset search with the torch backend on a device (CUDA on the lent GPU machine):
1 and 64 queries, |S| = 1, 2, 8, against the floor = bytes of the chosen chunks / the device's
copy bandwidth measured in the same run (a large tensor clone, read + write bytes).

    python bench/gpu_search_bench.py [--device cuda] [--n 1000000] [--repeats 9]
"""
import argparse
import statistics
import time

import numpy as np
import torch

from retrieval.search import ChunkStore, search

N_CHUNKS, DIM, K = 8, 64, 10
SUBSETS = {1: [3], 2: [1, 5], 8: list(range(N_CHUNKS))}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats):
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first call warms kernels and caches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((N_CHUNKS, args.n, DIM), dtype=np.float32)
    store = ChunkStore(feats, backend="torch", device=args.device)
    big = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    copy = median_time(big.clone, device, args.repeats)
    bandwidth = 2 * big.numel() * 4 / copy  # read + write
    del big
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; N = {args.n:,} x {N_CHUNKS} x {DIM}; copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| queries | chunks | ours (ms) | floor (ms) | ours / floor |")
    print("|---|---|---|---|---|")
    for nq in (1, 64):
        q = rng.standard_normal((nq, N_CHUNKS, DIM), dtype=np.float32)
        for size, chunks in SUBSETS.items():
            t = median_time(lambda: search(store, q, chunks, K), device, args.repeats)
            floor = args.n * len(chunks) * DIM * 4 / bandwidth
            print(f"| {nq} | {size} | {t * 1e3:.2f} | {floor * 1e3:.3f} | {t / floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
