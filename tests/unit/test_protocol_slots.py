"""The protocol keeps its per-connection state in slots: an attribute that is not one
lands in the instance's own dict, and past 30 of those every method call on the
protocol and each attribute read got slower on every request (bench/profiles,
"WSGI hello, session 6"). So a connection that served requests of each kind has
nothing in that dict."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from test_pipelined_writes import Transport, bodies, run_until

from forkd.config import Config
from forkd.http.protocol import HttpProtocol, ProxyProtocolHttp, ServerState
from forkd.http.wsgi import WSGICycle
from forkd.http.wsgipool import WSGIPool

pytestmark = pytest.mark.timeout(30)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"got " + body]


REQUESTS = (
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    b"POST /a?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
    b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"GET /d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize("kind", [HttpProtocol, ProxyProtocolHttp])
def test_a_connection_that_served_requests_has_no_attribute_outside_the_slots(
        loop: asyncio.AbstractEventLoop, kind: type[HttpProtocol]) -> None:
    state = ServerState(Config(app="test", interface="wsgi"), loop)
    state.cycle_factory = WSGICycle.bind(app, WSGIPool(loop, 0, "always"), "")
    proto = kind(state)
    transport = Transport()
    transport.protocol = proto
    proto.connection_made(transport)  # type: ignore[arg-type]
    if kind is ProxyProtocolHttp:  # (from a trusted peer, with its PROXY header)
        proto.data_received(b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 80\r\n")
    proto.data_received(REQUESTS)
    run_until(loop, lambda: len(bodies(transport.received)) == 5)
    assert bodies(transport.received) == [b"got ", b"got abc", b"got de", b"got ", b"got "]
    assert vars(proto) == {}, "add these to HttpProtocol.__slots__"


def test_a_connection_can_be_weakly_referenced(loop: asyncio.AbstractEventLoop) -> None:
    """As before its attributes moved to slots: code that tracks connections (a
    WeakSet of them, a weakref callback) keeps working, and the reference dies with
    the connection."""
    state = ServerState(Config(app="test", interface="wsgi"), loop)
    proto = HttpProtocol(state)
    ref = weakref.ref(proto)
    assert ref() is proto
    del proto
    gc.collect()
    assert ref() is None
