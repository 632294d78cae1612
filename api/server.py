"""The WSGI server under `retrieval serve`: waitress, with two changes.

- What waitress answers on its own (a malformed request line or header, a body over the limit,
  headers too large, a transfer coding it does not implement) is JSON like every other error.
- Slow clients cannot fill the connection limit. Waitress stops accepting at the limit, so ~100
  sockets that send half a request lock everyone out until they time out. Here a new connection
  at the limit evicts an idle one instead (one with no request being served and nothing left to
  send): the oldest of the address that holds the most, so one client's sockets go first.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from .errors import CODES

log = logging.getLogger(__name__)

# what a client can do about each error that waitress itself detects
_HINTS = {400: "send a well-formed HTTP/1.1 request",
          413: "the request body is larger than this server accepts; send a smaller one",
          431: "the request headers are larger than this server accepts; send fewer or shorter ones",
          501: "send the body with Content-Length or chunked transfer coding"}


class _JsonErrorTask(ErrorTask):
    """ErrorTask with the API's JSON body instead of text/plain."""

    def execute(self):
        e = self.request.error
        hint = _HINTS.get(e.code, "try again later; the server log has the details")
        body = json.dumps({"error": {"code": CODES.get(e.code, "error"),
                                     "message": f"{e.reason.lower()} ({e.body}); {hint}"}}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers += [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _JsonErrorTask

    @property
    def idle(self) -> bool:
        """No request in service, nothing buffered to send, not already closing: safe to drop."""
        return not (self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed)


class _Server(TcpWSGIServer):
    channel_class = _Channel
    _evicted, _warned = 0, -math.inf

    def readable(self) -> bool:
        """waitress's, except that at the limit it keeps listening while a connection can make room."""
        now = time.time()
        if now >= self.next_channel_cleanup:  # the channel timeout, as waitress runs it
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting and (len(self._map) < self.adj.connection_limit or self._victim() is not None)

    def handle_accept(self) -> None:
        super().handle_accept()
        while len(self._map) > self.adj.connection_limit and (victim := self._victim()) is not None:
            victim.handle_close()  # the loop's own thread, and no task holds an idle channel
            self._evicted += 1
        if self._evicted and time.monotonic() - self._warned >= 60:  # one line a minute under a flood
            log.warning("at the connection limit (%d): closed %d idle connection(s) to make room",
                        self.adj.connection_limit, self._evicted)
            self._evicted, self._warned = 0, time.monotonic()

    def _victim(self) -> _Channel | None:
        """The idle channel to drop: the oldest of the address holding the most idle channels."""
        idle = [c for c in self._map.values() if isinstance(c, _Channel) and c.idle and c.connected]
        if not idle:
            return None
        per_address = Counter(_address(c) for c in idle)
        return min(idle, key=lambda c: (-per_address[_address(c)], c.creation_time))


def _address(channel: HTTPChannel) -> str:
    return channel.addr[0] if isinstance(channel.addr, tuple) else str(channel.addr)


def make_server(app, host: str, port: int, *, threads: int, connection_limit: int, channel_timeout: int,
                max_body: int):
    """A waitress server for app on every address host resolves to; .run() serves, .close() stops."""
    adj = Adjustments(host=host, port=port, threads=threads, ident="retrieval", connection_limit=connection_limit,
                      channel_timeout=channel_timeout, cleanup_interval=max(1, min(channel_timeout, 10)),
                      max_request_body_size=max_body)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    socket_map: dict = {}
    servers = [_Server(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info) for info in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listen = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listen, dispatcher, servers[0].log_info)


def listening(server) -> list[tuple[str, int]]:
    """The (host, port) pairs a make_server result listens on."""
    if isinstance(server, MultiSocketServer):
        return list(server.effective_listen)
    return [(server.effective_host, server.effective_port)]
