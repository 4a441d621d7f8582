"""An app's response headers, as a client sees them: WSGI's str pairs, encoded once per
distinct short pair and cached (wsgi._HEADER_BYTES, bounded); a str subclass served as
a str whatever came before; what is not a pair of str is a 500 that says so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from test_pipelined_writes import connect, get

from forkd.http import wsgi

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def header_table() -> Iterator[None]:
    """Each test starts with an empty table (whatever other tests served before)."""
    saved = dict(wsgi._HEADER_BYTES)
    wsgi._HEADER_BYTES.clear()
    yield
    wsgi._HEADER_BYTES.clear()
    wsgi._HEADER_BYTES.update(saved)


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


class Safe(str):
    """A str subclass, as markupsafe's Markup or Django's SafeString."""


@pytest.mark.parametrize("plain_first", [True, False])
def test_a_str_subclass_header_is_served_whatever_came_before(
        loop: asyncio.AbstractEventLoop, plain_first: bool) -> None:
    """One rule whether the equal plain pair was learnt before (a hit) or not (a miss):
    a subclass of str is a str, as gunicorn takes it."""
    def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Location", "/next")])
        return [b""]

    def subclass(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [(Safe("Location"), Safe("/next"))])
        return [b""]

    apps = [plain, subclass, plain, subclass] if plain_first else [subclass, plain, subclass]
    for app in apps:
        head = serve(loop, app).split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nLocation: /next\r\n" in head
    assert wsgi._HEADER_BYTES[("Location", "/next")] == (b"Location", b"/next")


@pytest.mark.parametrize("value", [b"a", ["a", "b"], 3, None])
def test_a_header_value_that_is_not_str_is_a_clear_500(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, value: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Kind", environ["QUERY_STRING"])]
                       if environ["QUERY_STRING"] else [("X-Kind", value)])
        return [b"ok"]

    assert serve(loop, app, "/?a").startswith(b"HTTP/1.1 200 ")  # "a" learnt: no help
    with caplog.at_level(logging.ERROR, logger="forkd.http"):
        assert serve(loop, app).startswith(b"HTTP/1.1 500 ")
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [str(e) for e in errors] == [f"WSGI header 'X-Kind': {value!r} is not a pair of str"]


def test_headers_remembered_are_bounded(loop: asyncio.AbstractEventLoop) -> None:
    """Values that differ per response (an ETag, a Location echoing the path) neither
    grow the table past its bound nor keep the pairs met later from being learnt."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("ETag", environ["QUERY_STRING"])])
        return [b"ok"]

    def redirect(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("302 Found", [("Location", "/login?next=" + environ["PATH_INFO"])])
        return [b""]

    long_path = "/" + "a" * 4000
    assert b"\r\nLocation: /login?next=%b\r\n" % long_path.encode() in serve(
        loop, redirect, long_path)
    assert not any(len(value) > 256 for _, value in wsgi._HEADER_BYTES)  # not kept
    for n in range(wsgi._MAX_KEPT + 100):
        assert b"\r\nETag: %d\r\n" % n in serve(loop, app, f"/?{n}")
        assert len(wsgi._HEADER_BYTES) <= wsgi._MAX_KEPT
    assert ("ETag", str(wsgi._MAX_KEPT + 99)) in wsgi._HEADER_BYTES  # (emptied when full)

    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [b"hi"]

    assert serve(loop, hello).startswith(b"HTTP/1.1 200 OK\r\n")
    assert wsgi._HEADER_BYTES[("Content-Type", "text/html; charset=utf-8")] == (
        b"Content-Type", b"text/html; charset=utf-8")  # a constant pair met late: learnt
