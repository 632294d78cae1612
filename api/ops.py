"""Operations: /health, /metrics (Prometheus text) and the OpenAPI document."""
from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from .state import resources

bp = Blueprint("ops", __name__)

OPENAPI = Path(__file__).with_name("openapi.json")


@bp.get("/health")
def health():
    idx = resources().index
    return jsonify({"status": "ok", "images": len(idx), "n_chunks": idx.n_chunks,
                    "chunk_dim": idx.chunk_dim, "preset": idx.manifest["preset"],
                    "dataset_format": idx.manifest["dataset_format"]})


@bp.get("/metrics")
def metrics():
    r = resources()
    return Response(r.metrics.render(len(r.index)), content_type=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi():
    return jsonify(json.loads(OPENAPI.read_text(encoding="utf-8")))
