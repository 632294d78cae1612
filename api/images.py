"""The images: a browsable listing, each image's bytes and metadata, and attribute transfer."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, send_file, url_for

from . import render, schemas
from .openapi import ImageList, Record, error, json_response, media, operation
from .pixels import png_bytes, png_response
from .state import resources

bp = Blueprint("images", __name__)

IMAGE_PAGE, IMAGE_REF, TRANSFER = schemas.ImagePage(), schemas.ImageRef(), schemas.Transfer()


def _record(i: int) -> dict:
    record = resources().index.records([i])[0]
    return {**record, "url": url_for("images.image", ref=record["id"])}


@bp.get("/images")
@operation(query=IMAGE_PAGE, responses={200: json_response("One page of images", ImageList),
                                        400: error("Bad offset, limit or where")})
def listing(args: dict):
    """Indexed images in id order, a page at a time (the web page's gallery)."""
    r = resources()
    offset, limit, where = args["offset"], args["limit"], args["where"]
    with r.filter_lock:
        allowed = r.index.allowed(where)
    ids = r.index.ids if allowed is None else r.index.ids[allowed]
    page = [{**rec, "url": url_for("images.image", ref=rec["id"])}
            for rec in r.index.records(ids[offset:offset + limit])]
    return jsonify({"total": len(ids), "offset": offset, "limit": limit, "images": page})


@bp.get("/images/<ref>")
@operation(path=IMAGE_REF, responses={
    200: media("The image", "image/jpeg", "image/png", "image/webp"),
    304: {"description": "Not modified (If-None-Match)"},
    403: error("The stored file resolves outside the dataset root"),
    404: error("No such image, or its pixels are not available here")})
def image(args: dict):
    """The image's bytes.

    The original file for celeba and folder datasets (its own content type); a PNG of the frame
    the model saw for sprites, mnist and shapes. Cacheable (ETag, Cache-Control)."""
    r = resources()
    record = _record(args["ref"])
    if r.images.files:
        path, mimetype = r.images.file(record)
        response = send_file(path, mimetype=mimetype, max_age=current_app.config["IMAGE_MAX_AGE"],
                             conditional=True, etag=True)
        response.cache_control.public = True
    else:
        response = png_response(png_bytes(r.images.pixels(record)))
        response.set_etag(f"{r.index.manifest['checkpoint_sha256'][:16]}-{record['id']}")
        response.make_conditional(request)
    return response


@bp.get("/images/<ref>/meta")
@operation(path=IMAGE_REF, responses={200: json_response("The image's metadata", Record), 404: error("No such image")})
def meta(args: dict):
    """Key, path, split and attributes of an image."""
    return jsonify(_record(args["ref"]))


@bp.get("/transfer")
@operation(query=TRANSFER, responses={
    200: media("The decoded mix", "image/png"), 400: error("Bad chunks"),
    404: error("No such base or donor, or its pixels are not available here")})
def transfer(args: dict):
    """The base image with some chunks taken from the donor (PNG).

    The base image decoded with the chosen chunks taken from the donor's features (the index's
    decoder; paper section 3, Figure 5)."""
    r = resources()
    base, donor = r.index.records([args["base"], args["donor"]])
    pixels = [r.images.pixels(base), r.images.pixels(donor)]
    with r.model_lock:
        mixed = render.transfer(r.index.model, *pixels, args["chunks"])
    return png_response(png_bytes(mixed))
