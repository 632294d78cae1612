"""An INDEX/ folder opened for querying: metadata and chunk names from SQLite, vectors from the
per-chunk FAISS files (no copies), the encoder loaded on first use. Shared by the CLI and the API.
"""
from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from disentangle import checkpoint
from disentangle.errors import RetrievalError
from indexer import faiss_files
from indexer.build import DATABASE, MODEL, read_manifest
from indexer.schema import Chunk, Image, connect
from indexer.shards import read_layout, shard_dir

from .records import RecordLookup
from .search import ChunkStore, search

log = logging.getLogger(__name__)


MAX_CHUNK_NAME = 100  # characters


def normalize_name(name: str) -> str:
    """'Hair colour', 'hair_colour' and 'HAIR  COLOUR' all name the same chunk (so do the
    compatibility forms of one text, e.g. full-width letters)."""
    return "_".join(unicodedata.normalize("NFKC", name).replace("_", " ").casefold().split())


def clean_chunk_name(name: str | None) -> str | None:
    """The name as stored (spaces collapsed; None when blank), or a RetrievalError saying why it
    cannot be one: the grammar that keeps `chunks=NAME` and `chunks=NUMBER` apart."""
    if name is None:
        return None
    if len(name) > 4 * MAX_CHUNK_NAME or not name.isprintable():  # before collapsing: no tabs, newlines
        raise RetrievalError(f"a chunk name is at most {MAX_CHUNK_NAME} printable characters")
    name = " ".join(unicodedata.normalize("NFC", name).split())
    if not name:
        return None
    if len(name) > MAX_CHUNK_NAME:
        raise RetrievalError(f"a chunk name is at most {MAX_CHUNK_NAME} printable characters")
    if "," in name:
        raise RetrievalError(f"a chunk name cannot contain a comma ({name[:40]!r}): commas separate "
                             "the chunks of a list such as chunks=2,hair_colour")
    # chunk numbers are ASCII digits only; a name must not look like any other spelling of one
    if not any(ch.isalpha() for ch in name) or _reads_as_number(normalize_name(name)):
        raise RetrievalError(f"a chunk name cannot be a number ({name[:40]!r}): give it a letter "
                             "and make it read as a word, e.g. 'hair colour'")
    return name


def _reads_as_number(text: str) -> bool:
    try:
        float(text)  # also '+5', '1e3', 'inf', '1_000' and digits of any script
    except ValueError:
        return False
    return True


_INT = re.compile(r"-?[0-9]{1,18}")  # ASCII digits that fit an int64 (SQLite's integer)


def parse_where(clauses: Sequence[str]) -> dict[str, int | str | tuple]:
    """['Male=1', 'split=val'] -> {'Male': 1, 'split': 'val'}; values that look like ints are ints.

    Every clause must hold. An attribute given twice with different values maps to the tuple of
    its values, all of which must hold: no image has two values of one attribute, so it matches
    nothing (either-of is not a filter this index offers)."""
    out: dict[str, int | str | tuple] = {}
    for clause in clauses:
        name, sep, value = clause.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise RetrievalError(f"filter {clause!r}: write ATTRIBUTE=VALUE, e.g. Male=1")
        name, value = name.strip(), value.strip()
        value = int(value) if _INT.fullmatch(value) else value
        before = out.get(name, ())
        before = before if isinstance(before, tuple) else (before,)
        both = before + (value,) if value not in before else before
        out[name] = both[0] if len(both) == 1 else both
    return out


@dataclass(frozen=True)
class Query:
    """What a search starts from: an indexed image (id set) or features of an outside image."""
    vector: np.ndarray          # (n_chunks, chunk_dim)
    id: int | None = None
    key: str | None = None
    file: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in (("id", self.id), ("key", self.key), ("file", self.file)) if v is not None}


class Index:
    """A built index, read-only except for chunk names.

    Opening reads only the manifest, the chunk names, the ids and the FAISS files: keys and
    attributes stay in SQLite and are fetched for the k results, and filters run there as SQL,
    so a 200K-image index opens in about a second and holds little beyond its vectors.
    """

    def __init__(self, path: str | Path, device: str = "cpu", *, shard: int | None = None,
                 vectors: bool = True):
        """Open INDEX; device 'cuda' (or 'auto' with a GPU present) searches with torch on the GPU.

        shard k opens only shard k's folder and ids (indexer/shards.py: the images with
        id % N == k), as a shard's Ray actor does; vectors=False opens the metadata alone, as the
        service in front of the shards does (retrieval/shards.py): then there is no store."""
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise RetrievalError(f"{self.path} is not an index (no manifest.json); build one with "
                                 "`retrieval index DATA --model CKPT --out INDEX`")
        self.manifest = manifest
        self.n_chunks, self.chunk_dim = manifest["n_chunks"], manifest["chunk_dim"]
        folder, self._shard = self.path, None
        if shard is not None:
            layout = read_layout(self.path)
            if layout is None or not 0 <= shard < layout["shards"]:
                raise RetrievalError(f"{self.path} has no shard {shard}; split it with "
                                     "`retrieval index DATA --model CKPT --out INDEX --shards N`")
            folder, self._shard = shard_dir(self.path, shard), (Image.id % layout["shards"]) == shard
        database = manifest.get("database")  # a server database's URL; else the index's SQLite file
        self.engine = connect(database or self.path / DATABASE)
        self._lookup = RecordLookup(self.engine)  # the per-request lookups, without the ORM
        try:
            with Session(self.engine) as s:
                query = select(Image.id).order_by(Image.id)
                query = query if self._shard is None else query.where(self._shard)
                self.ids = np.array(s.scalars(query).all(), dtype=np.int64)
                self._names = {c.index: c.name for c in s.scalars(select(Chunk))}
        except DatabaseError as e:
            if database:  # unreachable, refused, or without the tables: the driver's first line says which
                raise RetrievalError(f"cannot read the metadata of {self.path} from {database}: "
                                     f"{str(e.orig).strip().splitlines()[0]}") from None
            raise RetrievalError(f"{self.path / DATABASE} is not a readable database (corrupted?); "
                                 "rebuild the index with --rebuild") from None
        chunks = range(self.n_chunks) if vectors else []
        self._faiss = [faiss_files.read(faiss_files.chunk_path(folder, c)) for c in chunks]
        for c, index in enumerate(self._faiss):
            if not np.array_equal(faiss_files.ids_of(index), self.ids):
                redo = ("split it again with `retrieval index ... --shards N`: the index changed since"
                        if shard is not None else "finish the build by running `retrieval index` again, "
                        "or rebuild with --rebuild")
                raise RetrievalError(f"{faiss_files.chunk_path(folder, c)} disagrees with the metadata; {redo}")
        if len(self.ids) == 0:
            raise RetrievalError(f"{self.path} holds no images yet; run `retrieval index` to add some")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        # views into the FAISS indexes' memory: self._faiss keeps them alive
        self._vectors = [faiss_files.vectors_of(ix) for ix in self._faiss]
        self.store = ChunkStore(self._vectors, self.ids, backend="numpy" if device == "cpu" else "torch",
                                device=device) if vectors else None
        self._model = None
        self._masks: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    # -- images ---------------------------------------------------------------------------
    def resolve(self, ref: str | int) -> int:
        """The id of an indexed image given by key or id."""
        found = self._lookup.id_of(str(ref))
        if found is not None:
            return found
        text = str(ref).strip()
        if _INT.fullmatch(text) and self._holds(int(text)):
            return int(text)
        raise RetrievalError(f"no indexed image has key or id {str(ref)[:100]!r}")

    def _holds(self, i: int) -> bool:
        pos = np.searchsorted(self.ids, i)
        return bool(pos < len(self.ids) and self.ids[pos] == i)

    def records(self, ids: Sequence[int]) -> list[dict]:
        """id, key, path, split and attributes of each id, in the order given."""
        return self._lookup.records(ids)

    def features(self) -> np.ndarray:
        """All features (N, n_chunks, chunk_dim) float32, in id order (a copy)."""
        return np.stack(self._vectors, axis=1)

    def keys(self) -> list[str]:
        """Every key, in id order (for export)."""
        with Session(self.engine) as s:
            return list(s.scalars(select(Image.key).order_by(Image.id)))

    @property
    def model(self):
        """The encoder/decoder the index was built with (loaded on first use)."""
        if self._model is None:
            model, cfg, _ = checkpoint.load_model(self.path / MODEL)
            if (cfg.n_chunks, cfg.chunk_dim) != (self.n_chunks, self.chunk_dim):
                raise RetrievalError(f"{self.path / MODEL} encodes {cfg.n_chunks} chunks x {cfg.chunk_dim}, but the "
                                     f"index stores {self.n_chunks} x {self.chunk_dim}; rebuild it with "
                                     "`retrieval index ... --rebuild`")
            self._model, self.model_config = model, cfg
        return self._model

    def query_for(self, ref: str | int) -> Query:
        """The query of an indexed image: by key or id (a str), or by id (an int, e.g. resolved
        already: no second key lookup)."""
        known = isinstance(ref, (int, np.integer)) and self._holds(int(ref))
        i = int(ref) if known else self.resolve(ref)
        return Query(self.store.vector(i), id=i, key=self._lookup.key_of(i))

    def query_for_file(self, path: str | Path) -> Query:
        """Encode an outside image file with the index's model."""
        return self.query_for_pixels(self.fit_file(path), file=str(path))

    def fit_file(self, path: str | Path) -> np.ndarray:
        """An outside image file decoded and fitted the way the indexer fitted the collection."""
        from disentangle.data.base import check_image, load_image
        from disentangle.data.celeba import celeba_box

        path = Path(path)
        reason = check_image(path) if path.is_file() else "no such file"
        if reason:
            raise RetrievalError(f"cannot use {path} as a query: {reason}")
        box = celeba_box if self.manifest["dataset_format"] == "celeba" else None
        return np.array(load_image(path, self.manifest["image_size"], box))  # writable for torch

    def query_for_pixels(self, pixels: np.ndarray, file: str | None = None) -> Query:
        """Encode fitted (size, size, 3) uint8 pixels with the index's model."""
        return self.queries_for_pixels([(pixels, file)])[0]

    def queries_for_pixels(self, images: Sequence[tuple[np.ndarray, str | None]]) -> list[Query]:
        """Encode several fitted images, (pixels, file name) each, in one pass of the encoder.
        (Batched float32 convolutions may differ from one-at-a-time ones in the last bits.)"""
        import torch

        x = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p, _ in images]).float() / 127.5 - 1
        with torch.no_grad():
            features = self.model.encode(x).numpy()
        return [Query(f, file=file) for f, (_, file) in zip(features, images)]

    # -- chunks ---------------------------------------------------------------------------
    def chunk_names(self) -> dict[int, str | None]:
        return {c: self._names.get(c) for c in range(self.n_chunks)}

    def resolve_chunks(self, spec: str | Sequence[str | int]) -> list[int]:
        """'2,hair_colour' -> [2, 5]: numbers or names (case and spaces/underscores ignored)."""
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        items = [str(i).strip() for i in items if str(i).strip()]
        if not items:
            raise RetrievalError(f"empty chunk list; give chunk numbers 0..{self.n_chunks - 1} or names")
        by_name = {normalize_name(n): c for c, n in self._names.items() if n}
        out = []
        for item in items:
            if _INT.fullmatch(item):
                c = int(item)
                if not 0 <= c < self.n_chunks:
                    raise RetrievalError(f"chunk {c} is out of range: chunks are 0..{self.n_chunks - 1}")
            elif normalize_name(item) in by_name:
                c = by_name[normalize_name(item)]
            else:
                known = ", ".join(sorted(by_name)) or "none yet (name one with `retrieval chunks --name`)"
                raise RetrievalError(f"unknown chunk {item[:100]!r}: give 0..{self.n_chunks - 1} or a name ({known})")
            if c in out:
                raise RetrievalError(f"chunk {c} is listed twice")
            out.append(c)
        return out

    def name_chunk(self, chunk: int | str, name: str | None) -> None:
        """Give a chunk a name (None or a blank one clears it); names are unique (clean_chunk_name)."""
        (c,) = self.resolve_chunks(str(chunk))
        name = clean_chunk_name(name)
        for other, existing in self._names.items():
            if name and other != c and existing and normalize_name(existing) == normalize_name(name):
                raise RetrievalError(f"chunk {other} is already named {existing!r}")
        with Session(self.engine) as s, s.begin():
            s.get(Chunk, c).name = name
        self._names[c] = name

    # -- search ---------------------------------------------------------------------------
    def allowed(self, where: dict[str, int | str | tuple] | None = None) -> np.ndarray | None:
        """Boolean mask over the stored images for attribute (and 'split') filters, run in the
        metadata database; every filter must hold (parse_where)."""
        if not where:
            return None
        cache_key = tuple(sorted(where.items(), key=str))
        with self._lock:
            mask = self._masks.get(cache_key)
        if mask is None:
            query = select(Image.id) if self._shard is None else select(Image.id).where(self._shard)
            for name, values in where.items():
                for value in values if isinstance(values, tuple) else (values,):  # all must hold
                    query = query.where(Image.split == str(value) if name == "split"
                                        else self._equals(name, value))
            with Session(self.engine) as s:
                hits = np.array(s.scalars(query).all(), dtype=np.int64)
            unknown = [n for n in where if n != "split" and not self._has_attribute(n)]
            if unknown:
                raise RetrievalError(f"no image has attribute {unknown[0]!r}; filter on one of "
                                     f"{', '.join(self._attribute_names() + ['split'])}")
            mask = np.isin(self.ids, hits)
            with self._lock:  # the server searches from several threads
                if len(self._masks) >= 64:  # filters repeat; keep a bounded few
                    self._masks.pop(next(iter(self._masks)))
                self._masks[cache_key] = mask
        return mask

    def _attribute(self, name: str):
        """The attribute's JSON value as SQL: SQLite's json_extract gives a number or text, so an int
        matches JSON numbers and a str JSON strings; PostgreSQL's -> gives json, compared as jsonb
        (json has no equality) to the value's own JSON, which keeps the same typed match."""
        if '"' in name or "\\" in name:
            raise RetrievalError(f"attribute name {name!r} cannot contain quotes or backslashes")
        if self.engine.dialect.name == "sqlite":
            return func.json_extract(Image.attributes, f'$."{name}"')
        return cast(Image.attributes[name], JSONB)

    def _equals(self, name: str, value: int | str):
        """SQL that holds where attribute `name` has `value`."""
        if self.engine.dialect.name == "sqlite":
            return self._attribute(name) == value
        return self._attribute(name) == cast(value, JSONB)  # the bind is the value's JSON

    def _has_attribute(self, name: str) -> bool:
        with Session(self.engine) as s:
            return s.scalar(select(Image.id).where(self._attribute(name).is_not(None)).limit(1)) is not None

    def _attribute_names(self) -> list[str]:
        with Session(self.engine) as s:  # a sample is enough to say what can be filtered on
            rows = s.scalars(select(Image.attributes).limit(1000)).all()
        return sorted({k for a in rows for k in (a or {})})

    def search(self, query: Query, chunks: Sequence[int], k: int = 10, *, offset: int = 0,
               weights: Sequence[float] | None = None, where: dict | None = None) -> dict:
        """The JSON-ready result of `retrieval search --json` and `GET /search`."""
        return self.search_many([query], chunks, k, offset=offset, weights=weights, where=where)[0]

    def search_many(self, queries: Sequence[Query], chunks: Sequence[int], k: int = 10, *,
                    offset: int = 0, weights: Sequence[float] | None = None,
                    where: dict | None = None) -> list[dict]:
        """Queries that share chunks, k, offset, weights and filters, answered by one call of the
        search core (one pass over the chosen chunks for all of them); one result dict each, as
        search() gives. A query by an indexed image never finds that image itself."""
        if not queries:
            return []
        result = search(self.store, np.stack([q.vector for q in queries]), list(chunks), k, weights=weights,
                        offset=offset, exclude_ids=self_exclusions(queries), allowed=self.allowed(where))
        found = [[(int(i), float(d)) for i, d in zip(ids, dists) if i >= 0]
                 for ids, dists in zip(result.ids, result.distances)]
        return answers(self, queries, chunks, k, found)


def self_exclusions(queries: Sequence[Query]) -> np.ndarray:
    """(Q, 1) ids each query must not find: itself; -1 (an uploaded image) is an id no store holds."""
    return np.array([[-1 if q.id is None else q.id] for q in queries], dtype=np.int64)


def answers(index: Index, queries: Sequence[Query], chunks: Sequence[int], k: int,
            found: list[list[tuple[int, float]]]) -> list[dict]:
    """The JSON-ready result of each query from its (id, distance) hits, records read at once."""
    records = iter(index.records([i for row in found for i, _ in row]))
    return [{"query": q.describe(), "chunks": list(chunks), "k": k,
             "results": [{"id": i, "key": r["key"], "distance": d, "attributes": r["attributes"]}
                         for (i, d), r in zip(row, records)]}
            for q, row in zip(queries, found)]
