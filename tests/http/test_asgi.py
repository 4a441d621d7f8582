"""The ASGI side of the worker's server, seen by a probe app: the `http` scope, the
`http.request` / `http.disconnect` events, failures of the app, and lifespan."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
from pathlib import Path

import pytest
from httpkit import Conn, Served, Truncated, pattern

from support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(serve) -> Served:
    return serve("http_asgi_probe:app")


@pytest.fixture(scope="module")
def worker_pid(server: Served) -> int:
    return server.pid()


def _bytes(value: object) -> bytes:
    assert isinstance(value, dict) and set(value) == {"bytes"}, f"not bytes: {value!r}"
    return str(value["bytes"]).encode("latin-1")


def _scope(server: Served, raw: bytes) -> tuple[dict, Conn]:
    conn = Conn.open(server.port)
    try:
        conn.send(raw)
        response = conn.read_response()
        assert response.status == 200, response.raw_head
        return response.json(), conn
    except BaseException:
        conn.close()
        raise


@pytest.mark.timeout(30)
def test_http_scope(server: Served) -> None:
    raw = (b"GET /caf%C3%A9/a%2Fb/%7E?x=1&y=%20&z HTTP/1.1\r\n"
           b"Host: example.com:1234\r\n"
           b"X-First:  One Two  \r\n"
           b"x-second: two\r\n"
           b"X-Dup: a\r\n"
           b"User-Agent: probe/1.0\r\n"
           b"X-DUP: b\r\n\r\n")
    scope, conn = _scope(server, raw)
    with conn:
        client_port = conn.local_port()
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert str(scope["asgi"]["spec_version"]).startswith("2.")
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/caf\u00e9/a/b/~"  # percent-decoded, as UTF-8
    assert _bytes(scope["raw_path"]) == b"/caf%C3%A9/a%2Fb/%7E"  # as sent, without the query
    assert _bytes(scope["query_string"]) == b"x=1&y=%20&z"  # raw
    assert scope["root_path"] == ""
    headers = [(_bytes(name), _bytes(value)) for name, value in scope["headers"]]
    assert headers == [  # names lower-cased, values trimmed, order and repeats kept
        (b"host", b"example.com:1234"),
        (b"x-first", b"One Two"),
        (b"x-second", b"two"),
        (b"x-dup", b"a"),
        (b"user-agent", b"probe/1.0"),
        (b"x-dup", b"b"),
    ]
    assert scope["client"] == ["127.0.0.1", client_port]
    assert scope["server"] == ["127.0.0.1", server.port]
    assert scope["state"]["token"] == "from-lifespan"
    assert scope["body_len"] == 0 and scope["events"] == 1


@pytest.mark.timeout(30)
def test_http10_post_scope(server: Served) -> None:
    body = b"a=1&b=2"
    scope, conn = _scope(server, b"POST /form HTTP/1.0\r\nContent-Type: application/x-www-form"
                                 b"-urlencoded\r\nContent-Length: 7\r\n\r\n" + body)
    conn.close()
    assert scope["http_version"] == "1.0"
    assert scope["method"] == "POST"
    assert scope["body_len"] == len(body)
    assert scope["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.timeout(30)
def test_absolute_form_scope(server: Served) -> None:
    scope, conn = _scope(server, b"GET http://example.com:8080/p%20q?z=9 HTTP/1.1\r\n"
                                 b"Host: example.com:8080\r\n\r\n")
    conn.close()
    assert scope["path"] == "/p q"
    assert _bytes(scope["raw_path"]) == b"/p%20q"
    assert _bytes(scope["query_string"]) == b"z=9"


@pytest.mark.timeout(30)
def test_state_is_a_copy_for_each_request(server: Served) -> None:
    """ASGI: each request gets a shallow copy of the lifespan state, so what one
    request writes into it is not seen by the next."""
    first, conn = _scope(server, b"GET /?set-state=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    with conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        second = conn.read_response().json()
    assert first["state"]["token"] == second["state"]["token"] == "from-lifespan"
    assert "written_by_a_request" not in second["state"]


@pytest.mark.timeout(30)
def test_chunked_upload_arrives_as_events_while_it_is_sent(server: Served) -> None:
    """Each piece of a chunked upload reaches the app as an http.request event with
    more_body=True before the client sends the next (the app acknowledges each one in
    its streamed response); the last event has more_body=False."""
    pieces = [b"a" * 10, b"b" * 3000, b"c" * 70_000]
    with Conn.open(server.port) as conn:
        conn.send(b"POST /duplex HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        received = 0
        for piece in pieces:
            conn.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            target = received + len(piece)
            while received < target:  # the piece may arrive as several events
                line = json.loads(conn.read_until(b"}\n").split(b"\r\n")[-1])
                assert line["more"] is True
                received += line["len"]
            assert received == target
        conn.send(b"0\r\n\r\n")
        tail = conn.read_until(b"0\r\n\r\n")
        assert b'{"len": 0, "more": false}' in tail
        conn.send(b"GET /sized?n=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().body == b"x"


@pytest.mark.timeout(30)
def test_chunked_upload_echo(server: Served) -> None:
    body = pattern(300_000)
    pieces = [body[i:i + 20_000] for i in range(0, len(body), 20_000)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/echo", body=iter(pieces), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
    assert int(response.getheader("x-events") or 0) >= 1


@pytest.mark.timeout(30)
def test_large_streamed_response(server: Served) -> None:
    size = 5 * 1024 * 1024
    with Conn.open(server.port, timeout=10) as conn:
        conn.send(b"GET /stream?n=%d&chunk=65536 HTTP/1.1\r\nHost: t\r\n\r\n" % size)
        response = conn.read_response()
    assert response.chunked
    assert len(response.body) == size
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern(size)).digest()


@pytest.mark.timeout(30)
def test_disconnect_in_the_middle_of_the_body(server: Served) -> None:
    with Conn.open(server.port) as conn:
        conn.send(b"POST /wait-disconnect?id=mid HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
                  b"\r\n" + b"z" * 10)
        server.marker("started-mid")  # the app holds the first part of the body
    events = json.loads(server.marker("disconnect-mid"))
    assert events[0] == {"type": "http.request", "len": 10, "more": True}
    assert events[-1]["type"] == "http.disconnect"
    assert all(event["type"] == "http.request" for event in events[:-1])


@pytest.mark.timeout(30)
def test_disconnect_while_the_app_works(server: Served) -> None:
    """After the whole request, receive() waits; it answers http.disconnect as soon
    as the client goes away (how an app notices it can stop a long job)."""
    with Conn.open(server.port) as conn:
        conn.send(b"GET /wait-disconnect?id=after HTTP/1.1\r\nHost: t\r\n\r\n")
        server.marker("started-after")
    events = json.loads(server.marker("disconnect-after"))
    assert events == [{"type": "http.request", "len": 0, "more": False},
                      {"type": "http.disconnect", "len": 0, "more": False}]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/raise", "/raise-after-start", "/noresponse", "/bad-header"])
def test_app_failure_before_any_byte_is_a_500(server: Served, worker_pid: int,
                                              path: str) -> None:
    with Conn.open(server.port) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = conn.read_response()
        assert response.status == 500, response.raw_head
        assert response.closes
        assert b"x-injected" not in response.raw_head.lower()
        assert conn.server_closed()
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["cl", "chunked"])
def test_app_failure_after_part_of_the_body_cuts_the_connection(server: Served, worker_pid: int,
                                                                 mode: str) -> None:
    """Once part of a response is out, the client must see it incomplete: the
    connection ends without the rest (no content-length worth, no last chunk)."""
    with Conn.open(server.port) as conn:
        conn.send(f"GET /partial?mode={mode} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        with pytest.raises(Truncated) as caught:
            conn.read_response()
        assert caught.value.head is not None and caught.value.head.status == 200
        assert conn.eof  # closed, not left hanging
    assert server.pid() == worker_pid


@pytest.mark.timeout(30)
def test_expect_100_continue_not_sent_when_the_app_does_not_read(server: Served) -> None:
    """The 100 is sent when the app asks for the body; an app that answers without
    reading it gets its final response out first. The client then sends the body
    anyway (RFC 9110 10.1.1) and the connection goes on."""
    with Conn.open(server.port) as conn:
        conn.send(b"POST /pid HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200, response.raw_head
        if response.closes:
            assert conn.server_closed()
            return
        conn.send(b"hello" + b"GET /sized?n=2 HTTP/1.1\r\nHost: t\r\n\r\n")
        after = conn.read_response()
        assert (after.status, after.body) == (200, b"xx")


@pytest.mark.timeout(60)
def test_lifespan_startup_before_ready_and_shutdown_on_stop(run_forkd, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = run_forkd("http_asgi_probe:app", "-b", "127.0.0.1:0", "-w", "1",
                     env={"HTTP_PROBE_MARKERS": str(markers), "HTTP_PROBE_STARTUP_DELAY": "0.5"})
    port = proc.port()
    proc.wait_ready(1)
    # ready is reported only after startup completed: its marker is already there
    startups = sorted(p.name for p in markers.glob("startup-*"))
    assert len(startups) == 1, proc.describe()
    with Conn.open(port) as conn:
        conn.send(b"GET /scope HTTP/1.1\r\nHost: t\r\n\r\n")
        scope = conn.read_response().json()
    worker = scope["state"]["startup_pid"]
    assert startups == [f"startup-{worker}"]  # startup ran in the worker that serves
    assert not list(markers.glob("shutdown-*"))
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.describe()
    wait_until(lambda: (markers / f"shutdown-{worker}").exists(), 5, message=proc.describe)


@pytest.mark.timeout(30)
def test_a_broken_body_after_an_early_answer_closes_the_connection_not_a_hang(
        server: Served) -> None:
    """The app answered without reading the body; the rest of that body is malformed.
    The request was answered: the connection closes with no second answer (a 400
    there would be read as the answer to the client's next request)."""
    with Conn.open(server.port) as conn:
        conn.send(b"POST /pid HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n")  # /pid answers without reading the body
        first = conn.read_response()
        conn.send(b"zz\r\nnot a chunk\r\n")
        assert first.status == 200
        assert conn.server_closed()  # (with nothing more to read: no 400)
