"""Metadata in PostgreSQL (`retrieval index --db postgresql://...`): what only a server database
can get wrong. The index tests themselves run on both databases (tests/test_index.py)."""
import json
import socket

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from disentangle.errors import RetrievalError
from indexer.build import DATABASE, build_index
from indexer.schema import Image, connect
from retrieval.index import Index
from retrieval.records import RecordLookup
from tests.test_cli import fails, ok


@pytest.fixture(scope="module")
def pg_index(tmp_path_factory, tiny_model, postgres):
    out = tmp_path_factory.mktemp("pg") / "shapes"
    url = postgres.database()
    build_index("shapes:300", tiny_model, out, db=url)
    return out, url


def test_the_tables_are_in_postgresql_and_the_folder_has_no_sqlite(pg_index):
    out, url = pg_index
    assert json.loads((out / "manifest.json").read_text())["database"] == url
    assert not (out / DATABASE).exists()
    idx = Index(out)
    assert idx.engine.dialect.name == "postgresql" and not idx._lookup.prepared  # the Core path
    with Session(connect(url)) as s:
        rows = {im.id: im for im in s.scalars(select(Image))}
    assert sorted(rows) == idx.ids.tolist()
    some = idx.ids[::37].tolist()
    assert [r["key"] for r in idx.records(some)] == [rows[i].key for i in some]
    assert [r["attributes"] for r in idx.records(some)] == [rows[i].attributes for i in some]


def test_typed_filters_match_as_in_sqlite(pg_index, tmp_path, tiny_model):
    """An int matches JSON numbers, a str JSON strings: the same answers on both databases."""
    lite = tmp_path / "lite"
    build_index("shapes:300", tiny_model, lite)
    pg, lt = Index(pg_index[0]), Index(lite)
    for where in ({"shape": 1}, {"shape": "1"}, {"split": "val", "shape": 2}, {"shape": (1, 2)},
                  {"colour": 3, "split": "train"}):
        np.testing.assert_array_equal(pg.allowed(where), lt.allowed(where))
    assert pg.allowed({"shape": 1}).any() and not pg.allowed({"shape": "1"}).any()
    with pytest.raises(RetrievalError, match="no image has attribute 'beard'"):
        pg.allowed({"beard": 1})


def test_db_given_for_an_index_elsewhere_is_refused(pg_index, tmp_path, tiny_model, postgres):
    out, url = pg_index
    other = postgres.database()
    fails("index", "shapes:300", "--model", tiny_model, "--out", out, "--db", other, match="keeps its metadata")
    ok("index", "shapes:300", "--model", tiny_model, "--out", out, "--db", url)  # the same URL is fine
    fails("index", "shapes:10", "--model", tiny_model, "--out", tmp_path / "new", "--db", url,
          match="already holds the metadata of 300 images")
    assert not (tmp_path / "new" / "manifest.json").exists()
    fails("index", "shapes:10", "--model", tiny_model, "--out", tmp_path / "x", "--db", "mysql://u@h/d",
          match="must be PostgreSQL")


def test_password_stays_out_of_the_manifest(tmp_path, tiny_model, postgres):
    url = postgres.database()
    with_password = url.replace("postgres@", "postgres:secret@")  # trust auth ignores it
    build_index("shapes:20", tiny_model, tmp_path / "idx", db=with_password)
    text = (tmp_path / "idx" / "manifest.json").read_text()
    assert "secret" not in text and json.loads(text)["database"] == url
    assert len(Index(tmp_path / "idx")) == 20


def test_unreachable_server_is_one_line(pg_index, tmp_path):
    import shutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket closes
    shutil.copytree(pg_index[0], tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["database"] = f"postgresql://postgres@127.0.0.1:{closed}/none"
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    fails("search", tmp_path / "idx", "--image", "shape_000001", "--chunks", "1", match="cannot read the metadata")


def test_record_lookup_core_path_on_postgresql(pg_index):
    idx = Index(pg_index[0])
    lookup = RecordLookup(idx.engine)
    assert not lookup.prepared
    key = idx.records([idx.ids[5]])[0]["key"]
    assert lookup.id_of(key) == idx.ids[5] and lookup.id_of("nope") is None
