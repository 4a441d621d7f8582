"""One ASGI request after another, without sockets (the harness of test_pipelined_writes):
what the lean per-request path must still give a client."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from test_pipelined_writes import Transport, asgi_sized, bodies, connect, get, run_until

from forkd.http.protocol import HttpProtocol

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


def ask_in_turn(loop: asyncio.AbstractEventLoop, proto: HttpProtocol, transport: Transport,
                paths: list[str]) -> list[bytes]:
    """Keep-alive requests, each sent in a read of its own once the one before it is
    answered (as a client that waits for its answer does): their bodies."""
    before = len(bodies(transport.received))
    for number, path in enumerate(paths, before + 1):
        proto.data_received(get(path))
        run_until(loop, lambda number=number: len(bodies(transport.received)) == number)
    return bodies(transport.received)


def test_each_keep_alive_request_runs_in_a_task_of_its_own(
        loop: asyncio.AbstractEventLoop) -> None:
    """A connection's requests, each in a read of its own, each start in a new task, as
    uvicorn, hypercorn and granian run them: no cancellation asked of it
    (asyncio.timeout, anyio's cancel scopes), context variables as the connection
    began, state kept per task (SQLAlchemy's async_scoped_session(scopefunc=
    current_task) without remove()) not another request's; and between two requests
    the connection holds no task, nor a request slot of --limit-concurrency."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    tasks: list[asyncio.Task[Any]] = []
    seen: list[tuple[str, int, list[str]]] = []
    per_task: dict[asyncio.Task[Any], list[str]] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        session = per_task.setdefault(task, [])
        seen.append((var.get(), task.cancelling(), list(session)))
        session.append(scope["path"])
        if scope["path"] == "/set":
            var.set("set by /set")  # (and not reset: the next request must not see it)
        elif scope["path"] == "/swallow":
            task.cancel()  # a cancellation the app swallows without uncancel()
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass
        elif scope["path"] == "/timeout":
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(1)
            except TimeoutError:
                scope["query_string"] = b"n=7"
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    state = proto.state
    state.limit_concurrency = 1
    paths = ["/?n=1", "/set", "/?n=2", "/swallow", "/timeout", "/?n=3"]
    for number, path in enumerate(paths, 1):
        assert len(ask_in_turn(loop, proto, transport, [path])) == number
        run_until(loop, lambda: not state.tasks)  # (its task ends with its app)
        assert state.in_progress() == 0
    assert bodies(transport.received) == [b"x", b"", b"xx", b"", b"x" * 7, b"xxx"]
    assert seen == [("unset", 0, [])] * len(paths)
    assert len(set(tasks)) == len(paths)
    other, other_transport = connect(loop, "asgi", app)
    other.state = state  # (the same worker: --limit-concurrency 1 is shared)
    other.data_received(get("/?n=4"))
    run_until(loop, lambda: b"\r\n\r\n" in other_transport.received)
    assert other_transport.received.startswith(b"HTTP/1.1 200 OK")


def test_a_cancel_an_app_left_armed_does_not_cut_the_next_request(
        loop: asyncio.AbstractEventLoop) -> None:
    """An app arms loop.call_later(t, task.cancel) as its own deadline and does not
    disarm it when it finishes early: the task it cancels is its own, long done, not
    the one of the connection's next request (which takes longer than t)."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/arm":
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_later(0.05, task.cancel)
        elif scope["path"] == "/slow":
            await asyncio.sleep(0.2)
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.state.limit_concurrency = 1
    assert ask_in_turn(loop, proto, transport, ["/arm?n=1", "/slow?n=2", "/?n=3"]) == [
        b"x", b"xx", b"xxx"]
    assert b"HTTP/1.1 500" not in transport.received and not transport.eof
    assert not proto.state.tasks and proto.state.in_progress() == 0


def test_a_connection_that_began_with_context_variables_starts_each_request_with_them(
        loop: asyncio.AbstractEventLoop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(var.get())
        if scope["path"] == "/set":
            var.set("changed")
        await asgi_sized(scope, receive, send)

    context = contextvars.copy_context()
    context.run(var.set, "as the connection began")
    proto, transport = context.run(connect, loop, "asgi", app)
    ask_in_turn(loop, proto, transport, ["/?n=1", "/set", "/?n=1", "/?n=1"])
    assert seen == ["as the connection began"] * 4


def test_a_websocket_on_a_connection_whose_last_app_still_runs_leaves_no_task_behind(
        loop: asyncio.AbstractEventLoop) -> None:
    """An app that works on after its answer (Starlette's BackgroundTasks), then an
    upgrade on the same connection: once both apps end, no task is left for a worker's
    graceful stop to wait for."""
    from forkd.http.websocket import make_upgrade_factory

    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        await asgi_sized(scope, receive, send)
        if scope["path"] == "/background":
            await release.wait()

    proto, transport = connect(loop, "asgi", app)
    websocket: list[Any] = []
    transport.set_protocol = websocket.append  # type: ignore[attr-defined]
    state = proto.state
    state.upgrade_factory = make_upgrade_factory(app, {}, "")
    ask_in_turn(loop, proto, transport, ["/background?n=1"])
    proto.data_received(b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n")
    run_until(loop, lambda: b"HTTP/1.1 101" in transport.received)
    release.set()
    (handler,) = websocket
    handler.connection_lost(None)  # the client goes
    run_until(loop, lambda: not state.tasks)
    assert state.in_progress() == 0


@pytest.mark.parametrize(("request_line", "fields", "version", "connection"), [
    (b"GET / HTTP/1.1", b"", "1.1", None),
    (b"GET / HTTP/1.1", b"Connection: keep-alive\r\n", "1.1", None),
    (b"GET / HTTP/1.1", b"Connection: close\r\n", "1.1", b"close"),
    (b"GET / HTTP/1.0", b"", "1.0", b"close"),
    (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", "1.0", b"keep-alive"),
    (b"GET / HTTP/1.0", b"Proxy-Connection: keep-alive\r\n", "1.0", b"keep-alive"),
    (b"GET / HTTP/2.0", b"Proxy-Connection: keep-alive\r\n", None, None),
    (b"GET / HTTP/2.0", b"", None, None),
    (b"GET / HTTP/2.0", b"Connection: keep-alive\r\n", None, None),
    (b"GET / HTTP/0.9", b"Connection: keep-alive\r\n", None, None),
])
def test_each_http_version_is_told_apart(loop: asyncio.AbstractEventLoop, request_line: bytes,
                                          fields: bytes, version: str | None,
                                          connection: bytes | None) -> None:
    """The version is worked out without asking the parser for it when it can only be
    1.1: with or without a Connection field, each version is the right one (the app's
    http_version, the response's framing), and 2.0 and 0.9 are refused 505."""
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["http_version"])
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(request_line + b"\r\nHost: test\r\n" + fields + b"\r\n")
    run_until(loop, lambda: b"\r\n\r\n" in transport.received)
    head = transport.received.split(b"\r\n\r\n")[0].lower()
    if version is None:
        assert head.startswith(b"http/1.1 505") and seen == []
        return
    assert head.startswith(b"http/1.1 200") and seen == [version]
    said = [line.split(b": ")[1] for line in head.split(b"\r\n") if line.startswith(b"connection")]
    assert said == ([] if connection is None else [connection])


def test_each_request_gets_a_scope_of_its_own_with_its_clients_and_schemes(
        loop: asyncio.AbstractEventLoop) -> None:
    """A request's scope is a copy of its connection's keys with its own set: what an app
    does to one scope (middleware rewrites path, adds keys, empties state) never reaches
    the next request's, and a trusted proxy's client and scheme hold for its request only."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append({**scope, "state": dict(scope["state"])})  # (as it came)
        scope["path"] = "/rewritten"
        scope["user"] = "someone"
        scope["client"] = ("6.6.6.6", 6)
        scope["state"]["seen"] = True
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.peer_trusted = True
    assert ask_in_turn(loop, proto, transport, ["/a?n=1", "/b?n=1"]) == [b"x", b"x"]
    proto.data_received(get("/c?n=1", b"X-Forwarded-For: 10.0.0.9\r\n"
                                      b"X-Forwarded-Proto: https\r\n"))
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    proto.data_received(get("/d?n=1"))
    run_until(loop, lambda: len(bodies(transport.received)) == 4)
    assert [scope["path"] for scope in scopes] == ["/a", "/b", "/c", "/d"]
    assert [scope["query_string"] for scope in scopes] == [b"n=1"] * 4
    assert all("user" not in scope and scope["state"] == {} for scope in scopes)
    assert [scope["client"] for scope in scopes] == [
        proto.client, proto.client, ("10.0.0.9", 0), proto.client]
    assert [scope["scheme"] for scope in scopes] == ["http", "http", "https", "http"]
    assert list(scopes[0]) == ["type", "asgi", "http_version", "server", "client", "scheme",
                               "method", "root_path", "path", "raw_path", "query_string",
                               "headers", "state"]


def test_a_path_asked_again_is_decoded_as_the_first_time_and_the_kept_ones_are_bounded(
        loop: asyncio.AbstractEventLoop) -> None:
    """ASGICycle keeps the scope path of each raw path it saw (a bounded table): a path
    asked again, plain or percent-encoded, gets the same scope path under the app's
    root_path, and an app asked for ever new paths keeps at most MAX_PATHS of them."""
    from forkd.http import asgi

    seen: list[tuple[str, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["raw_path"]))
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    cycle_class = asgi.ASGICycle.bind(app, {}, "/api")
    proto.state.cycle_factory = cycle_class
    paths = ["/a%20b?n=1", "/caf%C3%A9?n=1", "/plain?n=1", "/%FF?n=1"]
    ask_in_turn(loop, proto, transport, paths + paths)
    expected = [("/api/a b", b"/a%20b"), ("/api/café", b"/caf%C3%A9"),
                ("/api/plain", b"/plain"), ("/api/\ufffd", b"/%FF")]
    assert seen == expected + expected
    assert asgi.ASGICycle.paths == {}  # (each bound class has a table of its own)
    long_path = "/" + "x" * (asgi.MAX_KEPT_PATH + 1)
    ask_in_turn(loop, proto, transport, [long_path + "?n=1"])
    assert seen[-1][0] == "/api" + long_path
    assert long_path.encode() not in cycle_class.paths
    for number in range(3 * asgi.MAX_PATHS):
        cycle = cycle_class(proto, "GET", b"/n/%d" % number, [], "1.1", True)
        assert cycle.scope["path"] == f"/api/n/{number}"
    assert 0 < len(cycle_class.paths) <= asgi.MAX_PATHS
