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
import time
from json.encoder import encode_basestring

from forkd import log
from forkd.logs import record
from forkd.logs.record import Entry, clf_time, rfc3339

REQUEST_ID = b"x-request-id"
MAX_ID = 200  # bytes of a request id honoured; a longer one is replaced


class _Ids:
    """Unique request ids: 16 random hex digits per process, then a counter."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a worker must not repeat ours

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.counter = itertools.count()

    def make(self) -> bytes:
        return b"%s%016x" % (self.prefix, next(self.counter))


_ids = _Ids()
NONE = (b"", b"-", b"-")  # request_fields of a request not logged


def request_fields(headers: list[tuple[bytes, bytes]], make: bool = True
                   ) -> tuple[bytes, bytes, bytes]:
    """(request id, referer, user agent) of a request, in one pass over its headers. When
    it has no usable id, one is made and added to `headers` (`make`), else it is `-`."""
    rid: bytes | None = None
    referer = agent = b"-"
    for name, value in headers:
        if name == REQUEST_ID:
            if rid is None:  # (the first one counts)
                rid = value if _printable(value) else b""
        elif name == b"referer":
            referer = value
        elif name == b"user-agent":
            agent = value
    if not rid:
        if not make:
            return b"-", referer, agent
        rid = _ids.make()
        headers.append((REQUEST_ID, rid))
    return rid, referer, agent


def _printable(value: bytes) -> bool:
    # visible ASCII only: the id goes back into a response header and into log lines
    return 0 < len(value) <= MAX_ID and all(0x21 <= byte <= 0x7E for byte in value)


def log_access(client: tuple[str, int | None] | None, method: str, raw_path: bytes,
               query: bytes, version: str, fields: tuple[bytes, bytes, bytes], status: int,
               size: int, duration: float) -> None:
    """One access line, once the response has ended: `fields` are request_fields' (id,
    referer, user agent), `size` the body bytes sent, `duration` seconds since the
    request came in."""
    micros = int(duration * 1_000_000)
    rid, referer, agent = fields
    remote = client[0] if client else "-"
    state = log.state
    send = state.json_sink
    if send is None or state.slot is None:
        log.event("access", logging.INFO, remote=remote, method=method,
                  path=raw_path.decode("latin-1"), query=query.decode("latin-1"),
                  status=status, bytes=size, duration_ms=micros / 1000,
                  request_id=rid.decode("latin-1"), http_version=version,
                  referer=referer.decode("latin-1"), user_agent=agent.decode("latin-1"))
        return
    # The JSON record record.to_json renders for that event (a unit test holds it to
    # that), built as bytes: the remote address, the method (an HTTP token) and the
    # version need no escaping, the rest only when it holds a quote, a backslash or a
    # byte outside printable ASCII.
    plain = not b"".join((raw_path, query, rid, referer, agent)).translate(None, _SAFE)
    if not plain:
        raw_path, query, rid = _escaped(raw_path), _escaped(query), _escaped(rid)
        referer, agent = _escaped(referer), _escaped(agent)
    now = time.time()
    stamp = _stamp
    if int(now * 1000) != stamp[0]:
        stamp = _stamp_for(now)
    head = _head if _head[0] == state.generation else _head_for(state)
    remote_b, method_b, version_b = remote.encode(), method.encode(), version.encode()
    line = head[1] % (stamp[1], remote_b, method_b, raw_path, query, status, size,
                      micros // 1000, micros % 1000, rid, version_b, referer, agent)
    if state.access_text and plain:
        # With --log-format text, the text line goes along (after a tab, which JSON
        # never holds raw): rendered here in the worker, not once per line in the primary.
        target = raw_path + b"?" + query if query else raw_path
        send(line + _TEXT % (stamp[1], head[2], remote_b, stamp[2], method_b, target,
                             version_b, status, size, referer, agent, micros / 1000,
                             b'"' + rid + b'"' if b"=" in rid else rid))
    else:
        send(line + b"\n")


_LINE = (b'{"ts":"%%s","level":"info","event":"access","pid":%d,"slot":%d,"remote":"%%s",'
         b'"method":"%%s","path":"%%s","query":"%%s","status":%%d,"bytes":%%d,'
         b'"duration_ms":%%d.%%03d,"request_id":"%%s","http_version":"%%s","referer":"%%s",'
         b'"user_agent":"%%s"}')
# record.to_text's rendering of the same line: combined log format, duration, request id
_TEXT = b'\t%s %s %s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s" %ams request_id=%s\n'
_SAFE = b" !" + bytes(range(0x23, 0x5C)) + bytes(range(0x5D, 0x7F))  # as they are in JSON
_stamp: tuple[int, bytes, bytes] = (-1, b"", b"")  # (ms, JSON ts, combined-format time)
_head: tuple[int, bytes, bytes] = (-1, b"", b"")  # (log set-up generation, template, prefix)


def _stamp_for(now: float) -> tuple[int, bytes, bytes]:
    global _stamp
    ts = rfc3339(now)
    _stamp = (int(now * 1000), ts.encode(), clf_time(ts).encode())
    return _stamp


def _head_for(state: log.State) -> tuple[int, bytes, bytes]:
    """This process's line template (its pid and slot filled in) and text prefix."""
    global _head
    pid, slot = state.pid, state.slot or 0
    prefix = record.prefix(Entry("", "info", pid, slot), state.app_name).encode()
    _head = (state.generation, _LINE % (pid, slot), prefix)
    return _head


def _escaped(value: bytes) -> bytes:
    """A JSON string's inside for these bytes (read as latin-1, as the path is)."""
    if not value.translate(None, _SAFE):
        return value
    return encode_basestring(value.decode("latin-1"))[1:-1].encode()
