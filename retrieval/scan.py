"""The fused scan (retrieval/_scan.c), loaded with ctypes: candidate windows without a score matrix.

For a batch of queries the numpy path writes an (N, Q) float32 score matrix, then reads it again
to select: at 200K x 16 queries that is 12.8 MB out and back per call, and two passes of numpy
selection, around a GEMM that is skinny enough for OpenBLAS to run at half its rate. The C scan
keeps a block of rows' scores for 16 queries (or 8, or 4) in registers and compares them with each query's
running threshold at once; only the few rows under it are written. A single query has a kernel of
its own (retrieval/_scan_single.h), 1.3 to 1.5 times as fast as numpy's GEMV at 200K
(docs/benchmarks.md). Its windows satisfy the same contract as search._select (a superset of the
rows within e of the kk-th score), so the float64 re-rank makes the results equal either way;
the tests check both paths against brute force.

setup.py builds the library with the package; where it is missing (no C compiler at install) or
fails to load, `windows` is None and the core uses the numpy path.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from collections.abc import Callable

import numpy as np

LANES = (1, 4, 8, 16)  # queries per vector the C kernel is built for: a call takes the fewest that hold it
MAX_KK = 4096  # larger k + offset: the numpy path's partition, whose cost does not grow with k
_CAP = 64  # candidate slots per query beyond 2 kk; more within e of the kk-th falls back to numpy


def _default_threads() -> int:
    """RETRIEVAL_SCAN_THREADS if set, else the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        cpus = os.cpu_count() or 1
    try:
        return max(1, int(os.environ.get("RETRIEVAL_SCAN_THREADS") or cpus))
    except ValueError:
        return cpus


threads = _default_threads()
"""Threads of one scan. All cores by default, also in `retrieval serve`, whose request threads
each search with one BLAS thread: the coalescer (api/coalesce.py) runs one scan at a time for
requests with the same options, so a scan on one core left the other idle (200K images, one
chunk, 16 clients: 322 against 383 requests/s; two chunks: 167 against 266)."""


def _library(name: str) -> ctypes.CDLL | None:
    """The shared library `name` built beside this file, loaded; None if it is not there."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, name + suffix)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


ABI = 3  # scan_abi_version() of the _scan.c this wrapper calls


def _current(lib: ctypes.CDLL | None) -> bool:
    """Whether lib was built from the _scan.c this wrapper was written for."""
    version = getattr(lib, "scan_abi_version", None)
    if version is None:  # not built, or built before the version existed
        return False
    version.restype = ctypes.c_int
    return version() == ABI


def _load() -> ctypes.CDLL | None:
    """The widest build of the scan this CPU runs (setup.py builds one per x86-64 level), typed;
    None where none was built from the current source (reinstall: `make` or `pip install -e .`)."""
    lib = _library("_scan")
    if not _current(lib):
        return None
    lib.scan_cpu_level.restype = ctypes.c_int
    level = lib.scan_cpu_level()
    for name in [f"_scan_v{v}" for v in (4, 3) if v <= level]:
        wider = _library(name)
        if _current(wider):
            lib = wider
            break
    return _typed(lib)


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with scan_windows' argument and result types set."""
    fn = lib.scan_windows
    ptr = ctypes.c_void_p
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr,
                   ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ptr, ptr]
    return lib


def _addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """A C array of the arrays' data pointers (the arrays must outlive its use)."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.uintp)


def _wrap(lib: ctypes.CDLL) -> Callable:
    scan = lib.scan_windows

    def windows(xs: list[np.ndarray], norms: list[np.ndarray], w: np.ndarray, qs: list[np.ndarray],
                mask: np.ndarray | None, kk: np.ndarray, e: np.ndarray) -> list[np.ndarray] | None:
        """Per query, rows including every float32 score within e[i] of the kk[i]-th smallest.

        xs: the chosen chunks' C-contiguous float32 (n, d) rows; norms their float32 squared norms;
        w the float64 weights; qs per chunk the (Q, d) float32 -2 w_c q_c; mask a bool row filter
        or None; kk int64 (Q,) with kk[i] allowed rows at least. None if the scan gave up (memory,
        or more ties within e than its buffers hold): the caller then uses the numpy path."""
        n, d = xs[0].shape
        nq = len(kk)
        lanes = next((v for v in LANES if nq <= v), LANES[-1])
        tiles = -(-nq // lanes)
        padded = np.zeros((tiles * lanes, len(xs), d), np.float32)  # queries padded to whole tiles
        padded[:nq] = np.stack(qs, axis=1)
        qt = np.ascontiguousarray(padded.reshape(tiles, lanes, len(xs), d).transpose(0, 2, 3, 1))  # dimension-major
        kk = np.ascontiguousarray(kk, np.int64)
        e = np.ascontiguousarray(e, np.float64)
        wnorm = np.asarray(w, np.float32)
        m = None if mask is None else np.ascontiguousarray(mask, np.uint8)
        cap = 2 * int(kk.max()) + _CAP
        out = np.empty((nq, cap), np.int64)
        count = np.zeros(nq, np.int64)
        xp, np_ = _addresses(xs), _addresses(norms)
        status = scan(len(xs), n, d, xp.ctypes.data, np_.ctypes.data, wnorm.ctypes.data, qt.ctypes.data, nq,
                      None if m is None else m.ctypes.data, kk.ctypes.data, e.ctypes.data, lanes, threads, cap,
                      out.ctypes.data, count.ctypes.data)
        if status != 0 or count.max() > cap:
            return None
        return [out[i, :count[i]] for i in range(nq)]

    return windows


_lib = _load()
windows = _wrap(_lib) if _lib is not None else None
