"""The heavy objects a running app holds once, in app.extensions["retrieval"]."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app

from retrieval.index import Index, Query

from .coalesce import Coalescer
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
    coalescer: Coalescer = field(init=False)                              # concurrent single searches

    def __post_init__(self):
        self.coalescer = Coalescer(self.search)

    def search(self, queries: list[Query], options: dict) -> list[dict]:
        """Index.search_many of queries sharing options (chunks, k, offset, weights, where)."""
        self.metrics.observe_search(len(queries))
        if options["where"]:
            with self.filter_lock:  # the index's cache of filter masks is a plain dict, evicted unlocked
                return self.index.search_many(queries, **options)
        return self.index.search_many(queries, **options)


def resources() -> Resources:
    """The current app's resources."""
    return current_app.extensions["retrieval"]
