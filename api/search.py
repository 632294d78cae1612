"""GET /search (query by an indexed image) and POST /search (query by an uploaded file)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, url_for

from retrieval.index import Query

from . import params
from .errors import ApiError
from .state import Resources, resources
from .uploads import fit_upload

bp = Blueprint("search", __name__)


@bp.get("/search")
def by_image():
    r = resources()
    query = r.index.query_for(params.image_id(r.index, request.args.get("image")))
    return jsonify(_search(r, query, _options(r, request.args)))


@bp.post("/search")
def by_upload():
    r = resources()
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "POST a multipart/form-data body with the query image in the field 'file'")
    options = _options(r, request.values)  # form fields, or the same fields in the query string
    cfg = current_app.config
    pixels, name = fit_upload(r.index, upload, cfg["MAX_IMAGE_PIXELS"], cfg["MAX_IMAGE_SIDE"])
    with r.model_lock:  # the encoder only: decoding above runs in parallel
        query = r.index.query_for_pixels(pixels, file=name)
    return jsonify(_search(r, query, options))


def _options(r: Resources, values) -> dict:
    """The validated chunks, k, offset, weights and where-filters shared by both searches."""
    cfg = current_app.config
    chunks = params.chunks(r.index, values.get("chunks"))
    return {"chunks": chunks, "k": params.integer(values, "k", 10, 1, cfg["MAX_K"]),
            "offset": params.integer(values, "offset", 0, 0, cfg["MAX_OFFSET"]),
            "weights": params.weights(values.get("weights"), len(chunks)),
            "where": params.where(values.getlist("where"))}


def _search(r: Resources, query: Query, options: dict) -> dict:
    """Search, and add the URL of each image to the core's result."""
    if options["where"]:
        with r.filter_lock:  # the index's cache of filter masks is a plain dict, evicted unlocked
            result = r.index.search(query, **options)
    else:
        result = r.index.search(query, **options)
    if query.id is not None:
        result["query"]["url"] = url_for("images.image", ref=query.id)
    for hit in result["results"]:
        hit["url"] = url_for("images.image", ref=hit["id"])
    result["offset"] = options["offset"]
    return result
