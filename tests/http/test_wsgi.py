"""The WSGI side of the worker's server, through `wsgiref.validate`: every request
below is checked against PEP 3333 by the validator wrapped around the app, and the
breaches it can only report late (an unclosed result, a warning) are read back from
the app after each test."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator

import pytest
from httpkit import Conn, Served, Truncated, get, pattern

from support import at_once

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["never", "always"])
def server(request: pytest.FixtureRequest, serve) -> Served:
    # Every PEP 3333 check on both paths: the app on the pool's threads, and on the
    # loop's own thread (--wsgi-inline always, what auto does for a route learnt quick).
    return serve("http_wsgi_validate:app", "--wsgi-inline", request.param)


@pytest.fixture(scope="module")
def worker_pid(server: Served) -> int:
    return server.pid()


@pytest.fixture(autouse=True)
def no_validator_problems(server: Served) -> Iterator[None]:
    yield
    problems = get(server.port, "/problems").json()
    assert problems == [], problems


def call(server: Served, method: str, path: str, body=None,
         headers: dict[str, str] | None = None, chunked: bool = False
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_get_with_query(server: Served) -> None:
    status, _, body = call(server, "GET", "/qu%65ry?a=1&b=%20x&c&d=caf%C3%A9")
    assert status == 200
    assert json.loads(body) == {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/query",  # percent-decoded
        "QUERY_STRING": "a=1&b=%20x&c&d=caf%C3%A9",  # as sent
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }


@pytest.mark.timeout(30)
def test_environ_of_a_post(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"POST /environ HTTP/1.1\r\nHost: example.com\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 4\r\nX-Multi: a\r\nX-Multi: b \r\nX-Dash-Name: v\r\n\r\nbody")
        environ = conn.read_response().json()
        client_port = conn.local_port()
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["CONTENT_LENGTH"] == "4"
    assert environ["HTTP_HOST"] == "example.com"
    assert environ["HTTP_X_MULTI"] == "a,b"
    assert environ["HTTP_X_DASH_NAME"] == "v"
    assert environ["SERVER_NAME"] == "127.0.0.1"
    assert environ["SERVER_PORT"] == str(server.port)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["REMOTE_PORT"] == str(client_port)
    assert environ["wsgi.url_scheme"] == "http"


@pytest.mark.timeout(30)
def test_absolute_form_target(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"GET http://example.com/query?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        document = conn.read_response().json()
    assert (document["PATH_INFO"], document["QUERY_STRING"]) == ("/query", "x=1")


@pytest.mark.timeout(30)
def test_invalid_absolute_target_is_refused(server: Served, worker_pid: int) -> None:
    with Conn.open(server.port, timeout=4) as conn:
        conn.send(b"GET http://[::1 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = conn.read_response()
        assert response.status == 400 and response.closes
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [0, 10, 64 * 1024, 64 * 1024 + 1, 1024 * 1024])
def test_post_with_content_length(server: Served, size: int) -> None:
    body = pattern(size)
    status, headers, data = call(server, "POST", "/echo", body=body)
    assert status == 200
    assert headers["content-length"] == str(size)
    assert data == body


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [5, 300_000])
def test_chunked_upload(server: Served, size: int) -> None:
    body = pattern(size)
    pieces = [body[i:i + 7_000] for i in range(0, size, 7_000)]
    status, _, data = call(server, "POST", "/echo", body=iter(pieces),
                           headers={"Transfer-Encoding": "chunked"}, chunked=True)
    assert status == 200
    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()


@pytest.mark.timeout(30)
def test_body_read_by_lines(server: Served) -> None:
    lines = [b"line %d %s\n" % (n, b"x" * (n % 300)) for n in range(2000)]
    body = b"".join(lines)
    assert len(body) > 128 * 1024  # streams in, past the server's small-body buffer
    status, _, data = call(server, "POST", "/lines", body=iter([body[:50_000], body[50_000:]]),
                           headers={"Transfer-Encoding": "chunked"}, chunked=True)
    assert status == 200
    assert json.loads(data) == {"lines": len(lines), "bytes": len(body),
                                "sha": hashlib.sha256(body).hexdigest()}


@pytest.mark.timeout(30)
def test_head(server: Served) -> None:
    status, headers, data = call(server, "HEAD", "/sized?n=1234")
    get_status, get_headers, get_data = call(server, "GET", "/sized?n=1234")
    assert (status, data, get_status, len(get_data)) == (200, b"", 200, 1234)
    # (wsgiref.validate hands over an iterator, streamed: chunked, for HEAD as for GET)
    for name in ("content-length", "transfer-encoding"):
        assert headers.get(name) == get_headers.get(name)
    with Conn.open(server.port) as conn:  # no stray body bytes before the next response
        conn.send(b"HEAD /stream?n=3000000 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /sized?n=3 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response(method="HEAD").status == 200
        assert conn.read_response().body == b"xxx"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("piece", [65536, 1000])
def test_large_streamed_response(server: Served, piece: int) -> None:
    size = 5 * 1024 * 1024
    with Conn.open(server.port, timeout=15) as conn:
        conn.send(b"GET /stream?n=%d&chunk=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (size, piece))
        response = conn.read_response()
    assert response.status == 200
    assert response.chunked  # no length was given: HTTP/1.1 gets chunked framing
    assert len(response.body) == size
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern(size)).digest()


@pytest.mark.timeout(30)
def test_requests_run_in_parallel_threads(server: Served, request: pytest.FixtureRequest) -> None:
    """A blocking WSGI app runs in the worker's thread pool: four 400 ms requests on
    four connections take about 400 ms, not 1.6 s."""
    if "always" in request.node.callspec.id:
        pytest.skip("--wsgi-inline always is for apps that never block: one call at a time")
    results, elapsed = at_once(lambda: call(server, "GET", "/slow?ms=400")[0], 4)
    assert results == [200] * 4
    assert elapsed < 1.2, f"took {elapsed:.2f}s"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/raise", "/raise-after-start"])
def test_app_failure_before_any_byte_is_a_500(server: Served, worker_pid: int,
                                              path: str) -> None:
    with Conn.open(server.port) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = conn.read_response()
        assert response.status == 500
        assert response.closes
        assert conn.server_closed()
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
def test_failed_calls_do_not_count_as_running(server: Served, serve) -> None:
    """A call whose app raised is over: it must not hold one of --limit-concurrency's
    places (nor keep a drain waiting) after its 500 went out. (Once per module: the
    server fixture's own mode, on threads or inline.)"""
    mode = server.proc.args[server.proc.args.index("--wsgi-inline") + 1]
    limited = serve("http_wsgi_validate:app", "--limit-concurrency", "2", "--wsgi-inline", mode)
    for _ in range(3):
        assert call(limited, "GET", "/raise")[0] == 500
    status, _, body = call(limited, "GET", "/query")
    assert status == 200, body


@pytest.mark.timeout(30)
def test_app_failure_after_part_of_the_body_cuts_the_connection(server: Served,
                                                                 worker_pid: int) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"GET /partial HTTP/1.1\r\nHost: t\r\n\r\n")
        with pytest.raises(Truncated) as caught:
            conn.read_response()
        assert caught.value.head is not None and caught.value.head.status == 200
        assert conn.eof
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
def test_client_gone_in_the_middle_of_the_body(server: Served) -> None:
    """The app's thread blocked in wsgi.input.read() gets an OSError when the client
    goes away, instead of waiting for ever (and holding a pool thread). (The app starts
    once more than --wsgi-body-buffer, 1M by default, has come: before, the loop reads.)"""
    with Conn.open(server.port) as conn:
        conn.send(b"POST /upload-probe?id=cut HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n"
                  b"\r\n" + b"u" * 1_100_000)
        server.marker("started-cut")
    result = server.marker("result-cut")
    assert result.startswith("OSError after "), result
