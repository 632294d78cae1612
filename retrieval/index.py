"""An INDEX/ folder opened for querying: metadata and chunk names from SQLite, vectors from the
per-chunk FAISS files (no copies), the encoder loaded on first use. Shared by the CLI and the API.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from disentangle import checkpoint
from disentangle.errors import RetrievalError
from indexer import faiss_files
from indexer.build import DATABASE, MODEL, read_manifest
from indexer.schema import Chunk, Image, connect

from .search import ChunkStore, search

log = logging.getLogger(__name__)


def normalize_name(name: str) -> str:
    """'Hair colour', 'hair_colour' and 'HAIR  COLOUR' all name the same chunk."""
    return "_".join(name.replace("_", " ").lower().split())


_INT = re.compile(r"-?[0-9]{1,18}")  # ASCII digits that fit an int64 (SQLite's integer)


def parse_where(clauses: Sequence[str]) -> dict[str, int | str]:
    """['Male=1', 'split=val'] -> {'Male': 1, 'split': 'val'}; values that look like ints are ints."""
    out: dict[str, int | str] = {}
    for clause in clauses:
        name, sep, value = clause.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise RetrievalError(f"filter {clause!r}: write ATTRIBUTE=VALUE, e.g. Male=1")
        value = value.strip()
        out[name.strip()] = int(value) if _INT.fullmatch(value) else value
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

    def __init__(self, path: str | Path, device: str = "cpu"):
        """Open INDEX; device 'cuda' (or 'auto' with a GPU present) searches with torch on the GPU."""
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise RetrievalError(f"{self.path} is not an index (no manifest.json); build one with "
                                 "`retrieval index DATA --model CKPT --out INDEX`")
        self.manifest = manifest
        self.n_chunks, self.chunk_dim = manifest["n_chunks"], manifest["chunk_dim"]
        self.engine = connect(self.path / DATABASE)
        try:
            with Session(self.engine) as s:
                self.ids = np.array(s.scalars(select(Image.id).order_by(Image.id)).all(), dtype=np.int64)
                self._names = {c.index: c.name for c in s.scalars(select(Chunk))}
        except DatabaseError:
            raise RetrievalError(f"{self.path / DATABASE} is not a readable database (corrupted?); "
                                 "rebuild the index with --rebuild") from None
        self._faiss = [faiss_files.read(faiss_files.chunk_path(self.path, c)) for c in range(self.n_chunks)]
        for c, index in enumerate(self._faiss):
            if not np.array_equal(faiss_files.ids_of(index), self.ids):
                raise RetrievalError(f"{faiss_files.chunk_path(self.path, c)} disagrees with the "
                                     "metadata; finish the build by running `retrieval index` again, "
                                     "or rebuild with --rebuild")
        if len(self.ids) == 0:
            raise RetrievalError(f"{self.path} holds no images yet; run `retrieval index` to add some")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        # views into the FAISS indexes' memory: self._faiss keeps them alive
        self._vectors = [faiss_files.vectors_of(ix) for ix in self._faiss]
        self.store = ChunkStore(self._vectors, self.ids,
                                backend="numpy" if device == "cpu" else "torch", device=device)
        self._model = None
        self._masks: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    # -- images ---------------------------------------------------------------------------
    def resolve(self, ref: str | int) -> int:
        """The id of an indexed image given by key or id."""
        with self.engine.connect() as conn:
            found = conn.scalar(select(Image.id).where(Image.key == str(ref)))
        if found is not None:
            return found
        text = str(ref).strip()
        if _INT.fullmatch(text):
            i = int(text)
            pos = np.searchsorted(self.ids, i)
            if pos < len(self.ids) and self.ids[pos] == i:
                return i
        raise RetrievalError(f"no indexed image has key or id {str(ref)[:100]!r}")

    def records(self, ids: Sequence[int]) -> list[dict]:
        """id, key, path, split and attributes of each id, in the order given."""
        ids = [int(i) for i in ids]
        cols = (Image.id, Image.key, Image.path, Image.split, Image.attributes)
        with self.engine.connect() as conn:  # plain rows: ORM objects cost more than the search
            rows = {r[0]: r for r in conn.execute(select(*cols).where(Image.id.in_(ids)))}
        return [{"id": i, "key": rows[i][1], "path": rows[i][2], "split": rows[i][3],
                 "attributes": rows[i][4] or {}} for i in ids]

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
            self._model, self.model_config, _ = checkpoint.load_model(self.path / MODEL)
        return self._model

    def query_for(self, ref: str | int) -> Query:
        i = self.resolve(ref)
        return Query(self.store.vector(i), id=i, key=self.records([i])[0]["key"])

    def query_for_file(self, path: str | Path) -> Query:
        """Encode an outside image file with the index's model."""
        import torch

        from disentangle.data.base import check_image, load_image
        from disentangle.data.celeba import celeba_box

        path = Path(path)
        reason = check_image(path) if path.is_file() else "no such file"
        if reason:
            raise RetrievalError(f"cannot use {path} as a query: {reason}")
        box = celeba_box if self.manifest["dataset_format"] == "celeba" else None
        pixels = np.array(load_image(path, self.manifest["image_size"], box))  # writable for torch
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            f = self.model.encode(x)[0].numpy()
        return Query(f, file=str(path))

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
        """Give a chunk a name (None or '' clears it); names are unique."""
        (c,) = self.resolve_chunks(str(chunk))
        name = " ".join(name.split()) if name else None
        if name and _INT.fullmatch(normalize_name(name)):
            raise RetrievalError(f"a chunk name cannot be a number ({name!r})")
        for other, existing in self._names.items():
            if name and other != c and existing and normalize_name(existing) == normalize_name(name):
                raise RetrievalError(f"chunk {other} is already named {existing!r}")
        with Session(self.engine) as s, s.begin():
            s.get(Chunk, c).name = name
        self._names[c] = name

    # -- search ---------------------------------------------------------------------------
    def allowed(self, where: dict[str, int | str] | None = None) -> np.ndarray | None:
        """Boolean mask over the stored images for attribute (and 'split') filters, run in SQLite."""
        if not where:
            return None
        cache_key = tuple(sorted(where.items(), key=str))
        with self._lock:
            mask = self._masks.get(cache_key)
        if mask is None:
            query = select(Image.id)
            for name, value in where.items():
                query = query.where(Image.split == str(value) if name == "split"
                                    else self._attribute(name) == value)
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

    @staticmethod
    def _attribute(name: str):
        if '"' in name or "\\" in name:
            raise RetrievalError(f"attribute name {name!r} cannot contain quotes or backslashes")
        return func.json_extract(Image.attributes, f'$."{name}"')

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
        exclude = [query.id] if query.id is not None else None
        result = search(self.store, query.vector[None], list(chunks), k, weights=weights, offset=offset,
                        exclude_ids=exclude, allowed=self.allowed(where))
        found = [(int(i), float(d)) for i, d in zip(result.ids[0], result.distances[0]) if i >= 0]
        hits = [{"id": r["id"], "key": r["key"], "distance": d, "attributes": r["attributes"]}
                for r, (_, d) in zip(self.records([i for i, _ in found]), found)]
        return {"query": query.describe(), "chunks": list(chunks), "k": k, "results": hits}
