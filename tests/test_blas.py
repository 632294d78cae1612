"""retrieval/blas.py: the in-place float32 GEMM through numpy's own OpenBLAS, against float64."""
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from retrieval import blas


def test_found_wherever_numpy_ships_openblas():
    numpy_openblas = any(lib.get("internal_api") == "openblas" and "numpy" in lib["filepath"]
                         for lib in threadpool_info())
    assert (blas.gemm_add is not None) == numpy_openblas


@pytest.mark.skipif(blas.gemm_add is None, reason="numpy links no OpenBLAS of its own here")
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 5, 3), (7, 1, 64), (300, 16, 64), (1000, 3, 5)])
def test_adds_the_product_into_c(m, n, k):
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (m, n)))
    expected = c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64).T
    out = c
    blas.gemm_add(a, b, c)
    assert c is out
    np.testing.assert_allclose(c, expected, rtol=0, atol=1e-4 * (1 + np.abs(expected).max()))


@pytest.mark.skipif(blas.gemm_add is None, reason="numpy links no OpenBLAS of its own here")
@pytest.mark.parametrize("bad", ["dtype", "order", "shape"])
def test_refuses_what_it_cannot_pass_to_blas(bad):
    a, b, c = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32), np.zeros((4, 2), np.float32)
    if bad == "dtype":
        a = a.astype(np.float64)
    elif bad == "order":
        a = np.asfortranarray(a)
    else:
        c = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        blas.gemm_add(a, b, c)
    assert not c.any()  # nothing written
