"""Past one machine on a two-node Ray cluster (tests/ray_cluster.py): Ray Data encoding writes the
index the local encoder writes; sharded exact search (one actor per shard) answers exactly as the
single-process search and a float64 brute force; a killed shard actor comes back, and a shard that
cannot come back fails the request with a 503 naming it. Ray stays on loopback throughout."""
import os
import shutil
import signal

import numpy as np
import pytest

import tests.ray_cluster  # noqa: F401  (before anything imports ray: it sets Ray's loopback switches)
from disentangle.errors import RetrievalError
from indexer.build import build_index
from indexer.shards import read_layout, shard_dir, write_shards
from retrieval.index import Index, Query
from tests.loopback import children, listening, only_loopback
from tests.test_cli import fails, ok
from tests.test_index import _brute

N_SHARDS = 3  # over two nodes: one node holds two shards


def test_ray_data_encoding_equals_local_encoding(ray_cluster, tiny_model, tmp_path):
    build_index("shapes:300", tiny_model, tmp_path / "local")
    ok("index", "shapes:300", "--model", tiny_model, "--out", tmp_path / "ray", "--ray", ray_cluster.address,
       "--batch-size", "64", "--commit-every", "100", "--shards", "2")  # batches straddle the commits
    local, remote = Index(tmp_path / "local"), Index(tmp_path / "ray")
    np.testing.assert_array_equal(remote.ids, local.ids)
    assert remote.keys() == local.keys()
    np.testing.assert_allclose(remote.features(), local.features(), rtol=1e-5, atol=1e-6)
    assert read_layout(tmp_path / "ray")["counts"] == [150, 150]


@pytest.fixture(scope="module")
def split_index(api_index, tmp_path_factory):
    """A copy of the session's shapes:600 index, split into 3 shards."""
    path = tmp_path_factory.mktemp("sharded") / "idx"
    shutil.copytree(api_index, path)
    write_shards(path, N_SHARDS)
    return path


@pytest.fixture(scope="module")
def sharded(ray_cluster, split_index):
    from retrieval.shards import ShardedIndex

    index = ShardedIndex(split_index, ray_cluster.address)
    yield index
    index.close()


def test_shards_are_disjoint_complete_and_spread_over_both_nodes(sharded, split_index):
    single = Index(split_index)
    held = [Index(split_index, shard=k).ids for k in range(N_SHARDS)]
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), single.ids)
    assert [s["images"] for s in sharded.shards] == [len(h) for h in held]
    assert len({s["node"] for s in sharded.shards}) == 2
    # every listening socket of Ray's processes (and of this driver) is on loopback
    sockets = listening(children(os.getpid()))
    assert len(sockets) > 5 and only_loopback(sockets), sorted(sockets)


@pytest.mark.parametrize("seed", range(8))
def test_sharded_search_equals_single_process_and_brute_force(sharded, split_index, seed):
    single = Index(split_index)
    feats, ids = single.features(), single.ids
    rng = np.random.default_rng(seed)
    chunks = rng.choice(8, rng.integers(1, 9), replace=False).tolist()
    weights = rng.uniform(0.2, 3, len(chunks)).round(3).tolist() if seed % 2 else None
    where = [None, {"shape": 1}, {"split": "val", "colour": 2}, None][seed % 4]
    k, offset = [1, 7, 40, 700][seed % 4], [0, 3, 0, 11][seed // 2 % 4]
    picked = rng.choice(len(ids), 3, replace=False)
    queries = [single.query_for(int(ids[picked[0]])), single.query_for(int(ids[picked[1]])),
               Query(feats[picked[2]] + rng.normal(0, 0.01, feats[picked[2]].shape).astype(np.float32))]
    got = sharded.search_many(queries, chunks, k, offset=offset, weights=weights, where=where)
    assert got == single.search_many(queries, chunks, k, offset=offset, weights=weights, where=where)
    allowed = single.allowed(where)
    for q, answer in zip(queries, got):
        ref_ids, ref_d = _brute(feats, ids, q.vector, chunks, weights or [1] * len(chunks), allowed,
                                exclude=q.id)
        assert [h["id"] for h in answer["results"]] == ref_ids[offset:offset + k].tolist()
        np.testing.assert_allclose([h["distance"] for h in answer["results"]], ref_d[offset:offset + k],
                                   rtol=1e-9)


def test_ties_across_shards_break_by_id(sharded, split_index):
    """Copies of one vector in every shard: equal distances, ranked by id across the shards."""
    single = Index(split_index)
    q = single.query_for(int(single.ids[0]))
    twins = single.search(q, [0, 1, 2, 3, 4, 5, 6, 7], k=600)
    got = sharded.search(Query(q.vector), list(range(8)), k=600)
    assert got["results"][1:] == [dict(h) for h in twins["results"]][:599]
    d = [h["distance"] for h in got["results"]]
    pairs = list(zip(d, [h["id"] for h in got["results"]]))
    assert pairs == sorted(pairs)


def test_bad_input_reads_as_in_one_process(sharded, split_index):
    single = Index(split_index)
    q = single.query_for(int(single.ids[3]))
    for kwargs, match in (({"chunks": [9]}, "does not exist"), ({"chunks": [1], "k": 0}, "k must be"),
                          ({"chunks": [1, 2], "weights": [1]}, "weights must be"),
                          ({"chunks": [1], "where": {"beard": 1}}, "no image has attribute")):
        with pytest.raises(RetrievalError, match=match):
            sharded.search(q, **kwargs)


def test_service_over_shards_answers_as_the_single_process_service(ray_cluster, sharded, split_index):
    from tests.test_api import _app

    one = _app(split_index).test_client()
    app = _app(split_index, RAY=ray_cluster.address)
    many = app.test_client()
    for url in ("/search?chunks=2,4&image=shape_000005&k=10", "/search?chunks=1&image=17&k=25&offset=5&where=split=val",
                "/search?chunks=0,3,6&image=shape_000100&weights=1,0.5,2&where=shape=2"):
        a, b = one.get(url), many.get(url)
        assert a.status_code == b.status_code == 200 and a.get_json() == b.get_json(), url
    app.extensions["retrieval"].index.close()


def _pid(sharded, k: int) -> int:
    return sharded._ask(k, "describe")["pid"]


def test_killed_shard_actor_is_restarted_and_the_query_retried(sharded, split_index):
    single = Index(split_index)
    q = single.query_for(int(single.ids[10]))
    before = _pid(sharded, 1)
    os.kill(before, signal.SIGKILL)
    assert sharded.search(q, [2, 5], k=20) == single.search(q, [2, 5], k=20)
    assert _pid(sharded, 1) != before


def test_shard_that_cannot_come_back_is_a_503_naming_it(ray_cluster, split_index, tmp_path):
    from tests.test_api import _app, _error

    app = _app(split_index, RAY=ray_cluster.address)
    client, sharded = app.test_client(), app.extensions["retrieval"].index
    url = "/search?chunks=2,4&image=shape_000005&k=10"
    expect = client.get(url).get_json()
    moved = tmp_path / "away"
    shard_dir(split_index, 2).rename(moved)  # its restarts cannot load it now
    try:
        os.kill(_pid(sharded, 2), signal.SIGKILL)
        message = _error(client.get(url), 503, "shard 2 of 3 is unavailable")
        assert "no partial answer" in message and "could not be restarted" in message
        assert "chunk_0.faiss is missing" in message  # why its restart could not load it
    finally:
        moved.rename(shard_dir(split_index, 2))
    assert client.get(url).get_json() == expect  # back: a fresh actor loads the shard
    sharded.close()


def test_stale_or_missing_shards_are_refused(ray_cluster, api_index, tmp_path, tiny_model):
    from retrieval.shards import ShardedIndex

    with pytest.raises(RetrievalError, match="not split into shards"):
        ShardedIndex(api_index, ray_cluster.address)
    broken = tmp_path / "broken"
    shutil.copytree(api_index, broken)
    write_shards(broken, 2)
    (shard_dir(broken, 1) / "chunk_3.faiss").unlink()
    with pytest.raises(RetrievalError, match="cannot serve .*shard 1 of 2 .*chunk_3.faiss is missing"):
        ShardedIndex(broken, ray_cluster.address)
    out = tmp_path / "grow"
    build_index("shapes:40", tiny_model, out)
    write_shards(out, 2)
    build_index("shapes:50", tiny_model, out)  # grew after the split
    with pytest.raises(RetrievalError, match="split it again"):
        ShardedIndex(out, ray_cluster.address)
    with pytest.raises(RetrievalError, match="split it again"):
        Index(out, shard=0)
    fails("index", "shapes:50", "--model", tiny_model, "--out", out, "--shards", "51", match="too few")
