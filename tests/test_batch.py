"""POST /search/batch: each answer what GET or POST /search answers for that query and what a
float64 brute force over the index's features finds, one search-core call per group of equal
options, one encoder pass for the uploads, and a bad query failing the whole batch by name."""
import io
import json

import numpy as np
import pytest

from disentangle.data import open_dataset
from retrieval.index import Index
from tests.test_api import _app, _error, _png
from tests.test_api_hardening import _brute_filter
from tests.test_search import brute_force

QUERIES = [
    {"image": "shape_000005", "chunks": "2,4", "k": 10},
    {"image": 17, "chunks": [0], "k": 5, "offset": 3},
    {"image": "shape_000100", "chunks": [2, 4, 6], "k": 20, "weights": [1, 0.5, 2.5]},
    {"image": "shape_000042", "chunks": "3", "k": 50, "where": ["shape=1", "split=val"]},
    {"image": "shape_000009", "chunks": "2,4", "k": 10},                       # the first query's group
    {"image": "shape_000300", "chunks": "1,3", "weights": "2,1", "offset": 7},  # k left out: 10
]


def _batch(client, queries, files=None):
    if files is None:
        return client.post("/search/batch", json={"queries": queries})
    data = {"queries": json.dumps({"queries": queries}),
            **{field: (io.BytesIO(png), f"{field}.png") for field, png in files.items()}}
    return client.post("/search/batch", data=data, content_type="multipart/form-data")


def _fields(q: dict) -> dict:
    """A batch query's options as the fields of GET or POST /search."""
    def text(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return {**{n: text(q[n]) for n in ("chunks", "k", "offset", "weights") if n in q}, "where": q.get("where", [])}


def _get(client, q: dict) -> dict:
    """What GET /search answers for a batch query by an indexed image."""
    response = client.get("/search", query_string={"image": q["image"], **_fields(q)})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _reference(api_index, vector: np.ndarray, exclude: list[int], q: dict) -> tuple[list[int], np.ndarray]:
    """Ids and distances of a float64 brute force over the stored features for one query."""
    idx = Index(api_index)
    chunks = [int(c) for c in q["chunks"].split(",")] if isinstance(q["chunks"], str) else q["chunks"]
    weights = q.get("weights")
    weights = [float(w) for w in weights.split(",")] if isinstance(weights, str) else weights
    allowed = (np.isin(idx.ids, _brute_filter(api_index, q["where"])) if q.get("where")
               else np.ones(len(idx.ids), bool))
    ids, dist = brute_force(idx.features(), idx.ids, vector[None], chunks, weights, q.get("k", 10),
                            q.get("offset", 0), allowed, [exclude])[0]
    return ids.tolist(), dist


def test_each_answer_is_the_single_search_and_a_brute_force(client, api_index):
    response = _batch(client, QUERIES)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == len(QUERIES)
    idx = Index(api_index)
    feats = idx.features()
    for q, got in zip(QUERIES, results):
        assert got == _get(client, q)  # the same fields, urls and numbers as GET /search
        i = idx.resolve(q["image"])
        ids, dist = _reference(api_index, feats[idx.ids == i][0], [i], q)
        assert [h["id"] for h in got["results"]] == ids
        np.testing.assert_allclose([h["distance"] for h in got["results"]], dist, rtol=1e-12)
    assert results[3]["results"] and all(h["attributes"]["shape"] == 1 for h in results[3]["results"])


def test_uploads_answer_as_post_search_with_one_encoder_pass(app, client, api_index, monkeypatch, tmp_path):
    ds = open_dataset("shapes:600", size=16)
    files = {"a": _png(ds.image(77)), "b": _png(ds.image(300))}
    queries = [{"file": "a", "chunks": "1,3", "k": 7, "weights": [2, 1]}, {"image": "shape_000005", "chunks": "1,3"},
               {"file": "b", "chunks": [1, 3], "k": 7, "weights": "2,1"}, {"file": "a", "chunks": "0", "k": 4}]
    r = app.extensions["retrieval"]
    passes = []
    real = r.index.model.encode

    def encode(x):
        passes.append((len(x), r.model_lock.locked()))
        return real(x)

    monkeypatch.setattr(r.index.model, "encode", encode)
    response = _batch(client, queries, files)
    assert response.status_code == 200, response.get_json()
    assert passes == [(2, True)]  # a and b, once each, in one pass under the model lock
    results = response.get_json()["results"]
    assert results[1] == _get(client, queries[1])
    idx = Index(api_index)
    for q, got in zip(queries, results):
        if "file" not in q:
            continue
        upload = (io.BytesIO(files[q["file"]]), f"{q['file']}.png")
        single = client.post("/search", data={**_fields(q), "file": upload},
                             content_type="multipart/form-data").get_json()
        assert got["query"] == single["query"] == {"file": f"{q['file']}.png"}
        assert {k: v for k, v in got.items() if k != "results"} == {k: v for k, v in single.items() if k != "results"}
        assert [{k: v for k, v in h.items() if k != "distance"} for h in got["results"]] == \
               [{k: v for k, v in h.items() if k != "distance"} for h in single["results"]]
        # the encoder's float32 rounding differs between a batch of two and one image in the last digits
        np.testing.assert_allclose([h["distance"] for h in got["results"]],
                                   [h["distance"] for h in single["results"]], rtol=1e-5, atol=1e-9)
        (tmp_path / "q.png").write_bytes(files[q["file"]])
        ids, dist = _reference(api_index, idx.query_for_file(tmp_path / "q.png").vector, [], q)
        assert [h["id"] for h in got["results"]] == ids
        np.testing.assert_allclose([h["distance"] for h in got["results"]], dist, rtol=1e-5, atol=1e-9)


def test_equal_options_share_one_search_core_call(app, client, monkeypatch):
    r = app.extensions["retrieval"]
    calls = []
    real = r.index.search_many

    def counted(queries, chunks, k=10, **options):
        calls.append((len(queries), list(chunks), k, options["offset"], options["weights"], options["where"]))
        return real(queries, chunks, k, **options)

    monkeypatch.setattr(r.index, "search_many", counted)
    queries = [{"image": 5, "chunks": "2,4", "k": 3},
               {"image": 6, "chunks": "1", "k": 3, "where": ["shape=1", "split=train"]},
               {"image": 7, "chunks": [2, 4], "k": 3},                                      # with the first
               {"image": 8, "chunks": "2,4", "k": 4},                                       # another k
               {"image": 9, "chunks": "1", "k": 3, "where": ["split=train", "shape=1"]},   # with the second
               {"image": 10, "chunks": "2,4", "k": 3, "weights": "1,1"},                   # weights given
               {"image": 11, "chunks": "2,4", "k": 3}]                                      # with the first
    results = _batch(client, queries).get_json()["results"]
    assert sorted(calls, key=str) == sorted([
        (3, [2, 4], 3, 0, None, {}), (2, [1], 3, 0, None, {"shape": 1, "split": "train"}),
        (1, [2, 4], 4, 0, None, {}), (1, [2, 4], 3, 0, [1.0, 1.0], {})], key=str)
    assert [res["query"]["id"] for res in results] == [5, 6, 7, 8, 9, 10, 11]  # in the order given
    calls.clear()
    assert results == [_get(client, q) for q in queries] and len(calls) == len(queries)


GOOD = [{"image": 5, "chunks": "1"}, {"image": 6, "chunks": "2", "k": 3}]
BAD_QUERIES = [
    ({"image": 7, "chunks": "1", "k": 0}, 400, "queries[2]: k must be an integer from 1 to 1000; got 0"),
    ({"image": 7, "chunks": "1", "k": "abc"}, 400, "queries[2]: k must be an integer from 1 to 1000; got 'abc'"),
    ({"image": 7, "chunks": "1", "k": True}, 400, "queries[2]: k must be"),
    ({"image": 7, "chunks": "1", "offset": 100_001}, 400, "queries[2]: offset must be an integer from 0 to 100000"),
    ({"image": 7}, 400, "queries[2]: give chunks=LIST"),
    ({"image": 7, "chunks": "9"}, 400, "queries[2]: chunk 9 is out of range"),
    ({"image": 7, "chunks": [1, 1]}, 400, "queries[2]: chunk 1 is listed twice"),
    ({"image": 7, "chunks": [1.5]}, 400, "queries[2]: chunks is a list of chunk numbers or names"),
    ({"image": 7, "chunks": "1,2", "weights": [1]}, 400, "queries[2]: weights must be 2 finite numbers > 0"),
    ({"image": 7, "chunks": "1", "weights": [1e300]}, 400, "queries[2]: weights must lie from 1e-06 to 1e+06"),
    ({"image": 7, "chunks": "1", "weights": [10 ** 400]}, 400, "queries[2]: weights must be 1 finite numbers"),
    ({"image": 7, "chunks": "1", "weights": {"a": 1}}, 400, "queries[2]: weights are numbers"),
    ({"image": 7, "chunks": "1", "where": "shape=1"}, 400, "queries[2]: where is a list"),
    ({"image": 7, "chunks": "1", "where": ["shape"]}, 400, "queries[2]: filter 'shape': write ATTRIBUTE=VALUE"),
    ({"image": 7, "chunks": "1", "where": ["shape=1"] * 17}, 400, "queries[2]: at most 16 where-clauses"),
    ({"image": 7, "chunks": "1", "where": ["Male=1"]}, 400, "queries[2]: no image has attribute 'Male'"),
    ({"chunks": "1"}, 400, "queries[2]: give image=KEY_OR_ID of an indexed image or file=FIELDNAME"),
    ({"image": 7, "file": "a", "chunks": "1"}, 400, "queries[2]: file names the form field"),
    ({"image": " ", "chunks": "1"}, 400, "queries[2]: give image=KEY_OR_ID"),
    ({"file": "a", "chunks": "1"}, 400, "queries[2]: file names the form field of an uploaded image"),
    ("shape_000005", 400, "queries[2]: each query is a JSON object"),
    ({"image": "no_such_image", "chunks": "1"}, 404, "queries[2]: no indexed image has key or id 'no_such_image'"),
    ({"image": "../../etc/passwd", "chunks": "1"}, 404, "queries[2]: no indexed image has key or id"),
    ({"image": 601, "chunks": "1"}, 404, "queries[2]: no indexed image has key or id '601'"),
]


@pytest.mark.parametrize("bad,status,message", BAD_QUERIES, ids=[m.split(": ", 1)[1][:40] for *_, m in BAD_QUERIES])
def test_a_bad_query_fails_the_whole_batch_by_its_position(app, client, monkeypatch, bad, status, message):
    r = app.extensions["retrieval"]
    searched = []
    real = r.index.search_many
    monkeypatch.setattr(r.index, "search_many", lambda *a, **k: searched.append(1) or real(*a, **k))
    response = _batch(client, [*GOOD, bad, *GOOD])
    got = _error(response, status, message)
    assert got.startswith(message)
    if "Male" not in message:  # every query is checked before any is searched
        assert not searched


def test_the_number_of_queries_is_limited(api_index):
    client = _app(api_index).test_client()
    assert len(_batch(client, [{"image": 5, "chunks": "1", "k": 1}] * 64).get_json()["results"]) == 64
    _error(_batch(client, [{"image": 5, "chunks": "1", "k": 1}] * 65), 400,
           "queries is a list of 1 to 64 queries; got 65")
    _error(_batch(client, []), 400, "1 to 64 queries; got 0")
    small = _app(api_index, MAX_BATCH=2).test_client()
    _error(_batch(small, GOOD + GOOD[:1]), 400, "1 to 2 queries; got 3")


@pytest.mark.parametrize("kwargs,status,message", [
    ({"data": "x", "content_type": "text/plain"}, 415, "application/json"),
    ({"data": "{not json", "content_type": "application/json"}, 400, "the queries are not JSON"),
    ({"data": "[" * 100_000, "content_type": "application/json"}, 400, "the queries are not JSON"),
    ({"json": [GOOD]}, 400, 'send a JSON object {"queries": [...]}'),
    ({"json": {"query": GOOD}}, 400, 'send {"queries": [{"image": "KEY_OR_ID"'),
    ({"json": {"queries": GOOD[0]}}, 400, "queries is a list of 1 to 64 queries"),
    ({"data": {"q": "x"}, "content_type": "multipart/form-data"}, 400, "in the form field 'queries'"),
    ({"data": {"queries": "{"}, "content_type": "multipart/form-data"}, 400, "the queries are not JSON"),
    ({"data": {"queries": json.dumps({"queries": [*GOOD, {"file": "a", "chunks": "1"}]}),
               "a": (io.BytesIO(b"hello, I am text"), "a.png")}, "content_type": "multipart/form-data"},
     415, "queries[2]: the upload is not an image"),
    ({"data": {"queries": json.dumps({"queries": [{"image": 5, "file": "a", "chunks": "1"}]}),
               "a": (io.BytesIO(b"x"), "a.png")}, "content_type": "multipart/form-data"},
     400, "queries[0]: give image=KEY_OR_ID of an indexed image or file=FIELDNAME of an uploaded one, not both"),
])
def test_bad_batch_bodies(client, kwargs, status, message):
    _error(client.post("/search/batch", **kwargs), status, message)


def test_the_batch_is_in_the_generated_document(client):
    doc = client.get("/openapi.json").get_json()
    operation = doc["paths"]["/search/batch"]["post"]
    assert set(operation["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    item = doc["components"]["schemas"]["BatchQuery"]
    assert set(item["properties"]) == {"image", "file", "chunks", "k", "offset", "weights", "where"}
    assert item["properties"]["k"]["maximum"] == 1000
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/BatchResult")
