"""Real FastAPI (Starlette) and Flask apps under forkd: what their users notice. An SSE
stream ends when its client goes; work after the response survives a stop; a body past
its Content-Length never reaches the next response; the access log is right on both
interfaces and an ordinary disconnect is not an error."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest
from httpkit import Conn, Served

from support import Forkd, request, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fast(serve) -> Served:
    return serve("fastapi_app:app", "--access-log")


@pytest.fixture(scope="module")
def flask(serve) -> Served:
    return serve("flask_app:app", "--access-log")


def _open_sse(port: int, stream_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET /sse?id={stream_id} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    while b"data: 1\n\n" not in data:
        data += sock.recv(4096)
    assert b"text/event-stream" in data
    return sock


@pytest.mark.timeout(30)
def test_sse_streams_stop_when_their_clients_go(fast: Served) -> None:
    """ASGI 2.4: send() raises once the client is gone, so each stream's finally runs."""
    socks = [_open_sse(fast.port, f"s{i}") for i in range(5)]
    for sock in socks:
        sock.close()
    for i in range(5):
        fast.marker(f"sse-stopped-s{i}", timeout=5)
    # each logged as any answer cut by its client (the status it started), and only so
    wait_until(lambda: len(re.findall(r'"GET /sse\?id=s\d HTTP/1.1" 200 ',
                                      fast.proc.output())) == 5, 5, message=fast.proc.describe)
    output = fast.proc.output()
    assert "Traceback" not in output, output[-3000:]
    assert "exception in ASGI app" not in output
    assert "ended by" not in output


@pytest.mark.timeout(30)
def test_body_past_content_length_is_cut_and_the_connection_closed(fast: Served) -> None:
    with Conn.open(fast.port) as conn:
        conn.send(b"GET /overrun HTTP/1.1\r\nHost: t\r\n\r\nGET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        response = conn.read_response()
        assert response.body == b"01234"
        assert conn.server_closed(), "the excess was sent as the start of the next response"
    wait_until(lambda: fast.proc.output().count("more than its content-length") == 1,
               5, message=fast.proc.describe)
    assert request(fast.port, path="/pid")[0] == 200  # the worker lives


@pytest.mark.timeout(30)
def test_asgi_access_line_has_the_real_size_once_the_stream_ends(fast: Served) -> None:
    status, _, body = request(fast.port, path="/numbers?n=2000")
    assert status == 200 and len(body) == sum(len(f"{i}\n") for i in range(2000))
    line = wait_until(lambda: re.search(r'"GET /numbers\?n=2000 HTTP/1.1" 200 (\d+) .* '
                                        r'([\d.]+)ms', fast.proc.output()),
                      5, message=fast.proc.describe)
    assert int(line.group(1)) == len(body)


@pytest.mark.timeout(30)
def test_fastapi_validation_and_json(fast: Served) -> None:
    status, _, body = request(fast.port, "POST", "/items/7", b'{"name": "a", "price": 2.5}',
                              {"content-type": "application/json"})
    assert (status, body) == (200, b'{"id":7,"name":"a","price":2.5}')
    status, _, _ = request(fast.port, "POST", "/items/7", b'{"name": "a"}',
                           {"content-type": "application/json"})
    assert status == 422


@pytest.mark.timeout(30)
def test_flask_app_and_wsgi_access_log(flask: Served) -> None:
    status, headers, body = request(flask.port, "POST", "/form", b"a=1&b=two",
                                    {"content-type": "application/x-www-form-urlencoded"})
    assert status == 200 and body.strip() == b'{"a":"1","b":"two"}'
    status, headers, body = request(flask.port, path="/teapot")
    assert (status, headers["x-kind"], body) == (418, "teapot", b"short and stout")
    status, headers, body = request(flask.port, path="/stream?n=50")
    assert status == 200 and body.count(b"\n") == 50
    assert request(flask.port, path="/nowhere")[0] == 404
    line = wait_until(lambda: re.search(r'"GET /stream\?n=50 HTTP/1.1" 200 (\d+) ',
                                        flask.proc.output()), 5, message=flask.proc.describe)
    assert int(line.group(1)) == len(body)
    wait_until(lambda: re.search(r'"POST /form HTTP/1.1" 200 \d+ ', flask.proc.output()), 5,
               message=flask.proc.describe)
    # (logged as the answer goes out, written with the worker's next batch: may trail
    # the client)
    wait_until(lambda: re.search(r'"GET /nowhere HTTP/1.1" 404 \d+ ', flask.proc.output()), 5,
               message=flask.proc.describe)


@pytest.mark.timeout(30)
def test_flask_app_without_threads(serve) -> None:
    """--threads 0 (every call on the loop's thread): Flask's results are not lists (a
    ClosingIterator), and each is answered, kept-alive connection and all."""
    app = serve("flask_app:app", "--threads", "0")
    with Conn.open(app.port) as conn:
        for path in ("/pid", "/stream?n=50", "/teapot", "/nowhere"):
            conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answers = [conn.read_response() for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 418, 404]
    assert b'"pid"' in answers[0].body
    assert answers[1].body == b"".join(b"line %d\n" % i for i in range(50))
    assert answers[2].body == b"short and stout"


@pytest.mark.timeout(30)
def test_flask_stream_cut_by_its_client_is_not_an_error(flask: Served) -> None:
    with Conn.open(flask.port) as conn:
        conn.send(b"GET /stream?n=200000 HTTP/1.1\r\nHost: t\r\n\r\n")
        conn.read_head()
    wait_until(lambda: '"GET /stream?n=200000 HTTP/1.1" 200 ' in flask.proc.output(), 5,
               message=flask.proc.describe)
    assert request(flask.port, path="/pid")[0] == 200
    assert "exception in WSGI app" not in flask.proc.output()
    assert "Traceback" not in flask.proc.output()
    assert "ended by" not in flask.proc.output()  # (routine: no line of its own)


@pytest.mark.timeout(40)
def test_background_tasks_finish_or_are_cancelled_on_stop(tmp_path: Path) -> None:
    """A stop waits for work after the response (BackgroundTasks) up to
    --graceful-timeout; what is still running then is cancelled, so its cleanup runs."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = Forkd(["fastapi_app:app", "-b", "127.0.0.1:0", "-w", "1",
                  "--graceful-timeout", "3"], home, tmp_path / "forkd.log",
                 env={"HTTP_PROBE_MARKERS": str(markers)})
    try:
        port = proc.port()
        proc.wait_ready(1)
        assert request(port, path="/background?id=short&secs=1")[0] == 200
        assert request(port, path="/background?id=long&secs=60")[0] == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.describe()
        assert (markers / "bg-done-short").exists(), proc.describe()
        assert (markers / "bg-cancelled-long").exists(), proc.describe()
    finally:
        proc.stop()
