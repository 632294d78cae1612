"""The chunks: their names, naming one (token or loopback only), and a strip per chunk showing
what it changes when taken from other images."""
from __future__ import annotations

import hmac
import json
import ipaddress

from flask import Blueprint, current_app, jsonify, request, url_for

from . import params, render
from .errors import ApiError
from .hosts import LOOPBACK, bare_host
from .pixels import png_bytes, png_response
from .state import resources

bp = Blueprint("chunks", __name__)


def _chunk(i: int) -> int:
    n = resources().index.n_chunks
    if not 0 <= i < n:
        raise ApiError(404, f"no chunk {i}: chunks are 0..{n - 1}")
    return i


def _listing() -> dict:
    idx = resources().index
    return {"n_chunks": idx.n_chunks, "chunk_dim": idx.chunk_dim,
            "chunks": [{"index": c, "name": name, "strip": url_for("chunks.strip", i=c)}
                       for c, name in idx.chunk_names().items()]}


@bp.get("/chunks")
def listing():
    return jsonify(_listing())


@bp.put("/chunks/<int:i>")
def name(i: int):
    """Set (or with null / "" clear) a chunk's name; body {"name": ...}. The grammar of names is
    the index's (retrieval.index.clean_chunk_name), the same for the CLI."""
    _require_naming_rights()
    body = _small_json()
    if not isinstance(body, dict) or "name" not in body or not isinstance(body["name"], (str, type(None))):
        raise ApiError(400, 'send a JSON body {"name": "hair colour"} (null or "" clears the name)')
    r = resources()
    with r.write_lock:
        r.index.name_chunk(str(_chunk(i)), body["name"])
    return jsonify(_listing())


@bp.get("/chunks/<int:i>/strip.png")
def strip(i: int):
    """PNG: donors on top, a base at the left, below each donor the base with chunk i from it."""
    r = resources()
    n = params.integer(request.args, "n", current_app.config["STRIP_IMAGES"], 1, 12)
    key = (_chunk(i), n)
    if key not in r.strips:
        base, *donors = [r.images.pixels(rec) for rec in r.index.records(render.strip_ids(r.index.ids, n))]
        with r.model_lock:
            r.strips[key] = png_bytes(render.strip(r.index.model, base, donors or [base], i))
    return png_response(r.strips[key])


def _small_json(limit: int = 4096):
    """The JSON request body, or None when it is not JSON; deep nesting cannot recurse far in 4 KB."""
    if (request.content_length or 0) > limit:
        raise ApiError(413, f"the body is over {limit} bytes; send {{\"name\": ...}} only")
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        return None


def _require_naming_rights() -> None:
    token = current_app.config["TOKEN"]
    if token:  # an f-string, as from_prefixed_env reads RETRIEVAL_TOKEN=123 as a number
        # the scheme is case-insensitive (RFC 9110 §11.1): 'bearer T' and 'BEARER T' are 'Bearer T'
        scheme, _, sent = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), f"{token}".encode()):
            raise ApiError(401, "naming chunks needs the server's token: send 'Authorization: Bearer TOKEN'",
                           headers={"WWW-Authenticate": "Bearer"})
        return
    try:
        loopback = ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        loopback = False
    # a reverse proxy on this machine connects from loopback for every client: a request that
    # names the server by a non-loopback host came from elsewhere, whatever its address says
    if not loopback or bare_host(request.host) not in LOOPBACK:
        raise ApiError(403, "this server has no token, so chunks can be named only from the machine "
                            "it runs on; restart it with RETRIEVAL_TOKEN set to name chunks remotely")
