"""The request schemas: one marshmallow schema per operation's parameters (and body), which both
validate the requests and, through api/openapi.py, write the OpenAPI document.

Each field turns a query, form or JSON value into what the search core takes (an image's id or
Query, chunk numbers, a where-dict), or fails with a message that says what is allowed. Limits
that come from app.config (MAX_K, MAX_OFFSET, MAX_BATCH) are read from the current app, so one
schema instance, built at import, serves every app; `openapi()` on a field gives the same limits
to the document. A value that names nothing (an unknown image or chunk) is a NotFound message,
answered 404; every other failure is a 400.
"""
from __future__ import annotations

import math
import re

from flask import current_app, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, missing, post_load, pre_load, validates_schema
from werkzeug.datastructures import FileStorage, MultiDict

from disentangle.errors import RetrievalError
from retrieval.index import parse_where
from retrieval.search import MAX_WEIGHT, MIN_WEIGHT

from .errors import ApiError
from .state import resources

MAX_REF = 512          # longest key or id accepted; keys are relative paths or short ids
MAX_WHERE = 16         # where-clauses per query
MAX_CLAUSE = 200       # characters per where-clause
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"\s*\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,4})?\s*")  # not 1_0, inf, 0x1
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class NotFound(str):
    """A validation message answered with 404: the value is well formed but names nothing. A str,
    so marshmallow stores it like any other message."""


def _setting(value: int | str) -> int:
    """A number, or the app.config limit it names ('MAX_K')."""
    return current_app.config[value] if isinstance(value, str) else value


def _shown(value, n: int = 40) -> str:
    return repr(value[:n]) if isinstance(value, str) else repr(value)[:n]


def _literal(message: str) -> str:
    """A field's error message with braces, which marshmallow would otherwise read as a format."""
    return message.replace("{", "{{").replace("}", "}}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- fields ---------------------------------------------------------------------------------
class Integer(fields.Integer):
    """An integer from low to high (ASCII digits in a query string, a number in JSON); low, high
    and the default may name an app.config setting."""

    def __init__(self, low: int | str, high: int | str, default: int | str, **kwargs):
        super().__init__(load_default=lambda: _setting(default), **kwargs)
        self.low, self.high, self.default = low, high, default

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        low, high = _setting(self.low), _setting(self.high)
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, str) and _INTEGER.fullmatch(text) and len(text) <= 12:
            number = int(text)
        elif isinstance(text, int) and not isinstance(text, bool):
            number = text
        else:
            number = None
        if number is None or not low <= number <= high:
            raise ValidationError(f"{self.name} must be an integer from {low} to {high}; got {_shown(text)}")
        return number

    def openapi(self) -> dict:
        return {"minimum": _setting(self.low), "maximum": _setting(self.high), "default": _setting(self.default)}


class Image(fields.String):
    """An indexed image by key or id: its id, or with query=True the Query a search starts from.
    Never a path: anything that is not a stored key or id is a NotFound."""

    def __init__(self, query: bool = False, hint: str = "", required: bool = True, **kwargs):
        super().__init__(required=required, **kwargs)
        self.query, self.hint = query, hint

    def _bind_to_schema(self, field_name, parent) -> None:
        super()._bind_to_schema(field_name, parent)
        self.error_messages = {**self.error_messages,
                               "required": f"give {self.name}=KEY_OR_ID of an indexed image{self.hint}"}

    def _deserialize(self, value, attr, data, **kwargs):
        ref = str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # a JSON id
        if not isinstance(ref, str) or not ref.strip():
            raise self.make_error("required")
        # keys come from SQLite and ids are ASCII digits: anything else cannot name an image
        if len(ref) > MAX_REF or _BAD_CHARS.search(ref):
            raise ValidationError(NotFound(f"no indexed image has key or id {ref[:80]!r}"))
        index = resources().index
        try:
            return index.query_for(ref) if self.query else index.resolve(ref)
        except RetrievalError as e:
            raise ValidationError(NotFound(str(e))) from None

    def openapi(self) -> dict:
        return {"minLength": 1}


class Chunk(fields.Integer):
    """A chunk number in a URL path; a chunk the index does not have is a NotFound."""

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        n = resources().index.n_chunks
        if not 0 <= value < n:
            raise ValidationError(NotFound(f"no chunk {value}: chunks are 0..{n - 1}"))
        return value

    def openapi(self) -> dict:
        return {"minimum": 0}


class Chunks(fields.String):
    """Chunk numbers from '2,4' or names such as 'hair_colour' (with lists=True also a JSON list)."""

    def __init__(self, lists: bool = False, **kwargs):
        super().__init__(required=True, **kwargs)
        self.lists = lists

    def _validate_missing(self, value) -> None:  # the message names the index's chunks
        if value is missing:
            raise self._give()

    def _give(self) -> ValidationError:
        n = resources().index.n_chunks
        return ValidationError(f"give chunks=LIST, e.g. chunks=2,4: numbers 0..{n - 1} or chunk names")

    def _deserialize(self, value, attr, data, **kwargs) -> list[int]:
        index = resources().index
        n = index.n_chunks
        if isinstance(value, str):
            if not value.strip():
                raise self._give()
            items = value.split(",")
        elif self.lists and isinstance(value, list) and all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                          for t in value):
            items = [str(t) for t in value]
        else:
            raise ValidationError(f"chunks is a list of chunk numbers or names, e.g. \"2,4\" or [2, 4]; "
                                  f"got {_shown(value)}")
        items = [t.strip() for t in items if t.strip()]
        if len(items) > n or sum(map(len, items)) > 64 * n:
            raise ValidationError(f"chunks lists at most {n} chunks (0..{n - 1}), each once")
        try:
            return index.resolve_chunks(items)
        except RetrievalError as e:
            raise ValidationError(str(e)) from None

    def openapi(self) -> dict:
        text = {"type": "string", "minLength": 1, "example": "2,4"}
        if not self.lists:
            return text
        return {"oneOf": [text, {"type": "array", "items": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}]}


class Weights(fields.String):
    """One weight per chosen chunk, '1,0.5' (with lists=True also [1, 0.5]); checked against the
    chunks by the schema (check_weights)."""

    def __init__(self, lists: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.lists = lists

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) or self.lists and isinstance(value, list)):
            raise ValidationError(f"weights are numbers, one per chosen chunk, e.g. \"1,0.5\" or [1, 0.5]; "
                                  f"got {_shown(value)}")
        return value

    def openapi(self) -> dict:
        text = {"type": "string", "example": "1,0.5"}
        if not self.lists:
            return text
        return {"oneOf": [text, {"type": "array", "items": {"type": "number"}}]}


def check_weights(value, n: int) -> list[float] | None:
    """Weights in the range the exact search honours, one per chosen chunk; None when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
        w = [float(t) for t in items] if len(items) == n and all(map(_DECIMAL.fullmatch, items)) else []
    else:
        w = [_float(x) for x in value] if len(value) == n and all(map(_is_number, value)) else []
    if len(w) != n or not all(math.isfinite(x) and x > 0 for x in w):
        raise ValidationError(f"weights must be {n} finite numbers > 0, one per chosen chunk, "
                              f"separated by commas; got {_shown(value, 80)}", "weights")
    if not all(MIN_WEIGHT <= x <= MAX_WEIGHT for x in w):
        raise ValidationError(f"weights must lie from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}: they are relative "
                              f"(1,0.5 ranks as 2,1), and outside that range the search is not exact; "
                              f"got {_shown(value, 80)}", "weights")
    return w


def _float(x: int | float) -> float:
    try:
        return float(x)
    except OverflowError:  # a JSON integer too large for a float
        return math.inf


class Where(fields.List):
    """ATTRIBUTE=VALUE filters (Male=1, split=val), every one of which must hold: a where-dict."""

    def __init__(self, **kwargs):
        super().__init__(fields.String(), load_default=dict, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs) -> dict:
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValidationError(f"where is a list of ATTRIBUTE=VALUE clauses; got {_shown(value)}")
        if len(value) > MAX_WHERE:
            raise ValidationError(f"at most {MAX_WHERE} where-clauses")
        for clause in value:
            if len(clause) > MAX_CLAUSE or _BAD_CHARS.search(clause):
                raise ValidationError(f"a where-clause is ATTRIBUTE=VALUE in at most {MAX_CLAUSE} printable "
                                      "characters, e.g. where=Male=1")
        try:
            return parse_where(value)
        except RetrievalError as e:
            raise ValidationError(str(e)) from None

    def openapi(self) -> dict:
        return {"maxItems": MAX_WHERE}


class Upload(fields.Field):
    """The uploaded query image of a multipart/form-data body."""

    def _deserialize(self, value, attr, data, **kwargs) -> FileStorage:
        if not isinstance(value, FileStorage):
            raise self.make_error("required")
        return value

    def openapi(self) -> dict:
        return {"type": "string", "format": "binary"}


class UploadName(fields.String):
    """The form field that holds a batch query's uploaded image."""

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        if not isinstance(value, str) or value not in request.files:
            raise ValidationError(f"file names the form field of an uploaded image, and the request has no "
                                  f"file field {_shown(value, 80)}; upload it with the queries as multipart/form-data")
        return value


class Queries(fields.List):
    """The queries of a batch, at most MAX_BATCH of them (counted before any is checked)."""

    def _deserialize(self, value, attr, data, **kwargs) -> list:
        limit = current_app.config["MAX_BATCH"]
        if not isinstance(value, list) or not 1 <= len(value) <= limit:
            raise ValidationError(f"queries is a list of 1 to {limit} queries; got "
                                  f"{len(value) if isinstance(value, list) else _shown(value)}")
        return super()._deserialize(value, attr, data, **kwargs)

    def openapi(self) -> dict:
        return {"minItems": 1, "maxItems": current_app.config["MAX_BATCH"]}


# -- schemas --------------------------------------------------------------------------------
class Params(Schema):
    """Query-string or form parameters (read by `values`); unknown ones are ignored."""

    class Meta:
        unknown = EXCLUDE


def search_fields(lists: bool = False) -> tuple[fields.Field, ...]:
    """chunks, k, offset, weights and where: what every search takes (lists: JSON lists too)."""
    return (Chunks(lists, metadata={"description": "Chunk numbers (ASCII digits) or names, comma-separated, "
                                                   "each once: 2,4 or hair_colour."}),
            Integer(1, "MAX_K", 10, metadata={"description": "Results per page."}),
            Integer(0, "MAX_OFFSET", 0, metadata={"description": "Results to skip (paging)."}),
            Weights(lists, metadata={"description": "One weight per chosen chunk, a decimal from 1e-6 to 1e6: "
                                                    "1,0.5. Weights are relative; outside that range the exact "
                                                    "search cannot honour them, so they are refused."}),
            Where(metadata={"description": "ATTRIBUTE=VALUE filters (or split=val); repeatable, at most 16; "
                                           "every clause must hold, so two values of one attribute match nothing."}))


class Search(Params):
    """A search's options; the weights are checked against the chunks once both are known."""

    @post_load
    def _weights(self, data, **kwargs):
        data["weights"] = check_weights(data.get("weights"), len(data["chunks"]))
        return data


class SearchByImage(Search):
    image = Image(query=True, hint=" (or POST a file to /search)",
                  metadata={"description": "Key or id of an indexed image (never a path or URL).",
                            "example": "shape_000005"})
    chunks, k, offset, weights, where = search_fields()


class SearchByUpload(Search):
    file = Upload(required=True, metadata={"description": "A JPEG, PNG or WebP image."}, error_messages={
        "required": "POST a multipart/form-data body with the query image in the field 'file'"})
    chunks, k, offset, weights, where = search_fields()


class BatchQuery(Search):
    """One query of a batch: an indexed image or an uploaded file, and its own search options."""
    error_messages = {"type": 'each query is a JSON object such as {"image": "KEY_OR_ID", "chunks": "2,4"}'}
    image = Image(query=True, required=False, metadata={"description": "Key or id of an indexed image."})
    file = UploadName(metadata={"description": "Or the form field holding an uploaded image (multipart only)."})
    chunks, k, offset, weights, where = search_fields(lists=True)

    @pre_load
    def _drop_empty(self, data, **kwargs):  # null or "" is not given, as in a query string
        return {k: v for k, v in data.items() if v is not None and v != ""} if isinstance(data, dict) else data

    @validates_schema
    def _one_image(self, data, **kwargs):
        if ("image" in data) == ("file" in data):
            raise ValidationError("give image=KEY_OR_ID of an indexed image or file=FIELDNAME of an uploaded one"
                                  + (", not both" if "image" in data else ""))


class Batch(Schema):
    class Meta:
        unknown = EXCLUDE

    error_messages = {"type": 'send a JSON object {"queries": [...]}'}
    queries = Queries(fields.Nested(BatchQuery), required=True, error_messages={
        "required": _literal('send {"queries": [{"image": "KEY_OR_ID", "chunks": "2,4", "k": 10}, ...]}')})


class BatchForm(Schema):
    """A batch with uploads: the queries' JSON in a form field, the images in file fields."""

    class Meta:
        unknown = EXCLUDE

    queries = fields.String(required=True, metadata={"description": "The JSON of a batch body, "
                                                                    "{\"queries\": [...]}, as text."},
                            error_messages={"required": _literal("a multipart batch sends its JSON "
                                                                 "{\"queries\": [...]} in the form field 'queries'")})


class ImagePage(Params):
    offset = Integer(0, 10**9, 0)
    limit = Integer(1, 500, 48)
    where = Where(metadata={"description": "ATTRIBUTE=VALUE filters; every clause must hold."})


class Transfer(Params):
    base = Image()
    donor = Image()
    chunks = Chunks()


class ImageRef(Schema):
    ref = Image(metadata={"description": "Key or id of an indexed image."})


class ChunkRef(Schema):
    i = Chunk(required=True, metadata={"description": "A chunk number."})


class Strip(Params):
    n = Integer(1, 12, "STRIP_IMAGES", metadata={"description": "Donor images along the top."})


_NAME_BODY = 'send a JSON body {"name": "hair colour"} (null or "" clears the name)'


class ChunkName(Schema):
    """The body of PUT /chunks/{i}; the grammar of names is the index's (clean_chunk_name)."""

    class Meta:
        unknown = EXCLUDE

    error_messages = {"type": _NAME_BODY}
    name = fields.String(required=True, allow_none=True,
                         error_messages=dict.fromkeys(("required", "invalid"), _literal(_NAME_BODY)),
                         metadata={"description": "At most 100 printable characters after collapsing spaces, "
                                                  "at least one letter, no comma, nothing that reads as a "
                                                  "number; null or blank clears the name."})


# -- loading --------------------------------------------------------------------------------
def values(schema: Schema, source: MultiDict) -> dict:
    """The schema's fields as given in a query string or form: every value of a list field, the
    first of any other; an empty value is not given."""
    out = {}
    for name, field in schema.load_fields.items():
        if name in source:
            value = source.getlist(name) if isinstance(field, fields.List) else source[name]
            if value != "":
                out[name] = value
    return out


def load(schema: Schema, data) -> dict:
    """The data validated by the schema, or an ApiError with the first failure's message, prefixed
    with where it is ('queries[3]: ') when it lies inside a list."""
    try:
        return schema.load(data)
    except ValidationError as e:
        where, message = _first(e.messages)
        raise ApiError(404 if isinstance(message, NotFound) else 400, where + message) from None


def _first(messages, path: str = "") -> tuple[str, str]:
    if isinstance(messages, list):
        return (f"{path}: " if path else ""), messages[0]
    key, inner = next(iter(messages.items()))
    if isinstance(key, int):
        return _first(inner, f"{path}[{key}]")
    return _first(inner, path + key if isinstance(inner, dict) else path)  # a leaf's message names it
