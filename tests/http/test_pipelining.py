"""Connection reuse on both interfaces: pipelined requests answered in order, keep-alive,
HTTP/1.0, `Expect: 100-continue`, HEAD framing, absolute-form targets, and an Upgrade
the server does not perform."""

from __future__ import annotations

import hashlib
import socket

import pytest
from httpkit import Conn, Served, pattern

pytestmark = pytest.mark.integration

APPS = {
    "asgi": ("http_asgi_probe:app",),
    "wsgi": ("http_wsgi_validate:app", "--wsgi-inline", "never"),
    "wsgi-inline": ("http_wsgi_validate:app", "--wsgi-inline", "always"),
}


@pytest.fixture(scope="module", params=sorted(APPS))
def server(request: pytest.FixtureRequest, serve) -> Served:
    return serve(*APPS[request.param])


def get(target: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode("latin-1")


def post(target: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode("latin-1") + body


@pytest.mark.timeout(30)
def test_pipelined_requests_are_answered_in_order(server: Served) -> None:
    """A slow first request must not let the quick ones behind it overtake it."""
    with Conn.open(server.port) as conn:
        conn.send(get("/slow?ms=300") + get("/sized?n=3") + post("/echo", b"ping")
                  + get("/slow?ms=10") + get("/sized?n=1"))
        bodies = [conn.read_response().body for _ in range(5)]
        assert bodies == [b"slow 300", b"xxx", b"ping", b"slow 10", b"x"]
        conn.send(get("/sized?n=2"))
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"xx")
        assert not conn.server_closed(0.2)


@pytest.mark.timeout(30)
def test_many_pipelined_requests_in_one_write(server: Served) -> None:
    count = 60
    with Conn.open(server.port) as conn:
        conn.send(b"".join(get(f"/sized?n={n}") for n in range(count)))
        sizes = [len(conn.read_response().body) for _ in range(count)]
        assert sizes == list(range(count))
        assert not conn.server_closed(0.2)


def mixed_pipeline() -> tuple[list[bytes], list[bytes]]:
    """16 requests (wrk's plaintext depth) of every kind: sized, streamed in pieces
    (chunked), with a body, slow; and the bodies they are answered with."""
    requests, bodies = [], []
    for n in range(16):
        if n % 4 == 1:
            requests.append(get(f"/stream?n={3000 + n}&chunk=700"))
            bodies.append(pattern(3000 + n))
        elif n % 4 == 2:
            requests.append(post("/echo", b"body %d" % n))
            bodies.append(b"body %d" % n)
        elif n == 7:
            requests.append(get("/slow?ms=30"))
            bodies.append(b"slow 30")
        else:
            requests.append(get(f"/sized?n={n}"))
            bodies.append(b"x" * n)
    return requests, bodies


@pytest.mark.timeout(30)
def test_sixteen_mixed_pipelined_requests_come_back_complete_and_in_order(
        server: Served) -> None:
    requests, expected = mixed_pipeline()
    with Conn.open(server.port) as conn:
        for _ in range(3):  # and the connection carries the next batch as well
            conn.send(b"".join(requests))
            assert [conn.read_response().body for _ in range(16)] == expected
        assert not conn.server_closed(0.2)


@pytest.mark.timeout(30)
def test_connection_close_in_the_middle_of_a_pipeline_stops_after_its_answer(
        server: Served) -> None:
    requests, expected = mixed_pipeline()
    requests[9] = requests[9].replace(b"Host: test\r\n", b"Host: test\r\nConnection: close\r\n")
    with Conn.open(server.port) as conn:
        conn.send(b"".join(requests))
        answers = [conn.read_response() for _ in range(10)]
        assert [a.body for a in answers] == expected[:10]
        assert [a.closes for a in answers] == [False] * 9 + [True]
        assert conn.server_closed()  # and nothing after it


@pytest.mark.timeout(30)
def test_keep_alive_serves_many_requests_on_one_connection(server: Served) -> None:
    with Conn.open(server.port) as conn:
        for n in range(1, 8):
            conn.send(get(f"/sized?n={n}") if n % 2 else post("/echo", b"b" * n))
            response = conn.read_response()
            assert response.status == 200
            assert len(response.body) == n
            assert not response.closes
        assert not conn.server_closed(0.2)


@pytest.mark.timeout(30)
def test_connection_close_ends_the_pipeline(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(get("/sized?n=1", "Connection: close\r\n") + get("/sized?n=2"))
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"x")
        assert response.closes
        assert conn.server_closed()  # the second request is not answered


@pytest.mark.timeout(30)
def test_http10_closes_by_default(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"GET /sized?n=5 HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"xxxxx")
        # sized by the server (ASGI), or ended by the close (WSGI: wsgiref.validate hands
        # the server an iterator, whose blocks go out as they come, PEP 3333)
        assert response.header("content-length") in ("5", None)
        assert conn.server_closed()


@pytest.mark.timeout(30)
def test_http10_keep_alive(server: Served) -> None:
    with Conn.open(server.port) as conn:
        for n in (3, 4):
            conn.send(get(f"/sized?n={n}", "Connection: keep-alive\r\n", "1.0"))
            response = conn.read_response()
            assert (response.status, len(response.body)) == (200, n)
            if response.header("content-length") is None:
                # a streamed WSGI body: HTTP/1.0 has no chunks, so the close ends it
                assert (response.header("connection") or "").lower() == "close"
                assert conn.server_closed()
                return
            assert (response.header("connection") or "").lower() == "keep-alive"
        assert not conn.server_closed(0.2)


@pytest.mark.timeout(30)
def test_http10_streamed_response_is_close_delimited(server: Served) -> None:
    """HTTP/1.0 has no chunked coding: a body of unknown length ends with the connection."""
    size = 300_000
    with Conn.open(server.port) as conn:
        conn.send(get(f"/stream?n={size}&chunk=7000", "Connection: keep-alive\r\n", "1.0"))
        response = conn.read_response()
        assert response.status == 200
        assert response.header("transfer-encoding") is None
        assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern(size)).digest()


@pytest.mark.timeout(30)
def test_expect_100_continue(server: Served) -> None:
    body = b"the body, sent only when invited"
    with Conn.open(server.port) as conn:
        conn.send(post("/echo", b"", "Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)))
        interim = conn.read_response()
        assert interim.status == 100
        conn.send(body)
        final = conn.read_response()
        assert (final.status, final.body) == (200, body)
        conn.send(get("/sized?n=2"))  # the connection is still good
        assert conn.read_response().body == b"xx"


@pytest.mark.timeout(30)
def test_expect_100_continue_with_a_large_body(server: Served) -> None:
    body = pattern(500_000)
    with Conn.open(server.port) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert conn.read_response().status == 100
        conn.send(body)
        final = conn.read_response()
        assert final.status == 200
        assert final.body == body


@pytest.mark.timeout(30)
def test_expect_is_ignored_for_http10(server: Served) -> None:
    body = b"0123456789"
    with Conn.open(server.port) as conn:
        conn.send(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
                  + body)
        response = conn.read_response()
        assert (response.status, response.body) == (200, body)  # no interim 100 first


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target", ["/sized?n=1234", "/stream?n=5000&chunk=1000"])
def test_head_has_headers_but_no_body(server: Served, target: str) -> None:
    """HEAD gets the GET's headers (a sized body's content-length included) and not
    one body byte: a stray byte would corrupt the next response on the connection."""
    with Conn.open(server.port) as conn:
        conn.send(get(target))
        as_get = conn.read_response()
        conn.send(get(target).replace(b"GET", b"HEAD", 1) + get("/sized?n=2"))
        as_head = conn.read_response(method="HEAD")
        after = conn.read_response()
    assert as_head.status == as_get.status == 200
    # the same framing headers as the GET's
    assert as_head.header("content-length") == as_get.header("content-length")
    assert as_head.header("transfer-encoding") == as_get.header("transfer-encoding")
    if "sized" in target:
        assert len(as_get.body) == 1234
    else:
        assert len(as_get.body) == 5000
    assert as_head.header("content-type") == as_get.header("content-type")
    assert (after.status, after.body) == (200, b"xx")


@pytest.mark.timeout(30)
def test_absolute_form_target(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"GET http://example.com:8080/sized?n=4 HTTP/1.1\r\nHost: example.com:8080"
                  b"\r\n\r\n")
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"xxxx")


@pytest.mark.timeout(30)
def test_unperformed_upgrade_leaves_the_connection_usable(server: Served) -> None:
    """The server ignores `Upgrade` (RFC 9110 7.8 allows it) and answers in HTTP/1.1;
    a request pipelined behind it is then answered too, unless the first answer said
    it closes the connection."""
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(get("/sized?n=3", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
                  + get("/sized?n=2"))
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"xxx")
        if first.closes:
            assert conn.server_closed()
        else:
            second = conn.read_response()
            assert (second.status, second.body) == (200, b"xx")



@pytest.mark.timeout(30)
def test_pipelined_requests_then_a_half_close_are_all_answered(server: Served) -> None:
    """`printf 'GET ...GET ...GET ...' | nc`: the client sends its requests and shuts
    its side down (a FIN) before the first is answered; each is answered, in order,
    then the server closes. The last one's app reads its body (as Django's always
    does, and then works on it), which must not close the connection before its answer."""
    with Conn.open(server.port) as conn:
        conn.send(get("/slow?ms=50") + get("/sized?n=3") + post("/echo?ms=20", b"ping"))
        conn.sock.shutdown(socket.SHUT_WR)
        bodies = [conn.read_response().body for _ in range(3)]
        assert bodies == [b"slow 50", b"xxx", b"ping"]
        assert conn.read_to_eof() == b""


@pytest.mark.timeout(30)
def test_a_half_close_that_cuts_off_the_last_body_lets_the_whole_requests_be_answered(
        server: Served) -> None:
    """GET, GET, then a POST whose body the FIN cuts off: both GETs are answered, then
    the server closes (the POST can never be whole)."""
    with Conn.open(server.port) as conn:
        conn.send(get("/slow?ms=50") + get("/sized?n=3")
                  + b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
        conn.sock.shutdown(socket.SHUT_WR)
        bodies = [conn.read_response().body for _ in range(2)]
        assert bodies == [b"slow 50", b"xxx"]
        assert conn.read_to_eof() == b""
