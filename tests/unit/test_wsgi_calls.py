"""When a threaded WSGI call counts as ended (ServerState.calls: what a drain waits
for): with its answer when its result has nothing to close, in one hand-off to the loop;
only after close() returned when it has."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from test_pipelined_writes import Transport, bodies, get, run_until

from forkd.config import Config
from forkd.http.protocol import HttpProtocol, ServerState
from forkd.http.wsgi import WSGICycle
from forkd.http.wsgipool import WSGIPool

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def connect(loop: asyncio.AbstractEventLoop, app: Any
            ) -> tuple[ServerState, WSGIPool, Transport]:
    state = ServerState(Config(app="test", interface="wsgi"), loop)
    pool = WSGIPool(loop, 2, "never")  # every call on a thread
    state.cycle_factory = WSGICycle.bind(app, pool, "")
    proto = HttpProtocol(state)
    transport = Transport()
    transport.protocol = proto
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(get("/"))
    return state, pool, transport


def test_a_list_result_ends_its_call_with_its_answer(loop: asyncio.AbstractEventLoop
                                                     ) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    state, pool, transport = connect(loop, app)
    try:
        assert state.calls == 1
        deadline = time.monotonic() + 10  # (the loop does not run: its queue fills)
        while not pool.answers or pool.busy_since:
            assert time.monotonic() < deadline, "the thread did not answer"
            time.sleep(0.001)
        assert len(pool.answers) == 1  # the answer, which ends the call too
        run_until(loop, lambda: bool(bodies(transport.received)))
        assert bodies(transport.received) == [b"ok"]
        assert state.calls == 0
    finally:
        pool.shutdown()


def test_a_result_with_close_ends_its_call_once_close_returned(
        loop: asyncio.AbstractEventLoop) -> None:
    closing = threading.Event()
    release = threading.Event()

    class Result(list[bytes]):
        def close(self) -> None:
            closing.set()
            release.wait(10)

    def app(environ: dict[str, Any], start_response: Any) -> Result:
        start_response("200 OK", [("Content-Length", "2")])
        return Result([b"ok"])

    state, pool, transport = connect(loop, app)
    try:
        run_until(loop, lambda: closing.is_set() and bool(bodies(transport.received)))
        assert bodies(transport.received) == [b"ok"]  # answered, and close() runs:
        assert state.calls == 1  # the call is not over yet
        release.set()
        run_until(loop, lambda: state.calls == 0)
    finally:
        release.set()
        pool.shutdown()
