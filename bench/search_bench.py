"""Benchmark of the exact chunk-subset search (retrieval/search.py) on the CPU.

For |S| = 1, 2, 8 chosen chunks and 1 or 16 queries per call it times, with the last-level
cache flushed before every call and the thread pools left to go idle (medians over repeats,
methods interleaved):
  ours     retrieval.search.search (exact: the C scan of retrieval/scan.py where it was
           built, else GEMV for one query and GEMM for 16; float64 re-rank), also with a
           search on a 1,000-item store between flush and call ("code warm"): the flush
           evicts the interpreter's working set too, which a C call hardly notices; and
           with the C scan switched off ("GEMM": the numpy path, a GEMV for one query);
  matmul   just the float32 matmuls of the chosen chunks (what the BLAS alone costs);
  faiss    faiss.knn on a contiguous copy of the chosen chunks made beforehand;
  naive    ((X[S] - q[S]) ** 2).sum() over the full arrays, one query at a time;
  floor    bytes of the chosen chunks / memory bandwidth, the bandwidth measured in the
           same run as the median of the 512 MiB numpy copies that flush the cache before
           each call of that setting, counted as read + write bytes (2 x 512 MiB);
  arith    the arithmetic floor: the 2 Q N |S| d flops of the scores at the rate of a large
           square float32 matmul measured in the same run (numpy's BLAS, its default threads,
           the fastest of 7);
           a batch can beat neither floor, so it is judged against the larger one.
It also reports the store's resident memory (VmRSS delta around building the features and the
store) against the raw feature bytes. Prints markdown for docs/benchmarks.md.

    python bench/search_bench.py --n 200000 1000000
"""
import argparse
import os
import platform
import time

import faiss
import numpy as np

from retrieval import scan
from retrieval.search import ChunkStore, search

N_CHUNKS, DIM, K = 8, 64, 10
SUBSETS = {1: [3], 2: [1, 5], 8: list(range(N_CHUNKS))}
BUFFER = 1 << 29  # bytes per copy buffer: 512 MiB, beyond the last-level cache
# After a call OpenBLAS's worker threads (numpy's, and faiss's own) spin for about 0.1 s; a
# method timed meanwhile has one core fewer (8 chunks, 16 queries: 42 ms against 26 ms). Each
# call waits for the others' thread pools to go idle (--settle seconds), then the timed copy runs.


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def without_scan(fn):
    """fn() with the core's C scan switched off: its numpy GEMM path, as where the scan was not built."""
    saved, scan.windows = scan.windows, None
    try:
        return fn()
    finally:
        scan.windows = saved


def naive(x: np.ndarray, q: np.ndarray, sel: list[int], k: int) -> np.ndarray:
    """Top-k ids by squared distance over the full (n_chunks, N, d) array, per query."""
    out = []
    for qi in q:
        dist = ((x[sel] - qi[sel][:, None, :]) ** 2).sum(axis=(0, 2))
        top = np.argpartition(dist, k)[:k]
        out.append(top[np.argsort(dist[top])])
    return np.array(out)


def matmul_rate(size: int = 2048, repeats: int = 7) -> float:
    """Flops per second of a large square float32 matmul: what this CPU's BLAS reaches, from the
    fastest of the repeats (a floor is the best case; one run's median here once read 107 GFLOP/s
    against 195, a core busy elsewhere)."""
    a = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    return 2 * size**3 / min(timed(lambda: np.matmul(a, a, out=out)) for _ in range(repeats))


def bench(n: int, repeats: int, src: np.ndarray, dst: np.ndarray, rate: float, settle: float) -> list[str]:
    rng = np.random.default_rng(0)
    before = rss()
    x = np.empty((N_CHUNKS, n, DIM), np.float32)
    for c in range(N_CHUNKS):
        rng.standard_normal((n, DIM), dtype=np.float32, out=x[c])
    t = time.perf_counter()
    store = ChunkStore(x)
    build = time.perf_counter() - t
    tiny = ChunkStore(x[:, :1000].copy())
    resident = rss() - before
    print(f"N={n}: features {x.nbytes / 2**20:.0f} MiB, store.nbytes() {store.nbytes() / 2**20:.0f} MiB, "
          f"RSS delta {resident / 2**20:.0f} MiB = {resident / x.nbytes:.3f}x raw; built in {build:.2f} s",
          flush=True)

    rows = []
    for size, sel in SUBSETS.items():
        xb = np.ascontiguousarray(x[sel].transpose(1, 0, 2).reshape(n, -1))  # faiss's own layout
        for nq in (1, 16):
            q = rng.standard_normal((nq, N_CHUNKS, DIM), dtype=np.float32)
            xq = np.ascontiguousarray(q[:, sel].reshape(nq, -1))
            scores = np.empty((nq, n), np.float32)
            methods = {
                "ours": lambda: search(store, q, sel, K),
                "ours, code warm": lambda: search(store, q, sel, K),
                "ours, GEMM": lambda: without_scan(lambda: search(store, q, sel, K)),
                "matmul": lambda: [np.matmul(q[:, c], x[c].T, out=scores) for c in sel],
                "faiss": lambda xb=xb: faiss.knn(xq, xb, K),
                "naive": lambda: naive(x, q, sel, K),
            }
            times, copies = {m: [] for m in methods}, []
            # naive takes seconds per call: fewer repeats, none for batches beyond 200K items
            naive_repeats = max(1, repeats // 3) if nq == 1 else int(n <= 200_000)
            for r in range(repeats):
                for m, fn in methods.items():
                    if m == "naive" and r >= naive_repeats:
                        continue
                    # The copy evicts the chosen chunks from the last-level cache and, timed,
                    # measures the memory bandwidth under the same conditions as the call.
                    time.sleep(settle)
                    copies.append(timed(lambda: np.copyto(dst, src)))
                    if m == "ours, code warm":  # the interpreter's working set back in cache, not the data
                        search(tiny, q, sel, K)
                    times[m].append(timed(fn))
            ours, ref = search(store, q, sel, K).ids, faiss.knn(xq, xb, K)[1]
            agree = np.mean([set(a) == set(b) for a, b in zip(ours, ref)])
            bandwidth = 2 * src.nbytes / np.median(copies)  # a copy reads src and writes dst
            floor = n * size * DIM * 4 / bandwidth * 1e3  # ms
            arith = 2 * nq * n * size * DIM / rate * 1e3  # ms
            ms = {m: np.median(t) * 1e3 if t else np.nan for m, t in times.items()}
            cells = [f"{n:,}", size, nq, *(f"{ms[m]:.1f}" for m in list(methods)[:-1]), f"{ms['naive']:.0f}",
                     f"{bandwidth / 1e9:.1f}", f"{floor:.1f}", f"**{ms['ours'] / floor:.2f}**",
                     *(f"{ms[m] / floor:.2f}" for m in list(methods)[1:-1]), f"{ms['naive'] / floor:.0f}",
                     f"{arith:.1f}", f"**{ms['ours'] / max(floor, arith):.2f}**"]
            rows.append("| " + " | ".join(str(c).replace("nan", "—") for c in cells) + " |")
            print(rows[-1], f"(faiss top-{K} sets agree on {agree:.0%} of queries)", flush=True)
        del xb
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000], help="store sizes")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per method and setting")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="seconds before each call for other libraries' thread pools to go idle")
    args = parser.parse_args()

    src = np.ones(BUFFER // 4, np.float32)
    dst = np.zeros_like(src)
    copy = np.median([timed(lambda: np.copyto(dst, src)) for _ in range(7)])
    bandwidth = 2 * src.nbytes / copy  # a copy reads src and writes dst
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), load {os.getloadavg()[0]:.1f}")
    built = os.path.basename(scan._lib._name).split(".")[0] if scan._lib is not None else None
    print(f"search core: {f'the C scan, build {built}' if built else 'numpy GEMV and GEMM (no C scan built)'}")
    print(f"bandwidth at the start: {bandwidth / 1e9:.1f} GB/s (median copy of {BUFFER >> 20} MiB in "
          f"{copy * 1e3:.1f} ms, counting read + write bytes)", flush=True)
    rate = matmul_rate()
    print(f"float32 matmul rate: {rate / 1e9:.1f} GFLOP/s (fastest of 7 square 2048 matmuls)\n", flush=True)
    rows = ["| N | \\|S\\| | queries | ours ms | ours, code warm ms | ours, GEMM ms | matmul ms | faiss.knn ms | "
            "naive ms | GB/s | floor ms | **ours / floor** | code warm / floor | GEMM / floor | matmul / floor | "
            "faiss / floor | naive / floor | arith floor ms | **ours / max(floor, arith)** |",
            "|" + "---|" * 19]
    for n in args.n:
        rows += bench(n, args.repeats, src, dst, rate, args.settle)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
