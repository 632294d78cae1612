"""The C scan (retrieval/_scan.c through retrieval/scan.py) that answers the search core's queries.

The property test in test_search.py runs the core with and without it against a float64 brute
force; these tests reach what that test's small cases do not: the compiled builds themselves, the
chunk widths the C code specialises, query tiles with padding, two threads, and giving up.
"""
import os
import platform
import shutil
from unittest import mock

import numpy as np
import pytest

from retrieval import scan
from retrieval import search as core
from retrieval.search import ChunkStore, search
from tests.test_search import assert_matches, brute_force, make_data


needs_scan = pytest.mark.skipif(scan.windows is None, reason="the C scan was not built (no C compiler)")


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler to build the scan")
def test_the_scan_is_built_and_the_widest_build_for_this_cpu_is_loaded():
    # setup.py builds it optionally (an install without a C compiler still works); with one, a
    # silent build failure would leave the core on its slower path
    assert scan.windows is not None
    level = scan._library("_scan").scan_cpu_level()
    name = scan._lib._name.rsplit("/", 1)[-1]
    if platform.machine() == "x86_64":
        assert level in (0, 3, 4)
        wanted = {4: "_scan_v4", 3: "_scan_v3", 0: "_scan"}[level]
        assert name.split(".")[0] == wanted


@needs_scan
@pytest.mark.parametrize("build", ["_scan", "_scan_v3", "_scan_v4"])
def test_each_build_this_cpu_runs_equals_brute_force(monkeypatch, build):
    # the core loads only the widest build; the others are what a CPU without AVX-512 (or AVX2)
    # loads, with the same kernels compiled for narrower vectors
    lib = scan._library(build)
    if lib is None or not scan._current(lib):
        pytest.skip(f"{build} was not built here (only on x86-64)")
    level = {"_scan": 0, "_scan_v3": 3, "_scan_v4": 4}[build]
    if level > scan._library("_scan").scan_cpu_level():
        pytest.skip(f"this CPU does not run {build}")
    built = scan._wrap(scan._typed(lib))
    answered = []

    def windows(*args):
        wins = built(*args)
        answered.append(wins is not None)
        return wins

    monkeypatch.setattr(core.scan, "windows", windows)
    rng = np.random.default_rng(level)
    for dim, n_queries in [(3, 1), (64, 1), (17, 3), (64, 16)]:
        feats, ids = make_data(rng, 1500, 3, dim, levels=2)
        store = ChunkStore(feats.transpose(1, 0, 2), ids)
        q = rng.standard_normal((n_queries, 3, dim)).astype(np.float32)
        allowed = rng.random(1500) < 0.6
        result = search(store, q, [2, 0], 6, weights=[0.5, 2.0], allowed=allowed, exclude_ids=ids[:2])
        assert_matches(result, brute_force(feats, ids, q, [2, 0], [0.5, 2.0], 6, 0, allowed, [ids[:2]] * n_queries))
    assert answered == [True] * 4  # the build answered each call, not the numpy fallback


def search_both(store, q, chunks, k, **kw):
    """The core's results with the scan, and the core's results without it."""
    fused = search(store, q, chunks, k, **kw)
    with mock.patch.object(core.scan, "windows", None):
        plain = search(store, q, chunks, k, **kw)
    return fused, plain


@needs_scan
@pytest.mark.parametrize("dim", [3, 16, 32, 64, 128])
@pytest.mark.parametrize("n_queries", [1, 2, 7, 16, 40])
def test_every_chunk_width_and_query_tile_equals_brute_force(dim, n_queries):
    # 16, 32, 64 and 128 run code specialised for that width (3 and 128 also the single query's
    # lane tail and its several 16-wide steps); 1 query takes the single-query kernel, 2 and 7 the
    # kernels of 4 and 8 lanes, 40 fill two tiles of 16 and pad a third; 203 rows leave a tail
    # of 3 after tiles of 8 rows
    rng = np.random.default_rng(dim * 100 + n_queries)
    feats, ids = make_data(rng, 203, 3, dim, levels=2)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((n_queries, 3, dim)).astype(np.float32)
    q[::3] = feats[rng.integers(0, 203, len(q[::3]))]
    weights = [0.5, 3.0]
    expected = brute_force(feats, ids, q, [2, 0], weights, 7, 1, np.ones(203, bool), [[]] * n_queries)
    for result in search_both(store, q, [2, 0], 7, weights=weights, offset=1):
        assert_matches(result, expected)


@needs_scan
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_rows_split_over_threads_equal_brute_force(monkeypatch, threads, n_queries):
    # 140,000 rows go in shares shrinking from 32K to 2K rows: each thread takes several, keeps
    # its heaps across them, and the threads' heaps are merged at the end
    rng = np.random.default_rng(5)
    n = 140_000
    feats, ids = make_data(rng, n, 2, 16, levels=4)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((5, 2, 16)).astype(np.float32)
    q[:2] = feats[[7, n - 1]]
    q = q[:n_queries]
    allowed = rng.random(n) < 0.7
    exclude = np.stack([rng.choice(ids, 6) for _ in q])
    monkeypatch.setattr(scan, "threads", threads)
    result = search(store, q, [1, 0], 25, allowed=allowed, exclude_ids=exclude)
    assert_matches(result, brute_force(feats, ids, q, [1, 0], None, 25, 0, allowed, list(exclude)))


def spy_on_scan(monkeypatch) -> list:
    """Records what each call of the scan was given (query count) and returned."""
    calls = []
    real = core.scan.windows

    def spy(xs, norms, w, qs, mask, kk, e):
        calls.append((len(kk), real(xs, norms, w, qs, mask, kk, e)))
        return calls[-1][1]

    monkeypatch.setattr(core.scan, "windows", spy)
    return calls


@needs_scan
def test_all_queries_go_to_one_scan_whatever_the_store_size(monkeypatch):
    # the GEMM path splits queries so its (n, Q) scores stay within _SCORES floats; the scan keeps
    # none, so it takes them all at once, and where it gives up the GEMM path splits them again
    monkeypatch.setattr(core, "_SCORES", 300)  # 2 queries per group at 150 items
    rng = np.random.default_rng(11)
    feats, ids = make_data(rng, 150, 2, 4, levels=2)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((9, 2, 4)).astype(np.float32)
    calls = spy_on_scan(monkeypatch)
    result = search(store, q, [0, 1], 6)
    assert [n for n, _ in calls] == [9] and calls[0][1] is not None
    assert_matches(result, brute_force(feats, ids, q, [0, 1], None, 6, 0, np.ones(150, bool), [[]] * 9))


@needs_scan
def test_a_single_query_goes_to_the_scan_with_a_mask(monkeypatch):
    # one query (a lone request to the service) takes the single-query kernel, not numpy's GEMV;
    # with a filter mask and an excluded id, as GET /search?where=... sends them
    rng = np.random.default_rng(13)
    feats, ids = make_data(rng, 2000, 3, 64, levels=3)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    allowed = rng.random(2000) < 0.5
    calls = spy_on_scan(monkeypatch)
    result = search(store, feats[4], [2, 1], 9, allowed=allowed, exclude_ids=[ids[4]])
    assert [n for n, _ in calls] == [1] and calls[0][1] is not None
    assert_matches(result, brute_force(feats, ids, feats[4][None], [2, 1], None, 9, 0, allowed, [[ids[4]]]))


@needs_scan
def test_many_excluded_ids_take_the_gemm_path(monkeypatch):
    # the scan would ask for kk + m rows and re-rank them all; the GEMM path masks them instead
    rng = np.random.default_rng(12)
    feats, ids = make_data(rng, 3000, 1, 8)
    store = ChunkStore(feats.transpose(1, 0, 2), ids)
    q = rng.standard_normal((3, 1, 8)).astype(np.float32)
    calls = spy_on_scan(monkeypatch)
    few, many = ids[:core._FUSED_MAX_EXCLUDED], ids[:core._FUSED_MAX_EXCLUDED + 1]
    for exclude in (few, many):
        result = search(store, q, [0], 5, exclude_ids=exclude)
        assert_matches(result, brute_force(feats, ids, q, [0], None, 5, 0, np.ones(3000, bool), [exclude] * 3))
    assert len(calls) == 1  # only the first


def test_a_library_built_from_older_source_is_not_loaded():
    # an install leaves the compiled scan in the source tree; after a pull that changed
    # scan_windows' arguments, calling the old one would pass them shifted (a crash)
    class Library:
        pass

    old, older = Library(), Library()
    old.scan_abi_version = lambda: scan.ABI - 1
    assert not scan._current(old) and not scan._current(older) and not scan._current(None)


@needs_scan
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
        single = search(store, q[0], [0, 1], 5)  # the single-query kernel gives up alike
    assert calls == [None, None]
    assert_matches(result, brute_force(feats, ids, q, [0, 1], None, 5, 0, np.ones(500, bool), [[]] * 3))
    assert_matches(single, brute_force(feats, ids, q[:1], [0, 1], None, 5, 0, np.ones(500, bool), [[]]))


@needs_scan
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
    for unset in ("", "many"):
        monkeypatch.setenv("RETRIEVAL_SCAN_THREADS", unset)
        assert scan._default_threads() == len(os.sched_getaffinity(0))
