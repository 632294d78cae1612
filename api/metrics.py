"""Request counters and a latency histogram, written in the Prometheus text format by hand
(three metric families do not need a client library)."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# label values come from closed sets, or every invented method would be a series kept forever
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"


def _labels(**labels: str) -> str:
    esc = {k: str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Metrics:
    """Thread-safe totals per (method, endpoint, status) and latency per endpoint."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self._sums: dict[str, float] = defaultdict(float)

    def observe(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request; endpoint is the URL rule or 'unmatched', never the raw path,
        and a method outside METHODS counts as 'other'."""
        method = method if method in METHODS else OTHER_METHOD
        with self._lock:
            self._requests[method, endpoint, status] += 1
            self._buckets[endpoint][bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[endpoint] += seconds

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        with self._lock:
            requests = sorted(self._requests.items())
            buckets = {e: list(b) for e, b in sorted(self._buckets.items())}
            sums = dict(self._sums)
        lines = ["# HELP retrieval_http_requests_total HTTP requests answered, by method, endpoint and status.",
                 "# TYPE retrieval_http_requests_total counter"]
        lines += [f"retrieval_http_requests_total{_labels(method=m, endpoint=e, status=s)} {n}"
                  for (m, e, s), n in requests]
        lines += ["# HELP retrieval_http_errors_total HTTP requests answered with a 4xx or 5xx status.",
                  "# TYPE retrieval_http_errors_total counter"]
        lines += [f"retrieval_http_errors_total{_labels(method=m, endpoint=e, status=s)} {n}"
                  for (m, e, s), n in requests if s >= 400]
        lines += ["# HELP retrieval_http_request_duration_seconds Time to answer a request, by endpoint.",
                  "# TYPE retrieval_http_request_duration_seconds histogram"]
        for endpoint, counts in buckets.items():
            total = 0
            for le, n in zip([*map(str, BUCKETS), "+Inf"], counts):
                total += n
                lines.append(f"retrieval_http_request_duration_seconds_bucket{_labels(endpoint=endpoint, le=le)} {total}")
            lines.append(f"retrieval_http_request_duration_seconds_sum{_labels(endpoint=endpoint)} {sums[endpoint]:.6f}")
            lines.append(f"retrieval_http_request_duration_seconds_count{_labels(endpoint=endpoint)} {total}")
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
