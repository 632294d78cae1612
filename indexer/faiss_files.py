"""One FAISS file per chunk: IndexIDMap over IndexFlatL2, ids = SQLite image ids.

The id map keeps ids through removals (a plain IndexFlat renumbers, faiss#2044). IndexIDMap2
would add a reverse hash map that we never use and that costs ~45 bytes per id per chunk
(~70 MB at 200K images), so plain IndexIDMap it is. Files are replaced atomically so a kill
leaves either the old file or the new one.
"""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from disentangle.errors import RetrievalError


def chunk_path(index_dir: Path, chunk: int) -> Path:
    return index_dir / f"chunk_{chunk}.faiss"


def new_index(dim: int) -> faiss.IndexIDMap:
    return faiss.IndexIDMap(faiss.IndexFlatL2(dim))


def read(path: Path) -> faiss.IndexIDMap:
    """Load one chunk file, or a RetrievalError naming the file and the way out."""
    if not path.is_file():
        raise RetrievalError(f"{path} is missing; the index is incomplete: rebuild it with "
                             "`retrieval index DATA --model CKPT --out INDEX --rebuild`")
    try:
        index = faiss.read_index(str(path))  # already downcast; keep this owning wrapper alive
    except RuntimeError:
        index = None
    if not isinstance(index, faiss.IndexIDMap):
        raise RetrievalError(f"{path} is not a readable chunk index (corrupted?); rebuild the index "
                             "with `retrieval index ... --rebuild`")
    return index


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write to a temp file beside `path`, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ids_of(index: faiss.IndexIDMap) -> np.ndarray:
    """The stored ids, in storage order (int64 copy)."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def vectors_of(index: faiss.IndexIDMap) -> np.ndarray:
    """The stored vectors (ntotal, d) float32, a view of the index's own memory (no copy)."""
    flat = faiss.downcast_index(index.index)
    n, d = flat.ntotal, flat.d
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
