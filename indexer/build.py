"""`retrieval index`: encode a dataset into INDEX/ (manifest, metadata in SQLite or PostgreSQL, one
FAISS file per chunk, the model), incrementally and crash-safely.

Crash safety rests on one order of writes: every batch of new images goes first into all chunk
files (each replaced atomically), then into the database in one transaction. So the FAISS files
hold a superset of the committed ids at every moment; opening the index for writing drops the
ids the database never committed, and a kill -9 anywhere costs at most the batch in flight.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from disentangle import checkpoint
from disentangle.data import open_dataset
from disentangle.errors import RetrievalError

from . import faiss_files
from .encode import encode_batches, pick_device
from .schema import Base, Build, Chunk, Image, connect, database_url, is_url, now

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST, DATABASE, MODEL = "manifest.json", "meta.sqlite", "model.pt"
_OWN_FILES = {DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal", MODEL}


@dataclass(frozen=True)
class BuildReport:
    added: int
    total: int
    already_indexed: int
    seconds: float


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(index_dir: Path) -> dict | None:
    path = index_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RetrievalError(f"{path} is not valid JSON (corrupted?); rebuild with --rebuild") from None


def write_manifest(index_dir: Path, manifest: dict) -> None:
    tmp = index_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, index_dir / MANIFEST)


def _serving_model(ckpt: dict) -> dict:
    """The checkpoint without optimisers, discriminator and classifier: what search needs."""
    tc = dict(ckpt["train_config"], losses=[x for x in ckpt["train_config"]["losses"] if x != "c"])
    ae = {k: v for k, v in ckpt["models"]["autoencoder"].items() if not k.startswith("classifier.")}
    served = {"format": ckpt["format"], "step": ckpt["step"], "model_config": ckpt["model_config"],
              "train_config": tc, "models": {"autoencoder": ae, "discriminator": None}}
    if ckpt.get("chunk_groups"):  # the layout the stored features have (disentangle/grouping.py)
        served["chunk_groups"] = ckpt["chunk_groups"]
    return served


def _prepare_folder(out: Path, sha: str, data_id: str, rebuild: bool) -> dict | None:
    """Check `out` can take this build; returns its manifest when it is an index already."""
    manifest = read_manifest(out)
    if manifest is None:
        if out.exists():
            names = [p.name for p in out.iterdir()]
            if not all(n in _OWN_FILES or n.endswith(".tmp") for n in names):
                raise RetrievalError(f"{out} exists and is not an index; choose an empty or new --out")
            for n in names:  # the start of a build killed before its manifest was written
                (out / n).unlink()
        return None
    if rebuild:
        shutil.rmtree(out)
        return None
    if manifest["checkpoint_sha256"] != sha:
        raise RetrievalError(f"{out} was built with another checkpoint; pass --rebuild to re-encode "
                             "every image with this one, or choose another --out")
    if manifest["dataset"] != data_id:
        raise RetrievalError(f"{out} indexes {manifest['dataset']}, not {data_id}; index that data "
                             "into another --out (or pass --rebuild)")
    return manifest


def metadata_target(out: Path, manifest: dict | None, db: str | None, rebuild: bool = False) -> str | Path:
    """Where the index's metadata lives: --db (as given, password included), else the database
    its manifest names, else INDEX/meta.sqlite; a RetrievalError when --db names another
    database than the index's."""
    kept = manifest.get("database") if manifest else None
    bare = database_url(db) if db else None  # refuses anything but PostgreSQL
    if manifest is not None and not rebuild and bare and bare != kept:
        where = kept or f"its own {DATABASE}"
        raise RetrievalError(f"{out} keeps its metadata in {where}, not in {bare}; give "
                             "the same --db (or none), or pass --rebuild to start over elsewhere")
    return db or kept or out / DATABASE


def _open_server_database(url: str, new: bool, rebuild: bool):
    """The engine on a server database with the index's tables; a new index's tables start empty."""
    engine = connect(url)
    if new:
        with Session(engine) as s:
            held = s.scalar(select(func.count(Image.id))) if inspect(engine).has_table("images") else 0
        if held and not rebuild:
            raise RetrievalError(f"{database_url(url)} already holds the metadata of {held} images of another index; "
                                 "give an empty database, or pass --rebuild to replace them")
        Base.metadata.drop_all(engine)  # also the chunk rows of a start killed before its manifest
    Base.metadata.create_all(engine)
    return engine


def open_chunk_files(out: Path, engine, n_chunks: int, dim: int) -> list:
    """The chunk indexes, reconciled with the database: ids it never committed are dropped."""
    with Session(engine) as s:
        committed = np.array(s.scalars(select(Image.id).order_by(Image.id)).all(), dtype=np.int64)
    indexes = []
    for c in range(n_chunks):
        path = faiss_files.chunk_path(out, c)
        if not path.exists() and len(committed) == 0:
            indexes.append(faiss_files.new_index(dim))
            continue
        index = faiss_files.read(path)
        stored = faiss_files.ids_of(index)
        extra = np.setdiff1d(stored, committed)
        if len(extra):
            log.info("chunk %d: dropping %d ids of an interrupted build", c, len(extra))
            index.remove_ids(extra)
            faiss_files.write_atomic(index, path)
        if not np.array_equal(faiss_files.ids_of(index), committed):
            raise RetrievalError(f"{path} disagrees with the metadata of {out} ({index.ntotal} vs "
                                 f"{len(committed)} images); rebuild with --rebuild")
        indexes.append(index)
    return indexes


class _Rows:
    """Feature batches of one encoding stream, taken n rows at a time (a batch may straddle commits)."""

    def __init__(self, batches):
        self.batches, self.rest = iter(batches), None

    def take(self, n: int):
        """Arrays of n rows in all, in stream order."""
        while n > 0:
            f = self.rest if self.rest is not None else next(self.batches)
            self.rest = f[n:] if len(f) > n else None
            yield f[:n]
            n -= len(f[:n])


def build_index(data: str, model_path: str | Path, out: str | Path, *, fmt: str | None = None,
                split: str | None = None, rebuild: bool = False, batch_size: int = 256,
                device: str = "auto", bf16: bool = False, workers: int | None = None,
                skip_bad: bool = False, progress: bool = False, commit_every: int = 4096,
                db: str | None = None, ray: str | None = None) -> BuildReport:
    """Add every image of `data` whose key is new to the index in `out` (created if needed);
    db, a postgresql:// URL, keeps a new index's metadata in that database instead of SQLite;
    ray, a Ray cluster's address, encodes there with Ray Data (indexer/ray_encode.py)."""
    t0 = time.perf_counter()
    out, model_path = Path(out), Path(model_path)
    ckpt = checkpoint.load(model_path)
    sha = sha256_file(model_path)
    dev = pick_device(device)
    model, cfg, _ = checkpoint.load_model(model_path, dev)
    ds = open_dataset(data, size=cfg.image_size, format=fmt, split=split, skip_bad=skip_bad,
                      progress=progress)
    data_id = str(ds.root) if ds.root is not None else ds.format
    target = metadata_target(out, read_manifest(out), db, rebuild)
    manifest = _prepare_folder(out, sha, data_id, rebuild)
    out.mkdir(parents=True, exist_ok=True)
    if is_url(target):
        engine = _open_server_database(target, manifest is None, rebuild)
    else:
        engine = connect(target, create=True)
    if manifest is None:  # a new index: the manifest is written last, once the rest exists
        checkpoint.save_atomic(_serving_model(ckpt), out / MODEL)
        manifest = {"format_version": FORMAT_VERSION, "checkpoint_sha256": sha, "preset": cfg.name,
                    "n_chunks": cfg.n_chunks, "chunk_dim": cfg.chunk_dim, "dataset": data_id,
                    "dataset_format": ds.format, "image_size": cfg.image_size, "count": 0,
                    **({"database": database_url(target)} if is_url(target) else {})}
        with Session(engine) as s, s.begin():
            s.add_all(Chunk(index=c) for c in range(cfg.n_chunks))
        write_manifest(out, manifest)
    # what to reopen for pixels when the images are not files (sprites sheets, mnist, shapes)
    manifest = {**manifest, "dataset_spec": str(data) if ds.root is None else str(ds.root)}
    indexes = open_chunk_files(out, engine, cfg.n_chunks, cfg.chunk_dim)

    with Session(engine) as s:
        known = set(s.scalars(select(Image.key)).all())
        next_id = (s.scalar(select(func.max(Image.id))) or 0) + 1
    todo = [i for i, r in enumerate(ds.records) if r.key not in known]
    with Session(engine) as s, s.begin():
        build = Build(started_at=now(), checkpoint_sha256=sha)
        s.add(build)
        s.flush()
        build_id = build.id
    if workers is None:
        workers = 2 if ds.format in ("celeba", "folder") else 0
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="encoding", dynamic_ncols=True)
    if ray is None:
        batches = encode_batches(model, ds, todo, batch_size=batch_size, device=dev, bf16=bf16, workers=workers)
    else:
        from .ray_encode import encode_on_ray

        batches = encode_on_ray(ray, model_path, data, todo, fmt=ds.format, split=split, skip_bad=skip_bad,
                                batch_size=batch_size, bf16=bf16)
    rows = _Rows(batches)
    added = 0
    try:
        for start in range(0, len(todo), commit_every):
            part = todo[start:start + commit_every]
            feats = np.empty((len(part), cfg.n_chunks, cfg.chunk_dim), np.float32)
            pos = 0
            for f in rows.take(len(part)):
                feats[pos:pos + len(f)] = f
                pos += len(f)
                bar.update(len(f))
            ids = np.arange(next_id, next_id + len(part), dtype=np.int64)
            for c, index in enumerate(indexes):  # FAISS first, then SQLite: see module docstring
                index.add_with_ids(np.ascontiguousarray(feats[:, c]), ids)
                faiss_files.write_atomic(index, faiss_files.chunk_path(out, c))
            with Session(engine) as s, s.begin():
                s.add_all(Image(id=int(i), key=ds.records[r].key, path=ds.records[r].path,
                                split=ds.records[r].split, attributes=ds.records[r].attributes,
                                build_id=build_id) for i, r in zip(ids, part))
                s.get(Build, build_id).added = added + len(part)
            next_id += len(part)
            added += len(part)
            write_manifest(out, {**manifest, "count": int(indexes[0].ntotal)})
    finally:
        bar.close()
    with Session(engine) as s, s.begin():
        s.get(Build, build_id).finished_at = now()
    total = int(indexes[0].ntotal)
    write_manifest(out, {**manifest, "count": total})
    engine.dispose()
    return BuildReport(added, total, len(ds.records) - len(todo), time.perf_counter() - t0)
