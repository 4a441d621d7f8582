"""The access log (with --access-log): one `event=access` line per request, written when
its response has ended, through forkd's own log lines, and the request id that ties the
line to the app's own logs. As text it is the combined log format (what log analysers
read) followed by the duration (`12.5ms`) and request_id=; as JSON, one object with
every field (duration_ms, request_id among them).

The request id is the request's `X-Request-ID` when it has a sane one (what a load
balancer or the client set), else one made here; a made one is added to the request's
headers, so the app sees it too, and either way it is sent back in the response.

Cost on the hot path, per request: a made id is a counter after a per-process random
prefix (no system call); in a worker the request's fields go into the batch of records
as one tuple, and the batch is rendered in one loop, before its one write, straight to
the JSON records the primary passes through (with their text after a tab), without the
generic event machinery.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from json.encoder import encode_basestring
from typing import Any

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
        # next(self.stream) is the next id, made in C without a Python call
        self.stream = map(b"%s%016x".__mod__, zip(itertools.repeat(self.prefix),
                                                    itertools.count()))


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
        rid = next(_ids.stream)
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
    state = log.state
    defer, send = state.access_sink, state.json_sink
    if state.slot is not None and (defer is not None or send is not None):
        item = (time.perf_counter(), client, method, raw_path, query, version, fields,
                status, size, duration)
        if defer is not None:  # a worker: rendered with its next batch of records
            defer(item)
        else:
            assert send is not None
            send(b"".join(render([item])))
        return
    rid, referer, agent = fields
    log.event("access", logging.INFO, remote=client[0] if client else "-", method=method,
              path=raw_path.decode("latin-1"), query=query.decode("latin-1"),
              status=status, bytes=size, duration_ms=int(duration * 1_000_000) / 1000,
              request_id=rid.decode("latin-1"), http_version=version,
              referer=referer.decode("latin-1"), user_agent=agent.decode("latin-1"))


def render(items: list[Any]) -> list[bytes]:
    """The records of a batch: each access line handed to log_access's `defer` (a tuple
    of its arguments, after the perf_counter() of its end) becomes the JSON record that
    record.to_json renders for the generic `access` event (a unit test holds it to that),
    with, for --log-format text, its text line after a tab (JSON never holds a raw tab),
    so the primary renders nothing; anything else in `items` (bytes) is kept. One loop
    for the batch, in the worker that served the requests, away from their latency."""
    state = log.state
    head = _head if _head[0] == state.generation else _head_for(state)
    line_format, prefix, text = head[1], head[2], state.access_text
    offset = time.time() - time.perf_counter()  # (wall clock of a perf_counter reading)
    second, last_ms, ts = _second, -1, b""
    ascii_ = _ascii
    out: list[bytes] = []
    for item in items:
        if item.__class__ is not tuple:
            out.append(item)
            continue
        end, client, method, raw_path, query, version, fields, status, size, duration = item
        micros = int(duration * 1_000_000)
        rid, referer, agent = fields
        # The remote address, the method (an HTTP token) and the version need no
        # escaping; the rest only when it holds a quote, a backslash or a byte outside
        # printable ASCII.
        plain = not b"".join((raw_path, query, rid, referer, agent)).translate(None, _SAFE)
        if not plain:
            raw_path, query, rid = _escaped(raw_path), _escaped(query), _escaped(rid)
            referer, agent = _escaped(referer), _escaped(agent)
        ms = int((end + offset) * 1000)
        if ms != last_ms:  # (a busy worker ends many requests in one millisecond)
            last_ms = ms
            if ms // 1000 != second[0]:
                second = _second_for(ms // 1000)
            ts = b"%s.%03dZ" % (second[1], ms % 1000)
        remote = client[0] if client else "-"
        remote_b = ascii_.get(remote) or _ascii_for(remote)
        method_b = ascii_.get(method) or _ascii_for(method)
        version_b = ascii_.get(version) or _ascii_for(version)
        line = line_format % (ts, remote_b, method_b, raw_path, query, status, size,
                              micros // 1000, micros % 1000, rid, version_b, referer, agent)
        if text and plain:
            target = raw_path + b"?" + query if query else raw_path
            out.append(line + _TEXT % (
                ts, prefix, remote_b, second[2], method_b, target, version_b, status, size,
                referer, agent, micros / 1000, b'"' + rid + b'"' if b"=" in rid else rid))
        else:
            out.append(line + b"\n")
    return out


_LINE = (b'{"ts":"%%s","level":"info","event":"access","pid":%d,"slot":%d,"remote":"%%s",'
         b'"method":"%%s","path":"%%s","query":"%%s","status":%%d,"bytes":%%d,'
         b'"duration_ms":%%d.%%03d,"request_id":"%%s","http_version":"%%s","referer":"%%s",'
         b'"user_agent":"%%s"}')
# record.to_text's rendering of the same line: combined log format, duration, request id
_TEXT = b'\t%s %s %s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s" %ams request_id=%s\n'
_SAFE = b" !" + bytes(range(0x23, 0x5C)) + bytes(range(0x5D, 0x7F))  # as they are in JSON
# (the second, its JSON timestamp to the second, its combined-format time)
_second: tuple[int, bytes, bytes] = (-1, b"", b"")
_ascii: dict[str, bytes] = {}  # the bytes of remote addresses, methods and versions seen
_head: tuple[int, bytes, bytes] = (-1, b"", b"")  # (log set-up generation, template, prefix)


def _second_for(second: int) -> tuple[int, bytes, bytes]:
    global _second
    ts = rfc3339(second)  # (…T15:31:37.000Z: its first 19 characters are the second's)
    _second = (second, ts[:19].encode(), clf_time(ts).encode())
    return _second


def _ascii_for(value: str) -> bytes:
    if len(_ascii) >= 1024:  # (many clients: forget them, keep the cache small)
        _ascii.clear()
    data = _ascii[value] = value.encode()
    return data


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
