"""The response framer alone, as h11 tests its writers: a head and body blocks go
in, bytes and the keep-alive verdict come out. No socket."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd.http.framing import (
    ChunkedWriter,
    CloseWriter,
    LengthWriter,
    NoBodyWriter,
    Request,
    ResponseError,
    frame_head,
)

DATE = b"date: Tue, 01 Dec 2026 00:00:00 GMT\r\n"
GET11 = Request(head_only=False, http11=True, keep_alive=True)
GET10 = Request(head_only=False, http11=False, keep_alive=True)
HEAD11 = Request(head_only=True, http11=True, keep_alive=True)


def fields(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")[1:-2]


def run(status: int, headers: list[tuple[bytes, bytes]], request: Request,
        blocks: list[bytes], complete: bool = False, **kw) -> tuple[bytes, bool]:
    """Frame a response whose body comes in `blocks`; the bytes sent and keep-alive."""
    whole = b"".join(blocks) if complete else None
    head, writer = frame_head(status, headers, request,
                              complete_body=None if whole is None else len(whole),
                              date_header=DATE, **kw)
    out = head + b"".join(writer.write(block) for block in blocks) + writer.end()
    return out, writer.keep_alive


def test_complete_body_gets_a_content_length() -> None:
    out, keep = run(200, [(b"content-type", b"text/plain")], GET11, [b"hello"], complete=True)
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + DATE
                   + b"content-length: 5\r\n\r\nhello")
    assert keep


def test_streamed_body_is_chunked_on_11_and_ends_with_the_last_chunk() -> None:
    out, keep = run(200, [], GET11, [b"ab", b"", b"cde"])
    assert out.endswith(b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert keep


def test_streamed_body_on_10_is_ended_by_the_close() -> None:
    head, writer = frame_head(200, [], GET10, complete_body=None, date_header=DATE)
    assert isinstance(writer, CloseWriter)
    assert b"connection: close\r\n" in head and b"transfer-encoding" not in head
    assert writer.write(b"abc") == b"abc" and not writer.keep_alive


def test_http10_keep_alive_is_said_explicitly() -> None:
    out, keep = run(200, [], GET10, [b"x"], complete=True)
    assert b"connection: keep-alive\r\n" in out and keep


def test_body_past_the_content_length_is_cut_and_closes() -> None:
    head, writer = frame_head(200, [(b"content-length", b"5")], GET11, complete_body=None,
                              date_header=DATE)
    assert isinstance(writer, LengthWriter)
    assert writer.write(b"0123") == b"0123"
    assert writer.write(b"456789") == b"4"
    assert writer.overrun and not writer.keep_alive
    assert writer.sent == 5


def test_known_overrun_closes_in_the_head_already() -> None:
    out, keep = run(200, [(b"content-length", b"5")], GET11, [b"0123456789"], complete=True)
    assert out.endswith(b"connection: close\r\n\r\n01234") and not keep


def test_short_body_closes() -> None:
    head, writer = frame_head(200, [(b"content-length", b"5")], GET11, complete_body=None,
                              date_header=DATE)
    writer.write(b"ab")
    writer.end()
    assert not writer.keep_alive


@pytest.mark.parametrize("status", [101, 204, 304])
def test_statuses_without_a_body(status: int) -> None:
    out, keep = run(status, [], GET11, [b"ignored"], complete=True)
    assert b"content-length" not in out and b"transfer-encoding" not in out
    assert out.endswith(b"\r\n\r\n") and b"ignored" not in out and keep


def test_head_has_the_gets_length_but_no_body() -> None:
    out, _ = run(200, [], HEAD11, [b"hello"], complete=True)
    assert b"content-length: 5\r\n" in out and not out.endswith(b"hello")
    head, writer = frame_head(200, [], HEAD11, complete_body=0, date_header=DATE)
    assert b"content-length" not in head  # an empty HEAD answer: the length is unknown
    head, writer = frame_head(200, [], HEAD11, complete_body=None, date_header=DATE)
    assert b"transfer-encoding: chunked\r\n" in head and isinstance(writer, NoBodyWriter)
    assert writer.write(b"abc") == b"" and writer.end() == b""


def test_apps_framing_headers_are_ours() -> None:
    out, keep = run(200, [(b"Transfer-Encoding", b"gzip"), (b"Connection", b"close")], GET11,
                    [b"x"], complete=True)
    assert b"gzip" not in out and b"Connection: close" not in out
    assert b"connection: close\r\n" in out and not keep


def test_apps_date_is_kept_and_ours_not_added() -> None:
    out, _ = run(200, [(b"date", b"Mon, 01 Jan 2024 00:00:00 GMT")], GET11, [], complete=True)
    assert DATE not in out and b"date: Mon" in out


def test_force_close_and_custom_reason() -> None:
    out, keep = run(299, [], GET11, [], complete=True, force_close=True, reason=b"Fine")
    assert out.startswith(b"HTTP/1.1 299 Fine\r\n") and b"connection: close" in out
    assert not keep


@pytest.mark.parametrize(("name", "value"), [
    (b"x-a", b"a\r\nset-cookie: x"), (b"x-a", b"a\nb"), (b"x-a", b"a\x00"),
    (b"x:a", b"1"), (b"x a", b"1"), (b"", b"1"), (b"x\r\n", b"1"),
])
def test_response_splitting_is_refused(name: bytes, value: bytes) -> None:
    with pytest.raises(ResponseError):
        frame_head(200, [(name, value)], GET11, complete_body=0, date_header=DATE)


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1, 1", b""])
def test_bad_content_length_is_refused(value: bytes) -> None:
    with pytest.raises(ResponseError):
        frame_head(200, [(b"content-length", value)], GET11, complete_body=0, date_header=DATE)


def test_bad_status_is_refused() -> None:
    for status in (99, 1000):
        with pytest.raises(ResponseError):
            frame_head(status, [], GET11, complete_body=0, date_header=DATE)


def test_empty_block_never_ends_a_chunked_body() -> None:
    writer = ChunkedWriter(True)
    assert writer.write(b"") == b""
    assert writer.end() == b"0\r\n\r\n"


@given(st.sampled_from(["length", "chunked", "close", "nobody"]), st.integers(0, 12),
       st.lists(st.binary(max_size=6), max_size=3), st.binary(max_size=12))
def test_last_block_is_write_then_end(kind: str, length: int, before: list[bytes],
                                      block: bytes) -> None:
    """`last` (what ASGI calls for a body's final block) frames exactly as write + end:
    the same bytes, and the same verdict on a body cut at or short of its length."""
    def make() -> Any:
        return {"length": lambda: LengthWriter(True, length),
                "chunked": lambda: ChunkedWriter(True), "close": CloseWriter,
                "nobody": lambda: NoBodyWriter(True)}[kind]()

    one, two = make(), make()
    for part in before:
        assert one.write(part) == two.write(part)
    assert one.last(block) == two.write(block) + two.end()
    assert (one.keep_alive, one.sent, one.overrun) == (two.keep_alive, two.sent, two.overrun)


def test_fields_sent_again_are_framed_and_checked_as_the_first_time() -> None:
    """frame_head keeps the fields it checked: a field sent again goes out the same, a
    Content-Length kept from before still counts (twice is still refused, a body past it
    still cut), and what is kept stays bounded however many fields an app makes up."""
    from forkd.http import framing

    headers = [(b"Content-Type", b"text/plain"), (b"content-length", b"5")]
    first = run(200, headers, GET11, [b"hello"], complete=True)
    again = run(200, list(headers), GET11, [b"hello"], complete=True)
    assert again == first == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              b"content-length: 5\r\n" + DATE + b"\r\nhello", True)
    out, keep = run(200, headers, GET11, [b"hello, world"], complete=True)
    assert out.endswith(b"\r\n\r\nhello") and not keep  # (cut at the kept length: closes)
    with pytest.raises(ResponseError):
        frame_head(200, headers + [(b"content-length", b"5")], GET11, complete_body=5,
                   date_header=DATE)
    with pytest.raises(ResponseError):  # a kept name, a value never checked
        frame_head(200, [(b"Content-Type", b"text/plain\r\nx: y")], GET11, complete_body=0,
                   date_header=DATE)
    out, keep = run(200, [(b"x-a", bytearray(b"b"))], GET11, [b""], complete=True)
    assert b"\r\nx-a: b\r\n" in out
    for number in range(3 * framing._MAX_FIELDS):
        frame_head(200, [(b"x-n", b"%d" % number)], GET11, complete_body=0, date_header=DATE)
    assert len(framing._field_lines) <= framing._MAX_FIELDS


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "writable memoryview"])
def test_a_header_value_of_each_bytes_type_goes_out_every_time(kind: str) -> None:
    """A value the app gives as bytes, a bytearray or a memoryview (read-only or over a
    bytearray: hashing that one raises ValueError, not TypeError) is sent each time."""
    value: Any = {"bytes": b"one", "bytearray": bytearray(b"one"),
                  "memoryview": memoryview(b"one"),
                  "writable memoryview": memoryview(bytearray(b"one"))}[kind]
    for _ in range(2):
        out, keep = run(200, [(b"x-a", value)], GET11, [b"hi"], complete=True)
        assert b"\r\nx-a: one\r\n" in out and out.endswith(b"\r\n\r\nhi") and keep


@pytest.mark.parametrize("view", [lambda buffer: buffer, memoryview,
                                  lambda buffer: memoryview(buffer).toreadonly()],
                         ids=["bytearray", "memoryview", "read-only memoryview"])
def test_a_header_value_changed_in_place_goes_out_changed_and_is_checked_again(
        view: Any) -> None:
    """A value in a buffer the app changes between two responses goes out as it is
    now, never as a line kept from before; a CR LF put in it later is still refused."""
    buffer = bytearray(b"one")
    value = view(buffer)
    out, _ = run(200, [(b"x-view", value)], GET11, [b""], complete=True)
    assert b"\r\nx-view: one\r\n" in out
    buffer[:] = b"two"
    out, _ = run(200, [(b"x-view", value)], GET11, [b""], complete=True)
    assert b"\r\nx-view: two\r\n" in out
    buffer[:] = b"a\r\n"
    with pytest.raises(ResponseError):
        frame_head(200, [(b"x-view", value)], GET11, complete_body=0, date_header=DATE)


def test_what_frame_head_keeps_is_bounded_in_entries_and_in_bytes() -> None:
    """However many distinct fields an app makes up, and however long (a long name with a
    short value too), the kept lines stay at most _MAX_FIELDS of _MAX_KEPT_LINE bytes,
    for the plain fields and for the Content-Lengths alike."""
    from forkd.http import framing

    long_name = b"x-" + b"n" * 4096
    out, _ = run(200, [(long_name, b"1")], GET11, [b""], complete=True)
    assert b"\r\n" + long_name + b": 1\r\n" in out
    assert (long_name, b"1") not in framing._field_lines
    for number in range(3 * framing._MAX_FIELDS):
        frame_head(200, [(b"x-n", b"%d" % number), (b"x-" + b"n" * number, b"v"),
                         (b"content-length", b"%d" % number)], GET11,
                   complete_body=number, date_header=DATE)
    for kept in (framing._field_lines, framing._length_lines):
        assert 0 < len(kept) <= framing._MAX_FIELDS
    lines = [*framing._field_lines.values(), *(line for _, line in framing._length_lines.values())]
    assert max(map(len, lines)) <= framing._MAX_KEPT_LINE


SECTIONS = [
    [(b"content-type", b"text/plain"), (b"content-length", b"5")],
    [(b"content-type", b"text/plain")],
    [],
    [(b"Content-Length", b"3"), (b"x-a", b"b")],
    [(b"content-length", b"0")],
    [(b"x-a", b"b"), (b"date", b"Mon, 30 Nov 2026 00:00:00 GMT")],
    [(b"x-request-id", b"app-made"), (b"content-length", b"5")],
    [(b"connection", b"close"), (b"content-length", b"5")],
    [(b"transfer-encoding", b"chunked"), (b"x-a", b"b")],
]
REQUESTS = [Request(head_only, http11, keep_alive) for head_only in (False, True)
            for http11 in (False, True) for keep_alive in (False, True)]


@pytest.mark.parametrize("status", [200, 404, 204, 304, 101, 599])
@pytest.mark.parametrize("section", range(len(SECTIONS)))
def test_a_status_and_fields_sent_again_are_framed_as_the_first_time(
        status: int, section: int) -> None:
    """frame_head keeps whole status-and-fields sections it framed: a response with one
    of them seen before gets the same head and writer as a first one, whatever the
    request (HEAD, 1.0, close), the body's size, force_close and the request id."""
    from forkd.http import framing

    headers = SECTIONS[section]
    cases = [(request, complete, force_close, request_id) for request in REQUESTS
             for complete in (None, 0, 5, 6) for force_close in (False, True)
             for request_id in (b"", b"rid")]

    def frame(case: tuple[Any, ...]) -> tuple[bytes, str, bool, int | None]:
        request, complete, force_close, request_id = case
        head, writer = frame_head(status, list(headers), request, complete, DATE,
                                  force_close, None, request_id)
        return (head, type(writer).__name__, writer.keep_alive,
                getattr(writer, "length", None))

    framing._sections.clear()
    first = []
    for case in cases:
        framing._sections.clear()
        first.append(frame(case))
    frame(cases[0])  # (kept now, where it may be)
    assert [frame(case) for case in cases] == first
    kept = (status, *headers) in framing._sections
    # only sections of plain fields are kept: a Date or an id of the app's, or a framing
    # field other than a Content-Length, is looked at each time
    assert kept == (section < 5)


def test_a_section_given_as_lists_or_a_generator_is_framed_each_time() -> None:
    """Pairs given as lists (as the ASGI spec's examples do; unhashable), or fields from
    a generator (read once), are framed as a list of tuples is, the first time and every
    time after; lists are kept as the tuples they hold."""
    from forkd.http import framing

    framing._sections.clear()
    expected, _ = frame_head(200, [(b"x-a", b"b"), (b"content-length", b"2")], GET11, 2, DATE)
    framing._sections.clear()
    for _ in range(2):
        head, writer = frame_head(200, [[b"x-a", b"b"], [b"content-length", b"2"]], GET11,
                                  2, DATE)
        assert head == expected and isinstance(writer, LengthWriter)
        assert (200, (b"x-a", b"b"), (b"content-length", b"2")) in framing._sections
        head, writer = frame_head(200, ((name, value) for name, value in
                                        [(b"x-a", b"b"), (b"content-length", b"2")]),
                                  GET11, 2, DATE)
        assert head == expected and isinstance(writer, LengthWriter)


def test_kept_sections_are_bounded_in_entries_and_in_bytes() -> None:
    """However many sections an app makes up (a field that changes every time), at most
    _MAX_SECTIONS are kept, none over _MAX_KEPT_SECTION bytes; a long one goes out whole.
    A section seen once is not kept: one-off values do not push out the repeated ones."""
    from forkd.http import framing

    many = [(b"x-%d" % number, b"v" * 200) for number in range(20)]
    out, keep = run(200, many, GET11, [b"hi"], complete=True)
    assert all(b"%b: %b\r\n" % pair in out for pair in many) and keep
    framing._sections.clear()
    for number in range(3 * framing._MAX_SECTIONS):  # a value of its own in every answer
        frame_head(200, [(b"etag", b"%d" % number)], GET11, 0, DATE)
    assert not framing._sections  # framed field by field: nothing kept, nothing evicted
    for number in range(3 * framing._MAX_SECTIONS):  # each answered twice: kept, bounded
        for _ in range(2):
            frame_head(200, [(b"etag", b"%d" % number)], GET11, 0, DATE)
    assert 0 < len(framing._sections) <= framing._MAX_SECTIONS
    assert max(len(section) for section, _, _ in framing._sections.values()) \
        <= framing._MAX_KEPT_SECTION


@pytest.mark.parametrize("section", range(len(SECTIONS)))
@pytest.mark.parametrize("body", [b"", b"hello", b"hello!"])
def test_a_whole_body_given_is_framed_as_its_writers_last_block(section: int,
                                                                 body: bytes) -> None:
    """frame_head(..., body=...) is the head and `writer.last(body)` in one call, for a
    section seen before or not, whatever the request."""
    from forkd.http import framing

    for request in REQUESTS:
        for kept in (False, True):
            if not kept:
                framing._sections.clear()
            head, writer = frame_head(200, SECTIONS[section], request, len(body), DATE)
            expected = head + writer.last(body)
            if not kept:
                framing._sections.clear()
            out, whole = frame_head(200, SECTIONS[section], request, len(body), DATE,
                                    False, None, b"", body)
            assert out == expected
            assert (whole.keep_alive, whole.sent) == (writer.keep_alive, writer.sent)


@pytest.mark.parametrize("body", [None, b"hello"])
def test_a_kept_section_with_a_request_id_frames_as_the_first_time(body: bytes | None) -> None:
    """With --access-log every answer carries its request's id: a section framed before
    gives the same head (the id before the Date) as the first framing did, and a whole
    body given goes out after it."""
    from forkd.http import framing

    headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    framing._sections.clear()
    framing._field_lines.clear()
    framing._length_lines.clear()
    # the first framings: field by field, then kept
    first = [frame_head(200, list(headers), GET11, 5, DATE, request_id=b"id-%d" % n,
                        body=body) for n in range(3)]
    assert (200, *headers) in framing._sections
    again = frame_head(200, list(headers), GET11, 5, DATE, request_id=b"id-0", body=body)
    assert again[0] == first[0][0]
    assert again[0].startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                               b"content-length: 5\r\nx-request-id: id-0\r\n" + DATE + b"\r\n")
    assert again[0].endswith(b"\r\n\r\n" + (body or b""))
