"""One request, one client: `GET /search` through `retrieval serve` against the bare search core
on the same query in this process (issue 19's first target: p50 at most 1.3x), and the floor of
the stack: what a Flask route that runs only the search core costs through the same server.

Builds a synthetic index of N random images x 8 chunks x 64 (bench/index_load.py), starts
`retrieval serve` in a subprocess on a loopback port, and for each chunk set times, query by
query and in alternating order (so both see the same cache state): `retrieval.search.search`
on the query image's stored vector (excluding itself, as the service does) with one BLAS
thread, as the server runs each request; `Index.query_for` + `Index.search` (the library calls
behind one request); the same GET through the Flask app in this process (its test client: the
app's own work, no socket and no WSGI server); one keep-alive HTTP request with its JSON
parsed; and the floor: the same request to a second server (api/server.py's waitress, a
bare Flask app whose one route runs the same core call with nothing of ours around it and
answers a constant), which is what any Flask service on waitress pays a request after the
same scan. Medians over --queries queries after a warm-up. Loopback only.

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
from api.serve import THREADS  # noqa: E402
from retrieval.index import Index  # noqa: E402
from retrieval.search import search  # noqa: E402


def floor_app(index_dir: Path):
    """A bare Flask app: GET /core runs the search core as `measure`'s core does and answers a
    constant; GET /health answers that it is up."""
    from flask import Flask, request

    idx = Index(index_dir)
    app = Flask("floor")

    @app.get("/core")
    def core():
        i = int(request.args["image"])
        started = time.perf_counter()
        search(idx.store, idx.store.vector(i)[None], [int(c) for c in request.args["chunks"].split(",")], K,
               exclude_ids=[i])
        return {"results": []}, {"X-Core-Seconds": str(time.perf_counter() - started)}

    @app.get("/health")
    def health():
        return {"status": "ok"}
    return app


def serve_floor(index_dir: Path, port: int, threads: int) -> None:
    """floor_app on api/server.py's waitress with `retrieval serve`'s settings, until SIGTERM."""
    import signal

    from api.server import make_server

    def stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    threadpool_limits(1, user_api="blas")
    server = make_server(floor_app(index_dir), "127.0.0.1", port, threads=threads, connection_limit=100,
                         channel_timeout=30, max_body=2**20)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def measure(idx: Index, app, conn: http.client.HTTPConnection, floor: http.client.HTTPConnection, chunks: str,
            n: int, queries: int, warmup: int = 20) -> dict:
    chosen = idx.resolve_chunks(chunks)
    rng = np.random.default_rng(len(chosen))
    times: dict[str, list[float]] = {"core": [], "library": [], "app": [], "request": [], "floor": [],
                                     "floor_core": []}
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

    def floor_request(i):
        floor.request("GET", f"/core?image={i}&chunks={','.join(map(str, chosen))}")
        response = floor.getresponse()
        if response.status != 200 or json.loads(response.read()) != {"results": []}:
            raise SystemExit(f"bad answer from the floor server {response.status}")
        return float(response.getheader("X-Core-Seconds"))

    steps = [("core", core), ("library", library), ("app", in_app), ("request", request),
             ("floor", floor_request)]
    for q in range(warmup + queries):
        i = int(rng.integers(1, n + 1))
        for name, fn in steps if q % 2 else steps[::-1]:
            t = time.perf_counter()
            inner = fn(i)
            if q >= warmup:
                times[name].append(time.perf_counter() - t)
                if inner is not None:  # the floor server's own time for the core
                    times[f"{name}_core"].append(inner)
    p50 = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    return {**{f"{k}_p50_ms": v for k, v in p50.items()},
            "request_p99_ms": float(np.percentile(times["request"], 99)) * 1000,
            "ratio": p50["request"] / p50["core"], "floor_ratio": p50["floor"] / p50["core"]}


def connect(base: str) -> http.client.HTTPConnection:
    host, port = base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="Images in the synthetic index.")
    ap.add_argument("--queries", type=int, default=300, help="Timed queries per chunk set.")
    ap.add_argument("--threads", type=int, default=THREADS, help="Server worker threads.")
    ap.add_argument("--floor-server", type=Path, metavar="INDEX", help=argparse.SUPPRESS)  # the floor's process
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        return serve_floor(args.floor_server, args.port, args.threads)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp)
        make_index(index_dir, args.n)
        make_model(index_dir, chunk_dim=64)
        idx = Index(index_dir)
        app = create_app({"INDEX": str(index_dir)})
        rows = {}
        floor_command = [__file__, "--floor-server", str(index_dir), "--threads", str(args.threads)]
        with serving(index_dir, args.threads) as base, serving(index_dir, args.threads, floor_command) as bare, \
                threadpool_limits(1, user_api="blas"):
            conn, floor = connect(base), connect(bare)
            for c, chunks in CHUNK_SETS.items():
                rows[c] = measure(idx, app, conn, floor, chunks, args.n, args.queries)
            conn.close()
            floor.close()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.n:,} images x 8 chunks x 64, k={K}, one BLAS thread; server --threads {args.threads}; "
          f"one keep-alive client; medians of {args.queries} queries; floor: a bare Flask route running "
          "only the core, same server\n")
    print("| chunks | core p50 (ms) | Index.query_for + search p50 (ms) | Flask app in-process p50 (ms) "
          "| request p50 (ms) | request p99 (ms) | **request / core** | floor p50 (ms) | floor / core "
          "| core in the floor's server p50 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {c} | {r['core_p50_ms']:.2f} | {r['library_p50_ms']:.2f} | {r['app_p50_ms']:.2f} "
              f"| {r['request_p50_ms']:.2f} | {r['request_p99_ms']:.2f} | **{r['ratio']:.2f}** "
              f"| {r['floor_p50_ms']:.2f} | {r['floor_ratio']:.2f} | {r['floor_core_p50_ms']:.2f} |")


if __name__ == "__main__":
    main()
