"""The index's metadata in SQLite (SQLAlchemy 2.0 ORM): images, chunk names, builds.

An image's `id` is also its id in every per-chunk FAISS file.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, create_engine, event
from sqlalchemy.engine import Engine
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


def connect(path: str | Path, create: bool = False) -> Engine:
    """An engine on the SQLite file; WAL journal so a kill never leaves a half-written commit."""
    engine = create_engine(f"sqlite:///{Path(path)}")

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _record):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    if create:
        Base.metadata.create_all(engine)
    return engine
