"""WSGI flow between the loop and the pool threads: streaming, pipelined bodies,
stalled clients, a lying content-length, close() during a drain."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from httpkit import Conn

from support import request, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flow(serve):
    return serve("wsgi_flow:app", "--threads", "2", "--header-timeout", "1")


@pytest.mark.timeout(30)
def test_each_block_of_an_iterable_goes_out_as_it_comes(flow) -> None:
    with socket.create_connection(("127.0.0.1", flow.port), timeout=10) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /drip?n=3&ms=700 HTTP/1.1\r\nHost: t\r\n\r\n")
        first = sock.recv(65536)
        waited = time.monotonic() - sent
    assert b"block 0" in first and b"block 2" not in first
    assert waited < 0.6  # not held back until the generator ends (1.4 s)


@pytest.mark.timeout(30)
def test_a_pipelined_request_whose_body_comes_later_is_answered(flow) -> None:
    with Conn.open(flow.port) as conn:
        body = b"z" * 30000
        conn.send(b"GET /drip?n=2&ms=300 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"POST /length HTTP/1.1\r\nHost: t\r\nContent-Length: 30000\r\n\r\n")
        first = conn.read_response()
        conn.send(body)  # the second request's body, after the first answer began
        second = conn.read_response()
    assert first.body == b"block 0\nblock 1\n"
    assert (second.status, second.body) == (200, b"30000")


@pytest.mark.timeout(30)
def test_more_than_the_declared_content_length_is_not_sent(flow) -> None:
    """The excess would be read as the next response: it is cut, and the connection
    closes (the pipelined second request is left for the client to retry)."""
    with Conn.open(flow.port) as conn:
        conn.send(b"GET /overlong HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        first = conn.read_response()
        assert first.body == b"01234"
        assert first.closes
        assert conn.server_closed(), "bytes past the content-length were sent"
    assert request(flow.port)[2] == b"Hello, world!"


@pytest.mark.timeout(30)
def test_stalled_uploads_do_not_hold_the_pool(flow) -> None:
    stalled = []
    try:
        for _ in range(2):  # as many as --threads
            sock = socket.create_connection(("127.0.0.1", flow.port), timeout=10)
            sock.sendall(b"POST /length HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n"
                         b"\r\n" + b"a" * 100000)
            stalled.append(sock)
        started = time.monotonic()
        status, _, body = request(flow.port, timeout=10)
        assert (status, body) == (200, b"Hello, world!")
        assert time.monotonic() - started < 5  # freed by the 1 s stall limit, not the client
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.timeout(60)
def test_a_drain_waits_for_the_body_close(run_forkd, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = run_forkd("wsgi_flow:app", "-b", "127.0.0.1:0", "-w", "1",
                     env={"WSGI_FLOW_MARKERS": str(markers)})
    port = proc.port()
    proc.wait_ready(1)
    assert request(port, path="/closing?ms=800")[2] == b"closing"
    proc.signal(signal.SIGTERM)  # while close() still runs in the pool thread
    assert proc.wait(15) == 0
    wait_until(lambda: (markers / "closed").exists(), 1, message="close() to have finished")
