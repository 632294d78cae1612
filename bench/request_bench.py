"""One request, one client: `GET /search` through `retrieval serve` against the bare search core
on the same query in this process (issue 19's first target: p50 at most 1.3x).

Builds a synthetic index of N random images x 8 chunks x 64 (bench/index_load.py), starts
`retrieval serve` in a subprocess on a loopback port, and for each chunk set times, query by
query and in alternating order (so both see the same cache state): `retrieval.search.search`
on the query image's stored vector (excluding itself, as the service does) with one BLAS
thread, as the server runs each request; `Index.query_for` + `Index.search` (the library calls
behind one request); the same GET through the Flask app in this process (its test client: the
app's own work, no socket and no WSGI server); and one keep-alive HTTP request with its JSON
parsed. Medians over --queries queries after a warm-up. Loopback only.

    python bench/request_bench.py [--n 200000] [--queries 300]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from index_load import make_index  # noqa: E402
from load_test import CHUNK_SETS, K, make_model, serving  # noqa: E402

from api import create_app  # noqa: E402
from retrieval.index import Index  # noqa: E402
from retrieval.search import search  # noqa: E402


def measure(idx: Index, app, conn: http.client.HTTPConnection, chunks: str, n: int, queries: int,
            warmup: int = 20) -> dict:
    chosen = idx.resolve_chunks(chunks)
    rng = np.random.default_rng(len(chosen))
    times: dict[str, list[float]] = {"core": [], "library": [], "app": [], "request": []}
    client = app.test_client()

    def core(i):
        search(idx.store, idx.store.vector(i)[None], chosen, K, exclude_ids=[i])

    def library(i):
        idx.search(idx.query_for(i), chosen, K)

    def in_app(i):
        response = client.get(f"/search?image={i}&chunks={chunks}&k={K}")
        if response.status_code != 200 or len(response.json["results"]) != K:
            raise SystemExit(f"bad answer in the app {response.status_code}: {response.json}")

    def request(i):
        conn.request("GET", f"/search?image={i}&chunks={chunks}&k={K}")
        response = conn.getresponse()
        body = json.loads(response.read())
        if response.status != 200 or len(body["results"]) != K:
            raise SystemExit(f"bad answer {response.status}: {body}")

    steps = [("core", core), ("library", library), ("app", in_app), ("request", request)]
    for q in range(warmup + queries):
        i = int(rng.integers(1, n + 1))
        for name, fn in steps if q % 2 else steps[::-1]:
            t = time.perf_counter()
            fn(i)
            if q >= warmup:
                times[name].append(time.perf_counter() - t)
    p50 = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    return {**{f"{k}_p50_ms": v for k, v in p50.items()},
            "request_p99_ms": float(np.percentile(times["request"], 99)) * 1000,
            "ratio": p50["request"] / p50["core"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="Images in the synthetic index.")
    ap.add_argument("--queries", type=int, default=300, help="Timed queries per chunk set.")
    ap.add_argument("--threads", type=int, default=8, help="Server worker threads.")
    args = ap.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp)
        make_index(index_dir, args.n)
        make_model(index_dir, chunk_dim=64)
        idx = Index(index_dir)
        app = create_app({"INDEX": str(index_dir)})
        rows = {}
        with serving(index_dir, args.threads) as base, threadpool_limits(1, user_api="blas"):
            host, port = base.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            for c, chunks in CHUNK_SETS.items():
                rows[c] = measure(idx, app, conn, chunks, args.n, args.queries)
            conn.close()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.n:,} images x 8 chunks x 64, k={K}, one BLAS thread; server --threads {args.threads}; "
          f"one keep-alive client; medians of {args.queries} queries\n")
    print("| chunks | core p50 (ms) | Index.query_for + search p50 (ms) | Flask app in-process p50 (ms) "
          "| request p50 (ms) | request p99 (ms) | **request / core** |")
    print("|---|---|---|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {c} | {r['core_p50_ms']:.2f} | {r['library_p50_ms']:.2f} | {r['app_p50_ms']:.2f} "
              f"| {r['request_p50_ms']:.2f} | {r['request_p99_ms']:.2f} | **{r['ratio']:.2f}** |")


if __name__ == "__main__":
    main()
