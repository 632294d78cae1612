"""GET /search (query by an indexed image), POST /search (query by an uploaded file) and
POST /search/batch (several queries, each group of equal options answered by one search-core call)."""
from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify, request, url_for

from disentangle.errors import RetrievalError
from retrieval.index import Query

from . import schemas
from .errors import ApiError
from .openapi import BatchResult, SearchResult, error, json_response, operation
from .state import Resources, resources
from .uploads import fit_upload

bp = Blueprint("search", __name__)

SEARCH_BY_IMAGE, SEARCH_BY_UPLOAD = schemas.SearchByImage(), schemas.SearchByUpload()
BATCH, BATCH_FORM = schemas.Batch(), schemas.BatchForm()
OPTIONS = ("chunks", "k", "offset", "weights", "where")  # what Index.search_many takes besides the queries


@bp.get("/search")
@operation(query=SEARCH_BY_IMAGE, responses={
    200: json_response("Results, best first", SearchResult),
    400: error("Bad chunks, k, offset, weights or where"),
    404: error("No indexed image has that key or id")})
def by_image(args: dict):
    """Nearest images to an indexed image by the chosen chunks.

    The same result as `retrieval search --json`, with each image's URL."""
    return jsonify(_answer(resources(), [args.pop("image")], args, coalesce=True)[0])


@bp.post("/search")
@operation(form=SEARCH_BY_UPLOAD, responses={
    200: json_response("Results, best first", SearchResult),
    400: error("No file, truncated or corrupt image, too many pixels, decompression bomb, or bad fields"),
    413: error("The body is larger than the upload limit"),
    415: error("Not an image, or not JPEG/PNG/WebP")})
def by_upload(args: dict):
    """Nearest images to an uploaded image by the chosen chunks.

    The fields may also be given in the query string."""
    r = resources()
    cfg = current_app.config
    pixels, name = fit_upload(r.index, args.pop("file"), cfg["MAX_IMAGE_PIXELS"], cfg["MAX_IMAGE_SIDE"])
    with r.model_lock:  # the encoder only: decoding above runs in parallel
        query = r.index.query_for_pixels(pixels, file=name)
    return jsonify(_answer(r, [query], args, coalesce=True)[0])


@bp.post("/search/batch")
@operation(body={"application/json": BATCH, "multipart/form-data": BATCH_FORM}, responses={
    200: json_response("One answer per query, in the order given", BatchResult),
    400: error("A bad query (the message names its position), too many queries, or a bad upload"),
    404: error("A query's image is not indexed"),
    413: error("The body is larger than the upload limit"),
    415: error("Neither JSON nor multipart/form-data, or an upload that is not a JPEG, PNG or WebP image")})
def batch():
    """Several searches in one request, each with its own chunks, k, offset, weights and where.

    A JSON body {"queries": [{"image": "KEY_OR_ID", "chunks": "2,4", "k": 10}, ...]}, or
    multipart/form-data with that JSON in the field queries and the uploaded images in file fields
    that queries name as {"file": "FIELDNAME"}. Each query is checked as GET /search checks its
    parameters and answered as GET (or POST) /search would answer it; one bad query fails the
    whole batch. Queries with equal options are answered by one call of the search core."""
    r = resources()
    queries = schemas.load(BATCH, _batch_body())["queries"]
    uploads = _uploads(r, queries)
    groups: dict[tuple, list[int]] = {}
    for pos, q in enumerate(queries):
        groups.setdefault(_options_key(q), []).append(pos)
    results = [None] * len(queries)
    for positions in groups.values():
        options = {name: queries[positions[0]][name] for name in OPTIONS}
        group = [queries[p]["image"] if "image" in queries[p] else uploads[queries[p]["file"]] for p in positions]
        try:
            answers = _answer(r, group, options)
        except RetrievalError as e:  # a filter on an attribute no image has
            raise ApiError(400, f"queries[{positions[0]}]: {e}") from None
        for pos, answer in zip(positions, answers):
            results[pos] = answer
    return jsonify({"results": results})


def _batch_body():
    """The batch's JSON: the body itself, or the form field 'queries' of a multipart body."""
    if request.mimetype == "multipart/form-data":
        text = schemas.load(BATCH_FORM, schemas.values(BATCH_FORM, request.form))["queries"]
    elif request.is_json:
        text = request.get_data(cache=False)
    else:
        raise ApiError(415, 'send the queries as application/json {"queries": [...]}, or as '
                            "multipart/form-data with that JSON in the field 'queries' and the uploaded images")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, 'the queries are not JSON; send {"queries": [{"image": "KEY_OR_ID", '
                            '"chunks": "2,4"}, ...]}') from None


def _uploads(r: Resources, queries: list[dict]) -> dict[str, Query]:
    """The Query of each uploaded image the batch names: each decoded once, all encoded in one pass."""
    first: dict[str, int] = {}  # form field -> position of the first query naming it
    for pos, q in enumerate(queries):
        if "file" in q:
            first.setdefault(q["file"], pos)
    if not first:
        return {}
    cfg = current_app.config
    fitted = []
    for field, pos in first.items():
        try:
            fitted.append(fit_upload(r.index, request.files[field], cfg["MAX_IMAGE_PIXELS"], cfg["MAX_IMAGE_SIDE"]))
        except ApiError as e:
            raise ApiError(e.status, f"queries[{pos}]: {e}", e.code) from None
    with r.model_lock:  # all through the encoder at once
        return dict(zip(first, r.index.queries_for_pixels(fitted)))


def _options_key(options: dict) -> tuple:
    """A hashable key equal exactly when two queries' search options are."""
    where = tuple(sorted(options["where"].items(), key=str))
    weights = options["weights"] and tuple(options["weights"])
    return tuple(options["chunks"]), options["k"], options["offset"], weights, where


def _answer(r: Resources, queries: list[Query], options: dict, coalesce: bool = False) -> list[dict]:
    """Search with queries sharing their options, and add each image's URL and the offset to the
    core's results. coalesce (one query): share a search-core call with concurrent requests."""
    if coalesce:
        results = [r.coalescer(queries[0], options, _options_key(options))]
    else:
        results = r.search(queries, options)
    images = url_for("images.image", ref=0).removesuffix("0")  # '/images/': url_for once, not per hit
    for query, result in zip(queries, results):
        if query.id is not None:
            result["query"]["url"] = f"{images}{query.id}"
        for hit in result["results"]:
            hit["url"] = f"{images}{hit['id']}"
        result["offset"] = options["offset"]
    return results
