"""`retrieval serve`: the app on waitress, stopped cleanly by SIGINT or SIGTERM."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from threadpoolctl import threadpool_limits
from waitress import create_server

from . import create_app

log = logging.getLogger(__name__)


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 5000, threads: int = 4) -> None:
    """Open INDEX once and answer requests until SIGINT or SIGTERM; in-flight requests finish."""
    # one BLAS thread per request: concurrency comes from the worker threads, and OpenBLAS's own
    # pool fighting over the same cores from several threads at once is slower than either alone
    threadpool_limits(1, user_api="blas")
    app = create_app({"INDEX": str(index)})
    server = create_server(app, host=host, port=port, threads=threads, ident="retrieval")

    def stop(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        raise KeyboardInterrupt  # waitress's loop shuts its workers down on this

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log.info("serving %s (%d images) on http://%s:%s with %d threads", index,
             len(app.extensions["retrieval"].index), host, server.effective_port, threads)
    try:
        server.run()
    finally:
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("stopped")
