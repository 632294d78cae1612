"""`retrieval serve`: the app on waitress (api/server.py), stopped cleanly by SIGINT or SIGTERM."""
from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from threadpoolctl import threadpool_limits

from . import create_app
from .server import listening, make_server

log = logging.getLogger(__name__)

# Worker threads by default. Only requests that hold a thread can share a pass over the index (api/coalesce.py),
# so throughput grows with threads up to the number of concurrent clients: 16 clients on 2 cores at 200K,
# 1 chunk, got 356-359 req/s with 8 threads and 439-516 with 16, 32 or 64 (docs/benchmarks.md).
THREADS = 16


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 5000, threads: int = THREADS, *,
          connection_limit: int = 100, channel_timeout: int = 30, allowed_hosts: Sequence[str] = (),
          ray: str | None = None) -> None:
    """Open INDEX once and answer requests until SIGINT or SIGTERM; in-flight requests finish.

    threads: requests served at once; more than the cores, so that concurrent searches wait in the
    coalescer (api/coalesce.py) and share one pass over the index rather than queue in waitress.

    connection_limit bounds open connections (idle ones make room for new ones, api/server.py),
    channel_timeout closes a connection silent for that many seconds, allowed_hosts are the
    Host names answered besides the loopback ones and a specific listening address, and ray the
    address of the Ray cluster whose actors search the index's shards (retrieval/shards.py)."""
    # one BLAS thread per request: concurrency comes from the worker threads, and OpenBLAS's own
    # pool fighting over the same cores from several threads at once is slower than either alone
    threadpool_limits(1, user_api="blas")
    names = [*allowed_hosts] + ([] if _wildcard(host) else [host])
    config = {"INDEX": str(index), **({"ALLOWED_HOSTS": names} if names else {}), **({"RAY": ray} if ray else {})}
    app = create_app(config)
    server = make_server(app, host, port, threads=threads, connection_limit=connection_limit,
                         channel_timeout=channel_timeout, max_body=app.config["MAX_CONTENT_LENGTH"])

    def stop(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        raise KeyboardInterrupt  # waitress's loop shuts its workers down on this

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    for address, effective_port in listening(server):
        log.info("serving %s (%d images) on http://%s:%s with %d threads", index,
                 len(app.extensions["retrieval"].index), _url_host(address), effective_port, threads)
    if _wildcard(host) and not allowed_hosts:
        log.warning("listening on every interface, but answering only Host names %s: add --allowed-host NAME "
                    "for the names clients use", ", ".join(sorted(app.config["ALLOWED_HOSTS"])))
    try:
        server.run()
    finally:
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("stopped")


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return not host.strip() or host.strip() == "*"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
