"""Load test of `retrieval serve`: requests/s and latency of GET /search under many concurrent
clients, next to what the same library calls do in-process.

Builds a synthetic index of N random images x 8 chunks x 64 (bench/index_load.py's make_index,
plus a tiny untrained model.pt so the server can start), measures `Index.query_for` +
`Index.search` in this process (1 thread with the default BLAS threads, and as many threads as
the server has with one BLAS thread each, as the server runs them), then starts
`retrieval serve` in a subprocess on a free loopback port and drives it from a separate client
process: --clients threads, each with its own keep-alive connection, for --seconds per chunk
set. Traffic goes to 127.0.0.1 only; every loop is bounded in time and count.

    python bench/load_test.py [--n 200000] [--clients 16] [--threads 16] [--seconds 10]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
CHUNK_SETS = {1: "3", 2: "2,5", 8: "0,1,2,3,4,5,6,7"}
K = 10
MAX_REQUESTS = 200_000  # per client process and chunk set: the time limit binds long before


def make_model(index_dir: Path, chunk_dim: int) -> None:
    """A tiny untrained model.pt with the index's chunk shape, written as the indexer writes it."""
    import torch

    from disentangle import checkpoint
    from disentangle.config import PRESETS
    from disentangle.model import MixingAutoencoder
    from indexer.build import MODEL, _serving_model, read_manifest, write_manifest

    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], name="bench", chunk_dim=chunk_dim)
    model = MixingAutoencoder(cfg, ("mix",))
    ckpt = {"format": checkpoint.FORMAT_VERSION, "step": 0, "model_config": cfg.to_dict(),
            "train_config": {"losses": ["mix"]}, "models": {"autoencoder": model.state_dict()}}
    checkpoint.save_atomic(_serving_model(ckpt), index_dir / MODEL)
    write_manifest(index_dir, {**read_manifest(index_dir), "image_size": cfg.image_size})


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    a = np.array(latencies) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def in_process(index_dir: Path, n: int, chunks: str, threads: int, seconds: float, batch: int = 1) -> dict:
    """Queries/s of the library calls one GET /search makes, from `threads` threads; with batch > 1,
    of Index.search_many answering that many queries a call (what the server's coalescing can reach)."""
    from retrieval.index import Index

    idx = Index(index_dir)
    chosen = idx.resolve_chunks(chunks)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        while time.perf_counter() < deadline and len(mine) < MAX_REQUESTS:
            t = time.perf_counter()
            idx.search_many([idx.query_for(int(i)) for i in rng.integers(1, n + 1, batch)], chosen, K)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    idx.search(idx.query_for(1), chosen, K)  # warm the per-thread scratch buffers of this thread
    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"qps": batch * len(latencies) / elapsed, "p50_ms": p50, "p99_ms": p99}


def drive(base: str, n: int, chunks: str, clients: int, seconds: float, warmup: float) -> dict:
    """The client side (run in its own process): `clients` keep-alive connections for `seconds`."""
    host, port = base.removeprefix("http://").split(":")
    results: list[tuple[float, bool]] = []
    lock = threading.Lock()
    start = time.perf_counter() + warmup
    deadline = start + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        mine = []
        while len(mine) < MAX_REQUESTS:
            t = time.perf_counter()
            if t >= deadline:
                break
            ok = False
            try:
                conn.request("GET", f"/search?image={int(rng.integers(1, n + 1))}&chunks={chunks}&k={K}")
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and len(json.loads(body)["results"]) == K
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            done = time.perf_counter()
            if t >= start:  # requests that started during the warm-up are not counted
                mine.append((done - t, ok))
        conn.close()
        with lock:
            results.extend(mine)

    pool = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    latencies = [lat for lat, _ in results]
    p50, p99 = percentiles(latencies)
    return {"rps": len(results) / seconds, "p50_ms": p50, "p99_ms": p99,
            "requests": len(results), "errors": sum(not ok for _, ok in results)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(index_dir: Path, threads: int, command: list[str] | None = None):
    """`retrieval serve INDEX --threads N` (or command, which must answer GET /health) in a
    subprocess on a free loopback port, given as --port, until the block ends (then SIGTERM);
    yields its base URL."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = command or ["-m", "retrieval", "serve", str(index_dir), "--threads", str(threads)]
    log = open(index_dir / f"serve-{port}.log", "w")
    server = subprocess.Popen([sys.executable, *command, "--port", str(port)], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start; see {log.name}")
                time.sleep(0.5)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def serve_and_load(index_dir: Path, args) -> dict[int, dict]:
    """Start `retrieval serve`, drive it from a client process per chunk set, stop it."""
    out = {}
    with serving(index_dir, args.threads) as base:
        for n_chunks, chunks in CHUNK_SETS.items():
            client = subprocess.run(
                [sys.executable, __file__, "--drive", base, "--n", str(args.n), "--chunks", chunks,
                 "--clients", str(args.clients), "--seconds", str(args.seconds)],
                capture_output=True, text=True, timeout=args.seconds + 120, check=True)
            out[n_chunks] = json.loads(client.stdout)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="Images in the synthetic index.")
    ap.add_argument("--clients", type=int, default=16, help="Concurrent client connections.")
    ap.add_argument("--threads", type=int, help="Server worker threads (default: retrieval serve's, 16).")
    ap.add_argument("--seconds", type=float, default=10, help="Measured seconds per chunk set.")
    ap.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)  # the client process
    ap.add_argument("--chunks", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        print(json.dumps(drive(args.drive, args.n, args.chunks, args.clients, args.seconds, warmup=1.0)))
        return
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    from index_load import make_index

    from api.serve import THREADS

    args.threads = args.threads or THREADS

    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp)
        t = time.perf_counter()
        make_index(index_dir, args.n)
        make_model(index_dir, chunk_dim=64)
        print(f"built a synthetic {args.n:,}-image index in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        local = {}
        for c, s in CHUNK_SETS.items():
            single = in_process(index_dir, args.n, s, 1, args.seconds / 2)
            batched = in_process(index_dir, args.n, s, 1, args.seconds / 2, batch=args.clients)
            with threadpool_limits(1, user_api="blas"):  # as `retrieval serve` runs its workers
                local[c] = (single, in_process(index_dir, args.n, s, args.threads, args.seconds / 2), batched)
        served = serve_and_load(index_dir, args)
    cpus = os.cpu_count()
    print(json.dumps({"images": args.n, "clients": args.clients, "threads": args.threads, "cpus": cpus,
                      "in_process": local, "served": served}), file=sys.stderr)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n{args.n:,} images x 8 chunks x 64, k={K}; {cpus} CPUs; server --threads {args.threads}; "
          f"{args.clients} client connections from a separate process, {args.seconds:g} s per row; "
          f"load average {load} at the end\n")
    print(f"| chunks | in-process, 1 thread (q/s) | in-process, {args.threads} threads (q/s) | served (req/s) "
          "| served p50 (ms) | served p99 (ms) | errors / requests | served / best in-process "
          f"| in-process, {args.clients} queries a call (q/s) | served / that |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in CHUNK_SETS:
        one, many, batched = local[c]
        s = served[c]
        best = max(one["qps"], many["qps"])
        print(f"| {c} | {one['qps']:.0f} (p50 {one['p50_ms']:.1f} ms) | {many['qps']:.0f} | {s['rps']:.0f} "
              f"| {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} / {s['requests']} | {s['rps'] / best:.2f} "
              f"| {batched['qps']:.0f} | {s['rps'] / batched['qps']:.2f} |")


if __name__ == "__main__":
    main()
