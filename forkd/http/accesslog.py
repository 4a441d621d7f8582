"""The access log: one line per request in the combined log format followed by the
request's duration in milliseconds, on the `forkd.access` logger (off unless
--access-log). The line is written once the response has ended, with the body bytes
actually sent; the fields also travel as the record's `access` attribute, for a
structured formatter."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

access = logging.getLogger("forkd.access")


def _header(headers: Any, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return str(value.decode("latin-1"))
    return "-"


def format_combined(scope: Mapping[str, Any], status: int, size: int, when: float,
                    duration: float = 0.0) -> str:
    client = scope.get("client")
    host = client[0] if client else "-"
    target = scope.get("raw_path", b"").decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(when))
    headers = scope.get("headers", ())
    return (
        f'{host} - - [{stamp}] "{scope.get("method", "-")} {target} '
        f'HTTP/{scope.get("http_version", "1.1")}" {status} {size} '
        f'"{_header(headers, b"referer")}" "{_header(headers, b"user-agent")}" '
        f"{duration * 1000:.1f}ms"
    )


def log_access(scope: Mapping[str, Any], status: int, size: int, duration: float) -> None:
    """`scope` is the ASGI scope, or a mapping with the same keys (WSGI)."""
    client = scope.get("client")
    fields = {
        "remote": client[0] if client else None,
        "method": scope.get("method"),
        "path": scope.get("raw_path", b"").decode("latin-1"),
        "query": scope.get("query_string", b"").decode("latin-1"),
        "status": status,
        "bytes": size,
        "duration_ms": round(duration * 1000, 3),
    }
    access.info(format_combined(scope, status, size, time.time(), duration),
                extra={"access": fields})
