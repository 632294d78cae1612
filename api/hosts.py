"""Which Host names the service answers: a page on another site that rebinds its own name to
127.0.0.1 reaches the server from loopback, but its requests still carry that site's name in
Host, so refusing unknown names stops DNS rebinding (and keeps foreign names out of any URL the
app builds). Loopback names are always answered: no other site's page can send them."""
from __future__ import annotations

from collections.abc import Iterable

from flask import current_app, request

from .errors import ApiError

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def host_names(setting: str | Iterable[str] | None) -> list[str]:
    """The loopback names and the configured ones (a list, or one comma-separated string), bare."""
    items = setting.split(",") if isinstance(setting, str) else list(setting or [])
    return sorted(LOOPBACK | {bare_host(str(h)) for h in items if str(h).strip()})


def bare_host(host: str) -> str:
    """'Example.COM.:8080' -> 'example.com', '[::1]:5000' -> '::1': the name without its port."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def check_host() -> None:
    """Before every request: refuse a Host header that names none of the allowed hosts."""
    sent = request.environ.get("HTTP_HOST")
    if sent is None:  # HTTP/1.0 without Host: not a browser, so not rebinding
        return
    allowed = current_app.config["ALLOWED_HOSTS"]
    if bare_host(sent) not in allowed:
        raise ApiError(400, f"this server answers to the host names {', '.join(allowed)}, not "
                            f"{sent[:100]!r}; to reach it under another name, start it with "
                            "`retrieval serve --allowed-host NAME` (or set RETRIEVAL_ALLOWED_HOSTS)",
                       "unknown_host")
