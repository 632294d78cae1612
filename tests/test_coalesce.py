"""Concurrent searches with equal options share one search-core call (api/coalesce.py): each caller
gets its own answer, equal to the one it gets alone; different options never wait for each other;
an error reaches everyone of its batch and the next call still works."""
import threading
import time

import pytest

from api.coalesce import Coalescer
from tests.test_api import _app, _sample, _scrape

WAIT = 10  # seconds any test waits for a thread at most


class GatedSearch:
    """search(queries, options) -> [(query, options["tag"])...]; the first call blocks until released."""

    def __init__(self, fail: bool = False, bad: tuple = ()):
        self.calls: list[list] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail, self.bad = fail, bad  # fail: every call (bad options); bad: calls holding these queries

    def __call__(self, queries: list, options: dict) -> list:
        self.calls.append(list(queries))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(WAIT)
        if self.fail:
            raise ValueError(f"bad options {options['tag']}")
        if set(queries) & set(self.bad):
            raise ValueError(f"bad query among {sorted(queries)}")
        return [(q, options["tag"]) for q in queries]


def _start(coalescer: Coalescer, query, tag: str, out: dict) -> threading.Thread:
    def call():
        try:
            out[query] = coalescer(query, {"tag": tag}, tag)
        except ValueError as e:
            out[query] = e

    t = threading.Thread(target=call)
    t.start()
    return t


def _queued(coalescer: Coalescer, key, n: int) -> None:
    deadline = time.monotonic() + WAIT
    while len(coalescer._queued.get(key, ())) < n:
        assert time.monotonic() < deadline, "the callers never queued"
        time.sleep(0.001)


def _first_then_rest(c: Coalescer, search: GatedSearch, n: int) -> dict:
    """Query 0 searches alone under key "a"; queries 1..n-1 arrive meanwhile; then the gate opens.
    Returns each query's answer (or error) once every caller is back."""
    out: dict = {}
    first = _start(c, 0, "a", out)
    assert search.entered.wait(WAIT)
    rest = [_start(c, q, "a", out) for q in range(1, n)]
    _queued(c, "a", n - 1)
    search.release.set()
    for t in [first, *rest]:
        t.join(WAIT)
    return out


def test_callers_that_arrive_during_a_search_share_the_next_call():
    search = GatedSearch()
    c = Coalescer(search)
    out = _first_then_rest(c, search, 6)
    assert search.calls[0] == [0]
    assert sorted(search.calls[1]) == [1, 2, 3, 4, 5] and len(search.calls) == 2
    assert out == {q: (q, "a") for q in range(6)}  # each its own answer
    assert c._queued == {} and c._running == set()


def test_other_options_do_not_wait():
    search = GatedSearch()
    c = Coalescer(search)
    out: dict = {}
    blocked = _start(c, 0, "a", out)
    assert search.entered.wait(WAIT)
    other = _start(c, 1, "b", out)
    other.join(WAIT)
    assert out == {1: (1, "b")}  # answered while "a" is still searching
    search.release.set()
    blocked.join(WAIT)
    assert out == {0: (0, "a"), 1: (1, "b")}


def test_an_error_reaches_its_whole_batch_and_the_next_call_works():
    search = GatedSearch(fail=True)
    c = Coalescer(search)
    out = _first_then_rest(c, search, 3)
    assert all(isinstance(out[q], ValueError) and "bad options a" in str(out[q]) for q in range(3))
    assert len({id(out[q]) for q in range(3)}) == 3  # each caller raises its own exception
    search.fail = False
    assert c(7, {"tag": "a"}, "a") == (7, "a")
    assert c._queued == {} and c._running == set()


def test_a_bad_query_fails_only_its_own_caller():
    search = GatedSearch(bad=(3,))
    c = Coalescer(search)
    out = _first_then_rest(c, search, 5)
    assert isinstance(out[3], ValueError) and "bad query among [3]" in str(out[3])
    assert {q: out[q] for q in (0, 1, 2, 4)} == {q: (q, "a") for q in (0, 1, 2, 4)}
    assert sorted(search.calls[1]) == [1, 2, 3, 4]  # the shared call failed, then each alone
    assert sorted(map(tuple, search.calls[2:])) == [(1,), (2,), (3,), (4,)]


def test_a_search_that_returns_too_few_answers_frees_the_key():
    c = Coalescer(lambda queries, options: [])
    for _ in range(2):  # the second call would block forever if the first left the key running
        with pytest.raises(ValueError):  # zip(strict=True): fewer answers than queries
            c(0, {}, "k")
    assert c._queued == {} and c._running == set()


def test_a_lone_caller_searches_at_once():
    calls = []
    c = Coalescer(lambda queries, options: calls.append(queries) or [q * 2 for q in queries])
    assert [c(q, {}, "k") for q in range(3)] == [0, 2, 4]
    assert calls == [[0], [1], [2]]


def test_concurrent_requests_equal_their_answers_alone(api_index):
    """Eight GET /search requests held back while one searches are answered by one more call,
    each exactly as when asked alone; /metrics counts the calls by their number of queries."""
    app = _app(api_index)
    urls = [f"/search?image={i}&chunks=1,3&k=5" for i in range(1, 10)]
    alone = {u: app.test_client().get(u).get_json() for u in urls}
    r = app.extensions["retrieval"]
    search_many, entered, release = r.index.search_many, threading.Event(), threading.Event()

    def gated(queries, *args, **kwargs):
        if not entered.is_set():
            entered.set()
            assert release.wait(WAIT)
        return search_many(queries, *args, **kwargs)

    r.index.search_many = gated
    got: dict = {}

    def get(url):
        got[url] = app.test_client().get(url).get_json()

    threads = [threading.Thread(target=get, args=(urls[0],))]
    threads[0].start()
    assert entered.wait(WAIT)
    threads += [threading.Thread(target=get, args=(u,)) for u in urls[1:]]
    for t in threads[1:]:
        t.start()
    key = next(iter(r.coalescer._running))
    _queued(r.coalescer, key, len(urls) - 1)
    release.set()
    for t in threads:
        t.join(WAIT)
    assert got == alone
    _, samples = _scrape(app.test_client())
    name = "retrieval_search_core_queries"
    # the 9 alone, then one call of 1 and one of 8
    assert samples[_sample(f"{name}_count")] == len(urls) + 2
    assert samples[_sample(f"{name}_sum")] == 2 * len(urls)
    assert samples[_sample(f"{name}_bucket", le="4.0")] == len(urls) + 1
    assert samples[_sample(f"{name}_bucket", le="8.0")] == len(urls) + 2


@pytest.mark.parametrize("where", ["", "&where=split=val"])
def test_a_bad_option_fails_alone_and_does_not_block(api_index, where):
    """A filter on an unknown attribute is a 400 through the coalescer too, and the next request
    with the same options is still answered."""
    client = _app(api_index).test_client()
    bad = client.get(f"/search?image=1&chunks=2&where=nosuch=1{where}")
    assert bad.status_code == 400, bad.get_data(as_text=True)
    good = client.get(f"/search?image=1&chunks=2{where}")
    assert good.status_code == 200 and good.get_json()["results"]
