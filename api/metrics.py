"""Request counters, a latency histogram, the index's size and the process's own metrics, with the
official Prometheus client on a registry of the app's own (several apps share a test process, and
the client's global default registry would mix their counts)."""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)

CORE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# label values come from closed sets, or every invented method would be a series kept forever
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"
LABELS = ("method", "endpoint", "status")


class Metrics:
    """Totals per (method, endpoint, status), errors among them, and latency per endpoint."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._requests = Counter("retrieval_http_requests_total", "HTTP requests answered, by method, endpoint and "
                                 "status.", LABELS, registry=self.registry)
        self._errors = Counter("retrieval_http_errors_total", "HTTP requests answered with a 4xx or 5xx status.",
                               LABELS, registry=self.registry)
        self._seconds = Histogram("retrieval_http_request_duration_seconds", "Time to answer a request, by endpoint.",
                                  ("endpoint",), buckets=BUCKETS, registry=self.registry)
        self._core_queries = Histogram("retrieval_search_core_queries", "Queries answered by one call of the search "
                                       "core: concurrent searches with equal options share a call.",
                                       buckets=CORE_BUCKETS, registry=self.registry)
        self._images = Gauge("retrieval_index_images", "Images in the served index.", registry=self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # the children of each label set seen, so a request costs one dict lookup and not three
        # .labels() calls; two threads racing to fill a key get the same children from the client
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request; endpoint is the URL rule or 'unmatched', never the raw path,
        and a method outside METHODS counts as 'other'."""
        method = method if method in METHODS else OTHER_METHOD
        key = (method, endpoint, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self._requests.labels(*key),
                                               self._errors.labels(*key) if status >= 400 else None,
                                               self._seconds.labels(endpoint))
        count, error, latency = children
        count.inc()
        if error is not None:
            error.inc()
        latency.observe(seconds)

    def observe_search(self, queries: int) -> None:
        """Count one call of the search core answering this many queries."""
        self._core_queries.observe(queries)

    def render(self, images: int) -> bytes:
        """The exposition of every metric (serve it as prometheus_client.CONTENT_TYPE_LATEST)."""
        self._images.set(images)
        return generate_latest(self.registry)
