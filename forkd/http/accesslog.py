"""The access log (with --access-log): one `event=access` line per request, written when
its response has ended, through forkd's own log lines, and the request id that ties the
line to the app's own logs. As text it is the combined log format (what log analysers
read) followed by the duration (`12.5ms`) and request_id=; as JSON, one object with
every field (duration_ms, request_id among them).

The request id is the request's `X-Request-ID` when it has a sane one (what a load
balancer or the client set), else one made here; a made one is added to the request's
headers, so the app sees it too, and either way it is sent back in the response.

Cost on the hot path, per request: a made id is a counter after a per-process random
prefix (no system call); in a worker the line is rendered straight to the JSON record
the primary passes through (or turns into text), without the generic event machinery.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any

from forkd import log
from forkd.logs.record import rfc3339

REQUEST_ID = b"x-request-id"
MAX_ID = 200  # bytes of a request id honoured; a longer one is replaced


class _Ids:
    """Unique request ids: 16 random hex digits per process, then a counter."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a worker must not repeat ours

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def make(self) -> bytes:
        return f"{self.prefix}{next(self.counter):016x}".encode()


_ids = _Ids()


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's id; one is made (and added to `headers`) when it has none usable."""
    for name, value in headers:
        if name == REQUEST_ID:
            if _printable(value):
                return value
            break
    made = _ids.make()
    headers.append((REQUEST_ID, made))
    return made


def _printable(value: bytes) -> bool:
    # visible ASCII only: the id goes back into a response header and into log lines
    return 0 < len(value) <= MAX_ID and all(0x21 <= byte <= 0x7E for byte in value)


def id_header(rid: bytes) -> bytes:
    return b"x-request-id: " + rid + b"\r\n"


def log_access(scope: Mapping[str, Any], status: int, size: int, duration: float) -> None:
    """One access line, once the response has ended. `scope` is the ASGI scope or a
    mapping with the same keys (WSGI); its headers carry the request id (request_id
    put it there); `size` is the body bytes sent, `duration` seconds since the request
    came in."""
    rid = referer = agent = b"-"
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID:
            rid = value
        elif name == b"referer":
            referer = value
        elif name == b"user-agent":
            agent = value
    client = scope.get("client")
    remote = client[0] if client else "-"
    method = scope.get("method", "-")
    raw_path = scope.get("raw_path", b"")
    query = scope.get("query_string", b"")
    version = scope.get("http_version", "1.1")
    duration_ms = int(duration * 1_000_000) / 1000  # (round(x, 3) costs more than all else)
    state = log.state
    send = state.json_sink
    if send is None or state.slot is None:
        log.event("access", logging.INFO, remote=remote, method=method,
                  path=raw_path.decode("latin-1"), query=query.decode("latin-1"),
                  status=status, bytes=size, duration_ms=duration_ms,
                  request_id=rid.decode("latin-1"), http_version=version,
                  referer=referer.decode("latin-1"), user_agent=agent.decode("latin-1"))
        return
    # The same JSON record.to_json renders for that event (a unit test holds it to that),
    # built as bytes: the remote address, the method (an HTTP token) and the version need
    # no escaping, the rest only when it holds a quote, a backslash or a byte outside
    # printable ASCII.
    if _UNSAFE.search(b"".join((raw_path, query, rid, referer, agent))) is not None:
        raw_path, query, rid = _escaped(raw_path), _escaped(query), _escaped(rid)
        referer, agent = _escaped(referer), _escaped(agent)
    send(_LINE % (rfc3339(time.time()).encode(), state.pid, state.slot, remote.encode(),
                  method.encode(), raw_path, query, status, size, duration_ms, rid,
                  version.encode(), referer, agent))


_LINE = (b'{"ts":"%s","level":"info","event":"access","pid":%d,"slot":%d,"remote":"%s",'
         b'"method":"%s","path":"%s","query":"%s","status":%d,"bytes":%d,"duration_ms":%a,'
         b'"request_id":"%s","http_version":"%s","referer":"%s","user_agent":"%s"}\n')
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _escaped(value: bytes) -> bytes:
    """A JSON string's inside for these bytes (read as latin-1, as the path is)."""
    if _UNSAFE.search(value) is None:
        return value
    return encode_basestring(value.decode("latin-1"))[1:-1].encode()
