"""The access log (with --access-log): one `event=access` line per request, written when
its response has ended, through forkd's own log lines, and the request id that ties the
line to the app's own logs. A request forkd answers itself (a refusal of a malformed or
oversized request, a shed 503) has its line too, with what was parsed of it (refused).
As text it is the combined log format (what log analysers read) followed by the
duration (`12.5ms`) and request_id=; as JSON, one object with every field (duration_ms,
request_id among them).

The request id is the request's `X-Request-ID` when it has a sane one (what a load
balancer or the client set), else one made here; a made one is added to the request's
headers, so the app sees it too, and either way it is sent back in the response.

Cost on the hot path, per request: one call as it comes in (begin: id, referer, agent,
start time) and one as its response ends (ended); a made id is a counter after a
per-process random prefix (no system call); in a worker the line's values go into the
batch of records as one tuple, and the batch is rendered in one loop, before its one
write, straight to the JSON records the primary passes through (with their text after a
tab), without the generic event machinery, each line from a template of what repeats
(see render). About 18k instructions a line in all on ASGI (cachegrind,
bench/profiles/drive.py), against about 84k for the request itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from json.encoder import encode_basestring
from typing import Any

from forkd import log
from forkd.http.framing import split_target
from forkd.logs import record
from forkd.logs.record import Entry, clf_time, rfc3339

REQUEST_ID = b"x-request-id"
MAX_ID = 200  # bytes of a request id honoured; a longer one is replaced


class _Ids:
    """Unique request ids: 16 random hex digits per process, then a counter (16 hex
    digits). They are made 256 at a time, so taking one is a C-level next()."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a worker must not repeat ours

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.stream = itertools.chain.from_iterable(map(self._chunk, itertools.count()))

    def _chunk(self, number: int) -> list[bytes]:
        """Ids 256 * number to 256 * number + 255."""
        return list(map((b"%s%014x" % (self.prefix, number)).__add__, _LAST_DIGITS))


_LAST_DIGITS = [b"%02x" % last for last in range(256)]
_ids = _Ids()
NONE = (b"", b"-", b"-", 0.0)  # begin's for a request not logged


def begin(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes, float]:
    """A logged request's (request id, referer, user agent, perf_counter() when it came
    in), taken when it comes in (when the request has no usable id, one is made and
    added to `headers`: the app sees it); what `ended` hands on, as one object, when it
    has been answered."""
    rid: bytes | None = None
    referer = agent = b"-"
    for name, value in headers:  # (as request_fields, inline: once per request)
        if name == REQUEST_ID:
            if rid is None:
                rid = value if _printable(value) else b""
        elif name == b"referer":
            referer = value
        elif name == b"user-agent":
            agent = value
    if not rid:
        rid = next(_ids.stream)
        headers.append((REQUEST_ID, rid))
    return rid, referer, agent, perf_counter()


def request_fields(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes]:
    """(request id, referer, user agent) among the fields of a request refused before
    it was taken (`refused`), in one pass over them; the id is `-` when it has no
    usable one (`refused` then makes one)."""
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
    return rid or b"-", referer, agent


Refused = tuple[tuple[bytes, bytes, bytes, float], Any, str, bytes, bytes, str]


def refused(client: tuple[str, int | None] | None, method: bytes | None, target: bytes,
            version: str, headers: list[tuple[bytes, bytes]] | None,
            access: tuple[bytes, bytes, bytes, float] | None, elapsed: float | None
            ) -> Refused:
    """The access line's fields of a request forkd answers itself (a refusal, a shed
    503): `ended`'s arguments after the status and size, as far as they are known. Its
    request line as far as it was parsed (`method` None: not even its target, then the
    method and path are `-`; a version not parsed yet, "0.0" as llhttp says it, is `-`;
    the target of a head taken is split into path and query as a request's line splits
    it, one of a head refused is kept whole past its path when not in origin-form);
    begin's `access` for a request whose head was parsed and taken (it made an id,
    which the answer carries back), else the id, referer and user agent among the
    fields parsed so far (without a usable id one is made here, as begin does, and
    sent back: every line has one); the duration from `elapsed` seconds ago (unknown:
    0)."""
    taken = access is not None
    if access is None:
        rid, referer, agent = request_fields(headers) if headers else (b"-", b"-", b"-")
        if rid == b"-":  # (as begin: every line has an id, the answer carries it back)
            rid = next(_ids.stream)
        now = perf_counter()
        access = (rid, referer, agent, now - (elapsed or 0.0))
    if method is None or not target:
        return access, client, "-", b"-", b"", "-"
    if taken or target[:1] == b"/":  # (a taken target was checked: split as its own
        raw_path, query = split_target(target)  # line splits it)
    else:  # (absolute-form, authority-form, `*`, or bytes that are none of them: whole)
        raw_path, query = target, b""
    return (access, client, method.decode("latin-1"), raw_path, query,
            "-" if version == "0.0" else version)


def id_field(access: tuple[bytes, bytes, bytes, float]) -> bytes:
    """The x-request-id field an answer forkd gives itself carries (begin and refused
    always give an id)."""
    return b"x-request-id: %s\r\n" % access[0]


def _printable(value: bytes) -> bool:
    # visible ASCII only: the id goes back into a response header and into log lines
    # ("-" is the log's "none": a client's "-" is no id, one is made as for none)
    return (0 < len(value) <= MAX_ID and value != b"-"
            and all(0x21 <= byte <= 0x7E for byte in value))


def ended(access: tuple[bytes, bytes, bytes, float], status: int, size: int,
          client: tuple[str, int | None] | None, method: str, raw_path: bytes,
          query: bytes, version: str) -> None:
    """The access line of a request `begin` took, once its response has ended (`size`:
    the body bytes sent). In a worker, the values are held as given and rendered with
    the worker's next batch of records; elsewhere the line is made at once
    (log_access). begin's are the request's as it came in, and so are `client`,
    `method`, `raw_path`, `query` and `version`: a cycle takes them as the request
    starts, never from what the app may change (an ASGI scope). They are held by
    reference, not checked: a line that cannot be rendered is lost alone and counted as
    dropped (RecordWriter renders its batch's items one by one when the batch fails)."""
    end = perf_counter()
    defer = _state.access_sink  # (a worker's only: log.setup sees to it)
    if defer is not None:
        defer((end, end - access[3], access, status, size, client, method, raw_path, query,
               version))
        return
    log_access(client, method, raw_path, query, version, access, status, size,
               end - access[3])


def log_access(client: tuple[str, int | None] | None, method: str, raw_path: bytes,
               query: bytes, version: str, fields: tuple[Any, ...], status: int,
               size: int, duration: float) -> None:
    """One access line, made at once (`ended`, outside a worker): `fields` begin with
    the id, referer and user agent (begin's tuple), `size` is the body bytes sent,
    `duration` seconds since the request came in."""
    item = (perf_counter(), duration, (*fields[:3], 0.0), status, size, client, method,
            raw_path, query, version)  # (as `ended` hands it over)
    state = log.state
    if state.access_sink is not None:  # rendered with the worker's next batch of records
        state.access_sink(item)
        return
    send = state.json_sink
    if state.slot is not None and send is not None:
        send(b"".join(render([item])))
        return
    rid, referer, agent = fields[:3]
    log.event("access", logging.INFO, remote=client[0] if client else "-", method=method,
              path=raw_path.decode("latin-1"), query=query.decode("latin-1"),
              status=status, bytes=size, duration_ms=int(duration * 1_000_000) / 1000,
              request_id=rid.decode("latin-1"), http_version=version,
              referer=referer.decode("latin-1"), user_agent=agent.decode("latin-1"))


perf_counter = time.perf_counter
_state = log.state  # (one object for the process's life: log.setup changes its fields)


def render(items: list[Any]) -> list[bytes]:
    """The records of a batch: each access line handed over by `ended` (a tuple of its
    values: the perf_counter() of its end, its duration, begin's tuple, status, size, and
    what the request line said) becomes the JSON record that record.to_json renders for the
    generic `access` event (a unit test holds it to that), with, for --log-format text,
    its text line after a tab (JSON never holds a raw tab), so the primary renders
    nothing; anything else in `items` (bytes) is kept. One loop for the batch, in the
    worker that served the requests, away from their latency.

    What a request shares with the requests before it (its remote address, method,
    path, query, version, referer, user agent and status: a keep-alive connection
    repeats them, and so do most clients of a route) is rendered once, on its second
    sight, into the fixed parts of its JSON record, kept in `_templates`; the record is
    then one join of those parts with its own values (time, size, duration, request
    id: the first three from caches of their bytes). Only its text line (with
    --log-format text) is a `%` format of those values."""
    state = log.state
    head = _head if _head[0] == state.generation else _head_for(state)
    text = state.access_text
    offset = time.time() - time.perf_counter()  # (wall clock of a perf_counter reading)
    second = _second
    base = second[0]  # (the second `second` holds)
    templates, seen, durations, sizes, fractions = _templates, _seen, _durations, _sizes, _MS
    out: list[bytes] = []
    append = out.append
    for item in items:
        if item.__class__ is not tuple:
            append(item)
            continue
        end, duration, fields, status, size, client, method, raw_path, query, version = item
        rid, referer, agent, _ = fields
        key = (client[0] if client else "-", method, raw_path, query, version, referer, agent,
               status)
        made = templates.get(key)
        if made is None and key in seen:  # (its second sight)
            made = _template_for(key, head)
        # (as rfc3339 does: the milliseconds of what is past the second, exact; not
        # int(when * 1000), whose rounding can give the next millisecond)
        when = end + offset
        past = when - base
        if not 0.0 <= past < 1.0:
            second = _second_for(int(when))
            base = second[0]
            past = when - base
        fraction = fractions[int(past * 1000)]
        micros = int(duration * 1_000_000)
        if made is None:  # seen for the first time: rendered on its own
            _first_sight(key)
            append(_line(head, text, second[1] + fraction, second, size, micros,
                         rid, key))
            continue
        if not (rid.isalnum() or not rid.translate(None, _SAFE)):  # (a made id is safe)
            if text and made[1] is not None:
                made = (made[0], None, made[2])  # (the text line escapes as JSON does not)
            rid = _escaped(rid)
        if text and made[1] is not None:
            ts = second[1] + fraction
            append(b"".join((second[3], fraction, made[0],
                             sizes.get(size) or _size(size),
                             durations.get(micros) or _duration(micros), rid, made[2][:-1],
                             made[1] % (ts, second[2], size, micros / 1000,
                                        b'"' + rid + b'"' if b"=" in rid else rid))))
            continue
        append(b"".join((second[3], fraction, made[0],
                         sizes.get(size) or _size(size),
                         durations.get(micros) or _duration(micros), rid, made[2])))
    return out


def _line(head: tuple[int, bytes, bytes], text: bool, ts: bytes,
          second: tuple[int, bytes, bytes, bytes], size: int, micros: int, rid: bytes,
          key: tuple[str, str, bytes, bytes, str, bytes, bytes, int]) -> bytes:
    """An access line rendered without a template (its fields seen for the first time)."""
    remote, method, raw_path, query, version, referer, agent, status = key
    # The remote address, the method and the version come escaped from _ascii's cache
    # (and one that needed it keeps the line JSON only, as any other field that did);
    # the rest is escaped only when it holds a quote, a backslash or a byte outside
    # printable ASCII.
    remote_b, method_b, version_b = _ascii(remote), _ascii(method), _ascii(version)
    plain = not b"".join((raw_path, query, rid, referer, agent, remote_b)).translate(
        None, _SAFE)
    if not plain:
        raw_path, query, rid = _escaped(raw_path), _escaped(query), _escaped(rid)
        referer, agent = _escaped(referer), _escaped(agent)
    line = head[1] % (ts, remote_b, method_b, raw_path, query, status, size, micros // 1000,
                      micros % 1000, rid, version_b, referer, agent)
    if text and plain:
        return line + _TEXT % (ts, head[2], remote_b, second[2],
                               _request(method_b, raw_path, query, version_b),
                               status, size, referer, agent, micros / 1000,
                               b'"' + rid + b'"' if b"=" in rid else rid)
    return line + b"\n"


def _first_sight(key: tuple[Any, ...]) -> None:
    """Remember that these fields were seen: a template is made on their second sight
    (a stream of fields that never repeat costs a set insertion a line, no template).
    Fields longer than MAX_KEPT together are never remembered, so never templated: a
    client's long paths, referers and agents (up to the request line's and a field's
    limits, 8 KiB each) would otherwise hold megabytes of a worker's memory."""
    if len(key[2]) + len(key[3]) + len(key[5]) + len(key[6]) > MAX_KEPT:
        return
    if len(_seen) >= MAX_TEMPLATES:
        _seen.clear()
    _seen.add(key)


def _template_for(key: tuple[str, str, bytes, bytes, str, bytes, bytes, int],
                  head: tuple[int, bytes, bytes]) -> tuple[bytes, bytes | None, bytes]:
    """The line's template for these fields: the JSON record's fixed parts after its
    time (up to its size) and after its request id, and the text line as a `%` format
    of the rest (with its second's time too), None when a field needs escaping (the
    combined format does not escape as JSON does: that line is JSON only, as _line's)."""
    remote, method, raw_path, query, version, referer, agent, status = key
    remote_b, method_b, version_b = _ascii(remote), _ascii(method), _ascii(version)
    plain = not b"".join((raw_path, query, referer, agent, remote_b)).translate(None, _SAFE)

    def literal(value: bytes) -> bytes:  # (in a % format)
        return value.replace(b"%", b"%%")

    # the JSON record's fixed parts: after its time up to its size, and after its id
    after_ts = (head[1][head[1].index(b'"level":') - 2:head[1].index(b'"remote":"') + 10]
                + b'%s","method":"%s","path":"%s","query":"%s","status":%d,"bytes":' % (
                    remote_b, method_b, _escaped(raw_path), _escaped(query), status))
    after_id = b'","http_version":"%s","referer":"%s","user_agent":"%s"}\n' % (
        version_b, _escaped(referer), _escaped(agent))
    text_line = None
    if plain:
        text_line = (b'\t%%s %s %s - - [%%s] "%s" %d %%d "%s" "%s" %%ams '
                     b'request_id=%%s\n' % (
                         literal(head[2]), literal(remote_b),
                         literal(_request(method_b, raw_path, query, version_b)), status,
                         literal(referer), literal(agent)))
    if len(_templates) >= MAX_TEMPLATES:  # (many different requests: start afresh)
        _templates.clear()
    made = _templates[key] = (after_ts, text_line, after_id)
    return made


_LINE = (b'{"ts":"%%s","level":"info","event":"access","pid":%d,"slot":%d,"remote":"%%s",'
         b'"method":"%%s","path":"%%s","query":"%%s","status":%%d,"bytes":%%d,'
         b'"duration_ms":%%d.%%03d,"request_id":"%%s","http_version":"%%s","referer":"%%s",'
         b'"user_agent":"%%s"}')
# record.to_text's rendering of the same line: combined log format, duration, request id
_TEXT = b'\t%s %s %s - - [%s] "%s" %d %d "%s" "%s" %ams request_id=%s\n'


def _request(method: bytes, raw_path: bytes, query: bytes, version: bytes) -> bytes:
    """The combined format's request line (as record.combined): `-` for a request of
    which not even the target was parsed (a refusal, see `refused`)."""
    if method == b"-":
        return b"-"
    return b"%s %s%s%s HTTP/%s" % (method, raw_path, b"?" if query else b"", query, version)

_SAFE = b" !" + bytes(range(0x23, 0x5C)) + bytes(range(0x5D, 0x7F))  # as they are in JSON
MAX_TEMPLATES = 1024  # lines' templates kept (and fields seen once remembered)
MAX_KEPT = 512  # bytes of path, query, referer and agent a template may hold
_templates: dict[tuple[Any, ...], tuple[bytes, bytes | None, bytes]] = {}
_seen: set[tuple[Any, ...]] = set()
# the rest of a timestamp after its second, by milliseconds
_MS = [b".%03dZ" % ms for ms in range(1000)]
# body sizes -> their digits and the next field's name (see render)
_sizes: dict[int, bytes] = {}
# durations in microseconds -> the duration_ms field's value and the next field's name
_durations: dict[int, bytes] = {}


def _size(size: int) -> bytes:
    if len(_sizes) >= 4096:
        _sizes.clear()
    made = _sizes[size] = b'%d,"duration_ms":' % size
    return made


def _duration(micros: int) -> bytes:
    if len(_durations) >= 4096:  # (slow requests vary: keep the cache small)
        _durations.clear()
    made = _durations[micros] = b'%d.%03d,"request_id":"' % (micros // 1000, micros % 1000)
    return made


# the second of the last line rendered: (that second, its JSON timestamp up to the
# second, its combined-format time, and that timestamp after `{"ts":"`: a line's start)
_second: tuple[int, bytes, bytes, bytes] = (-1, b"", b"", b"")
# remote addresses, methods and versions seen -> their bytes inside a JSON string
_ascii_cache: dict[str, bytes] = {}
_head: tuple[int, bytes, bytes] = (-1, b"", b"")  # (log set-up generation, template, prefix)


def _second_for(second: int) -> tuple[int, bytes, bytes, bytes]:
    global _second
    ts = rfc3339(second)  # (…T15:31:37.000Z: its first 19 characters are the second's)
    _second = (second, ts[:19].encode(), clf_time(ts).encode(), b'{"ts":"' + ts[:19].encode())
    return _second


def _ascii(value: str) -> bytes:
    """A remote address's, a method's or a version's bytes in a JSON string, escaped
    once, when first seen: the remote comes from the network (an IPv6 zone, a proxy's
    header) and may hold anything, however it was checked before."""
    data = _ascii_cache.get(value)
    if data is None:
        if len(_ascii_cache) >= 1024:  # (many clients: forget them, keep the cache small)
            _ascii_cache.clear()
        data = _ascii_cache[value] = encode_basestring(value)[1:-1].encode()
    return data


def _head_for(state: log.State) -> tuple[int, bytes, bytes]:
    """This process's line template (its pid and slot filled in) and text prefix."""
    global _head
    _templates.clear()  # (they hold the pid and slot of the last set-up)
    _seen.clear()
    pid, slot = state.pid, state.slot or 0
    prefix = record.prefix(Entry("", "info", pid, slot), state.app_name).encode()
    _head = (state.generation, _LINE % (pid, slot), prefix)
    return _head


def _escaped(value: bytes) -> bytes:
    """A JSON string's inside for these bytes (read as latin-1, as the path is)."""
    if not value.translate(None, _SAFE):
        return value
    return encode_basestring(value.decode("latin-1"))[1:-1].encode()
