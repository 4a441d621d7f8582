"""Generated input against one running server (-w 1): random bytes, mutated valid
requests, and odd-but-valid requests. Every exchange is bounded by a socket timeout
(the server must answer or close: it never hangs), nothing a client sends may earn a
5xx (505 aside: an HTTP version the server does not speak), everything that comes back
must be well-framed HTTP, valid requests are answered exactly, and the same worker
(same pid) answers throughout."""

from __future__ import annotations

import hashlib
import socket
import warnings
from urllib.parse import unquote_to_bytes

import pytest
from httpkit import Conn, Served, Truncated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

# When a test fails, hypothesis's pytest plugin imports libcst to suggest a patch, and that
# import warns (mypy_extensions.TypedDict is deprecated); under -W error the warning turns
# into an INTERNALERROR that hides the failure. Import it now, with the warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(serve) -> Served:
    return serve("http_asgi_probe:app", "--header-timeout", "1",
                 "--max-body-size", str(MAX_BODY))


@pytest.fixture(scope="module")
def worker_pid(server: Served) -> int:
    return server.pid()


def _responses_in(conn: Conn) -> list[int]:
    """Statuses of the well-framed responses the server sent before closing."""
    statuses = []
    while True:
        if not conn.buffer and not conn.fill():
            return statuses
        try:
            response = conn.read_response()
        except Truncated as exc:
            # an app response cut by the close that follows the client's end of input is
            # acceptable; a cut error response is not
            assert exc.head is not None and exc.head.status < 400, exc
            return statuses
        statuses.append(response.status)


def _throw(server: Served, data: bytes) -> list[int]:
    """Send `data`, end our side, and collect what the server says until it closes."""
    with Conn.open(server.port, timeout=3) as conn:
        try:
            conn.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before reading it all: what it answered is still checked
        try:
            statuses = _responses_in(conn)
        except TimeoutError:
            raise AssertionError(f"the server neither answered nor closed for {data!r}") from None
    return statuses


def _check(server: Served, worker_pid: int, data: bytes) -> None:
    statuses = _throw(server, data)
    # 505 is the client's doing too (an HTTP/0.9 or /2.0 request line), and so is 501 for a
    # transfer coding it made up (RFC 9112 6.1); any other 5xx is not
    assert all(status < 500 or status in (501, 505) for status in statuses), (statuses, data)
    assert server.pid() == worker_pid, f"the worker died on {data!r}"


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=120)
@given(data=st.binary(min_size=1, max_size=400))
def test_random_bytes(server: Served, worker_pid: int, data: bytes) -> None:
    _check(server, worker_pid, data)


VALID = [
    b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://t/x?y=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
]
NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"%", b"\x7f", b"\xff", b"0",
         b"-", b"9" * 20, b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
         b"Content-Length: 3\r\n", b"GET / HTTP/1.1\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(NASTY) | st.binary(min_size=1, max_size=3))
        if action == "insert":
            data[at:at] = piece
        elif action == "delete":
            del data[at:at + len(piece)]
        else:
            data[at:at + len(piece)] = piece
    return bytes(data)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=120)
@given(data=mutated())
def test_mutated_requests(server: Served, worker_pid: int, data: bytes) -> None:
    _check(server, worker_pid, data)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&'*+-.^_`|~",
                min_size=1, max_size=12)
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
PCHAR = st.sampled_from(list("abcXYZ019-._~!$&'()*+,;=:@") + ["%20", "%2F", "%C3%A9", "%41"])


@st.composite
def valid_request(draw: st.DrawFn) -> tuple[bytes, dict]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    segments = draw(st.lists(st.lists(PCHAR, max_size=6).map("".join), max_size=4))
    raw_path = ("/fuzz/" + "/".join(segments)).encode()
    query = draw(st.lists(PCHAR | st.sampled_from(["=", "&", "?", "/"]), max_size=10)
                 .map("".join)).encode()
    version = draw(st.sampled_from(["1.1", "1.0"]))
    names = draw(st.lists(TOKEN.map(lambda t: "X-" + t), max_size=8, unique_by=str.lower))
    values = [draw(st.text(VCHAR + " \t", max_size=30).map(lambda v: v.strip(" \t")))
              for _ in names]
    body = draw(st.binary(max_size=3000))
    chunked = version == "1.1" and draw(st.booleans())
    head = [f"{method} {raw_path.decode()}{'?' + query.decode() if query else ''} HTTP/{version}"]
    if version == "1.1":
        head.append("Host: fuzz.example")
    head += [f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}"
             for name, value in zip(names, values, strict=True)]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    else:
        if body or draw(st.booleans()):
            head.append(f"Content-Length: {len(body)}")
        framed = body
    if version == "1.0":
        head.append("Connection: keep-alive")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + framed
    expected = {"method": method, "raw_path": raw_path, "query": query, "version": version,
                "headers": [(n.lower().encode(), v.encode()) for n, v in zip(names, values,
                                                                             strict=True)],
                "body": body}
    return raw, expected


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=80)
@given(requests=st.lists(valid_request(), min_size=1, max_size=3))
def test_valid_requests_are_answered_exactly(server: Served, worker_pid: int,
                                             requests: list[tuple[bytes, dict]]) -> None:
    """Odd-but-valid requests, pipelined on one connection, each answered with what
    the app saw: method, raw path and query as sent, headers in order, the body intact."""
    with Conn.open(server.port, timeout=3) as conn:
        conn.send(b"".join(raw for raw, _ in requests))
        for raw, expected in requests:
            response = conn.read_response()
            assert response.status == 200, (response.raw_head, raw)
            scope = response.json()
            assert scope["method"] == expected["method"]
            assert scope["http_version"] == expected["version"]
            assert scope["raw_path"]["bytes"].encode("latin-1") == expected["raw_path"]
            decoded = unquote_to_bytes(expected["raw_path"]).decode("utf-8", "surrogateescape")
            assert scope["path"] == decoded
            assert scope["query_string"]["bytes"].encode("latin-1") == expected["query"]
            headers = [(n["bytes"].encode("latin-1"), v["bytes"].encode("latin-1"))
                       for n, v in scope["headers"]]
            ours = [h for h in headers if h[0].startswith(b"x-")]
            assert ours == expected["headers"], raw
            assert scope["body_len"] == len(expected["body"])
            assert scope["body_sha256"] == hashlib.sha256(expected["body"]).hexdigest()
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
def test_no_parser_callback_crashed(server: Served) -> None:
    """Client input must never make a parser callback raise (it would be a 500)."""
    assert "error in the HTTP parser callback" not in server.proc.output()
