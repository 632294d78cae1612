"""The Flask service and web page (DESIGN.md, "The service"), in flaskr's app-factory style.

`create_app()` reads config defaults, then RETRIEVAL_* environment variables, then `test_config`;
it opens the index and loads the model once and keeps them in app.extensions["retrieval"].
"""
from __future__ import annotations

import logging
import time
from urllib.parse import quote

from flask import Flask, current_app, g, request

from disentangle.errors import RetrievalError
from retrieval.index import Index

from . import chunks, errors, images, openapi, ops, search, web
from .hosts import check_host, host_names
from .jsonfast import OrjsonProvider
from .metrics import Metrics
from .pixels import ImageSource
from .state import Resources

access_log = logging.getLogger("api.access")

DEFAULTS = {
    "INDEX": None,                          # the INDEX/ folder to serve (RETRIEVAL_INDEX)
    "DEVICE": "cpu",                        # 'cuda' or 'auto' search with torch on a GPU
    "TOKEN": None,                          # when set, PUT /chunks needs 'Authorization: Bearer TOKEN'
    "MAX_CONTENT_LENGTH": 10 * 2**20,       # upload bodies past this are refused with 413
    "MAX_IMAGE_PIXELS": 40_000_000,         # uploads with more pixels are refused with 400
    "MAX_IMAGE_SIDE": 10_000,               # ... and those wider or taller than this (1 x 40M decodes slowly)
    "ALLOWED_HOSTS": [],                    # Host names answered besides localhost, 127.0.0.1 and ::1
    "MAX_K": 1000,                          # results per page
    "MAX_OFFSET": 100_000,                  # how deep a client may page
    "MAX_BATCH": 64,                        # queries per POST /search/batch
    "IMAGE_MAX_AGE": 86_400,                # seconds browsers may cache images (ids never change)
    "STRIP_IMAGES": 6,                      # donors per chunk strip
}


BLUEPRINTS = (search, images, chunks, ops, web)


def create_app(test_config: dict | None = None) -> Flask:
    """The app serving config['INDEX']."""
    app = Flask(__name__, static_folder=None)
    # no redirects: merging '//' sent '//evil.example' to http://evil.example/ (and as HTML);
    # a path with doubled slashes is a JSON 404 like any other unknown path
    app.url_map.merge_slashes = False
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RETRIEVAL")
    if test_config is not None:
        app.config.from_mapping(test_config)
    app.config["ALLOWED_HOSTS"] = host_names(app.config["ALLOWED_HOSTS"])
    app.json = OrjsonProvider(app)  # keeps the search result's field order
    if not app.config["INDEX"]:
        raise RetrievalError("no index to serve: run `retrieval serve INDEX` or set RETRIEVAL_INDEX")
    if app.config.get("RAY"):  # RETRIEVAL_RAY: a sharded index, one Ray actor per shard (docs/scale.md)
        from retrieval.shards import ShardedIndex, ShardUnavailable

        index = ShardedIndex(app.config["INDEX"], app.config["RAY"])
        app.register_error_handler(ShardUnavailable,
                                   lambda e: errors.error_response(503, str(e), "shard_unavailable"))
    else:
        index = Index(app.config["INDEX"], device=app.config["DEVICE"])
    index.model  # load the encoder/decoder now, not in the first request
    app.extensions["retrieval"] = Resources(index, ImageSource(index.manifest), Metrics())

    errors.register(app)
    for module in BLUEPRINTS:
        app.register_blueprint(module.bp)
    app.extensions["openapi"] = openapi.document(app)
    app.before_request(_start_clock)
    app.before_request(check_host)
    app.after_request(_finish)
    return app


def _start_clock() -> None:
    g.started = time.perf_counter()


def _finish(response):
    """Count, time and log every request (one line each), and forbid content sniffing."""
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    current_app.extensions["retrieval"].metrics.observe(request.method, endpoint, response.status_code, seconds)
    access_log.info('%s "%s %s" %d %.1f ms', request.remote_addr, quote(request.method, safe=_LOGGED),
                    _logged_target()[:300], response.status_code, seconds * 1000)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


# what a logged request line keeps as it is: printable ASCII but for space, '"', '\\' and '%';
# everything else is %XX, so a request cannot start a forged log line (CR, LF), move the
# terminal's cursor (ESC) or blur the line's own fields (space, quotes)
_LOGGED = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\%')


def _logged_target() -> str:
    """Path and query as sent: the path arrives decoded, so its '%' is escaped too; the query is raw."""
    query = quote(request.query_string, safe=_LOGGED + "%")
    return quote(request.path, safe=_LOGGED) + (f"?{query}" if query else "")
