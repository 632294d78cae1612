"""How long `Index(path)` takes to open a CelebA-sized index (what `retrieval serve` pays at start),
and its resident memory against the raw feature bytes.

Builds a synthetic index of N random images x 8 chunks x 64 with the indexer's own file formats
(SQLite rows with 40 binary attributes each, one FAISS file per chunk), then opens it several
times in fresh processes and reports the median.

    python bench/index_load.py [--n 200000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session

from indexer import faiss_files
from indexer.build import DATABASE, FORMAT_VERSION, write_manifest
from indexer.schema import Build, Chunk, Image, connect, now

OPEN = """
import sys, time
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
t = time.perf_counter()
from retrieval.index import Index
t_import, rss_import = time.perf_counter(), rss()
idx = Index(sys.argv[1])
t_open = time.perf_counter()
print(t_import - t, t_open - t_import, rss() - rss_import, idx.store.nbytes())
"""


def make_index(out: Path, n: int, n_chunks: int = 8, dim: int = 64) -> None:
    rng = np.random.default_rng(0)
    engine = connect(out / DATABASE, create=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    names = [f"attr_{a:02d}" for a in range(40)]
    bits = rng.integers(0, 2, (n, 40))
    with Session(engine) as s, s.begin():
        s.add(Build(id=1, started_at=now(), finished_at=now(), checkpoint_sha256="bench", added=n))
        s.add_all(Chunk(index=c) for c in range(n_chunks))
    with Session(engine) as s, s.begin():
        s.execute(insert(Image), [
            {"id": int(i), "key": f"{i:06d}.jpg", "path": f"img_align_celeba/{i:06d}.jpg",
             "split": "train", "attributes": dict(zip(names, map(int, row))), "build_id": 1}
            for i, row in zip(ids, bits)])
    for c in range(n_chunks):
        index = faiss_files.new_index(dim)
        index.add_with_ids(rng.standard_normal((n, dim), dtype=np.float32), ids)
        faiss_files.write_atomic(index, faiss_files.chunk_path(out, c))
    write_manifest(out, {"format_version": FORMAT_VERSION, "checkpoint_sha256": "bench", "preset": "bench",
                         "n_chunks": n_chunks, "chunk_dim": dim, "dataset": "synthetic",
                         "dataset_format": "folder", "image_size": 64, "count": n})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_index(Path(tmp), args.n)
        print(f"built a synthetic {args.n}-image index in {time.perf_counter() - t:.1f} s")
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", OPEN, tmp], capture_output=True, text=True, check=True)
            runs.append([float(x) for x in out.stdout.split()])
    imp, opened, rss, held = (statistics.median(r[i] for r in runs) for i in range(4))
    raw = args.n * 8 * 64 * 4
    print(json.dumps({"images": args.n, "import_s": round(imp, 2), "open_s": round(opened, 2),
                      "rss_growth_mb": round(rss / 2**20), "store_mb": round(held / 2**20),
                      "raw_features_mb": round(raw / 2**20)}))
    print(f"\nRSS growth / raw feature bytes: {rss / raw:.2f}")
    print("\n| images | import (s) | Index() open (s) | RSS growth on open (MB) | store (MB) | raw features (MB) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.n:,} | {imp:.2f} | {opened:.2f} | {rss / 2**20:.0f} | {held / 2**20:.0f} | {raw / 2**20:.0f} |")


if __name__ == "__main__":
    main()
