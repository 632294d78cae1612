"""The OpenAPI 3 document, built by apispec when the app is created: each route's parameters and
bodies from the marshmallow schemas its view validates with (api/schemas.py), its summary and
description from the view's docstring, its responses from what the view declares here."""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, request
from marshmallow import Schema, fields
from werkzeug.datastructures import CombinedMultiDict

from .schemas import load, values

DESCRIPTION = (
    "Search an image collection by one visual attribute at a time: exact L2 over any subset of the "
    "disentangled feature chunks (Hu et al., CVPR 2018). Every error is JSON {\"error\": {\"code\", "
    "\"message\"}}. Only the configured Host names are answered (400 unknown_host otherwise); errors "
    "the WSGI server detects itself (400, 413, 431, 501) are JSON too.")


def operation(*, path: Schema | None = None, query: Schema | None = None, form: Schema | None = None,
              body: dict[str, Schema] | None = None, responses: dict[int, dict], **extra):
    """Declare a view's parameters and responses. Path, query-string and form values are validated
    here with their schemas and reach the view as one dict; a body (by media type) is read by the
    view itself, since its format and size limit are its own, and loaded with the schema given here."""
    sources = [(path, lambda: request.view_args), (query, lambda: values(query, request.args)),
               (form, lambda: values(form, CombinedMultiDict([request.values, request.files])))]
    sources = [(schema, read) for schema, read in sources if schema is not None]
    parameters = [{"in": where, "schema": type(schema)} for where, schema in (("path", path), ("query", query))
                  if schema is not None]
    content = {"multipart/form-data": form} if form is not None else body or {}
    declared = {"parameters": parameters, "responses": responses, **extra}
    if content:
        declared["requestBody"] = {"required": True, "content": {media: {"schema": type(schema)}
                                                                 for media, schema in content.items()}}

    def wrap(view):
        @functools.wraps(view)
        def validated(**view_args):
            if not sources:
                return view(**view_args)
            args = {}
            for schema, read in sources:
                args.update(load(schema, read()))
            return view(args)

        validated.openapi = declared
        return validated
    return wrap


# -- responses ------------------------------------------------------------------------------
def json_response(description: str, schema: type[Schema] | dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error(description: str) -> dict:
    return json_response(description, Error)


def media(description: str, *types: str, binary: bool = True) -> dict:
    schema = {"type": "string", "format": "binary"} if binary else {"type": "string"}
    return {"description": description, "content": {t: {"schema": schema} for t in types}}


class ErrorDetail(Schema):
    code = fields.String(required=True, metadata={"description": "bad_request, not_found, too_many_pixels, ..."})
    message = fields.String(required=True, metadata={"description": "What went wrong and what is allowed."})


class Error(Schema):
    error = fields.Nested(ErrorDetail, required=True)


class QueryImage(Schema):
    id = fields.Integer()
    key = fields.String()
    file = fields.String(metadata={"description": "The sanitised name of an uploaded query."})
    url = fields.String()


class Hit(Schema):
    id = fields.Integer(required=True)
    key = fields.String(required=True)
    distance = fields.Float(required=True, metadata={"description": "Σ_c w_c ‖q_c − x_c‖² over the chunks."})
    attributes = fields.Dict(required=True)
    url = fields.String(required=True)


class SearchResult(Schema):
    query = fields.Nested(QueryImage, required=True, metadata={
        "description": "id, key and url of an indexed query, or file for an upload"})
    chunks = fields.List(fields.Integer(), required=True)
    k = fields.Integer(required=True)
    results = fields.List(fields.Nested(Hit), required=True, metadata={"description": "Best first."})
    offset = fields.Integer(required=True)


class BatchResult(Schema):
    results = fields.List(fields.Nested(SearchResult), required=True, metadata={
        "description": "One answer per query, in the order given; each what GET or POST /search answers."})


class Record(Schema):
    id = fields.Integer(required=True)
    key = fields.String(required=True)
    path = fields.String(required=True, allow_none=True)
    split = fields.String(required=True, allow_none=True)
    attributes = fields.Dict(required=True)
    url = fields.String(required=True)


class ImageList(Schema):
    total = fields.Integer(required=True)
    offset = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    images = fields.List(fields.Nested(Record), required=True)


class ChunkInfo(Schema):
    index = fields.Integer(required=True)
    name = fields.String(required=True, allow_none=True)
    strip = fields.String(required=True, metadata={"description": "The URL of the chunk's strip."})


class ChunkList(Schema):
    n_chunks = fields.Integer(required=True)
    chunk_dim = fields.Integer(required=True)
    chunks = fields.List(fields.Nested(ChunkInfo), required=True)


class Health(Schema):
    status = fields.String(required=True)
    images = fields.Integer(required=True)
    n_chunks = fields.Integer(required=True)
    chunk_dim = fields.Integer(required=True)
    preset = fields.String(required=True)
    dataset_format = fields.String(required=True)


# -- the document ---------------------------------------------------------------------------
def document(app: Flask) -> dict:
    """The OpenAPI document of every route of the app (its static files aside)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="chunk-retrieval", version=importlib.metadata.version("chunk-retrieval"),
                   openapi_version="3.0.3", plugins=[plugin], info={"description": DESCRIPTION})
    plugin.converter.add_attribute_function(_field_properties)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    with app.app_context():  # limits such as MAX_K are read from the app's config
        for rule in app.url_map.iter_rules():
            if rule.endpoint.rsplit(".", 1)[-1] == "static":
                continue
            view = app.view_functions[rule.endpoint]
            summary, _, description = (inspect.getdoc(view) or "").partition("\n\n")
            declared = getattr(view, "openapi", {"responses": {200: {"description": "OK"}}})
            operation = {"operationId": rule.endpoint, "summary": " ".join(summary.split()).rstrip("."), **declared}
            if description:
                operation["description"] = " ".join(description.split())
            spec.path(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule),
                      operations={m.lower(): operation for m in sorted(rule.methods - {"HEAD", "OPTIONS"})})
        return spec.to_dict()


def _field_properties(self, field, ret: dict, **kwargs) -> dict:
    """What a field of api/schemas.py says of itself: its limits, its media type, its alternatives."""
    props = field.openapi() if hasattr(field, "openapi") else {}
    if "oneOf" in props:
        ret.pop("type", None)
    return props
