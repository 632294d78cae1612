"""The C scan (retrieval/_scan.c through retrieval/scan.py) that batches the search core's queries.

The property test in test_search.py runs the core with and without it against a float64 brute
force; these tests reach what that test's small cases do not: the compiled builds themselves, the
chunk widths the C code specialises, query tiles with padding, two threads, and giving up.
"""
import os
import platform
from unittest import mock

import numpy as np
import pytest

from retrieval import scan
from retrieval import search as core
from retrieval.search import ChunkStore, search
from tests.test_search import assert_matches, brute_force, make_data


def test_the_scan_is_built_and_the_widest_build_for_this_cpu_is_loaded():
    # setup.py builds it optionally (an install without a C compiler still works); here, with gcc,
    # a silent build failure would leave the core on its slower path
    assert scan.windows is not None
    level = scan._library("_scan").scan_cpu_level()
    name = scan._lib._name.rsplit("/", 1)[-1]
    if platform.machine() == "x86_64":
        assert level in (0, 3, 4)
        wanted = {4: "_scan_v4", 3: "_scan_v3", 0: "_scan"}[level]
        assert name.split(".")[0] == wanted


def search_both(store, q, chunks, k, **kw):
    """The core's results with the scan, and the core's results without it."""
    fused = search(store, q, chunks, k, **kw)
    with mock.patch.object(core.scan, "windows", None):
        plain = search(store, q, chunks, k, **kw)
    return fused, plain


@pytest.mark.parametrize("dim", [3, 16, 32, 64, 128])
@pytest.mark.parametrize("n_queries", [2, 7, 16, 40])
def test_every_chunk_width_and_query_tile_equals_brute_force(dim, n_queries):
    # 16, 32, 64 and 128 run code specialised for that width; 2 and 7 queries take the kernels
    # of 4 and 8 lanes, 40 fill two tiles of 16 and pad a third; 203 rows leave a tail of 3
    # after tiles of 8 rows
    rng = np.random.default_rng(dim * 100 + n_queries)
    feats, ids = make_data(rng, 203, 3, dim, levels=2)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((n_queries, 3, dim)).astype(np.float32)
    q[::3] = feats[rng.integers(0, 203, len(q[::3]))]
    weights = [0.5, 3.0]
    expected = brute_force(feats, ids, q, [2, 0], weights, 7, 1, np.ones(203, bool), [[]] * n_queries)
    for result in search_both(store, q, [2, 0], 7, weights=weights, offset=1):
        assert_matches(result, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_over_threads_equal_brute_force(monkeypatch, threads):
    # 40,000 rows are taken 16K at a time by the threads, each with heaps of its own, merged at the end
    rng = np.random.default_rng(5)
    feats, ids = make_data(rng, 40_000, 2, 16, levels=4)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((5, 2, 16)).astype(np.float32)
    q[:2] = feats[[7, 39_999]]
    allowed = rng.random(40_000) < 0.7
    exclude = np.stack([rng.choice(ids, 6) for _ in q])
    monkeypatch.setattr(scan, "threads", threads)
    result = search(store, q, [1, 0], 25, allowed=allowed, exclude_ids=exclude)
    assert_matches(result, brute_force(feats, ids, q, [1, 0], None, 25, 0, allowed, list(exclude)))


def test_more_ties_than_its_buffers_hold_fall_back_to_numpy():
    # every row is the same vector: all 500 tie with the k-th, more than the 2 kk + 64 rows the
    # scan keeps per query, so it gives up and the numpy path answers, still exactly
    feats = np.ones((500, 2, 4), np.float32)
    ids = np.arange(1000, 1500)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = np.zeros((3, 2, 4), np.float32)
    calls = []
    real = core.scan.windows

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    with mock.patch.object(core.scan, "windows", spy):
        result = search(store, q, [0, 1], 5)
    assert calls == [None]
    assert_matches(result, brute_force(feats, ids, q, [0, 1], None, 5, 0, np.ones(500, bool), [[]] * 3))


def test_it_refuses_more_wanted_rows_than_allowed():
    x = np.ones((10, 4), np.float32)
    norms = np.full(10, 4, np.float32)
    qs = [np.zeros((2, 4), np.float32)]
    mask = np.arange(10) < 3
    assert scan.windows([x], [norms], np.ones(1), qs, mask, np.array([3, 4]), np.zeros(2)) is None
    wins = scan.windows([x], [norms], np.ones(1), qs, mask, np.array([3, 0]), np.zeros(2))
    assert [list(w) for w in wins] == [[0, 1, 2], []]


def test_a_large_k_takes_the_numpy_path():
    rng = np.random.default_rng(9)
    feats, ids = make_data(rng, scan.MAX_KK + 500, 1, 4)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((2, 1, 4)).astype(np.float32)
    with mock.patch.object(core.scan, "windows", side_effect=AssertionError("the scan was called")):
        result = search(store, q, [0], scan.MAX_KK + 1)
    assert_matches(result, brute_force(feats, ids, q, [0], None, scan.MAX_KK + 1, 0,
                                       np.ones(len(ids), bool), [[]] * 2))


def test_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_SCAN_THREADS", "3")
    assert scan._default_threads() == 3
    monkeypatch.setenv("RETRIEVAL_SCAN_THREADS", "")
    assert scan._default_threads() == len(os.sched_getaffinity(0))
