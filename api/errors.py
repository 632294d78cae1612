"""The API's one error class and the handlers that render every failure as
`{"error": {"code", "message"}}` with the right status: never a traceback, never HTML."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from disentangle.errors import RetrievalError

log = logging.getLogger(__name__)

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
         415: "unsupported_media_type", 431: "headers_too_large", 500: "internal_error",
         501: "not_implemented"}


class ApiError(RetrievalError):
    """A RetrievalError that knows its HTTP status; a plain RetrievalError is a 400."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.headers = headers or {}


def error_response(status: int, message: str, code: str | None = None):
    """The JSON body and status every error shares."""
    body = {"error": {"code": code or CODES.get(status, "error"), "message": message}}
    return jsonify(body), status


def register(app: Flask) -> None:
    """Route library errors, HTTP errors and anything unexpected to JSON responses."""

    @app.errorhandler(RetrievalError)
    def _retrieval(e: RetrievalError):
        if isinstance(e, ApiError):
            body, status = error_response(e.status, str(e), e.code)
            return body, status, e.headers
        return error_response(400, str(e))

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        response = e.get_response()
        status = e.code or 500
        body, _ = error_response(status, e.description or e.name)
        body.headers.extend((k, v) for k, v in response.headers.items() if k in ("Allow", "Retry-After"))
        return body, status

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unexpected error")  # the server's log gets the traceback; the client never does
        return error_response(500, "internal error; the server log has the details")
