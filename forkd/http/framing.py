"""How a response is framed, for both interfaces: no I/O here.

`frame_head` turns a status, the app's header fields and what is known of the request
into the response head and one body writer; the writer turns each body block into the
bytes to send and says at the end whether the connection can carry another request.
One writer per framing, as h11 has: `LengthWriter` (a Content-Length, cut at it),
`ChunkedWriter`, `CloseWriter` (HTTP/1.0 without a length: the close ends the body)
and `NoBodyWriter` (HEAD, 1xx, 204, 304). asgi.py and wsgi.py only translate their
interface's events into these calls. (`split_target`, what both interfaces, WebSockets
and the access log read of a request's target, lives here too.)"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httptools

NO_BODY_STATUSES = frozenset((204, 304))
# RFC 9110 5.6.2: a field name is a token
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_checked_names: set[bytes] = set()  # names already found to be tokens (a few dozen at most)
_MAX_CHECKED = 512
# Response fields frame_head has checked, as they go out: (name, value) -> b"name: value\r\n"
# for a field that does not frame the response, -> (length, that line) for a Content-Length.
# Apps send the same few fields again and again (content-type, server, cache-control):
# one dict lookup instead of lowering, comparing and searching each. Bounded: emptied
# when full, so the fields that keep coming are soon back; long fields (name and value)
# are not kept, so at most _MAX_FIELDS lines of _MAX_KEPT_LINE bytes each; only bytes
# are (a bytearray or memoryview may change after it was checked).
_field_lines: dict[tuple[bytes, bytes], bytes] = {}
_length_lines: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}
_MAX_FIELDS = 1024
_MAX_KEPT_LINE = 256
# Whole status lines and field sections, as above: (status, *fields) -> (the status
# line and field lines, the Content-Length or None, whether a body of that length
# follows), for a section of plain fields (no Date, X-Request-Id or framing field but a
# Content-Length), all bytes. Most apps answer with a few sections over and over: one
# tuple, one hash and one lookup for them all.
_sections: dict[tuple[Any, ...], tuple[bytes, int | None, bool]] = {}
_MAX_SECTIONS = 256
_MAX_KEPT_SECTION = 2048


class ResponseError(Exception):
    """The app's response cannot be framed: a bad status, header or length."""


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


STATUS_LINES: dict[int, bytes] = {int(s): _status_line(int(s)) for s in http.HTTPStatus}


def status_line(code: int, reason: bytes | None = None) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`; `reason` replaces the standard phrase (WSGI's status text)."""
    if reason is not None:
        if not isinstance(code, int) or not 100 <= code <= 999 or _BAD_VALUE.search(reason):
            raise ResponseError(f"invalid HTTP status {code!r} {reason!r}")
        return b"HTTP/1.1 %d %b\r\n" % (code, reason)
    line = STATUS_LINES.get(code)
    if line is None:
        if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 999:
            raise ResponseError(f"invalid HTTP status {code!r}")
        line = STATUS_LINES[code] = _status_line(code)
    return line


def check_field(name: bytes, value: bytes) -> None:
    """Refuse what would split or corrupt the head (response splitting). (frame_head
    does the same inline.)"""
    if name not in _checked_names:
        _check_name(name)
    if _BAD_VALUE.search(value):
        raise ResponseError(f"invalid character in response header {name!r}")


def _check_name(name: bytes) -> None:
    if not _TOKEN.fullmatch(name):
        raise ResponseError(f"invalid response header name {name!r}")
    if len(_checked_names) < _MAX_CHECKED:
        _checked_names.add(name)


@dataclass(slots=True)  # (not frozen: a frozen __init__ costs a setattr call per field)
class Request:
    """What of the request decides the response's framing."""

    head_only: bool  # a HEAD request: the body is never sent
    http11: bool
    keep_alive: bool  # the client and the server both allow another request


class BodyWriter:
    """Frames body blocks. `sent` counts the body bytes the app produced that go out
    (for the access log); `keep_alive` is final once `end` returned."""

    __slots__ = ("keep_alive", "sent", "overrun")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.sent = 0
        self.overrun = False  # the app sent more than its Content-Length

    def write(self, data: bytes) -> bytes:
        raise NotImplementedError

    def end(self) -> bytes:
        return b""

    def last(self, data: bytes) -> bytes:
        """`write(data)` then `end()`: the body's last block."""
        return self.write(data) + self.end()


class LengthWriter(BodyWriter):
    __slots__ = ("length",)

    def __init__(self, keep_alive: bool, length: int) -> None:
        self.keep_alive = keep_alive  # (BodyWriter's, without the call: one per response)
        self.sent = 0
        self.overrun = False
        self.length = length

    def last(self, data: bytes) -> bytes:
        # (write and end in one call: a whole response's body, the usual case)
        room = self.length - self.sent
        size = len(data)
        if size != room:
            if size > room:
                self.overrun = True
                data = data[:room]
                size = room
            self.keep_alive = False  # cut, or short: either way the close must say so
        self.sent += size
        return data

    def write(self, data: bytes) -> bytes:
        room = self.length - self.sent
        if len(data) > room:
            # what goes past the length would be read as the next response: cut it,
            # and close, since the app's idea of the body and the client's now differ
            self.overrun = True
            self.keep_alive = False
            data = data[:room]
        self.sent += len(data)
        return data

    def end(self) -> bytes:
        if self.sent < self.length:
            self.keep_alive = False  # the close tells the client the body is short
        return b""


class ChunkedWriter(BodyWriter):
    __slots__ = ()

    def write(self, data: bytes) -> bytes:
        if not data:
            return b""  # an empty chunk would end the body
        self.sent += len(data)
        return b"%x\r\n%b\r\n" % (len(data), data)

    def end(self) -> bytes:
        return b"0\r\n\r\n"


class CloseWriter(BodyWriter):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(False)

    def write(self, data: bytes) -> bytes:
        self.sent += len(data)
        return data


class NoBodyWriter(BodyWriter):
    __slots__ = ()

    def write(self, data: bytes) -> bytes:
        return b""


def frame_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    request: Request,
    complete_body: int | None,
    date_header: bytes,
    force_close: bool = False,
    reason: bytes | None = None,
    request_id: bytes = b"",
    body: bytes | None = None,
) -> tuple[bytes, BodyWriter]:
    """The response head and the writer of its body; with `body` (the whole body, of
    `complete_body` bytes), the head and that body framed by the writer's `last`.

    `complete_body` is the body's whole size when the app has already handed all of
    it over (then a Content-Length is sent rather than chunks), else None.
    `force_close` ends the connection after this response (draining, unread body).
    The app's Transfer-Encoding and Connection are framing, which is ours: dropped
    (a `Connection: close` from the app is honoured)."""
    keep_alive = request.keep_alive and not force_close
    known = key = None
    writer: BodyWriter
    if reason is None:
        # the status and all fields as one key (a generator of fields is read once here)
        fields: Any = (status, *headers)
        if type(fields[-1]) is list:  # pairs as lists, as in the ASGI spec's examples: as
            fields = (status, *map(tuple, fields[1:]))  # tuples (unhashable, they raise)
        try:
            known = _sections.get(fields)
        except (TypeError, ValueError):  # a pair given as a buffer: field by field
            pass
        else:
            key = fields
        if known is None:
            headers = fields[1:]
    if known is not None:  # the same status and fields, framed before
        section, length, sized = known
        if (sized and complete_body == length and keep_alive
                and request.http11 and not request.head_only):
            # (the usual answer, as below: its whole body is here, as long as it says;
            # with --access-log, the request's id before the Date, as below too)
            writer = LengthWriter(True, length)  # type: ignore[arg-type]
            if body is None:
                if request_id:
                    return b"".join((section, b"x-request-id: ", request_id, b"\r\n",
                                     date_header, b"\r\n")), writer
                return b"".join((section, date_header, b"\r\n")), writer
            writer.sent = length  # type: ignore[assignment]  # (writer.last, inline)
            if request_id:
                return b"".join((section, b"x-request-id: ", request_id, b"\r\n",
                                 date_header, b"\r\n", body)), writer
            return b"".join((section, date_header, b"\r\n", body)), writer
        parts = [section]
        has_date = has_id = False
    else:
        parts, length, keep_alive, has_date, has_id = _frame_fields(
            status, headers, reason, keep_alive, key)
    if request_id and not has_id:  # (with --access-log: see accesslog.begin)
        parts += (b"x-request-id: ", request_id, b"\r\n")
    if not has_date:
        parts.append(date_header)
    if (length is not None and complete_body is not None and complete_body != length
            and not request.head_only):
        keep_alive = False  # the body will be cut or short: say so in the head already
    if status < 200 or status in NO_BODY_STATUSES:
        writer = NoBodyWriter(keep_alive)
    elif length is not None:
        writer = NoBodyWriter(keep_alive) if request.head_only else LengthWriter(keep_alive, length)
    elif complete_body is not None:
        if not (request.head_only and complete_body == 0):  # an empty HEAD: length unknown
            parts.append(b"content-length: %d\r\n" % complete_body)
        writer = NoBodyWriter(keep_alive) if request.head_only else LengthWriter(
            keep_alive, complete_body)
    elif request.http11:  # (a HEAD gets the head its GET would get: RFC 9110 9.3.2)
        parts.append(b"transfer-encoding: chunked\r\n")
        writer = NoBodyWriter(keep_alive) if request.head_only else ChunkedWriter(keep_alive)
    elif request.head_only:
        writer = NoBodyWriter(keep_alive)
    else:
        writer = CloseWriter()  # HTTP/1.0 has no chunks: the close ends the body
    if not writer.keep_alive:
        parts.append(b"connection: close\r\n\r\n")
    elif not request.http11:
        parts.append(b"connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    if body is None:
        return b"".join(parts), writer
    return b"".join(parts) + writer.last(body), writer


def _frame_fields(status: int, headers: Iterable[tuple[bytes, bytes]], reason: bytes | None,
                  keep_alive: bool, section_key: tuple[Any, ...] | None
                  ) -> tuple[list[bytes], int | None, bool, bool, bool]:
    """frame_head's status line and fields, each checked: (the parts of the head so far,
    the Content-Length, keep_alive, a Date given, an X-Request-Id given). The section is
    kept under `section_key` (frame_head's) when every field is a plain one made of bytes."""
    line = STATUS_LINES.get(status) if reason is None else None  # (status_line's usual case)
    parts = [line if line is not None else status_line(status, reason)]
    length: int | None = None
    has_date = has_id = False
    checked = _checked_names
    bad_value = _BAD_VALUE.search
    field_lines = _field_lines
    seen = 0  # fields whose line was kept before: a section is kept when all of them were
    for name, value in headers:
        key: tuple[bytes, bytes] | None = (name, value)
        try:
            line = field_lines.get(key)  # type: ignore[arg-type]
        except (TypeError, ValueError):  # (a bytearray, a writable memoryview: unhashable)
            line = key = None
        if line is not None:  # (checked before, and no framing field)
            parts.append(line)
            seen += 1
            continue
        known_length = _length_lines.get(key)  # type: ignore[arg-type]
        if known_length is not None and length is None:
            length, line = known_length
            parts.append(line)
            seen += 1
            continue
        lname = name.lower()
        plain = False
        if lname == b"content-length":
            if length is not None or not value.strip().isdigit():
                raise ResponseError(f"invalid response content-length {value!r}")
            length = int(value)
        elif lname == b"connection":
            if b"close" in value.lower():
                keep_alive = False
            continue
        elif lname == b"transfer-encoding":
            continue
        elif lname == b"date":
            has_date = True
        elif lname == b"x-request-id":
            has_id = True  # the app answers with its own
        else:
            plain = True
        if name not in checked:  # (check_field, inline: once per header field)
            _check_name(name)
        if bad_value(value):
            raise ResponseError(f"invalid character in response header {name!r}")
        line = b"%b: %b\r\n" % (name, value)
        parts.append(line)
        # (exactly bytes: not a subclass, whose == and hash may be its own)
        if len(line) <= _MAX_KEPT_LINE and type(value) is bytes and type(name) is bytes:
            if plain:
                if len(field_lines) >= _MAX_FIELDS:
                    field_lines.clear()
                field_lines[name, value] = line
            elif lname == b"content-length":
                if len(_length_lines) >= _MAX_FIELDS:
                    _length_lines.clear()
                _length_lines[name, value] = (int(value), line)
    if section_key is not None and seen == len(section_key) - 1 and type(status) is int:
        # Every field's line was kept before (so each is a plain pair of bytes, no Date,
        # no X-Request-Id, none dropped) and the section is kept from its second answer
        # on: a section with a value of its own per answer (a cookie, an ETag, a trace
        # id) is framed field by field and never fills the table.
        section = b"".join(parts)
        if len(section) <= _MAX_KEPT_SECTION:
            if len(_sections) >= _MAX_SECTIONS:
                _sections.clear()
            # (sized: a body of this length follows, as the framing below finds)
            _sections[section_key] = (section, length, length is not None and status >= 200
                                      and status not in NO_BODY_STATUSES)
    return parts, length, keep_alive, has_date, has_id


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Request target -> (raw path, query string); absolute-form and `*` included."""
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
        return path, query
    if target == b"*":
        return b"*", b""
    if b"/" not in target:  # CONNECT's authority-form (checked by the protocol)
        return target, b""
    url = httptools.parse_url(target)
    return url.path or b"/", url.query or b""
