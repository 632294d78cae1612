"""The analysts' web page: one static HTML/JS/CSS page, no build step, nothing fetched from outside."""
from __future__ import annotations

from flask import Blueprint, send_from_directory

from .openapi import media, operation

bp = Blueprint("web", __name__, static_folder="static", static_url_path="/static")


@bp.get("/")
@operation(responses={200: media("HTML", "text/html", binary=False)})
def page():
    """The analysts' web page."""
    response = send_from_directory(bp.static_folder, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
    return response
