"""An INDEX/ folder opened for querying: metadata and chunk names from SQLite, vectors from the
per-chunk FAISS files (no copies), the encoder loaded on first use. Shared by the CLI and the API.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
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


def parse_where(clauses: Sequence[str]) -> dict[str, int | str]:
    """['Male=1', 'split=val'] -> {'Male': 1, 'split': 'val'}; values that look like ints are ints."""
    out: dict[str, int | str] = {}
    for clause in clauses:
        name, sep, value = clause.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise RetrievalError(f"filter {clause!r}: write ATTRIBUTE=VALUE, e.g. Male=1")
        value = value.strip()
        try:
            out[name.strip()] = int(value)
        except ValueError:
            out[name.strip()] = value
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
    """A built index, read-only except for chunk names."""

    def __init__(self, path: str | Path):
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
                rows = s.execute(select(Image.id, Image.key, Image.path, Image.split, Image.attributes)
                                 .order_by(Image.id)).all()
                self._names = {c.index: c.name for c in s.scalars(select(Chunk))}
        except DatabaseError:
            raise RetrievalError(f"{self.path / DATABASE} is not a readable database (corrupted?); "
                                 "rebuild the index with --rebuild") from None
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.keys = [r[1] for r in rows]
        self.paths = [r[2] for r in rows]
        self.splits = np.array([r[3] or "" for r in rows], dtype=object)
        self.attributes: list[dict] = [r[4] or {} for r in rows]
        self._position = {int(i): p for p, i in enumerate(self.ids)}
        self._by_key = {k: p for p, k in enumerate(self.keys)}
        self._faiss = [faiss_files.read(faiss_files.chunk_path(self.path, c)) for c in range(self.n_chunks)]
        for c, index in enumerate(self._faiss):
            if not np.array_equal(faiss_files.ids_of(index), self.ids):
                raise RetrievalError(f"{faiss_files.chunk_path(self.path, c)} disagrees with the "
                                     "metadata; finish the build by running `retrieval index` again, "
                                     "or rebuild with --rebuild")
        # views into the FAISS indexes' memory: self._faiss keeps them alive
        self.store = ChunkStore([faiss_files.vectors_of(ix) for ix in self._faiss], self.ids)
        self._model = None

    def __len__(self) -> int:
        return len(self.ids)

    # -- images ---------------------------------------------------------------------------
    def position(self, ref: str | int) -> int:
        """Row position of an indexed image given by key or id."""
        if isinstance(ref, str) and ref in self._by_key:
            return self._by_key[ref]
        try:
            return self._position[int(ref)]
        except (ValueError, KeyError):
            raise RetrievalError(f"no indexed image has key or id {ref!r}") from None

    def record(self, pos: int) -> dict:
        return {"id": int(self.ids[pos]), "key": self.keys[pos], "path": self.paths[pos],
                "split": self.splits[pos] or None, "attributes": self.attributes[pos]}

    @property
    def model(self):
        """The encoder/decoder the index was built with (loaded on first use)."""
        if self._model is None:
            self._model, self.model_config, _ = checkpoint.load_model(self.path / MODEL)
        return self._model

    def query_for(self, ref: str | int) -> Query:
        pos = self.position(ref)
        return Query(self.store.vector(int(self.ids[pos])), id=int(self.ids[pos]), key=self.keys[pos])

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
        pixels = load_image(path, self.manifest["image_size"], box)
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
            if item.lstrip("-").isdigit():
                c = int(item)
                if not 0 <= c < self.n_chunks:
                    raise RetrievalError(f"chunk {c} is out of range: chunks are 0..{self.n_chunks - 1}")
            elif normalize_name(item) in by_name:
                c = by_name[normalize_name(item)]
            else:
                known = ", ".join(sorted(by_name)) or "none yet (name one with `retrieval chunks --name`)"
                raise RetrievalError(f"unknown chunk {item!r}: give 0..{self.n_chunks - 1} or a name ({known})")
            if c in out:
                raise RetrievalError(f"chunk {c} is listed twice")
            out.append(c)
        return out

    def name_chunk(self, chunk: int | str, name: str | None) -> None:
        """Give a chunk a name (None or '' clears it); names are unique."""
        (c,) = self.resolve_chunks(str(chunk))
        name = " ".join(name.split()) if name else None
        if name and normalize_name(name).isdigit():
            raise RetrievalError(f"a chunk name cannot be a number ({name!r})")
        for other, existing in self._names.items():
            if name and other != c and existing and normalize_name(existing) == normalize_name(name):
                raise RetrievalError(f"chunk {other} is already named {existing!r}")
        with Session(self.engine) as s, s.begin():
            s.get(Chunk, c).name = name
        self._names[c] = name

    # -- search ---------------------------------------------------------------------------
    def allowed(self, where: dict[str, int | str] | None = None) -> np.ndarray | None:
        """Boolean mask over the stored images for attribute (and 'split') filters."""
        if not where:
            return None
        mask = np.ones(len(self), dtype=bool)
        for name, value in where.items():
            if name == "split":
                mask &= self.splits == value
                continue
            if not any(name in a for a in self.attributes):
                known = sorted({k for a in self.attributes for k in a}) + ["split"]
                raise RetrievalError(f"no image has attribute {name!r}; filter on one of {', '.join(known)}")
            mask &= np.fromiter((a.get(name) == value for a in self.attributes), bool, len(self))
        return mask

    def search(self, query: Query, chunks: Sequence[int], k: int = 10, *, offset: int = 0,
               weights: Sequence[float] | None = None, where: dict | None = None) -> dict:
        """The JSON-ready result of `retrieval search --json` and `GET /search`."""
        exclude = [query.id] if query.id is not None else None
        result = search(self.store, query.vector[None], list(chunks), k, weights=weights, offset=offset,
                        exclude_ids=exclude, allowed=self.allowed(where))
        hits = []
        for i, d in zip(result.ids[0], result.distances[0]):
            if i < 0:
                continue
            pos = self._position[int(i)]
            hits.append({"id": int(i), "key": self.keys[pos], "distance": float(d),
                         "attributes": self.attributes[pos]})
        return {"query": query.describe(), "chunks": list(chunks), "k": k, "results": hits}
