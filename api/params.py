"""Validation of request parameters: each helper turns a query or form value into what the search
core takes, or raises an ApiError whose message says what is allowed."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from disentangle.errors import RetrievalError
from retrieval.index import Index, parse_where
from retrieval.search import MAX_WEIGHT, MIN_WEIGHT

from .errors import ApiError

MAX_REF = 512          # longest key or id accepted; keys are relative paths or short ids
MAX_WHERE = 16         # where-clauses per query
MAX_CLAUSE = 200       # characters per where-clause
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"\s*\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,4})?\s*")  # not 1_0, inf, 0x1
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def integer(values: Mapping, name: str, default: int, low: int, high: int) -> int:
    """An integer parameter in [low, high]."""
    text = values.get(name)
    if text is None or text == "":
        return default
    text = text.strip()
    if not _INTEGER.fullmatch(text) or len(text) > 12 or not low <= int(text) <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}; got {text[:40]!r}")
    return int(text)


def image_id(index: Index, ref: str | None, name: str = "image") -> int:
    """The id of the indexed image named by key or id; 404 when there is none. Never a path."""
    if ref is None or not ref.strip():
        raise ApiError(400, f"give {name}=KEY_OR_ID of an indexed image (or POST a file to /search)")
    # keys come from SQLite and ids are ASCII digits: anything else cannot name an image
    if len(ref) > MAX_REF or _BAD_CHARS.search(ref):
        raise ApiError(404, f"no indexed image has key or id {ref[:80]!r}")
    try:
        return index.resolve(ref)
    except RetrievalError as e:
        raise ApiError(404, str(e)) from None


def chunks(index: Index, spec: str | None) -> list[int]:
    """Chunk numbers from 'chunks=2,4' or names such as 'hair_colour'."""
    if spec is None or not spec.strip():
        raise ApiError(400, f"give chunks=LIST, e.g. chunks=2,4: numbers 0..{index.n_chunks - 1} or chunk names")
    items = [t.strip() for t in spec.split(",") if t.strip()]
    if len(items) > index.n_chunks or len(spec) > 64 * index.n_chunks:
        raise ApiError(400, f"chunks lists at most {index.n_chunks} chunks (0..{index.n_chunks - 1}), each once")
    return index.resolve_chunks(items)


def weights(text: str | None, n: int) -> list[float] | None:
    """One weight per chosen chunk, e.g. weights=1,0.5, in the range the exact search honours."""
    if text is None or text == "":
        return None
    items = text.split(",")
    w = [float(t) for t in items] if len(items) == n and all(map(_DECIMAL.fullmatch, items)) else []
    if len(w) != n or not all(math.isfinite(x) and x > 0 for x in w):
        raise ApiError(400, f"weights must be {n} finite numbers > 0, one per chosen chunk, "
                            f"separated by commas; got {text[:80]!r}")
    if not all(MIN_WEIGHT <= x <= MAX_WEIGHT for x in w):
        raise ApiError(400, f"weights must lie from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}: they are relative "
                            f"(1,0.5 ranks as 2,1), and outside that range the search is not exact; "
                            f"got {text[:80]!r}")
    return w


def where(clauses: list[str]) -> dict[str, int | str]:
    """ATTRIBUTE=VALUE filters (repeatable): Male=1, split=val."""
    if len(clauses) > MAX_WHERE:
        raise ApiError(400, f"at most {MAX_WHERE} where-clauses")
    for clause in clauses:
        if len(clause) > MAX_CLAUSE or _BAD_CHARS.search(clause):
            raise ApiError(400, f"a where-clause is ATTRIBUTE=VALUE in at most {MAX_CLAUSE} printable "
                                "characters, e.g. where=Male=1")
    return parse_where(clauses)
