"""The Flask service: every endpoint against the library it wraps, bad input of every kind as a
JSON 4xx (never a 5xx, never a traceback, never a read outside the dataset root), an OpenAPI fuzz,
and `retrieval serve` as a real waitress process stopped by a signal."""
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from api.metrics import BUCKETS
from disentangle.data import open_dataset
from disentangle.errors import RetrievalError
from indexer.build import build_index
from retrieval.index import Index

REPO = Path(__file__).resolve().parents[1]


def _app(index: Path, **config):
    return create_app({"INDEX": str(index), "TESTING": True, "TOKEN": None, **config})


def _error(response, status: int, match: str = "") -> str:
    """The response is a JSON error with this status and a message containing `match`."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in response.get_data(as_text=True)
    assert match.lower() in body["error"]["message"].lower(), body
    return body["error"]["message"]


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("query", [
    "image=shape_000005&chunks=1,2",
    "image=17&chunks=0&k=5&offset=3",
    "image=shape_000100&chunks=2,4,6&k=20&weights=1,0.5,2.5",
    "image=shape_000042&chunks=3&where=shape=1&where=split=val&k=50",
])
def test_search_is_the_core_result_with_urls(app, client, api_index, query):
    response = client.get(f"/search?{query}")
    assert response.status_code == 200, response.get_json()
    got = response.get_json()
    p = {k: v for k, v in (kv.split("=", 1) for kv in query.split("&") if not kv.startswith("where"))}
    where = dict(kv.split("=", 1)[1].split("=") for kv in query.split("&") if kv.startswith("where"))
    idx = Index(api_index)
    q = idx.query_for(p["image"])
    expect = idx.search(q, [int(c) for c in p["chunks"].split(",")], int(p.get("k", 10)),
                        offset=int(p.get("offset", 0)),
                        weights=[float(w) for w in p["weights"].split(",")] if "weights" in p else None,
                        where={a: int(v) if v.isdigit() else v for a, v in where.items()})
    assert [h["id"] for h in got["results"]] == [h["id"] for h in expect["results"]]
    assert [h["distance"] for h in got["results"]] == [h["distance"] for h in expect["results"]]
    assert got["query"] == {**expect["query"], "url": f"/images/{q.id}"}
    assert got["chunks"] == expect["chunks"] and got["k"] == expect["k"]
    assert all(h["url"] == f"/images/{h['id']}" for h in got["results"])
    assert all(client.get(h["url"]).status_code == 200 for h in got["results"][:3])


def test_search_by_chunk_name(own_index):
    client = _app(own_index).test_client()
    assert client.put("/chunks/4", json={"name": "Object colour"}).status_code == 200
    by_name = client.get("/search?image=shape_000009&chunks=2,object_colour").get_json()
    by_number = client.get("/search?image=shape_000009&chunks=2,4").get_json()
    assert by_name == by_number and by_name["chunks"] == [2, 4]


BAD_SEARCH = [
    ("chunks=1", 400, "give image="),
    ("image=&chunks=1", 400, "give image="),
    ("image=../../etc/passwd&chunks=1", 404, "no indexed image"),
    ("image=..%2F..%2Fetc%2Fpasswd&chunks=1", 404, "no indexed image"),
    ("image=%2e%2e%2f%2e%2e%2fetc%2fpasswd&chunks=1", 404, "no indexed image"),
    ("image=..%252F..%252Fetc%252Fpasswd&chunks=1", 404, "no indexed image"),
    ("image=/etc/passwd&chunks=1", 404, "no indexed image"),
    ("image=%2Fetc%2Fpasswd&chunks=1", 404, "no indexed image"),
    ("image=file:///etc/passwd&chunks=1", 404, "no indexed image"),
    ("image=http://example.com/a.png&chunks=1", 404, "no indexed image"),
    ("image=C:%5CWindows%5Cwin.ini&chunks=1", 404, "no indexed image"),
    ("image=shape_000005%00.png&chunks=1", 404, "no indexed image"),
    ("image=0&chunks=1", 404, "no indexed image"),
    ("image=601&chunks=1", 404, "no indexed image"),
    ("image=-3&chunks=1", 404, "no indexed image"),
    ("image=%C2%B2&chunks=1", 404, "no indexed image"),
    ("image=" + "9" * 40 + "&chunks=1", 404, "no indexed image"),
    ("image=" + "x" * 5000 + "&chunks=1", 404, "no indexed image"),
    ("image=5", 400, "give chunks="),
    ("image=5&chunks=", 400, "give chunks="),
    ("image=5&chunks=,,", 400, "empty chunk list"),
    ("image=5&chunks=8", 400, "out of range"),
    ("image=5&chunks=-1", 400, "out of range"),
    ("image=5&chunks=1,1", 400, "listed twice"),
    ("image=5&chunks=hair", 400, "unknown chunk"),
    ("image=5&chunks=%C2%B2", 400, "unknown chunk"),
    ("image=5&chunks=0,1,2,3,4,5,6,7,0", 400, "at most 8"),
    ("image=5&chunks=1&k=0", 400, "k must be an integer from 1 to 1000"),
    ("image=5&chunks=1&k=1001", 400, "k must be"),
    ("image=5&chunks=1&k=abc", 400, "k must be"),
    ("image=5&chunks=1&k=1.5", 400, "k must be"),
    ("image=5&chunks=1&k=--5", 400, "k must be"),
    ("image=5&chunks=1&k=" + "9" * 30, 400, "k must be"),
    ("image=5&chunks=1&offset=-1", 400, "offset must be an integer from 0 to 100000"),
    ("image=5&chunks=1&offset=100001", 400, "offset must be"),
    ("image=5&chunks=1&offset=x", 400, "offset must be"),
    ("image=5&chunks=1&weights=nan", 400, "weights must be 1 finite numbers > 0"),
    ("image=5&chunks=1&weights=inf", 400, "weights must be"),
    ("image=5&chunks=1&weights=1e400", 400, "weights must be"),
    ("image=5&chunks=1&weights=0", 400, "weights must be"),
    ("image=5&chunks=1&weights=-1", 400, "weights must be"),
    ("image=5&chunks=1&weights=1,2", 400, "one per chosen chunk"),
    ("image=5&chunks=1,2&weights=1", 400, "one per chosen chunk"),
    ("image=5&chunks=1&weights=a", 400, "weights must be"),
    ("image=5&chunks=1&weights=1e300", 400, "from 1e-06 to 1e+06"),
    ("image=5&chunks=1&where=shape", 400, "ATTRIBUTE=VALUE"),
    ("image=5&chunks=1&where==1", 400, "ATTRIBUTE=VALUE"),
    ("image=5&chunks=1&where=shape=", 400, "ATTRIBUTE=VALUE"),
    ("image=5&chunks=1&where=Male=1", 400, "no image has attribute 'Male'"),
    ("image=5&chunks=1&where=a%22b=1", 400, "quotes"),
    ("image=5&chunks=1&where=a%5Cb=1", 400, "backslashes"),
    ("image=5&chunks=1&where=shape%00=1", 400, "printable"),
    ("image=5&chunks=1&where=shape=" + "9" * 300, 400, "at most 200"),
    ("image=5&chunks=1" + "&where=shape=1" * 17, 400, "at most 16"),
]


@pytest.mark.parametrize("query,status,match", BAD_SEARCH)
def test_bad_search_input(client, query, status, match):
    _error(client.get(f"/search?{query}"), status, match)


def test_where_on_a_value_nobody_has_is_empty_not_an_error(client):
    assert client.get("/search?image=5&chunks=1&where=shape=9").get_json()["results"] == []
    assert client.get("/search?image=5&chunks=1&where=split=nope").get_json()["results"] == []


# -- uploads --------------------------------------------------------------------------------
def _post(client, data: bytes | None, name: str = "q.png", **fields):
    form = {"chunks": "1,3", **fields}
    if data is not None:
        form["file"] = (io.BytesIO(data), name)
    return client.post("/search", data=form, content_type="multipart/form-data")


def test_upload_searches_like_the_cli_file_query(client, api_index, tmp_path):
    ds = open_dataset("shapes:600", size=16)
    path = tmp_path / "query.png"
    path.write_bytes(_png(ds.image(77)))
    got = _post(client, path.read_bytes(), "my query.png", k="7", weights="2,1").get_json()
    idx = Index(api_index)
    expect = idx.search(idx.query_for_file(path), [1, 3], 7, weights=[2, 1])
    assert [h["id"] for h in got["results"]] == [h["id"] for h in expect["results"]]
    assert got["query"] == {"file": "my_query.png"}  # never the server's temp path
    jpeg = _post(client, _png(ds.image(77), "JPEG"), "q.jpg")
    assert jpeg.status_code == 200 and len(jpeg.get_json()["results"]) == 10


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


_IMAGE = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
BAD_UPLOADS = [
    (None, "q.png", {}, 400, "field 'file'"),
    (b"", "q.png", {}, 400, "empty"),
    (b"hello, I am text", "q.png", {}, 415, "not an image"),
    (b"%PDF-1.4 not really", "q.pdf", {}, 415, "not an image"),
    (_png(_IMAGE, "GIF"), "q.gif", {}, 415, "GIF images are not accepted"),
    (_png(_IMAGE, "BMP"), "q.bmp", {}, 415, "BMP images are not accepted"),
    (_png(_IMAGE)[:-40], "q.png", {}, 400, "truncated"),
    (_png(_IMAGE, "JPEG")[:-200], "q.jpg", {}, 400, "truncated"),
    (_png(_IMAGE)[:60] + b"\0" * 100 + _png(_IMAGE)[-12:], "q.png", {}, 400, "cannot decode"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "q.png", {}, 415, "not an image"),
    (_png_header(30_000, 30_000), "bomb.png", {}, 400, "decompression bomb"),
    (_png_header(8_000, 8_000), "big.png", {}, 400, "more than the limit"),
    (_png(_IMAGE), "q.png", {"chunks": "9"}, 400, "out of range"),
    (_png(_IMAGE), "q.png", {"k": "0"}, 400, "k must be"),
    (_png(_IMAGE), "q.png", {"where": "Male=1"}, 400, "no image has attribute"),
]


@pytest.mark.parametrize("data,name,fields,status,match", BAD_UPLOADS, ids=[
    "no-file", "empty", "text", "pdf", "gif", "bmp", "truncated-png", "truncated-jpeg", "corrupt-png",
    "png-magic-only", "bomb", "too-many-pixels", "bad-chunks", "bad-k", "bad-where"])
def test_bad_upload(client, data, name, fields, status, match):
    _error(_post(client, data, name, **fields), status, match)


def test_upload_limits_are_configurable(api_index):
    client = _app(api_index, MAX_CONTENT_LENGTH=20_000, MAX_IMAGE_PIXELS=1000).test_client()
    noise = np.random.default_rng(1).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    _error(_post(client, _png(noise)), 413)
    _error(_post(client, _png(noise[:40, :40])), 400, "1,600 pixels, more than the limit of 1,000")
    assert _post(client, _png(noise[:30, :30])).status_code == 200


def test_post_without_multipart_is_a_json_error(client):
    _error(client.post("/search", data="x", content_type="text/plain"), 400, "field 'file'")
    _error(client.post("/search", json={"image": 5}), 400, "field 'file'")


# -- images ---------------------------------------------------------------------------------
def test_image_bytes_are_the_dataset_pixels_and_cacheable(client):
    ds = open_dataset("shapes:600", size=16)
    response = client.get("/images/shape_000123")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert np.array_equal(_decode(response.data), ds.image(123))
    assert client.get("/images/124").data == response.data  # id 124 is key shape_000123
    assert response.cache_control.public and response.cache_control.max_age == 86400
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    again = client.get("/images/124", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and not again.data


def test_image_meta_and_listing(client):
    meta = client.get("/images/shape_000010/meta").get_json()
    assert meta["id"] == 11 and meta["key"] == "shape_000010" and meta["url"] == "/images/11"
    assert set(meta["attributes"]) == {"shape", "colour", "background", "scale", "rotation", "x", "y"}
    page = client.get("/images?offset=10&limit=5").get_json()
    assert page["total"] == 600 and [i["id"] for i in page["images"]] == [11, 12, 13, 14, 15]
    assert page["images"][0] == meta
    filtered = client.get("/images?where=shape=2&limit=500").get_json()
    assert filtered["total"] == len(filtered["images"]) > 0
    assert all(i["attributes"]["shape"] == 2 for i in filtered["images"])
    assert client.get("/images?offset=5000").get_json()["images"] == []


@pytest.mark.parametrize("path,status", [
    ("/images/..%2F..%2Fetc%2Fpasswd", 404),
    ("/images/%2Fetc%2Fpasswd", 404),
    ("/images/../../etc/passwd", 404),
    ("/images/%2e%2e", 404),
    ("/images/..", 404),
    ("/images/0", 404),
    ("/images/600000", 404),
    ("/images/" + "9" * 30, 404),
    ("/images/%C2%B2", 404),
    ("/images/nope/meta", 404),
    ("/images/etc/passwd", 404),
    ("/images?limit=0", 400),
    ("/images?limit=501", 400),
    ("/images?offset=-1", 400),
    ("/images?where=nope=1", 400),
])
def test_bad_image_requests(client, path, status):
    _error(client.get(path), status)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    """A folder dataset with a symlink to an image outside its root, indexed with the tiny model."""
    base = tmp_path_factory.mktemp("folder")
    root, outside = base / "data", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        (root / f"img{i}.png").write_bytes(_png(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)))
    (root / "photo.jpg").write_bytes(_png(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), "JPEG"))
    (root / "sub" / "deep.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (outside / "secret.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "attributes.csv").write_text("file,kind,split\nimg0.png,1,val\nimg1.png,2,train\n")
    build_index(str(root), tiny_model, base / "idx")
    return root, base / "idx"


def test_folder_images_are_the_original_files_inside_the_root(folder):
    root, index = folder
    client = _app(index).test_client()
    idx = Index(index)
    keys = dict(zip(idx.keys(), idx.ids.tolist()))
    assert set(keys) == {f"img{i}.png" for i in range(6)} | {"photo.jpg", "sub/deep.png", "escape.png"}
    for key in ("img3.png", "photo.jpg", "sub/deep.png"):
        response = client.get(f"/images/{keys[key]}")
        assert response.status_code == 200 and response.data == (root / key).read_bytes()
        assert response.mimetype == ("image/jpeg" if key.endswith(".jpg") else "image/png")
        assert response.cache_control.public and response.headers.get("ETag")
    assert client.get("/images/img3.png").data == (root / "img3.png").read_bytes()
    # the symlink resolves outside the root: refused, for bytes, transfer and search alike
    _error(client.get(f"/images/{keys['escape.png']}"), 403, "outside the dataset root")
    _error(client.get("/images/escape.png"), 403, "outside the dataset root")
    _error(client.get("/transfer?base=escape.png&donor=img1.png&chunks=1"), 403, "outside")
    assert client.get("/search?image=img0.png&chunks=1&where=kind=2").get_json()["results"][0]["key"] == "img1.png"
    # a file that disappeared after indexing is a 404, not a 500
    moved = root / "img5.png"
    moved.rename(root.parent / "img5.png")
    try:
        _error(client.get(f"/images/{keys['img5.png']}"), 404, "missing")
    finally:
        (root.parent / "img5.png").rename(moved)


def test_stored_paths_that_climb_out_are_refused(folder, tmp_path):
    """Even a tampered database cannot make the server read outside the root."""
    import sqlite3

    _, index = folder
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    db = sqlite3.connect(copy / "meta.sqlite")
    db.execute("update images set path = '../outside/secret.png' where key = 'img0.png'")
    db.execute("update images set path = '/etc/passwd' where key = 'img1.png'")
    db.commit()
    db.close()
    client = _app(copy).test_client()
    _error(client.get("/images/img0.png"), 403, "outside the dataset root")
    _error(client.get("/images/img1.png"), 403, "outside the dataset root")


# -- transfer and chunks --------------------------------------------------------------------
def test_transfer_takes_the_chosen_chunks_from_the_donor(app, client):
    ds = open_dataset("shapes:600", size=16)
    model = app.extensions["retrieval"].index.model
    x = torch.stack([ds[20], ds[30]])
    with torch.no_grad():
        f = model.encode(x)
        mixed = f[0].clone()
        mixed[[2, 5]] = f[1, [2, 5]]
        expect = ((model.decode(mixed[None]).clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    response = client.get("/transfer?base=shape_000020&donor=31&chunks=2,5")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert np.array_equal(_decode(response.data), expect)
    all_chunks = client.get("/transfer?base=shape_000020&donor=shape_000030&chunks=0,1,2,3,4,5,6,7").data
    reconstructed = client.get("/transfer?base=shape_000030&donor=shape_000020&chunks=0").data
    assert all_chunks != reconstructed


@pytest.mark.parametrize("query,status,match", [
    ("donor=2&chunks=1", 400, "give base="),
    ("base=1&chunks=1", 400, "give donor="),
    ("base=1&donor=2", 400, "give chunks="),
    ("base=../../etc/passwd&donor=2&chunks=1", 404, "no indexed image"),
    ("base=1&donor=%2Fetc%2Fpasswd&chunks=1", 404, "no indexed image"),
    ("base=1&donor=2&chunks=9", 400, "out of range"),
])
def test_bad_transfer(client, query, status, match):
    _error(client.get(f"/transfer?{query}"), status, match)


def test_chunks_and_strips(client):
    listing = client.get("/chunks").get_json()
    assert listing["n_chunks"] == 8 and listing["chunk_dim"] == 4
    assert [c["index"] for c in listing["chunks"]] == list(range(8))
    strip = client.get(listing["chunks"][3]["strip"])
    assert strip.status_code == 200 and strip.mimetype == "image/png"
    h, w, _ = _decode(strip.data).shape
    assert w > 6 * 16 and 2 * 16 < h < 3 * 16  # donors on top, the transfers below
    assert client.get("/chunks/3/strip.png").data == strip.data  # rendered once, then cached
    assert _decode(client.get("/chunks/3/strip.png?n=2").data).shape[1] < w
    _error(client.get("/chunks/8/strip.png"), 404, "no chunk 8")
    _error(client.get("/chunks/3/strip.png?n=0"), 400, "n must be")
    _error(client.get("/chunks/-1/strip.png"), 404)


def test_naming_open_on_loopback_only_without_token(own_index):
    client = _app(own_index).test_client()
    named = client.put("/chunks/2", json={"name": "  Hair   colour "})
    assert named.status_code == 200 and named.get_json()["chunks"][2]["name"] == "Hair colour"
    assert Index(own_index).chunk_names()[2] == "Hair colour"  # stored in SQLite
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    _error(client.put("/chunks/2", json={"name": "x"}, environ_base=remote), 403, "RETRIEVAL_TOKEN")
    assert client.put("/chunks/2", json={"name": "y"}, environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    assert client.put("/chunks/2", json={"name": None}).get_json()["chunks"][2]["name"] is None


def test_naming_needs_the_token_when_one_is_set(own_index, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_TOKEN", "s3cret")
    client = create_app({"INDEX": str(own_index)}).test_client()  # token from the environment
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    response = client.put("/chunks/1", json={"name": "x"})
    _error(response, 401, "Bearer")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    _error(client.put("/chunks/1", json={"name": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    ok = client.put("/chunks/1", json={"name": "scale"}, headers={"Authorization": "Bearer s3cret"},
                    environ_base=remote)
    assert ok.status_code == 200 and ok.get_json()["chunks"][1]["name"] == "scale"


@pytest.mark.parametrize("path,kwargs,status,match", [
    ("/chunks/2", {"data": "name=x"}, 400, "JSON body"),
    ("/chunks/2", {"data": "{not json", "content_type": "application/json"}, 400, "JSON body"),
    ("/chunks/2", {"json": ["x"]}, 400, "JSON body"),
    ("/chunks/2", {"data": "[" * 4000, "content_type": "application/json"}, 400, "JSON body"),
    ("/chunks/2", {"data": "[" * 5000, "content_type": "application/json"}, 413, "over 4096 bytes"),
    ("/chunks/2", {"data": b"\xff\xfe", "content_type": "application/json"}, 400, "JSON body"),
    ("/chunks/2", {"json": {"title": "x"}}, 400, "JSON body"),
    ("/chunks/2", {"json": {"name": 5}}, 400, "JSON body"),
    ("/chunks/2", {"json": {"name": "x" * 101}}, 400, "at most 100"),
    ("/chunks/2", {"json": {"name": "a\nb"}}, 400, "printable"),
    ("/chunks/2", {"json": {"name": "7"}}, 400, "cannot be a number"),
    ("/chunks/2", {"json": {"name": "taken"}}, 400, "already named"),
    ("/chunks/8", {"json": {"name": "x"}}, 404, "no chunk 8"),
    ("/chunks/x", {"json": {"name": "x"}}, 404, ""),
])
def test_bad_naming(own_index, path, kwargs, status, match):
    client = _app(own_index).test_client()
    assert client.put("/chunks/5", json={"name": "taken"}).status_code == 200
    _error(client.put(path, **kwargs), status, match)
    assert Index(own_index).chunk_names()[2] is None


# -- errors, health, metrics, OpenAPI -------------------------------------------------------
@pytest.mark.parametrize("method,path,status", [
    ("get", "/no/such/page", 404),
    ("delete", "/search", 405),
    ("post", "/images/1", 405),
    ("put", "/chunks", 405),
    ("get", "/static/../api/__init__.py", 404),
    ("get", "/static/..%2F__init__.py", 404),
])
def test_http_errors_are_json(client, method, path, status):
    _error(getattr(client, method)(path), status)


def test_unexpected_failures_are_a_json_500_without_traceback(app, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(app.extensions["retrieval"].index, "search_many", boom)
    message = _error(app.test_client().get("/search?image=5&chunks=1"), 500)
    assert "secret" not in message and "ZeroDivision" not in message


def test_no_index_configured(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_INDEX", raising=False)
    with pytest.raises(RetrievalError, match="retrieval serve INDEX"):
        create_app({})


def _scrape(client) -> tuple[dict[str, str], dict[tuple, float]]:
    """GET /metrics read by prometheus_client's own parser: each family's type by its name, and
    each sample's value by _sample(name, **labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type == CONTENT_TYPE_LATEST
    families = list(text_string_to_metric_families(response.get_data(as_text=True)))
    return {f.name: f.type for f in families}, {_sample(s.name, **s.labels): s.value for f in families for s in f.samples}


def _sample(name: str, **labels: str) -> tuple:
    return (name, *sorted(labels.items()))


def test_health_and_metrics(api_index):
    client = _app(api_index).test_client()  # a registry of its own: the counts are this test's requests
    health = client.get("/health").get_json()
    assert health == {"status": "ok", "images": 600, "n_chunks": 8, "chunk_dim": 4, "preset": "tiny",
                      "dataset_format": "shapes"}
    for query in ("image=5&chunks=1", "image=6&chunks=2,4", "image=5&chunks=99"):
        client.get(f"/search?{query}")
    client.post("/search", data={"chunks": "1"})  # no file: 400
    types, samples = _scrape(client)

    def total(method: str, endpoint: str, status: int, name: str = "requests") -> float | None:
        return samples.get(_sample(f"retrieval_http_{name}_total", method=method, endpoint=endpoint, status=str(status)))

    assert total("GET", "/health", 200) == 1 and total("GET", "/search", 200) == 2
    assert total("GET", "/search", 400) == total("POST", "/search", 400) == 1
    assert total("GET", "/search", 400, "errors") == total("POST", "/search", 400, "errors") == 1
    assert total("GET", "/search", 200, "errors") is None and total("GET", "/health", 200, "errors") is None
    assert total("GET", "/metrics", 200) is None  # a request is counted once answered
    histogram = "retrieval_http_request_duration_seconds"
    buckets = {float(dict(labels)["le"]): value for (name, *labels), value in samples.items()
               if name == f"{histogram}_bucket" and dict(labels)["endpoint"] == "/search"}
    assert list(buckets) == [*BUCKETS, float("inf")]
    assert list(buckets.values()) == sorted(buckets.values()) and buckets[float("inf")] == 4
    assert samples[_sample(f"{histogram}_count", endpoint="/search")] == 4
    assert samples[_sample(f"{histogram}_count", endpoint="/health")] == 1
    assert samples[_sample(f"{histogram}_sum", endpoint="/search")] > 0
    assert types["retrieval_http_requests"] == types["retrieval_http_errors"] == "counter"
    assert types[histogram] == "histogram" and types["retrieval_index_images"] == "gauge"
    assert samples[_sample("retrieval_index_images")] == 600
    # the client's process and platform collectors, on the app's registry
    assert samples[_sample("process_cpu_seconds_total")] > 0
    assert samples[_sample("process_resident_memory_bytes")] > 0 and samples[_sample("process_open_fds")] > 0
    assert 0 < samples[_sample("process_start_time_seconds")] <= time.time()
    python_info = [dict(labels) for name, *labels in samples if name == "python_info"]
    assert python_info[0]["version"] == platform.python_version()


def _openapi_paths(app) -> set[str]:
    return set(app.test_client().get("/openapi.json").get_json()["paths"])


def test_openapi_covers_every_route(app):
    doc = app.test_client().get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule): r.methods - {"HEAD", "OPTIONS"}
              for r in app.url_map.iter_rules() if not r.rule.startswith("/static")}
    routes["/search"] = {"GET", "POST"}  # two rules, one path
    documented = {p: {m.upper() for m in ops} for p, ops in doc["paths"].items()}
    assert documented == routes
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == set(OPERATIONS)  # all fuzzed


def _declared(view) -> dict[str, tuple]:
    """Where each parameter or body field of a view's schemas is (location, media type), by name."""
    out = {}
    for parameter in view.openapi["parameters"]:
        out.update({name: (parameter["in"],) for name in parameter["schema"]().fields})
    for media, item in view.openapi.get("requestBody", {}).get("content", {}).items():
        out.update({name: ("body", media) for name in item["schema"]().fields})
    return out


def _documented(doc: dict, operation: dict) -> dict[str, tuple]:
    out = {p["name"]: (p["in"],) for p in operation.get("parameters", [])}
    for media, item in operation.get("requestBody", {}).get("content", {}).items():
        schema = doc["components"]["schemas"][item["schema"]["$ref"].rsplit("/", 1)[1]]
        out.update({name: ("body", media) for name in schema["properties"]})
    return out


def test_openapi_lists_exactly_the_fields_each_view_validates(app):
    doc = app.test_client().get("/openapi.json").get_json()
    by_id = {op["operationId"]: op for ops in doc["paths"].values() for op in ops.values()}
    checked = 0
    for endpoint, view in app.view_functions.items():
        if hasattr(view, "openapi"):
            assert _documented(doc, by_id[endpoint]) == _declared(view), endpoint
            checked += bool(_declared(view))
    assert checked == 9  # the operations that take parameters or a body


def test_a_parameter_added_to_a_schema_is_documented_and_validated():
    """The mechanism on an app of one route: the field's limits (one from app.config) are in the
    document, and the same field refuses values outside them."""
    from flask import Flask, jsonify

    from api import errors
    from api.openapi import document, operation
    from api.schemas import Integer, Params

    class Depth(Params):
        depth = Integer(2, "MAX_DEPTH", 7, metadata={"description": "A new parameter."})

    app = Flask("one-route")
    app.config["MAX_DEPTH"] = 321
    errors.register(app)

    @app.get("/deep")
    @operation(query=Depth(), responses={200: {"description": "The depth"}})
    def deep(args):
        return jsonify(args)

    (parameter,) = document(app)["paths"]["/deep"]["get"]["parameters"]
    assert parameter == {"in": "query", "name": "depth", "description": "A new parameter.", "required": False,
                         "schema": {"type": "integer", "minimum": 2, "maximum": 321, "default": 7}}
    client = app.test_client()
    assert client.get("/deep").get_json() == {"depth": 7} and client.get("/deep?depth=321").get_json() == {"depth": 321}
    _error(client.get("/deep?depth=322"), 400, "depth must be an integer from 2 to 321; got '322'")


def test_the_documented_limits_are_the_enforced_ones(api_index):
    client = _app(api_index, MAX_K=50, MAX_OFFSET=70, MAX_BATCH=3).test_client()
    doc = client.get("/openapi.json").get_json()
    params = {p["name"]: p["schema"] for p in doc["paths"]["/search"]["get"]["parameters"]}
    assert (params["k"]["minimum"], params["k"]["maximum"], params["k"]["default"]) == (1, 50, 10)
    assert (params["offset"]["minimum"], params["offset"]["maximum"]) == (0, 70)
    assert doc["components"]["schemas"]["Batch"]["properties"]["queries"]["maxItems"] == 3
    assert client.get("/search?image=5&chunks=1&k=50&offset=70").status_code == 200
    _error(client.get("/search?image=5&chunks=1&k=51"), 400, "k must be an integer from 1 to 50")
    _error(client.get("/search?image=5&chunks=1&offset=71"), 400, "offset must be an integer from 0 to 70")
    _error(client.post("/search/batch", json={"queries": [{"image": 5, "chunks": "1"}] * 4}), 400, "1 to 3 queries")


def test_responses_are_described(app):
    doc = app.test_client().get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]

    def body(path, method, status):
        return doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    assert body("/search", "get", "200") == body("/search", "post", "200") == "#/components/schemas/SearchResult"
    assert body("/health", "get", "200") == "#/components/schemas/Health"
    assert body("/search", "get", "404") == body("/search/batch", "post", "400") == "#/components/schemas/Error"
    assert schemas["Error"]["required"] == ["error"]
    assert set(schemas["ErrorDetail"]["required"]) == {"code", "message"}
    assert set(schemas["SearchResult"]["required"]) == {"query", "chunks", "k", "results", "offset"}
    assert set(schemas["Health"]["properties"]) == set(app.test_client().get("/health").get_json())


def test_docs_list_exactly_the_openapi_paths(app):
    text = (REPO / "docs" / "api.md").read_text()
    in_docs = set(re.findall(r"^#{2,3} `(?:GET|POST|PUT|DELETE) ([^`? ]+)", text, re.M))
    assert in_docs == _openapi_paths(app)


# -- fuzz -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_schema(api_index, tmp_path_factory):
    import schemathesis

    index = tmp_path_factory.mktemp("fuzz") / "idx"
    shutil.copytree(api_index, index)
    return schemathesis.openapi.from_wsgi("/openapi.json", _app(index))


def _routes_document() -> dict:
    """The document the app generates, from its blueprints alone (no index needed at collection)."""
    from flask import Flask

    from api import BLUEPRINTS, DEFAULTS
    from api.openapi import document

    bare = Flask("routes")
    bare.config.from_mapping(DEFAULTS)
    for module in BLUEPRINTS:
        bare.register_blueprint(module.bp)
    return document(bare)


OPERATIONS = [(path, method) for path, ops in _routes_document()["paths"].items() for method in ops]
# operations whose parameters have constraints a request can break (the others take any string)
BREAKABLE = [("/search", "get"), ("/search", "post"), ("/search/batch", "post"), ("/images", "get"),
             ("/transfer", "get"), ("/chunks/{i}", "put"), ("/chunks/{i}/strip.png", "get")]


@pytest.mark.parametrize("path,method,mode", [(*op, "positive") for op in OPERATIONS]
                         + [(*op, "negative") for op in BREAKABLE])
def test_fuzz_openapi_never_5xx(fuzz_schema, path, method, mode):
    """schemathesis draws requests from the OpenAPI document the app serves (conforming ones, and
    ones that break it on purpose): every one must get a non-5xx answer, errors as JSON, and every
    answer must have the documented shape."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    operation = fuzz_schema[path][method]

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 12)), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode(mode)))
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.content[:300])
        assert b"Traceback" not in response.content
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"code", "message"}
        case.validate_response(response, checks=[response_schema_conformance])

    check()


# -- retrieval serve ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_retrieval_serve_answers_and_stops_on_signal(api_index, stop):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RETRIEVAL_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", str(api_index), "--port", str(port),
                             "--threads", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert json.load(r)["images"] == 600
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/search?image=shape_000001&chunks=2,4&k=3", timeout=10) as r:
            assert len(json.load(r)["results"]) == 3
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(base + "/search?image=..%2F..%2Fetc%2Fpasswd&chunks=1", timeout=10)
        assert bad.value.code == 404 and "error" in json.load(bad.value)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}" in out
    assert re.search(r'"GET /search\?image=shape_000001&chunks=2,4&k=3" 200 [\d.]+ ms', out), out
    assert re.search(r'"GET /health" 200', out) and '" 404 ' in out
    assert "stopping" in out and out.rstrip().endswith("stopped")
    assert "Traceback" not in out and "Logging error" not in out
