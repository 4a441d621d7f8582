"""--wsgi-inline auto: a route learnt to be quick runs on the loop's thread; a route that
blocks runs inline at most once and then stays on the pool's threads, concurrently; a quick
route that starts blocking goes back to them."""

from __future__ import annotations

import selectors
import socket
import time

import pytest
from httpkit import Conn, Served, get

from forkd.http import wsgipool
from support import at_once

pytestmark = pytest.mark.integration

LEARN = wsgipool.PROMOTE_AFTER + 8  # calls after which a quick route is surely learnt


@pytest.fixture(scope="module")
def server(serve) -> Served:
    return serve("wsgi_inline_probe:app", "--threads", "4")


def where(server: Served, path: str) -> str:
    response = get(server.port, path)
    assert response.status == 200
    return response.body.decode()


@pytest.mark.timeout(30)
def test_a_quick_route_moves_to_the_loop_thread(server: Served) -> None:
    first = where(server, "/where")
    assert first.startswith("forkd-wsgi-")
    seen = [where(server, "/where") for _ in range(LEARN)]
    assert seen[-1] == "MainThread"


@pytest.mark.timeout(30)
def test_a_route_calling_asyncio_run_is_served_inline_too(serve) -> None:
    """A sync view that runs async code (asyncio.run(), asgiref's async_to_sync) works
    on a thread; learnt as quick, it runs on the loop's thread and must work there too:
    the app does not see the worker's running loop. (`always`: every call inline, as a
    learnt route's are; a new loop per call is too slow to be learnt on a loaded host.)"""
    inline = serve("wsgi_inline_probe:app", "--wsgi-inline", "always")
    assert [where(inline, "/where?asyncio=1") for _ in range(3)] == ["MainThread"] * 3


@pytest.mark.timeout(30)
def test_a_blocking_route_stays_concurrent(server: Served) -> None:
    seen = [where(server, "/slow-io?ms=25") for _ in range(2 * LEARN)]
    # its CPU is small, so it may be tried inline once (when, a loaded host decides:
    # a quick call's CPU over the limit delays the learning); that call's 25 ms sends
    # it back for a probation longer than this test, so never a second time
    assert seen.count("MainThread") <= 1, seen
    results, elapsed = at_once(lambda: where(server, "/slow-io?ms=400"), 4)
    assert len(results) == 4
    assert elapsed < 1.2


@pytest.mark.timeout(30)
def test_calls_that_block_are_served_concurrently_up_to_threads(serve) -> None:
    """Past the pool's floor of 8 threads, up to --threads: calls that wait for a
    thread while every thread sleeps get threads of their own."""
    wide = serve("wsgi_inline_probe:app", "--threads", "12")
    results, elapsed = at_once(lambda: where(wide, "/slow-io?ms=700"), 12)
    assert len(results) == 12
    assert len(set(results)) == 12  # each on a thread of its own
    assert elapsed < 1.3, f"took {elapsed:.2f}s: 8 threads would take 1.4 s or more"


@pytest.mark.timeout(30)
def test_a_learnt_route_that_blocks_goes_back_to_the_threads(server: Served) -> None:
    for _ in range(LEARN):
        where(server, "/flaky")
    assert where(server, "/flaky") == "MainThread"
    assert where(server, "/flaky?ms=50") == "MainThread"  # it blocked the loop, once
    assert where(server, "/flaky").startswith("forkd-wsgi-")


@pytest.mark.timeout(30)
def test_a_quick_route_pipelined_deep_is_learnt_as_quick(server: Served) -> None:
    """Requests queued behind one answered on a thread run inline, one inside the answer
    of the other, as soon as their route is learnt: each call's time is its own. (Timed
    whole, the first of 15 such calls of 0.2 ms took 3 ms, and the route went back to the
    threads for good: pipelined traffic was never served inline.)"""
    depth = 24  # the route is learnt inside the second batch, with requests still queued
    request = b"GET /pipelined?us=150 HTTP/1.1\r\nHost: test\r\n\r\n"
    with Conn.open(server.port, timeout=10) as conn:
        for _ in range(3):
            conn.send(request * depth)
            answers = [conn.read_response() for _ in range(depth)]
            assert [a.status for a in answers] == [200] * depth
    assert {a.body for a in answers} == {b"MainThread"}  # the third batch: all inline
    # (on a loaded host the scheduler held an inline call 12 ms: that sent the route back
    # to the threads for 10 s, and the third batch ran on them; wsgipool's docstring)


@pytest.mark.timeout(60)
def test_a_burst_of_pipelining_connections_is_accepted_while_calls_run_inline(serve) -> None:
    """uvloop accepts one connection per pass of the loop. With every call of a pass
    run inline, a pass took as long as the pipelined requests of every connection
    already accepted, and the last connections of a burst waited seconds for their
    first answer (wrk counts them as timeouts past 2 s). A client here: 48 connections
    at once, 16 requests pipelined on each and 16 more as soon as those are answered."""
    busy = serve("wsgi_inline_probe:app", "--wsgi-inline", "always")
    count, depth = 48, 16
    batch = b"GET /?us=300 HTTP/1.1\r\nHost: test\r\n\r\n" * depth
    marker = b"\r\n\r\nMainThread"  # the end of one answer
    selector = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", busy.port), timeout=5) for _ in range(count)]
    answered = dict.fromkeys(socks, 0)
    tails = dict.fromkeys(socks, b"")
    first: dict[socket.socket, float] = {}
    try:
        started = time.monotonic()
        for sock in socks:
            sock.sendall(batch)
            selector.register(sock, selectors.EVENT_READ)
        deadline = started + 20
        while len(first) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(65536)
                assert data, "the server closed a connection"
                seen = tails[sock] + data
                answered[sock] += seen.count(marker)
                tails[sock] = seen[-(len(marker) - 1):]
                if answered[sock] % depth == 0:
                    first.setdefault(sock, time.monotonic() - started)
                    sock.sendall(batch)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    assert len(first) == count, f"{count - len(first)} connections never answered in 20 s"
    slowest = max(first.values())
    assert slowest < 2.0, f"the last connection's first 16 answers took {slowest:.2f} s"
