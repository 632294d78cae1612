"""What an outside attack on `retrieval serve` found (issue 18), one section per finding, each
against an independent reference: a brute-force filter or distance over the stored data, the
raw bytes a real waitress server sends, the log records written. Network use is loopback only;
the slow-client tests hold a bounded number of sockets, each with a timeout."""
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from api import create_app
from api.metrics import METHODS
from api.server import make_server
from retrieval.cli import main
from retrieval.index import Index
from tests.test_api import _app, _error, _png, _png_header, _post, _sample, _scrape

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- a real waitress server in this process, on a loopback port ------------------------------
@contextmanager
def _served(app, connection_limit: int = 100):
    server = make_server(app, "127.0.0.1", 0, threads=2, connection_limit=connection_limit,
                         channel_timeout=30, max_body=app.config["MAX_CONTENT_LENGTH"])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.effective_port
    finally:
        def close_all():  # from the loop's own thread (see tests/test_web.py)
            for channel in list(server._map.values()):
                channel.close()
        server.trigger.pull_trigger(close_all)
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()
        assert not thread.is_alive(), "waitress's loop did not stop"


@pytest.fixture(scope="module")
def port(app):
    with _served(app) as p:
        yield p


def _raw(port: int, data: bytes, timeout: float = 5) -> tuple[int, dict, bytes]:
    """Send bytes as they are; the status, headers and body the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # the server may close with our bytes unread: the answer came first
            pass
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _json_error(status: int, headers: dict, body: bytes, expect: int) -> dict:
    assert status == expect, body
    assert headers["content-type"] == "application/json", (headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and error["message"]
    return error


def _health(port: int, timeout: float = 1.0) -> float:
    """Seconds for GET /health over a new connection; fails past the timeout."""
    start = time.monotonic()
    status, _, body = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout)
    assert status == 200 and json.loads(body)["status"] == "ok"
    return time.monotonic() - start


# -- 1. where: every clause must hold, in the CLI and the API alike ---------------------------
def _brute_filter(index: Path, clauses: list[str]) -> list[int]:
    """Ids whose stored split and attributes satisfy every ATTRIBUTE=VALUE clause."""
    idx = Index(index)
    wanted = [(a, int(v) if re.fullmatch(r"-?\d+", v) else v) for a, v in (c.split("=", 1) for c in clauses)]

    def value(record, attribute):
        return record["split"] if attribute == "split" else record["attributes"].get(attribute)

    return [r["id"] for r in idx.records(idx.ids)
            if all(value(r, a) == (str(v) if a == "split" else v) for a, v in wanted)]


WHERE = [["shape=1", "shape=2"], ["shape=1", "shape=1"], ["shape=1", "shape=01"], ["shape=2", "colour=1"],
         ["split=val", "split=train"], ["shape=0", "split=val", "shape=0"], ["shape=1", "shape=2", "shape=1"]]


@pytest.mark.parametrize("clauses", WHERE, ids=["&".join(c) for c in WHERE])
def test_where_clauses_all_hold(client, api_index, clauses):
    expect = _brute_filter(api_index, clauses)
    where = "".join(f"&where={c}" for c in clauses)
    listing = client.get(f"/images?limit=500{where}").get_json()
    assert listing["total"] == len(expect) and [i["id"] for i in listing["images"]] == expect[:500]
    query = Index(api_index).resolve("shape_000005")
    others = {i for i in expect if i != query}
    found = client.get(f"/search?image=shape_000005&chunks=0&k=1000{where}").get_json()["results"]
    assert {h["id"] for h in found} == others
    # one clause in the query string, the others in the form of an upload
    upload = client.post(f"/search?where={clauses[0]}", content_type="multipart/form-data",
                         data={"file": (io.BytesIO(_png(np.zeros((16, 16, 3), np.uint8))), "q.png"),
                               "chunks": "0", "k": "1000", "where": clauses[1:]}).get_json()["results"]
    assert {h["id"] for h in upload} == set(expect)
    cli = _cli("search", api_index, "--image", "shape_000005", "--chunks", "0", "-k", 1000, "--json",
               *[w for c in clauses for w in ("--where", c)])
    assert cli.exit_code == 0, cli.output
    assert {h["id"] for h in json.loads(cli.output)["results"]} == others


def test_contradictory_where_is_empty_not_the_last_clause(client):
    got = client.get("/search?image=shape_000005&chunks=0&where=shape=1&where=shape=2&k=5").get_json()
    assert got["results"] == []


# -- 2. slow clients cannot starve the service -------------------------------------------------
SLOW = [b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow",          # headers never end
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nabc"]  # body never ends


def test_half_sent_requests_cannot_fill_the_connection_limit(app):
    """40 sockets (2.5 x the limit) that never finish a request: /health still answers in a
    second, time after time; at most 40 sockets, each with a 2 s timeout, closed at the end."""
    with _served(app, connection_limit=16) as port:
        held = []
        try:
            for i in range(40):
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(SLOW[i % 2])
                held.append(s)
            for _ in range(5):
                assert _health(port) < 1.0
            # the eviction took the half-sent requests, oldest first; the newest are still open
            assert _peer_closed(held[0]) and not _peer_closed(held[-1])
        finally:
            for s in held:
                s.close()


def _peer_closed(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_serving_a_request_is_never_evicted(app, monkeypatch):
    """At the limit, connections whose request is being served stay: only idle ones make room."""
    from api import ops

    release, entered = threading.Event(), threading.Event()
    real = ops.health

    def slow_health():
        entered.set()
        release.wait(10)
        return real()

    monkeypatch.setitem(app.view_functions, "ops.health", slow_health)
    with _served(app, connection_limit=8) as port:
        answers = []
        busy = threading.Thread(target=lambda: answers.append(_raw(
            port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 15)))
        busy.start()
        assert entered.wait(10)
        held = []
        try:
            for _ in range(12):
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(SLOW[0])
                held.append(s)
            time.sleep(0.3)
        finally:
            release.set()
            busy.join(15)
            for s in held:
                s.close()
        assert answers and answers[0][0] == 200


# -- 3. metrics: label values from closed sets -------------------------------------------------
def test_invented_methods_and_paths_do_not_grow_the_metrics(api_index):
    client = _app(api_index).test_client()
    client.get("/metrics")  # its own series exist before the first count

    def attack(start: int):
        for i in range(start, start + 100):
            client.open("/health", method=f"X{i}")
            client.open(f"/nope/{i}", method=f"Y{i}")
            client.get(f"/no-such-{i}")

    attack(0)
    _, before = _scrape(client)
    attack(100)
    _, after = _scrape(client)
    assert set(after) == set(before)  # counts grew, series did not
    labels = [dict(sample) for name, *sample in after if name.startswith("retrieval_http_")]
    rules = {r.rule for r in client.application.url_map.iter_rules()}
    assert {l["method"] for l in labels if "method" in l} == {"GET", "other"} <= METHODS | {"other"}
    assert {l["endpoint"] for l in labels} <= rules | {"unmatched"}
    for method, status in [("other", 405), ("other", 404), ("GET", 404)]:
        for name in ("retrieval_http_requests_total", "retrieval_http_errors_total"):
            key = _sample(name, method=method, endpoint="unmatched", status=str(status))
            assert (before[key], after[key]) == (100, 200)


# -- 4. the access log cannot be forged -------------------------------------------------------
def test_request_lines_are_logged_escaped(client, caplog):
    caplog.set_level(logging.INFO, logger="api.access")
    client.get("/nope%0D%0AINFO%20api.access:%20FORGED")
    client.get("/images", environ_overrides={"QUERY_STRING": 'limit=\x1b[31m"x y"\r\nINFO'})
    client.get("/search?image=shape_000001&chunks=2,4&k=3")
    lines = [r.getMessage() for r in caplog.records if r.name == "api.access"]
    assert len(lines) == 3
    assert all(re.fullmatch(r'[\x21-\x7e ]+', line) for line in lines), lines  # printable ASCII only
    assert '"GET /nope%0D%0AINFO%20api.access:%20FORGED" 404' in lines[0]
    assert '"GET /images?limit=%1B[31m%22x%20y%22%0D%0AINFO" 400' in lines[1]
    assert '"GET /search?image=shape_000001&chunks=2,4&k=3" 200' in lines[2]  # ordinary ones read as sent


# -- 5. uploads: dimensions refused before decoding, decoding outside the model lock -----------
@pytest.mark.parametrize("width,height", [(1, 40_000_000), (40_000_000, 1), (10_001, 16)])
def test_extreme_dimensions_are_refused_before_decoding(client, width, height, monkeypatch):
    import disentangle.data.base as base

    monkeypatch.setattr(base, "load_image", lambda *a, **k: pytest.fail("decoded a refused upload"))
    message = _error(_post(client, _png_header(width, height), "strip.png"), 400, "each side may be at most 10,000")
    assert f"{width}x{height}" in message


def test_decoding_does_not_wait_for_the_model(api_index, monkeypatch):
    """While the model lock is held, an upload is still decoded; only its encoding waits."""
    import disentangle.data.base as base

    app = _app(api_index)
    decoded = threading.Event()
    real = base.load_image

    def spy(*args, **kwargs):
        pixels = real(*args, **kwargs)
        decoded.set()
        return pixels

    monkeypatch.setattr(base, "load_image", spy)
    answers = []
    upload = _png(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    worker = threading.Thread(target=lambda: answers.append(_post(app.test_client(), upload)))
    with app.extensions["retrieval"].model_lock:
        worker.start()
        assert decoded.wait(10), "the upload was decoded only once the model was free"
        time.sleep(0.1)
        assert not answers  # ... and its encoding waits for the lock
    worker.join(30)
    assert answers[0].status_code == 200 and len(answers[0].get_json()["results"]) == 10


# -- 6. only the configured host names are answered --------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:5000", "[::1]:5000", "LocalHost.:80", "localhost:1"])
def test_loopback_host_names_are_answered(client, host):
    assert client.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "[::2]:5000", "", "a b"])
def test_a_rebound_name_cannot_rename_or_read(own_index, host):
    client = _app(own_index).test_client()
    _error(client.put("/chunks/3", json={"name": "pwned"}, headers={"Host": host}), 400, "--allowed-host")
    _error(client.get("/chunks", headers={"Host": host}), 400, "--allowed-host")
    assert Index(own_index).chunk_names()[3] is None


def test_configured_host_names(own_index, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_ALLOWED_HOSTS", "search.example, Other.Example")
    client = create_app({"INDEX": str(own_index), "TOKEN": None}).test_client()
    for host in ("search.example", "search.example:8443", "other.example", "localhost:5000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    _error(client.get("/health", headers={"Host": "x.search.example"}), 400, "search.example")


def test_naming_through_a_local_proxy_needs_the_token(own_index):
    """A proxy on this machine connects from loopback for everyone: its Host gives it away."""
    client = _app(own_index, ALLOWED_HOSTS=["search.example"]).test_client()
    _error(client.put("/chunks/3", json={"name": "shape"}, headers={"Host": "search.example"}), 403, "RETRIEVAL_TOKEN")
    assert Index(own_index).chunk_names()[3] is None
    assert client.put("/chunks/3", json={"name": "shape"}, headers={"Host": "127.0.0.1:5000"}).status_code == 200


@pytest.mark.parametrize("path", ["//evil.example", "//evil.example/search", "/images//5", "/chunks//3",
                                  "/chunks/3//strip.png"])
def test_no_redirect_points_anywhere(client, path):
    """Merged slashes used to answer 308 (HTML) to Location http://evil.example/...: now a JSON 404."""
    response = client.get("/", environ_overrides={"PATH_INFO": path})
    _error(response, 404)
    assert "Location" not in response.headers


# -- 7. weights: a range the exact search honours ----------------------------------------------
@pytest.mark.parametrize("weights", ["1e-320,1e-320", "1e-7,1", "1,2e6", "1e-300,1e300"])
def test_degenerate_weights_are_refused(client, api_index, weights):
    _error(client.get(f"/search?image=shape_000005&chunks=0,1&weights={weights}"), 400, "from 1e-06 to 1e+06")
    cli = _cli("search", api_index, "--image", "shape_000005", "--chunks", "0,1", "--weights", weights)
    assert cli.exit_code != 0 and "from 1e-06 to 1e+06" in cli.output


@pytest.mark.parametrize("weights", ["1e-6,1e-6", "1e6,1e6", "1e-6,1e6", "1e6,1e-6", "0.5,3"])
def test_weights_in_range_rank_like_a_float64_brute_force(client, api_index, weights):
    idx = Index(api_index)
    q = idx.resolve("shape_000005")
    feats = idx.features().astype(np.float64)  # (N, chunks, dim) in id order
    w = [float(x) for x in weights.split(",")]
    d = sum(wc * ((feats[:, c] - feats[idx.ids == q][0, c]) ** 2).sum(1) for c, wc in zip([0, 1], w))
    order = [i for i in np.lexsort((idx.ids, d)) if idx.ids[i] != q][:20]
    got = client.get(f"/search?image=shape_000005&chunks=0,1&k=20&weights={weights}").get_json()["results"]
    assert [h["id"] for h in got] == idx.ids[order].tolist()
    np.testing.assert_allclose([h["distance"] for h in got], d[order], rtol=1e-12)


def test_a_common_scale_does_not_change_the_ranking(client):
    ids = {w: [h["id"] for h in client.get(f"/search?image=shape_000005&chunks=0,1&k=30&weights={w}")
               .get_json()["results"]] for w in ("1,1", "1e-6,1e-6", "1e6,1e6", "7,7")}
    assert len({tuple(v) for v in ids.values()}) == 1, ids


@pytest.mark.parametrize("weights", ["1_0,1", "inf,1", "0x1,1", "1,", " ,1"])
def test_weights_are_plain_decimals(client, weights):
    _error(client.get(f"/search?image=shape_000005&chunks=0,1&weights={weights}"), 400, "weights must be")


# -- 8. chunk names: one grammar, enforced on write; numbers and names never meet --------------
BAD_NAMES = [("a,b", "comma"), ("+5", "cannot be a number"), ("٣", "cannot be a number"),
             ("５", "cannot be a number"), ("1e3", "cannot be a number"), ("inf", "cannot be a number"),
             ("1_000", "cannot be a number"), ("-0", "cannot be a number"), ("²", "cannot be a number"),
             ("a\tb", "printable"), ("x" * 101, "at most 100"), ("\u200bx", "printable")]


@pytest.mark.parametrize("name,match", BAD_NAMES, ids=[repr(n)[:12] for n, _ in BAD_NAMES])
def test_names_outside_the_grammar_are_refused(own_index, name, match):
    client = _app(own_index).test_client()
    _error(client.put("/chunks/3", json={"name": name}), 400, match)
    cli = _cli("chunks", own_index, "--name", 3, name)
    assert cli.exit_code != 0 and match in cli.output
    assert Index(own_index).chunk_names()[3] is None


def test_a_blank_name_clears_instead_of_storing_an_empty_one(own_index):
    client = _app(own_index).test_client()
    assert client.put("/chunks/3", json={"name": "shape"}).status_code == 200
    listing = client.put("/chunks/3", json={"name": "   "}).get_json()
    assert listing["chunks"][3]["name"] is None and Index(own_index).chunk_names()[3] is None


@pytest.mark.parametrize("name,spelling", [("5_o_Clock_Shadow", "5 o clock shadow"), ("hair colour", "HAIR_COLOUR"),
                                           ("Haarfarbe", "haarfarbe"), ("x and y", "x_and_y"),
                                           ("ｓｈａｐｅ", "shape"), ("Straße", "STRASSE")])
def test_every_valid_name_is_reachable(own_index, name, spelling):
    client = _app(own_index).test_client()
    assert client.put("/chunks/3", json={"name": name}).get_json()["chunks"][3]["name"] == name
    by_name = client.get("/search", query_string={"image": "shape_000005", "chunks": f"1,{spelling}"}).get_json()
    assert by_name == client.get("/search?image=shape_000005&chunks=1,3").get_json()
    assert by_name["chunks"] == [1, 3]


@pytest.mark.parametrize("spelling", ["+5", "٣", "５", "5.0", "0x5", "+3"])
def test_chunk_numbers_are_ascii_digits_only(client, spelling):
    _error(client.get("/search", query_string={"image": "shape_000005", "chunks": spelling}), 400, "unknown chunk")


@pytest.mark.parametrize("header,status", [("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER s3cret", 200),
                                           ("Bearer   s3cret ", 200), ("Basic s3cret", 401),
                                           ("Bearers3cret", 401), ("bearer nope", 401), ("s3cret", 401)])
def test_the_bearer_scheme_is_case_insensitive(own_index, header, status):
    client = _app(own_index, TOKEN="s3cret").test_client()
    response = client.put("/chunks/1", json={"name": "scale"}, headers={"Authorization": header},
                          environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert response.status_code == status, response.get_json()
    assert Index(own_index).chunk_names()[1] == ("scale" if status == 200 else None)


# -- 9. what the WSGI server answers on its own is JSON too -------------------------------------
_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: "
WAITRESS = [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", 400, "bad_request"),
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n\r\n", 413, "payload_too_large"),
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10485761\r\n\r\n", 413, "payload_too_large"),
    (_HEAD + b"a" * (262_144 - len(_HEAD)), 431, "headers_too_large"),  # exactly the limit: none left unread
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
    (b"GET //evil.example HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 404, "not_found"),
    (b"GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 400, "unknown_host"),
]


@pytest.mark.parametrize("request_bytes,status,code", WAITRESS,
                         ids=["request-line", "header-line", "content-length", "over-max-content", "headers",
                              "transfer-coding", "double-slash", "host"])
def test_server_level_errors_are_json(port, request_bytes, status, code):
    status_got, headers, body = _raw(port, request_bytes)
    assert _json_error(status_got, headers, body, status)["code"] == code
    assert headers["x-content-type-options"] == "nosniff"


# -- `retrieval serve` with the new options, as a process ---------------------------------------
def test_retrieval_serve_with_limits(api_index):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RETRIEVAL_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", str(api_index), "--port", "0",
                             "--threads", "2", "--connection-limit", "12", "--channel-timeout", "5",
                             "--allowed-host", "search.example"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, started = [], threading.Event()

    def read():
        for line in proc.stdout:
            log.append(line)
            if " on http://" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    held = []
    try:
        assert started.wait(60), "".join(log)
        port = int(re.search(r" on http://127\.0\.0\.1:(\d+) ", "".join(log))[1])
        assert _raw(port, b"GET /health HTTP/1.1\r\nHost: search.example\r\nConnection: close\r\n\r\n")[0] == 200
        assert _raw(port, b"GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")[0] == 400
        _json_error(*_raw(port, b"GARBAGE\r\n\r\n"), 400)
        _raw(port, b"GET /nope%0D%0AINFO%20api.access:%20FORGED HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(SLOW[i % 2])
            held.append(s)
        for _ in range(3):
            assert _health(port) < 1.0
    finally:
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    text = "".join(log)
    assert proc.returncode == 0, text
    assert not any(line.startswith("INFO api.access: FORGED") for line in log), text
    assert "/nope%0D%0AINFO%20api.access:%20FORGED" in text
    assert "at the connection limit (12)" in text and "Traceback" not in text
