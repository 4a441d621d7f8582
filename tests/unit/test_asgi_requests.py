"""One ASGI request after another, without sockets (the harness of test_pipelined_writes):
what the lean per-request path must still give a client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_pipelined_writes import Transport, asgi_sized, bodies, connect, get, loop, run_until

from forkd.http.protocol import HttpProtocol

__all__ = ["loop"]  # (the fixture, imported to be used here)

pytestmark = pytest.mark.timeout(30)


def test_a_request_slot_comes_back_whatever_its_app_did(
        loop: asyncio.AbstractEventLoop) -> None:
    """--limit-concurrency 1: after an answer, after an app that raised, and after an
    app cancelled at the drain's deadline, the next request is served, not refused 503."""
    forever = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/raise":
            raise RuntimeError("boom")
        if scope["path"] == "/hang":
            await forever.wait()
        await asgi_sized(scope, receive, send)

    first, _ = connect(loop, "asgi", app)
    state = first.state
    state.limit_concurrency = 1

    def ask(path: str) -> bytes:
        proto = HttpProtocol(state)  # (a 500 closes its connection: one each)
        transport = Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(get(path))
        run_until(loop, lambda: b"\r\n\r\n" in transport.received)
        return transport.received.split(b"\r\n", 1)[0]

    assert ask("/?n=1") == b"HTTP/1.1 200 OK"
    assert ask("/raise") == b"HTTP/1.1 500 Internal Server Error"
    assert ask("/?n=1") == b"HTTP/1.1 200 OK"
    hanging = HttpProtocol(state)
    hanging.connection_made(Transport())  # type: ignore[arg-type]
    hanging.data_received(get("/hang"))
    run_until(loop, lambda: state.in_progress() == 1)
    assert ask("/?n=1") == b"HTTP/1.1 503 Service Unavailable"  # (the limit holds)
    loop.run_until_complete(state.cancel_tasks(1.0))
    assert ask("/?n=1") == b"HTTP/1.1 200 OK"


def test_a_request_task_cancelled_before_it_ran_leaves_nothing_in_progress(
        loop: asyncio.AbstractEventLoop) -> None:
    """The drain's deadline may come in the pass a request arrived in: its task is
    cancelled before its first step and must not count as in progress after."""
    proto, transport = connect(loop, "asgi", asgi_sized)
    proto.data_received(get("/?n=1"))
    (task,) = proto.state.tasks
    task.cancel()  # (as cancel_tasks does, before the loop ran the task)
    loop.run_until_complete(proto.state.cancel_tasks(1.0))
    assert proto.state.in_progress() == 0
    assert bodies(transport.received) == []
