"""Exact any-subset chunk search (retrieval/search.py) against a float64 numpy brute force."""
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from disentangle.errors import RetrievalError
from retrieval import search as search_module
from retrieval.search import ChunkStore, search

BACKENDS = ["numpy", "torch"]


def brute_force(feats, ids, q, chunks, weights, k, offset, allowed, excluded):
    """Per query, (ids, distances) of a float64 scan over every item, lexsorted by (distance, id)."""
    weights = np.ones(len(chunks)) if weights is None else weights
    out = []
    for qi, ex in zip(q, excluded):
        dist = np.zeros(len(ids))
        for c, wc in zip(chunks, weights):
            diff = feats[:, c].astype(np.float64) - qi[c].astype(np.float64)
            dist += wc * np.square(diff).sum(1)
        keep = allowed & ~np.isin(ids, ex)
        best = np.lexsort((ids[keep], dist[keep]))[offset:offset + k]
        out.append((ids[keep][best], dist[keep][best]))
    return out


def assert_matches(result, expected):
    width = max(len(i) for i, _ in expected)
    assert result.ids.shape == result.distances.shape == (len(expected), width)
    assert result.ids.dtype == np.int64
    for row_ids, row_dist, (ids, dist) in zip(result.ids, result.distances, expected):
        assert_array_equal(row_ids[:len(ids)], ids)
        assert_allclose(row_dist[:len(ids)], dist, rtol=1e-12)
        assert_array_equal(row_ids[len(ids):], -1)  # padding of a query with fewer results
        assert np.all(row_dist[len(ids):] == np.inf)


def make_data(rng, n_items, n_chunks, dim, dup_fraction=0.2, levels=None):
    """(N, n_chunks, dim) float32 features with duplicated rows and shuffled, non-contiguous ids."""
    feats = rng.standard_normal((n_items, n_chunks, dim)).astype(np.float32)
    if levels:  # coarse values make equal distances between different vectors
        feats = np.round(feats * levels) / levels
    dups = rng.random(n_items) < dup_fraction
    feats[dups] = feats[rng.integers(0, n_items, dups.sum())]
    ids = rng.choice(10 * n_items + 10, n_items, replace=False).astype(np.int64)
    return feats, ids


def store_of(feats, ids, backend):
    return ChunkStore(feats.transpose(1, 0, 2), ids, backend=backend)


@st.composite
def cases(draw):
    n_chunks = draw(st.integers(1, 5))
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        n_items=draw(st.one_of(st.integers(1, 60), st.integers(1000, 3000))),
        n_chunks=n_chunks,
        dim=draw(st.integers(1, 6)),
        levels=draw(st.sampled_from([None, 1, 4])),
        chunks=draw(st.lists(st.integers(0, n_chunks - 1), min_size=1, max_size=n_chunks, unique=True)),
        weighted=draw(st.booleans()),
        k=draw(st.integers(1, 40)),
        offset=draw(st.integers(0, 6)),
        n_queries=draw(st.integers(1, 17)),
        allowed=draw(st.sampled_from([None, "mask", "ids"])),
        allowed_fraction=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        exclude=draw(st.sampled_from([None, "shared", "per-query", "itself"])),
    )


# numpy-gemm: the numpy backend with the C scan (retrieval/scan.py) off, as where it was not built
@pytest.mark.parametrize("backend", BACKENDS + ["numpy-gemm"])
@settings(max_examples=120, deadline=None, derandomize=True)
@given(case=cases())
def test_equals_brute_force(backend, case):
    with mock.patch.object(search_module.scan, "windows", None if backend == "numpy-gemm" else
                           search_module.scan.windows):
        check_against_brute_force(backend.split("-")[0], case)


def check_against_brute_force(backend, case):
    rng = np.random.default_rng(case["seed"])
    n, nc, dim = case["n_items"], case["n_chunks"], case["dim"]
    feats, ids = make_data(rng, n, nc, dim, levels=case["levels"])
    store = store_of(feats, ids, backend)
    q = rng.standard_normal((case["n_queries"], nc, dim)).astype(np.float32)
    stored = rng.random(len(q)) < 0.5  # some queries are indexed items, as in query-by-example
    q[stored] = feats[rng.integers(0, n, stored.sum())]
    weights = rng.uniform(0.1, 5.0, len(case["chunks"])) if case["weighted"] else None

    allowed = np.ones(n, bool) if case["allowed"] is None else rng.random(n) < case["allowed_fraction"]
    allowed_arg = {None: None, "mask": allowed, "ids": np.concatenate([ids[allowed], [10**12]])}
    absent = 10 * n + 11  # ids not in the store are ignored by both filters
    if case["exclude"] in ("per-query", "itself"):  # itself: one id a query, as a query by an indexed image
        exclude = np.stack([rng.choice(np.append(ids, absent), 3 if case["exclude"] == "per-query" else 1)
                            for _ in q])
        excluded = list(exclude)
    else:
        exclude = None if case["exclude"] is None else np.append(rng.choice(ids, 4), absent)
        excluded = [np.empty(0, np.int64) if exclude is None else exclude] * len(q)

    result = search(store, q, case["chunks"], case["k"], weights=weights, offset=case["offset"],
                    exclude_ids=exclude, allowed=allowed_arg[case["allowed"]])
    assert_matches(result, brute_force(feats, ids, q, case["chunks"], weights, case["k"], case["offset"],
                                       allowed, excluded))


@pytest.mark.parametrize("path", ["scan", "in-place gemm", "numpy"])
def test_the_numpy_path_equals_the_in_place_gemm(monkeypatch, path):
    """Where numpy links no OpenBLAS of its own (retrieval/blas.py), the core multiplies and adds
    with numpy, and where the C scan was not built (retrieval/scan.py) it takes the GEMM: the same
    results."""
    import retrieval.search as core

    if path != "scan":
        monkeypatch.setattr(core.scan, "windows", None)
    if path == "numpy":
        monkeypatch.setattr(core, "gemm_add", None)
    rng = np.random.default_rng(7)
    feats, ids = make_data(rng, 2000, 4, 8, levels=4)
    q = rng.standard_normal((6, 4, 8)).astype(np.float32)
    q[:2] = feats[:2]
    weights = [0.5, 2.0, 1.0]
    result = search(store_of(feats, ids, "numpy"), q, [3, 0, 1], 12, weights=weights, offset=2)
    assert_matches(result, brute_force(feats, ids, q, [3, 0, 1], weights, 12, 2, np.ones(len(ids), bool),
                                       [[]] * len(q)))


def near_copies(rng, n_bases):
    """Shuffled near-copies (100 each, 1e-3 apart) of vectors far from the origin, and 8 queries.

    float32 ‖x‖² − 2x·q cannot order them (its rounding error is ~1e-2, their distances ~1e-5),
    so results are right only if the error-bound window and the float64 re-rank work.
    """
    n = 100 * n_bases
    base = 30 + rng.standard_normal((n_bases, 1, 2, 16))
    feats = (base + 1e-3 * rng.standard_normal((n_bases, 100, 2, 16))).reshape(n, 2, 16).astype(np.float32)
    q = (base[:8, 0] + 1e-3 * rng.standard_normal((8, 2, 16))).astype(np.float32)
    return feats[rng.permutation(n)], rng.permutation(n).astype(np.int64), q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_bases, offset", [(60, 0), (10, 70)])  # the latter selects k + offset > N / 16
def test_float32_rounding_does_not_change_the_ranking(backend, n_bases, offset):
    feats, ids, q = near_copies(np.random.default_rng(1), n_bases)
    expected = brute_force(feats, ids, q, [0, 1], None, 10, offset, np.ones(len(ids), bool), [[]] * 8)
    x = feats.reshape(len(ids), 32)
    scores32 = np.square(x).sum(1, dtype=np.float32) - 2 * (q.reshape(8, 32) @ x.T)  # (8, N)
    traps = [ids[np.lexsort((ids, s))[offset:offset + 10]] for s in scores32]
    assert any(not np.array_equal(t, e[0]) for t, e in zip(traps, expected))  # float32 alone fails
    assert_matches(search(store_of(feats, ids, backend), q, [0, 1], 10, offset=offset), expected)


@pytest.mark.parametrize("setting", ["legacy", "per-backend"])
def test_torch_reduced_precision_matmul_stays_exact(setting):
    # Items on a thin shell around the query: distances 1 ± 2e-4, far below bf16's ~0.1 error.
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    dirs = rng.standard_normal((3000, 2, 64))
    dirs *= ((1 + 1e-4 * rng.random(3000)) / np.linalg.norm(dirs.reshape(3000, -1), axis=1))[:, None, None]
    feats, ids = (q + dirs).astype(np.float32), rng.permutation(3000).astype(np.int64)
    store = store_of(feats, ids, "torch")
    x, qt = torch.from_numpy(feats[:, 0]), torch.from_numpy(q[:, 0])
    exact = qt @ x.T
    legacy, mkldnn = torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision
    try:
        if setting == "legacy":
            torch.set_float32_matmul_precision("medium")
        else:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        if (qt @ x.T - exact).abs().max() < 0.01:
            pytest.skip("this CPU has no bf16 matmul, so the setting changes nothing")
        result = search(store, q, [0, 1], 10)
    finally:
        torch.set_float32_matmul_precision(legacy)
        torch.backends.mkldnn.matmul.fp32_precision = mkldnn
    assert_matches(result, brute_force(feats, ids, q, [0, 1], None, 10, 0, np.ones(3000, bool), [[]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_broken_by_id(backend):
    rng = np.random.default_rng(3)
    feats = np.repeat(rng.standard_normal((50, 4, 8)).astype(np.float32), 3, axis=0)
    ids = rng.permutation(np.arange(1000, 1150)).astype(np.int64)
    result = search(store_of(feats, ids, backend), feats[9], [1, 3], 3)
    assert_array_equal(result.ids[0], np.sort(ids[9:12]))
    assert_array_equal(result.distances[0], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_items", [1000, 1001, 1017])
def test_every_position_is_searched(backend, n_items):
    # Each of the first and last items, queried by its own vector, is its own nearest neighbour.
    rng = np.random.default_rng(11)
    feats, ids = make_data(rng, n_items, 2, 8, dup_fraction=0)
    q = np.concatenate([feats[:20], feats[-20:]])
    result = search(store_of(feats, ids, backend), q, [0, 1], 1)
    assert_array_equal(result.ids[:, 0], np.concatenate([ids[:20], ids[-20:]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_the_allowed_set_returns_all_of_it(backend):
    rng = np.random.default_rng(4)
    feats, ids = make_data(rng, 400, 2, 4)
    allowed = ids[::50]
    q = rng.standard_normal((2, 2, 4)).astype(np.float32)
    result = search(store_of(feats, ids, backend), q, [0], 100, allowed=allowed, exclude_ids=allowed[:1])
    mask = np.isin(ids, allowed)
    expected = brute_force(feats, ids, q, [0], None, 100, 0, mask, [allowed[:1]] * 2)
    assert result.ids.shape == (2, len(allowed) - 1)
    assert_matches(result, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_query_exclusions_pad_short_rows(backend):
    rng = np.random.default_rng(5)
    feats, ids = make_data(rng, 6, 2, 3, dup_fraction=0)
    q = rng.standard_normal((3, 2, 3)).astype(np.float32)
    exclude = np.stack([np.repeat(ids[:1], 6), np.resize(ids[1:3], 6), ids])
    result = search(store_of(feats, ids, backend), q, [0, 1], 10, exclude_ids=exclude)
    assert_array_equal((result.ids >= 0).sum(1), [5, 4, 0])
    assert_matches(result, brute_force(feats, ids, q, [0, 1], None, 10, 0, np.ones(6, bool), list(exclude)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_filter_returns_no_columns(backend):
    rng = np.random.default_rng(6)
    feats, ids = make_data(rng, 20, 2, 3)
    result = search(store_of(feats, ids, backend), feats[:3], [0], 5, allowed=np.zeros(20, bool))
    assert result.ids.shape == result.distances.shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_blocks_and_query_groups(backend, monkeypatch):
    # Shrink block and group sizes so every blocked loop runs, with a partial last block.
    monkeypatch.setattr(search_module, "_BLOCK", 7)
    monkeypatch.setattr(search_module, "_SCORES", 300)
    rng = np.random.default_rng(7)
    feats, ids = make_data(rng, 125, 3, 5, levels=2)
    store = store_of(feats, ids, backend)
    q = rng.standard_normal((9, 3, 5)).astype(np.float32)
    result = search(store, q, [2, 0], 30, weights=[0.5, 2.0], offset=3)
    assert_matches(result, brute_force(feats, ids, q, [2, 0], [0.5, 2.0], 30, 3, np.ones(125, bool), [[]] * 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_wraps_contiguous_float32_without_copying(backend):
    feats = np.random.default_rng(8).standard_normal((3, 10, 4)).astype(np.float32)  # (n_chunks, N, d)
    store = ChunkStore(feats, np.arange(100, 110), backend=backend)
    assert (store.n_chunks, store.chunk_dim, len(store)) == (3, 4, 10)
    feats[2, 5, 1] = 42.0
    assert store.vector(105)[2, 1] == 42.0
    assert_array_equal(store.vector(107), feats[:, 7])


def test_memory_is_close_to_the_raw_features():
    feats = np.zeros((8, 1000, 64), np.float32)
    assert feats.nbytes < ChunkStore(list(feats)).nbytes() < 1.05 * feats.nbytes


def test_a_single_query_may_omit_the_batch_axis():
    rng = np.random.default_rng(9)
    feats, ids = make_data(rng, 50, 2, 3)
    store = store_of(feats, ids, "numpy")
    one, batch = search(store, feats[4], [1], 4), search(store, feats[4:5], [1], 4)
    assert one.ids.shape == (1, 4)
    assert_array_equal(one.ids, batch.ids)


STORE = store_of(*make_data(np.random.default_rng(10), 30, 3, 2), "numpy")
Q = np.zeros((3, 2), np.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunks=[]), "at least one"),
    (dict(chunks=[3]), "chunk 3 does not exist"),
    (dict(chunks=[-1]), "chunk -1 does not exist"),
    (dict(chunks=[1, 1]), "once"),
    (dict(chunks=[0.5]), "integers"),
    (dict(chunks=[0], k=0), "k must be an integer >= 1"),
    (dict(chunks=[0], k=2.0), "k must be an integer >= 1"),
    (dict(chunks=[0], offset=-1), "offset must be an integer >= 0"),
    (dict(chunks=[0, 1], weights=[1.0]), "one per chosen chunk"),
    (dict(chunks=[0], weights=[0.0]), "> 0"),
    (dict(chunks=[0], weights=[-1.0]), "> 0"),
    (dict(chunks=[0], weights=[np.nan]), "finite"),
    (dict(chunks=[0], weights=[np.inf]), "finite"),
    (dict(chunks=[0], weights=["a"]), "finite"),
    (dict(chunks=[0], queries=np.zeros((3, 3))), "shape"),
    (dict(chunks=[0], queries=np.zeros((2, 4, 2))), "shape"),
    (dict(chunks=[0], queries=np.zeros(6)), "shape"),
    (dict(chunks=[0], queries=np.zeros((0, 3, 2))), "Q >= 1"),
    (dict(chunks=[0], queries=np.full((3, 2), np.nan)), "finite"),
    (dict(chunks=[0], queries=np.full((3, 2), 1e19)), "too large"),
    (dict(chunks=[0], allowed=np.ones(29, bool)), "boolean mask of length 30"),
    (dict(chunks=[0], allowed=np.array([1.0, 2.0])), "array of ids"),
    (dict(chunks=[0], allowed=np.zeros((2, 2), int)), "array of ids"),
    (dict(chunks=[0], exclude_ids=[1.5]), "exclude_ids"),
    (dict(chunks=[0], exclude_ids=np.zeros((2, 1), int)), "one row of ids per query"),
])
def test_search_rejects_bad_arguments(kwargs, message):
    kwargs = {"queries": Q, **kwargs}
    with pytest.raises(RetrievalError, match=message):
        search(STORE, kwargs.pop("queries"), kwargs.pop("chunks"), **kwargs)


@pytest.mark.parametrize("args, kwargs, message", [
    ((np.zeros((10, 4), np.float32),), {}, r"\(n_chunks, N, chunk_dim\)"),
    (([],), {}, "N >= 1"),
    (([np.zeros((10, 4)), np.zeros((10, 5))],), {}, "one shape"),
    ((np.zeros((2, 0, 4)),), {}, "N >= 1"),
    ((np.zeros((2, 3, 4), complex),), {}, "real"),
    ((np.zeros((2, 3, 4)), np.arange(4)), {}, "3 non-negative integers"),
    ((np.zeros((2, 3, 4)), np.array([0, -1, 2])), {}, "non-negative"),
    ((np.zeros((2, 3, 4)), np.array([0.0, 1.0, 2.0])), {}, "integers"),
    ((np.zeros((2, 3, 4)), np.array([5, 7, 5])), {}, "unique"),
    ((np.full((2, 3, 4), np.nan),), {}, "finite"),
    ((np.full((2, 3, 4), 1e30),), {}, "finite"),
    ((np.zeros((2, 3, 4)),), dict(backend="jax"), "'numpy' or 'torch'"),
    ((np.zeros((2, 3, 4)),), dict(backend="numpy", device="cuda"), "backend='torch'"),
    ((np.zeros((2, 3, 4)),), dict(device="gpu7"), "unknown device"),
])
def test_store_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(RetrievalError, match=message):
        ChunkStore(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_store_without_cuda_says_so():
    with pytest.raises(RetrievalError, match="CUDA is not available"):
        ChunkStore(np.zeros((2, 3, 4)), device="cuda")


def test_vector_of_an_absent_id():
    with pytest.raises(RetrievalError, match="not in the store"):
        STORE.vector(10**9)
