"""Hostile and malformed requests: each gets its error status with `connection: close`,
the server closes the connection, and the one worker (-w 1) that refused it goes on
answering (its pid is unchanged). Statuses follow RFC 9110/9112; where reasonable
servers differ (nginx, uvicorn, gunicorn), every status one of them would send is accepted."""

from __future__ import annotations

import select
import time

import pytest
from httpkit import Conn, Served, Truncated

pytestmark = pytest.mark.integration

MAX_BODY = 1000
H = b"Host: test\r\n"


@pytest.fixture(scope="module")
def server(serve) -> Served:
    return serve("http_asgi_probe:app", "--max-body-size", str(MAX_BODY),
                 "--header-timeout", "1")


@pytest.fixture(scope="module")
def worker_pid(server: Served) -> int:
    return server.pid()


def post(headers: bytes, body: bytes = b"", path: bytes = b"/echo") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\n" + H + headers + b"\r\n" + body


def get_with(header_lines: bytes, target: bytes = b"/") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + H + header_lines + b"\r\n"


CHUNKED = b"Transfer-Encoding: chunked\r\n"

# (id, raw request, acceptable statuses)
MALFORMED: list[tuple[str, bytes, set[int]]] = [
    # -- request line and target
    ("target-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", {414}),
    ("target-control-char", get_with(b"", b"/a\x01b"), {400}),
    ("target-del-char", get_with(b"", b"/a\x7fb"), {400}),
    ("target-nul", get_with(b"", b"/a\x00b"), {400}),
    ("target-tab", get_with(b"", b"/a\tb"), {400}),
    ("target-raw-non-ascii", get_with(b"", "/caf\u00e9".encode()), {400}),
    ("target-not-a-path", get_with(b"", b"foo"), {400}),
    ("target-broken-absolute-url", get_with(b"", b"http://[::1"), {400}),
    ("target-bad-port", get_with(b"", b"http://example.com:99999/"), {400}),
    ("connect-origin-form", b"CONNECT /x HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("asterisk-form-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("method-invalid-char", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("method-nul", b"GE\x00T / HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("method-lowercase", b"get / HTTP/1.1\r\n" + H + b"\r\n", {400, 501}),
    ("method-unknown", b"FROB / HTTP/1.1\r\n" + H + b"\r\n", {400, 405, 501}),
    ("version-garbage", b"GET / HTTP/1.1x\r\n" + H + b"\r\n", {400}),
    ("version-lowercase", b"GET / http/1.1\r\n" + H + b"\r\n", {400}),
    ("version-no-minor", b"GET / HTTP/1\r\n" + H + b"\r\n", {400}),
    ("version-https", b"GET / HTTPS/1.1\r\n" + H + b"\r\n", {400}),
    ("version-2-over-http1", b"GET / HTTP/2.0\r\n" + H + b"\r\n", {400, 505}),
    ("version-0.9-request", b"GET /\r\n\r\n", {400, 505}),
    ("h2-prior-knowledge-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    ("nul-bytes-only", b"\x00" * 16, {400}),
    ("binary-garbage", bytes(range(256)) * 2, {400}),
    ("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64, {400}),
    # -- header fields
    ("header-field-too-large", get_with(b"X-Big: " + b"a" * 9000 + b"\r\n"), {431}),
    ("too-many-headers", get_with(b"".join(b"X-H%d: v\r\n" % i for i in range(100))), {431}),
    ("header-name-non-ascii", get_with("X-Caf\u00e9: 1\r\n".encode()), {400}),
    ("header-name-control-char", get_with(b"X-\x01: 1\r\n"), {400}),
    ("header-name-space", get_with(b"X A: 1\r\n"), {400}),
    ("space-before-colon", get_with(b"X-A : 1\r\n"), {400}),  # RFC 9112 5.1: MUST 400
    ("empty-header-name", get_with(b": 1\r\n"), {400}),
    ("missing-colon", get_with(b"X-A b\r\n"), {400}),
    ("header-value-control-char", get_with(b"X-A: a\x01b\r\n"), {400}),
    ("header-value-del", get_with(b"X-A: a\x7fb\r\n"), {400}),
    ("header-value-nul", get_with(b"X-A: a\x00b\r\n"), {400}),
    ("header-value-bare-cr", get_with(b"X-A: a\rb\r\n"), {400}),  # RFC 9112 2.2
    ("header-value-bare-lf", get_with(b"X-A: a\nb\r\n"), {400}),
    ("obs-fold", get_with(b"X-A: b\r\n c\r\n"), {400}),  # RFC 9112 5.2: reject or unfold
    ("whitespace-before-first-header", b"GET / HTTP/1.1\r\n X-A: b\r\n" + H + b"\r\n", {400}),
    ("host-missing-in-http11", b"GET / HTTP/1.1\r\n\r\n", {400}),  # RFC 9112 3.2: MUST 400
    ("host-twice", get_with(b"Host: other\r\n"), {400}),  # RFC 9112 3.2: MUST 400
    # RFC 9112 3.2: MUST 400 on an invalid Host value
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", {400}),
    ("host-unclosed-ipv6", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", {400}),
    ("host-bad-ipv6", b"GET / HTTP/1.1\r\nHost: [zz::1]:80\r\n\r\n", {400}),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", {400}),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", {400}),
    ("host-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", {400}),
    ("content-type-twice",
     post(b"Content-Type: text/plain\r\nContent-Type: application/json\r\n"
          b"Content-Length: 2\r\n", b"{}"), {400}),
    ("header-field-line-one-over-limit",  # the limit counts the whole line "X-Big: aaa..."
     get_with(b"X-Big: " + b"a" * (8191 - 7) + b"\r\n"), {431}),
    ("two-empty-lines-before-request", b"\r\n\r\n" + get_with(b""), {400}),
    # -- Content-Length
    ("content-length-not-a-number", post(b"Content-Length: abc\r\n"), {400}),
    ("content-length-negative", post(b"Content-Length: -1\r\n"), {400}),
    ("content-length-plus-sign", post(b"Content-Length: +5\r\n", b"hello"), {400}),
    ("content-length-list", post(b"Content-Length: 5, 5\r\n", b"hello"), {400}),
    ("content-length-twice-differing",
     post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), {400}),
    ("content-length-twice-same",
     post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), {400}),
    ("content-length-overflow", post(b"Content-Length: 99999999999999999999999\r\n"),
     {400, 413}),
    ("content-length-with-transfer-encoding",
     post(b"Content-Length: 5\r\n" + CHUNKED, b"5\r\nhello\r\n0\r\n\r\n"), {400}),
    # -- Transfer-Encoding (RFC 9112 6.3: chunked must be the final coding of a request)
    ("te-not-chunked", post(b"Transfer-Encoding: gzip\r\n", b"hello"), {400}),
    # RFC 9112 6.1: a coding the server does not know is 501, before the app runs (nginx too)
    ("te-unknown-coding", post(b"Transfer-Encoding: chunkedx\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
     {501}),
    ("te-unknown-coding-no-length", post(b"Transfer-Encoding: xchunked\r\n", b"hello"), {501}),
    ("te-gzip-then-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n",
                                   b"5\r\nhello\r\n0\r\n\r\n"), {501}),
    ("te-chunked-not-last", post(b"Transfer-Encoding: chunked, gzip\r\n",
                                  b"5\r\nhello\r\n0\r\n\r\n"), {400}),
    ("te-chunked-twice", post(CHUNKED + CHUNKED, b"5\r\nhello\r\n0\r\n\r\n"), {400}),
    ("te-in-http10", b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", {400}),  # RFC 9112 6.1: faulty framing
    # -- trailers: never merged; a field that frames or routes the message is refused
    ("trailer-host", post(CHUNKED, b"5\r\nhello\r\n0\r\nHost: evil\r\n\r\n"), {400}),
    ("trailer-content-length",
     post(CHUNKED, b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"), {400}),
    ("trailer-transfer-encoding",
     post(CHUNKED, b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"), {400}),
    ("trailer-content-type",
     post(CHUNKED, b"5\r\nhello\r\n0\r\nContent-Type: text/html\r\n\r\n"), {400}),
    # -- chunked framing
    ("chunk-size-not-hex", post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-size-negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-size-overflow", post(CHUNKED, b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-size-empty", post(CHUNKED, b"\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-data-longer-than-size", post(CHUNKED, b"5\r\nhelloXX\r\n0\r\n\r\n"), {400}),
    ("chunk-extension-control-char", post(CHUNKED, b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), {400}),
    # -- body size (--max-body-size 1000)
    ("body-content-length-over-limit", post(b"Content-Length: %d\r\n" % (MAX_BODY + 1),
                                            b"x" * (MAX_BODY + 1)), {413}),
    ("body-content-length-huge", post(b"Content-Length: 999999999999\r\n"), {413}),
    ("body-chunked-over-limit",
     post(CHUNKED, b"258\r\n" + b"x" * 600 + b"\r\n258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n"),
     {413}),
]


def _expect_refusal(server: Served, data: bytes, statuses: set[int]) -> None:
    with Conn.open(server.port, timeout=4) as conn:
        try:
            conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before the whole request is sent; the answer is still due
        try:
            response = conn.read_response()
        except Truncated as exc:
            raise AssertionError(f"no complete response ({exc})") from None
        assert response.status in statuses, response.raw_head
        assert response.closes, f"no connection: close on {response.raw_head!r}"
        assert conn.server_closed(3.0), "the server kept the connection open"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("data", "statuses"), [pytest.param(d, s, id=i) for i, d, s in MALFORMED])
def test_malformed_request_is_refused(server: Served, worker_pid: int, data: bytes,
                                      statuses: set[int]) -> None:
    _expect_refusal(server, data, statuses)
    assert server.pid() == worker_pid, "the worker that refused the request is gone"


# Odd but valid requests near the same limits: all must be served (200), the connection
# kept open, so a refusal above is the limit at work and not a blanket refusal.
ACCEPTED: list[tuple[str, bytes]] = [
    ("body-exactly-max-size", post(b"Content-Length: %d\r\n" % MAX_BODY, b"x" * MAX_BODY)),
    ("chunked-body-exactly-max-size",
     post(CHUNKED, b"1f4\r\n" + b"x" * 500 + b"\r\n1f4\r\n" + b"y" * 500 + b"\r\n0\r\n\r\n")),
    ("chunk-extension-and-trailer", post(CHUNKED, b"5;name=value\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")),
    ("uppercase-hex-chunk-size", post(CHUNKED, b"A\r\n0123456789\r\n0\r\n\r\n")),
    ("ninety-nine-extra-headers", get_with(b"".join(b"X-H%d: v\r\n" % i for i in range(99)))),
    ("long-target", b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    ("long-header", get_with(b"X-Big: " + b"a" * 4000 + b"\r\n")),
    ("obs-text-in-header-value", get_with("X-Name: caf\u00e9\r\n".encode())),  # RFC 9110 5.5
    ("tab-in-header-value", get_with(b"X-A: a\tb\r\n")),
    ("whitespace-around-header-value", get_with(b"X-A: \t v \t\r\n")),
    ("empty-header-value", get_with(b"X-Empty:\r\n")),
    ("content-length-zero", post(b"Content-Length: 0\r\n")),
    ("content-length-leading-zeros", post(b"Content-Length: 005\r\n", b"hello")),
    ("leading-empty-line", b"\r\n" + get_with(b"")),  # RFC 9112 2.2: SHOULD ignore
    ("header-field-line-at-limit", get_with(b"X-Big: " + b"a" * (8190 - 7) + b"\r\n")),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n"),
    ("host-ipv6-literal", b"GET / HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n"),
    ("host-ipv4-port", b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"),
    ("host-empty", b"GET / HTTP/1.1\r\nHost:\r\n\r\n"),  # RFC 9112 3.2: a URI without host
    ("http10-without-host", b"GET /?keep=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in ACCEPTED])
def test_odd_but_valid_request_is_served(server: Served, worker_pid: int, data: bytes) -> None:
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(data)
        response = conn.read_response()
        assert response.status == 200, response.raw_head + b"\r\n\r\n" + response.body[:200]
        assert not response.closes
        assert not conn.server_closed(0.3)
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_slow_headers_are_cut_by_header_timeout(server: Served, worker_pid: int) -> None:
    """A client dripping header lines (slowloris) is answered 408 and closed once
    --header-timeout (1 s) has passed since its request began."""
    with Conn.open(server.port, timeout=6) as conn:
        started = time.monotonic()
        conn.send(b"GET /pid HTTP/1.1\r\n" + H)
        number = 0
        while time.monotonic() - started < 5:  # far longer than the timeout allows
            readable, _, _ = select.select([conn.sock], [], [], 0.1)
            if readable:
                break
            try:
                conn.send(b"X-Drip-%d: 1\r\n" % number)
            except (BrokenPipeError, ConnectionResetError):
                break
            number += 1
        conn.sock.settimeout(3)
        response = conn.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert response.closes
        assert conn.server_closed(3.0)
    assert 0.9 <= elapsed <= 3.5, f"cut after {elapsed:.2f}s with --header-timeout 1"
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
@pytest.mark.parametrize("partial", [b"GE", b"GET /pid HTT", b"GET /pid HTTP/1.1\r\n" + H])
def test_stalled_request_is_closed(server: Served, worker_pid: int, partial: bytes) -> None:
    """A request that stops arriving ends in a 408 or a plain close within the
    header timeout, never an open connection that waits for ever."""
    with Conn.open(server.port, timeout=6) as conn:
        started = time.monotonic()
        conn.send(partial)
        data = conn.read_to_eof()
        elapsed = time.monotonic() - started
        assert conn.eof and not conn.reset, "expected a clean close"
    if data:
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"\r\nconnection: close\r\n" in data.lower()
    assert elapsed <= 3.5, f"closed after {elapsed:.2f}s with --header-timeout 1"
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_refusal_after_a_served_request_on_the_same_connection(server: Served,
                                                              worker_pid: int) -> None:
    """A valid request and a broken one pipelined: the first is answered in full,
    then the second is refused and the connection closed."""
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(get_with(b"", b"/sized?n=5") + b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n")
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"xxxxx")
        second = conn.read_response()
        assert second.status == 400 and second.closes
        assert conn.server_closed()
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_broken_body_of_a_pipelined_request(server: Served, worker_pid: int) -> None:
    """The second pipelined request has a broken chunked body: the first is answered,
    the second is refused with 400 (it can never be served), and the connection closes."""
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(get_with(b"", b"/slow?ms=100") + post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"))
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"slow 100")
        second = conn.read_response()
        assert second.status == 400 and second.closes, second.raw_head
        assert conn.server_closed()
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_max_body_size_counts_a_streamed_body_in_total(server: Served, worker_pid: int) -> None:
    """--max-body-size bounds the whole body, not what is buffered at one time: an app
    that drains a chunked upload as it arrives must still never be handed more than
    the limit. (/duplex acknowledges each piece, so the second piece is sent only after
    the app has consumed the first.)"""
    piece = b"p" * 600  # two of them pass the limit of 1000
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(post(CHUNKED, path=b"/duplex") + b"258\r\n" + piece + b"\r\n")
        first = conn.read_until(b"}\n")
        assert b'"len": 600' in first
        try:
            conn.send(b"258\r\n" + piece + b"\r\n0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.sock.settimeout(2)
        try:
            rest = conn.read_to_eof()
        except TimeoutError:
            rest = bytes(conn.buffer)  # the server kept the connection open
    acknowledged = sum(int(part.split(b",")[0]) for part in (first + rest).split(b'"len": ')[1:])
    assert acknowledged <= MAX_BODY, "the app was handed more than --max-body-size"
    assert b'"more": false' not in rest, "the over-limit upload completed normally"
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_new_connection_served_after_all_refusals(server: Served, worker_pid: int) -> None:
    for _ in range(3):
        with Conn.open(server.port) as conn:
            conn.send(get_with(b"", b"/sized?n=3"))
            response = conn.read_response()
            assert (response.status, response.body) == (200, b"xxx")
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_trailer_fields_never_reach_the_app(server: Served, worker_pid: int) -> None:
    """A chunked request's trailer is read and dropped: the app's headers are the head's."""
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(post(CHUNKED, b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n", path=b"/scope"))
        response = conn.read_response()
    assert response.status == 200
    scope = response.json()
    names = [name["bytes"] for name, _ in scope["headers"]]
    assert "transfer-encoding" in names and "x-trailer" not in names
    assert scope["body_len"] == 5
    assert server.pid() == worker_pid


@pytest.mark.timeout(20)
def test_connect_reaches_the_app(server: Served, worker_pid: int) -> None:
    """CONNECT's authority-form is a valid target: the app decides (forkd tunnels
    nothing, so the connection closes after the answer)."""
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        scope = response.json()
        assert scope["method"] == "CONNECT"
        assert scope["raw_path"] == {"bytes": "example.com:443"}
        assert conn.server_closed()
    assert server.pid() == worker_pid
