"""The index's metadata (SQLAlchemy 2.0 ORM): images, chunk names, builds; in the index's SQLite
file by default, or in a server database (PostgreSQL) given by URL, the same tables either way.

An image's `id` is also its id in every per-chunk FAISS file.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from disentangle.errors import RetrievalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True, index=True)   # stable across rebuilds
    path: Mapped[str] = mapped_column(String)                           # relative to the dataset root
    split: Mapped[str | None] = mapped_column(String, nullable=True)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"))


class Chunk(Base):
    __tablename__ = "chunks"

    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String, nullable=True, unique=True)


class Build(Base):
    __tablename__ = "builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String)
    added: Mapped[int] = mapped_column(Integer, default=0)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def is_url(target: str | Path) -> bool:
    """Whether target names a server database (postgresql://...) rather than a SQLite file."""
    return isinstance(target, str) and "://" in target


def database_url(url: str) -> str:
    """url as the manifest keeps it: no password (libpq reads PGPASSWORD or ~/.pgpass), and a
    RetrievalError for anything but PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RetrievalError(f"--db {url!r} is not a database URL; write postgresql://USER@HOST:PORT/DATABASE") from None
    if parsed.get_backend_name() != "postgresql":
        raise RetrievalError(f"--db {parsed.get_backend_name()!r}: a server database must be PostgreSQL "
                             "(postgresql://USER@HOST:PORT/DATABASE); leave --db out for the index's SQLite file")
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database,
                      parsed.query)
    return bare.render_as_string(hide_password=False)


def connect(target: str | Path, create: bool = False) -> Engine:
    """An engine on the SQLite file at target (WAL journal, so a kill never leaves a half-written
    commit), or on a postgresql:// URL (psycopg 3 unless the URL names another driver)."""
    if is_url(target):
        url = make_url(target)
        if url.drivername == "postgresql":  # SQLAlchemy's default there is psycopg2
            url = url.set(drivername="postgresql+psycopg")
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ImportError:
            raise RetrievalError("PostgreSQL metadata needs its driver: pip install 'chunk-retrieval[cluster]' "
                                 "(psycopg)") from None
    else:
        engine = create_engine(f"sqlite:///{Path(target)}")

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

    if create:
        Base.metadata.create_all(engine)
    return engine
