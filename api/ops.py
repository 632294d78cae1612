"""Operations: /health, /metrics (Prometheus text) and the OpenAPI document."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from .openapi import Health, json_response, operation
from .state import resources

bp = Blueprint("ops", __name__)


@bp.get("/health")
@operation(responses={200: json_response("Serving", Health)})
def health():
    """Liveness and what is served."""
    idx = resources().index
    return jsonify({"status": "ok", "images": len(idx), "n_chunks": idx.n_chunks,
                    "chunk_dim": idx.chunk_dim, "preset": idx.manifest["preset"],
                    "dataset_format": idx.manifest["dataset_format"]})


@bp.get("/metrics")
@operation(responses={200: {"description": "The Prometheus text exposition (prometheus_client)",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics():
    """Request counts, latencies, the index's size and the process's own metrics."""
    r = resources()
    return Response(r.metrics.render(len(r.index)), content_type=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
@operation(responses={200: json_response("OpenAPI 3", {"type": "object"})})
def openapi():
    """This document, generated from the request schemas when the app was created."""
    return jsonify(current_app.extensions["openapi"])
