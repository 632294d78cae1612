"""The metadata lookups on every request's path: the id of an image's key (and the key of a query
given by id), and the records (key, path, split, attributes) of the k results.

Through SQLAlchemy each costs 0.25 to 1 ms of Python holding the GIL, about as much as
searching one 200K-image chunk (docs/benchmarks.md, "One request"). On SQLite they run here as
two fixed statements, prepared once per thread on that thread's own connection (sqlite3 caches
them): 0.01 ms for a key, 0.2 ms for 10 records with their attributes decoded. Any other
database takes the same two queries through SQLAlchemy Core. Filters and everything else stay
with the ORM (retrieval/index.py).
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence

import orjson
from sqlalchemy import bindparam, select
from sqlalchemy.engine import Engine

from indexer.schema import Image

_COLUMNS = "id, key, path, split, attributes"
# one statement for any number of ids: the ids travel as one JSON array, read by json_each
_RECORDS_SQL = f"SELECT {_COLUMNS} FROM images WHERE id IN (SELECT value FROM json_each(?))"
_KEY_SQL = "SELECT id FROM images WHERE key = ?"
_KEY_OF_SQL = "SELECT key FROM images WHERE id = ?"

_RECORDS = select(Image.id, Image.key, Image.path, Image.split, Image.attributes).where(
    Image.id.in_(bindparam("ids", expanding=True)))
_KEY = select(Image.id).where(Image.key == bindparam("key"))
_KEY_OF = select(Image.key).where(Image.id == bindparam("id"))


class RecordLookup:
    """Key -> id and ids -> records for one index's database, safe from many threads."""

    def __init__(self, engine: Engine, prepared: bool | None = None):
        """prepared: the sqlite3 path (default: whenever the database is a SQLite file)."""
        self.engine = engine
        self._file = engine.url.database if engine.dialect.name == "sqlite" else None
        self._local = threading.local()  # a thread's connection closes when the thread ends
        wanted = bool(self._file) if prepared is None else prepared and bool(self._file)
        self.prepared = wanted and self._has_json_each()

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit: each SELECT reads the latest commit (chunk names renamed meanwhile)
            conn = self._local.conn = sqlite3.connect(self._file, isolation_level=None)
        return conn

    def _has_json_each(self) -> bool:
        try:  # JSON1 is built into SQLite >= 3.38; an older library takes the Core path
            self._connection().execute("SELECT value FROM json_each('[1]')").fetchall()
        except sqlite3.OperationalError:
            return False
        return True

    def id_of(self, key: str) -> int | None:
        """The id stored for key, or None."""
        if self.prepared:
            row = self._connection().execute(_KEY_SQL, (key,)).fetchone()
            return None if row is None else row[0]
        with self.engine.connect() as conn:
            return conn.scalar(_KEY, {"key": key})

    def key_of(self, i: int) -> str:
        """The key of id i (a query's, without decoding its attributes); KeyError if not stored."""
        if self.prepared:
            row = self._connection().execute(_KEY_OF_SQL, (int(i),)).fetchone()
            key = None if row is None else row[0]
        else:
            with self.engine.connect() as conn:
                key = conn.scalar(_KEY_OF, {"id": int(i)})
        if key is None:
            raise KeyError(i)
        return key

    def records(self, ids: Sequence[int]) -> list[dict]:
        """id, key, path, split and attributes of each id, in the order given; KeyError for an
        id the database does not hold."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        if self.prepared:
            found = self._connection().execute(_RECORDS_SQL, (json.dumps(ids),)).fetchall()
            # SQLAlchemy's JSON column stores json.dumps text; NULL reads as no attributes
            rows = {r[0]: (r[1], r[2], r[3], orjson.loads(r[4]) if r[4] is not None else None) for r in found}
        else:
            with self.engine.connect() as conn:
                rows = {r[0]: r[1:] for r in conn.execute(_RECORDS, {"ids": ids})}
        out = []
        for i in ids:
            key, path, split, attributes = rows[i]
            out.append({"id": i, "key": key, "path": path, "split": split, "attributes": attributes or {}})
        return out
