"""The chunks: their names, naming one (token or loopback only), and a strip per chunk showing
what it changes when taken from other images."""
from __future__ import annotations

import hmac
import json
import ipaddress

from flask import Blueprint, current_app, jsonify, request, url_for

from . import render, schemas
from .errors import ApiError
from .hosts import LOOPBACK, bare_host
from .openapi import ChunkList, error, json_response, media, operation
from .pixels import png_bytes, png_response
from .state import resources

bp = Blueprint("chunks", __name__)

CHUNK_REF, CHUNK_NAME, STRIP = schemas.ChunkRef(), schemas.ChunkName(), schemas.Strip()


def _listing() -> dict:
    idx = resources().index
    return {"n_chunks": idx.n_chunks, "chunk_dim": idx.chunk_dim,
            "chunks": [{"index": c, "name": name, "strip": url_for("chunks.strip", i=c)}
                       for c, name in idx.chunk_names().items()]}


@bp.get("/chunks")
@operation(responses={200: json_response("The chunks", ChunkList)})
def listing():
    """The chunks with their names and strip URLs."""
    return jsonify(_listing())


@bp.put("/chunks/<int:i>")
@operation(path=CHUNK_REF, body={"application/json": CHUNK_NAME}, security=[{}, {"bearer": []}], responses={
    200: json_response("The chunks after naming", ChunkList),
    400: error("Bad body, a name outside the grammar, or a name another chunk has"),
    401: error("The server has a token and the request did not send it"),
    403: error("No token configured and the request is not from loopback"),
    404: error("No such chunk")})
def name(args: dict):
    """Name a chunk (null or "" clears the name).

    With RETRIEVAL_TOKEN set, needs 'Authorization: Bearer TOKEN' (scheme in any case); without
    one, only requests from loopback that name the server by a loopback host may name chunks. The
    grammar of names is the index's (retrieval.index.clean_chunk_name), the same for the CLI."""
    _require_naming_rights()
    body = schemas.load(CHUNK_NAME, _small_json())
    r = resources()
    with r.write_lock:
        r.index.name_chunk(str(args["i"]), body["name"])
    return jsonify(_listing())


@bp.get("/chunks/<int:i>/strip.png")
@operation(path=CHUNK_REF, query=STRIP, responses={
    200: media("The strip", "image/png"), 400: error("Bad n"),
    404: error("No such chunk, or pixels not available here")})
def strip(args: dict):
    """What a chunk changes (PNG).

    Donors along the top, one base image at the left, and under each donor the base with chunk i
    taken from that donor."""
    r = resources()
    i, n = args["i"], args["n"]
    key = (i, n)
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
