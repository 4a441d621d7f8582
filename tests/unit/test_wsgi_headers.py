"""An app's response headers, as a client sees them: WSGI's str pairs, encoded once per
distinct pair and cached (wsgi._HEADER_BYTES); what is not a pair of str is still a 500
however often a valid pair with the same text came before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from test_pipelined_writes import connect, get

from forkd.http import wsgi

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def serve(loop: asyncio.AbstractEventLoop, app: Any, path: str = "/") -> bytes:
    proto, transport = connect(loop, "wsgi", app)
    proto.data_received(get(path))
    return b"".join(transport.writes)


def test_header_pairs_as_tuples_lists_and_varying_values(loop: asyncio.AbstractEventLoop
                                                         ) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        n = environ["QUERY_STRING"]
        start_response("200 OK", [("Content-Type", "text/plain"), ["X-N", n],
                                  ("X-Tag", "é" + n)])
        return [b"ok"]

    for n in range(3):
        head = serve(loop, app, f"/?{n}").split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Type: text/plain\r\n" in head
        assert b"\r\nX-N: %d\r\n" % n in head
        assert b"\r\nX-Tag: \xe9%d" % n in head


def test_a_header_that_is_not_str_is_a_500_after_the_same_text_as_str(
        loop: asyncio.AbstractEventLoop) -> None:
    pairs = [("X-Kind", "a")]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", list(pairs))
        return [b"ok"]

    assert serve(loop, app).startswith(b"HTTP/1.1 200 ")
    assert ("X-Kind", "a") in wsgi._HEADER_BYTES
    pairs[0] = ("X-Kind", b"a")  # type: ignore[list-item]  # equal to no str: not cached
    assert serve(loop, app).startswith(b"HTTP/1.1 500 ")


def test_headers_remembered_are_bounded(loop: asyncio.AbstractEventLoop) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("ETag", environ["QUERY_STRING"])])
        return [b"ok"]

    for n in range(1100):
        assert b"\r\nETag: %d\r\n" % n in serve(loop, app, f"/?{n}")
    assert len(wsgi._HEADER_BYTES) <= 1024
