"""retrieval.client against a real `retrieval serve` process on a loopback port: each answer equal
to what the library gives in process (Index.search, the dataset's pixels, the app's own PNGs),
errors as ServerError with the server's message, and a closed port as a connection error."""
import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from numpy.testing import assert_array_equal
from PIL import Image

from disentangle.data import open_dataset
from disentangle.errors import RetrievalError
from retrieval.client import Client, ServerError, Unreachable
from retrieval.index import Index
from tests.test_api import REPO, _decode, _free_port, _png

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def served(api_index, tmp_path_factory):
    """(URL, index): `retrieval serve` with a token, on a copy of the shapes index (a test names chunks)."""
    tmp = tmp_path_factory.mktemp("client")
    index = tmp / "idx"
    shutil.copytree(api_index, index)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RETRIEVAL_TOKEN": TOKEN}
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", str(index), "--port", str(port),
                                 "--threads", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with Client(f"http://127.0.0.1:{port}", timeout=2) as probe:
            while True:
                try:
                    probe.health()
                    break
                except Unreachable:
                    assert proc.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()
                    time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", index
    finally:
        proc.terminate()  # it stops cleanly on SIGTERM (tests/test_api.py); killed, and an error, if not
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture()
def remote(served):
    with Client(served[0]) as c:
        yield c


@pytest.fixture(scope="module")
def local(served) -> Index:
    return Index(served[1])


def _same_hits(got: dict, expect: dict) -> None:
    """The client's arrays (and the JSON under them) are the in-process search's hits."""
    assert got["ids"].dtype == np.int64 and got["distances"].dtype == np.float64
    assert_array_equal(got["ids"], [h["id"] for h in expect["results"]])
    assert_array_equal(got["distances"], [h["distance"] for h in expect["results"]])
    assert [h["attributes"] for h in got["results"]] == [h["attributes"] for h in expect["results"]]


def test_health(remote, local):
    assert remote.health() == {"status": "ok", "images": len(local), "n_chunks": local.n_chunks,
                               "chunk_dim": local.chunk_dim, "preset": "tiny", "dataset_format": "shapes"}


@pytest.mark.parametrize("image,chunks,options,expect_chunks", [
    ("shape_000005", "2,4", {}, [2, 4]),
    (17, [0], {"k": 5, "offset": 3}, [0]),
    ("shape_000100", (2, 4, 6), {"k": 20, "weights": np.array([1, 0.5, 2.5])}, [2, 4, 6]),
    (600, 7, {"k": 3}, [7]),
])
def test_search_by_key_or_id_is_the_index_search(remote, local, image, chunks, options, expect_chunks):
    got = remote.search(image, chunks=chunks, **options)
    _same_hits(got, local.search(local.query_for(image), expect_chunks, **options))
    assert got["chunks"] == expect_chunks and got["offset"] == options.get("offset", 0)
    assert got["query"]["id"] == local.resolve(image)


def test_search_by_file_is_the_index_search(remote, local, tmp_path):
    path = tmp_path / "query.png"
    path.write_bytes(_png(open_dataset("shapes:600", size=16).image(77)))
    expect = local.search(local.query_for_file(path), [1, 3], 7, weights=[2, 1])
    for file in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), Image.open(path)):
        _same_hits(remote.search(file=file, chunks=[1, 3], k=7, weights=[2, 1]), expect)
    with open(path, "rb") as f:
        assert remote.search(file=f, chunks="1,3")["query"] == {"file": "query.png"}


@pytest.mark.parametrize("where,expect", [
    ({"shape": 1}, {"shape": 1}),
    (["shape=1", "split=val"], {"shape": 1, "split": "val"}),
    ("colour=2", {"colour": 2}),
    ({"shape": 1, "colour": 2}, {"shape": 1, "colour": 2}),
])
def test_where_filters_are_the_index_filters(remote, local, where, expect):
    got = remote.search("shape_000042", chunks=[3], k=50, where=where)
    _same_hits(got, local.search(local.query_for("shape_000042"), [3], 50, where=expect))
    attributes = {a: v for a, v in expect.items() if a != "split"}
    assert len(got["ids"]) > 0 and all(h["attributes"].items() >= attributes.items() for h in got["results"])


def test_search_needs_exactly_one_query(remote):
    for kwargs in ({}, {"image": 5, "file": b"png"}):
        with pytest.raises(ValueError, match="exactly one"):
            remote.search(chunks=[1], **kwargs)


def test_images_and_transfer(remote, local, client):
    """client: conftest's in-process app, whose own /transfer PNG the remote one must equal."""
    pixels = np.asarray(remote.image("shape_000123").convert("RGB"))
    assert_array_equal(pixels, open_dataset("shapes:600", size=16).image(123))
    assert_array_equal(np.asarray(remote.image(124).convert("RGB")), pixels)  # id 124 is key shape_000123
    mixed = remote.transfer("shape_000020", 31, [2, 5])
    size = local.manifest["image_size"]
    assert mixed.size == (size, size)
    assert_array_equal(np.asarray(mixed.convert("RGB")),
                       _decode(client.get("/transfer?base=shape_000020&donor=31&chunks=2,5").data))


def test_name_chunk_round_trip(served, remote):
    with Client(served[0], token=TOKEN) as owner:
        listing = owner.name_chunk(3, "test colour")
        assert listing["chunks"][3]["name"] == "test colour" and listing == remote.chunks()
        assert_array_equal(remote.search(5, chunks="test colour")["ids"], remote.search(5, chunks=3)["ids"])
        with pytest.raises(ServerError) as no_token:
            remote.name_chunk(3, "other name")
        assert no_token.value.status == 401 and no_token.value.error == "unauthorized"
        assert owner.name_chunk(3, None)["chunks"][3]["name"] is None
    assert remote.chunks()["chunks"][3]["name"] is None


@pytest.mark.parametrize("call,path,status,code", [
    (lambda c: c.search(5, chunks=[99]), "/search?image=5&chunks=99", 400, "bad_request"),
    (lambda c: c.search(5, chunks=1, where={"Male": 1}), "/search?image=5&chunks=1&where=Male=1", 400, "bad_request"),
    (lambda c: c.search("no_such_image", chunks=1), "/search?image=no_such_image&chunks=1", 404, "not_found"),
    (lambda c: c.image("no_such_image"), "/images/no_such_image", 404, "not_found"),
    (lambda c: c.transfer(5, 6, "99"), "/transfer?base=5&donor=6&chunks=99", 400, "bad_request"),
], ids=["bad-chunk", "unknown-attribute", "unknown-image", "unknown-image-bytes", "transfer-bad-chunk"])
def test_error_answers_raise_server_error_with_the_servers_message(served, remote, call, path, status, code):
    with pytest.raises(ServerError) as raised:
        call(remote)
    body = requests.get(served[0] + path, timeout=10).json()["error"]  # the answer, read without the client
    assert (raised.value.status, raised.value.error, raised.value.message) == (status, code, body["message"])
    assert isinstance(raised.value, RetrievalError) and body["message"] in str(raised.value)


def test_a_closed_port_raises_a_connection_error():
    url = f"http://127.0.0.1:{_free_port()}"  # free: nothing listens there
    with pytest.raises(ConnectionError, match=f"nothing answers at {url}") as raised:
        Client(url, timeout=5).health()
    assert isinstance(raised.value, RetrievalError)  # one except clause catches every client failure
