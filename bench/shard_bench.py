"""One query through the sharded service (`retrieval serve INDEX --ray ADDRESS`, one Ray actor per
shard) against the single-process service (`retrieval serve INDEX`) on the same index.

Builds a synthetic index of N random images x 8 chunks x 64 (bench/index_load.py), splits it into
--shards shards, starts a Ray cluster on loopback in this process (its files in a temporary
folder), then both services in subprocesses on loopback ports, and times one keep-alive client's
GET /search on each, query by query in alternating order; every answer of the sharded service is
checked equal to the single-process one. Reports medians and each service's start time.

    python bench/shard_bench.py [--n 1000000] [--shards 2] [--queries 30]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from index_load import make_index  # noqa: E402
from load_test import CHUNK_SETS, K, _free_port, make_model  # noqa: E402

from indexer.shards import write_shards  # noqa: E402

# Ray on this machine's loopback only, read once at its import (docs/scale.md, "Ray on one machine")
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def service(index_dir: Path, name: str, *extra: str):
    """`retrieval serve INDEX [extra]` in a subprocess on a free loopback port; yields (base URL,
    seconds until /health answered)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(index_dir.parent / f"{name}.log", "w")
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", str(index_dir), "--port", str(port),
                               *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - t > 300:
                    raise SystemExit(f"{name} did not start; see {index_dir.parent / f'{name}.log'}")
                time.sleep(0.2)
        yield base, time.perf_counter() - t
    finally:
        server.terminate()
        server.wait(timeout=60)


def get(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path)
    response = conn.getresponse()
    body = json.loads(response.read())
    if response.status != 200:
        raise SystemExit(f"{path}: {response.status} {body}")
    return body


def measure(single, sharded, chunks: str, n: int, queries: int, warmup: int = 3) -> dict:
    """Median ms of one GET /search on each service; every sharded answer equals the single one."""
    rng = np.random.default_rng(len(chunks))
    times = {"single": [], "sharded": []}
    for q in range(warmup + queries):
        path = f"/search?image={int(rng.integers(1, n + 1))}&chunks={chunks}&k={K}"
        answers = {}
        order = [("single", single), ("sharded", sharded)]
        for name, conn in order if q % 2 else order[::-1]:
            t = time.perf_counter()
            answers[name] = get(conn, path)
            if q >= warmup:
                times[name].append(time.perf_counter() - t)
        if answers["single"] != answers["sharded"]:
            raise SystemExit(f"{path}: the sharded answer differs from the single-process one")
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="Images in the synthetic index.")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=30, help="Timed queries per chunk set.")
    args = ap.parse_args()
    os.environ.update(RAY_ENV)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        index_dir = Path(tmp) / "index"
        index_dir.mkdir()
        t = time.perf_counter()
        make_index(index_dir, args.n)
        make_model(index_dir, chunk_dim=64)
        layout = write_shards(index_dir, args.shards)
        print(f"built and split a synthetic {args.n:,}-image index in {time.perf_counter() - t:.0f} s "
              f"(shards of {', '.join(map(str, layout['counts']))})")
        os.environ.update(RAY_TMPDIR=tmp, HOME=tmp)  # Ray's session files stay in the temporary folder
        import ray

        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=args.shards,
                 object_store_memory=200 * 2**20, logging_level="WARNING")
        address = ray.get_runtime_context().gcs_address
        rows = {}
        with service(index_dir, "single") as (one, t_one), \
                service(index_dir, "sharded", "--ray", address) as (many, t_many):
            conns = [http.client.HTTPConnection(*b.removeprefix("http://").split(":"), timeout=120)
                     for b in (one, many)]
            for c, chunks in CHUNK_SETS.items():
                rows[c] = measure(*conns, chunks, args.n, args.queries)
            for conn in conns:
                conn.close()
        ray.shutdown()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.n:,} images x 8 chunks x 64, k={K}, {args.shards} shards (Ray actors on this machine); "
          f"one keep-alive client; medians of {args.queries} queries; every sharded answer equal to the "
          f"single-process one\n")
    print(f"service start until /health answers: single {t_one:.1f} s, sharded {t_many:.1f} s\n")
    print("| chunks | single-process GET /search p50 (ms) | sharded GET /search p50 (ms) | sharded / single |")
    print("|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {c} | {r['single']:.1f} | {r['sharded']:.1f} | {r['sharded'] / r['single']:.2f} |")


if __name__ == "__main__":
    main()
