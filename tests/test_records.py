"""retrieval/records.py: the per-request lookups answer exactly what the ORM reads, on the
prepared sqlite3 path and on the SQLAlchemy Core path, from many threads, and see later commits."""
import random
import shutil
import threading

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from indexer.build import DATABASE
from indexer.schema import Image, connect
from retrieval.records import RecordLookup


@pytest.fixture()
def db(api_index, tmp_path):
    """A copy of the shared shapes index's database that a test may write to."""
    shutil.copy(api_index / DATABASE, tmp_path / DATABASE)
    return connect(tmp_path / DATABASE)


def _orm_records(engine) -> dict[int, dict]:
    with Session(engine) as s:
        return {im.id: {"id": im.id, "key": im.key, "path": im.path, "split": im.split,
                        "attributes": im.attributes or {}} for im in s.scalars(select(Image))}


@pytest.fixture(params=[True, False], ids=["prepared", "core"])
def lookup(request, db):
    found = RecordLookup(db, prepared=request.param)
    assert found.prepared is request.param
    return found


def test_records_equal_the_orm_in_the_order_asked(lookup, db):
    reference = _orm_records(db)
    ids = list(reference)
    random.Random(0).shuffle(ids)
    ids = ids[:37] + ids[:3]  # an id asked twice comes back twice
    assert lookup.records(ids) == [reference[i] for i in ids]
    assert lookup.records([]) == []
    assert any(r["attributes"] for r in reference.values())  # the shapes' factors are there


def test_key_lookup(lookup, db):
    reference = _orm_records(db)
    for i in list(reference)[:50]:
        assert lookup.id_of(reference[i]["key"]) == i
    assert lookup.id_of("no-such-key") is None
    assert lookup.id_of(str(next(iter(reference)))) is None  # an id is not a key


def test_key_of_an_id(lookup, db):
    reference = _orm_records(db)
    for i in list(reference)[:50]:
        assert lookup.key_of(i) == reference[i]["key"]
    with pytest.raises(KeyError):
        lookup.key_of(max(reference) + 1)


def test_unknown_id_raises(lookup, db):
    with pytest.raises(KeyError):
        lookup.records([max(_orm_records(db)) + 1])


def test_many_threads_each_get_their_own_rows(lookup, db):
    reference = _orm_records(db)
    ids = list(reference)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(40):
            asked = rng.sample(ids, 10)
            if lookup.records(asked) != [reference[i] for i in asked]:
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_later_commits_are_seen_and_null_attributes_read_as_no_attributes(lookup, db):
    first = next(iter(_orm_records(db)))
    lookup.records([first])  # the thread's connection is open before the write
    with Session(db) as s, s.begin():
        s.execute(update(Image).where(Image.id == first).values(attributes={"renamed": 1}))
    assert lookup.records([first])[0]["attributes"] == {"renamed": 1}
    with Session(db) as s, s.begin():
        s.execute(update(Image).where(Image.id == first).values(attributes=None))
    assert lookup.records([first])[0]["attributes"] == {}
