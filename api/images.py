"""The images: a browsable listing, each image's bytes and metadata, and attribute transfer."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, send_file, url_for

from . import params, render
from .pixels import png_bytes, png_response
from .state import resources

bp = Blueprint("images", __name__)


def _record(ref: str) -> dict:
    r = resources()
    record = r.index.records([params.image_id(r.index, ref)])[0]
    return {**record, "url": url_for("images.image", ref=record["id"])}


@bp.get("/images")
def listing():
    """Indexed images in id order, a page at a time (the web page's gallery)."""
    r = resources()
    offset = params.integer(request.args, "offset", 0, 0, 10**9)
    limit = params.integer(request.args, "limit", 48, 1, 500)
    where = params.where(request.args.getlist("where"))
    with r.filter_lock:
        allowed = r.index.allowed(where)
    ids = r.index.ids if allowed is None else r.index.ids[allowed]
    page = [{**rec, "url": url_for("images.image", ref=rec["id"])}
            for rec in r.index.records(ids[offset:offset + limit])]
    return jsonify({"total": len(ids), "offset": offset, "limit": limit, "images": page})


@bp.get("/images/<ref>")
def image(ref: str):
    """The original file (celeba, folder) or a PNG of the frame (sprites, mnist, shapes)."""
    r = resources()
    record = _record(ref)
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
def meta(ref: str):
    return jsonify(_record(ref))


@bp.get("/transfer")
def transfer():
    """PNG: the base image with the chosen chunks taken from the donor (the index's decoder)."""
    r = resources()
    base = r.index.records([params.image_id(r.index, request.args.get("base"), "base")])[0]
    donor = r.index.records([params.image_id(r.index, request.args.get("donor"), "donor")])[0]
    chunks = params.chunks(r.index, request.args.get("chunks"))
    pixels = [r.images.pixels(base), r.images.pixels(donor)]
    with r.model_lock:
        mixed = render.transfer(r.index.model, *pixels, chunks)
    return png_response(png_bytes(mixed))
