"""C += A @ B.T in float32 through the OpenBLAS that numpy itself links, called with ctypes.

The search core needs a GEMM that adds into its output in place (beta = 1), so that summing
the chosen chunks costs no pass of its own over the (N, Q) scores. numpy's matmul cannot add
into its output, and scipy's BLAS wrappers can but hold the GIL for the whole product, which
stalls every other request thread of the server; a ctypes call releases the GIL while it runs.
Where numpy links another BLAS (MKL, Accelerate) or the symbol is missing, `gemm_add` is None
and the core adds with numpy instead.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # the CBLAS enum values
# numpy's wheels ship OpenBLAS built with 64-bit integers and its symbols renamed; other builds
# keep the plain name with 32-bit integers
_SYMBOLS = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
            ("scipy_cblas_sgemm", ctypes.c_int32), ("cblas_sgemm", ctypes.c_int32))


def _numpy_openblas() -> Callable | None:
    """The cblas_sgemm of the OpenBLAS numpy uses, wrapped for gemm_add; None if there is none."""
    from threadpoolctl import threadpool_info

    numpy = os.path.dirname(np.__file__)  # its wheel's OpenBLAS lies beside it, in numpy.libs
    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas" or not lib["filepath"].startswith(numpy):
            continue
        try:
            dll = ctypes.CDLL(lib["filepath"])
        except OSError:
            return None
        for name, integer in _SYMBOLS:
            fn = getattr(dll, name, None)
            if fn is not None:
                f32p = ctypes.POINTER(ctypes.c_float)
                fn.restype = None
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, ctypes.c_float,
                               f32p, integer, f32p, integer, ctypes.c_float, f32p, integer]
                return fn
    return None


def _wrap(sgemm: Callable) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    def gemm_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        """c += a @ b.T for C-contiguous float32 a (M, K), b (N, K) and c (M, N)."""
        (m, k), (n, k2) = a.shape, b.shape
        if not (k == k2 and c.shape == (m, n) and all(x.dtype == np.float32 and x.flags.c_contiguous
                                                       for x in (a, b, c))):
            raise ValueError(f"gemm_add needs C-contiguous float32 (M, K), (N, K), (M, N); got "
                             f"{a.shape} {a.dtype}, {b.shape} {b.dtype}, {c.shape} {c.dtype}")
        ptr = ctypes.POINTER(ctypes.c_float)
        sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, m, n, k, 1.0, a.ctypes.data_as(ptr), k, b.ctypes.data_as(ptr), k,
              1.0, c.ctypes.data_as(ptr), n)

    return gemm_add


_sgemm = _numpy_openblas()
gemm_add = _wrap(_sgemm) if _sgemm is not None else None
