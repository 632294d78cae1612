"""The heavy objects a running app holds once, in app.extensions["retrieval"]."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app

from retrieval.index import Index

from .metrics import Metrics
from .pixels import ImageSource


@dataclass
class Resources:
    index: Index
    images: ImageSource
    metrics: Metrics
    model_lock: threading.Lock = field(default_factory=threading.Lock)    # decoder/encoder calls
    write_lock: threading.Lock = field(default_factory=threading.Lock)    # chunk names
    filter_lock: threading.Lock = field(default_factory=threading.Lock)   # Index's filter-mask cache
    strips: dict = field(default_factory=dict)                            # (chunk, n) -> PNG bytes


def resources() -> Resources:
    """The current app's resources."""
    return current_app.extensions["retrieval"]
