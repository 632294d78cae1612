"""`retrieval index ... --shards N`: split an index's chunk files into N shard folders for sharded
exact search on Ray (retrieval/shards.py, docs/scale.md).

Shard k of N holds the images whose id % N == k, as a complete per-chunk store of its own
(INDEX/shards/k/chunk_c.faiss, ids in ascending order like the index's own files); the metadata
stays where it is (SQLite or PostgreSQL), shared by all shards. INDEX/shards/layout.json says how
many shards there are and how many images the split covered, so a shard split before the index
grew is found stale. The whole folder is written beside the old one and swapped in by renames.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from disentangle.errors import RetrievalError

from . import faiss_files
from .build import read_manifest

SHARDS, LAYOUT = "shards", "layout.json"


def shard_dir(index_dir: Path, shard: int) -> Path:
    return Path(index_dir) / SHARDS / str(shard)


def read_layout(index_dir: Path) -> dict | None:
    """{'shards': N, 'count': images split, 'checkpoint_sha256': ...}, or None when not split."""
    path = Path(index_dir) / SHARDS / LAYOUT
    return json.loads(path.read_text()) if path.exists() else None


def write_shards(index_dir: str | Path, n: int) -> dict:
    """Split INDEX's chunk files into n shard folders (replacing an earlier split); its layout."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise RetrievalError(f"{index_dir} is not an index (no manifest.json); build it first")
    if n < 1:
        raise RetrievalError(f"--shards {n}: give 1 or more shards")
    new, old = index_dir / f".{SHARDS}.tmp", index_dir / f".{SHARDS}.old"
    for leftover in (new, old):  # of a split killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    counts = None
    for c in range(manifest["n_chunks"]):  # one chunk in memory at a time
        index = faiss_files.read(faiss_files.chunk_path(index_dir, c))
        ids, vectors = faiss_files.ids_of(index), faiss_files.vectors_of(index)
        owner = ids % n
        counts = np.bincount(owner, minlength=n).tolist()
        for k in range(n):
            part = faiss_files.new_index(manifest["chunk_dim"])
            mine = owner == k
            part.add_with_ids(np.ascontiguousarray(vectors[mine]), ids[mine])
            (new / str(k)).mkdir(parents=True, exist_ok=True)
            faiss_files.write_atomic(part, faiss_files.chunk_path(new / str(k), c))
    if min(counts) == 0:
        shutil.rmtree(new)
        raise RetrievalError(f"--shards {n}: {index_dir} holds {sum(counts)} images, too few to give every shard one")
    layout = {"shards": n, "rule": "id % shards", "count": int(sum(counts)), "counts": counts,
              "checkpoint_sha256": manifest["checkpoint_sha256"]}
    (new / LAYOUT).write_text(json.dumps(layout, indent=1))
    if (index_dir / SHARDS).exists():
        (index_dir / SHARDS).rename(old)
    new.rename(index_dir / SHARDS)
    shutil.rmtree(old, ignore_errors=True)
    return layout
