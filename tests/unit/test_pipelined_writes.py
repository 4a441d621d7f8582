"""Pipelined requests on one connection, without sockets: one HttpProtocol on a uvloop
loop with a transport that records what it is given. What a client would see: the
answers in order and complete, in as few writes as the batch allows, the transport's
back-pressure still obeyed, and each ASGI app run as if in a task of its own."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import socket
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from forkd.config import Config
from forkd.http.protocol import (
    FEED_SLICE,
    MAX_PIPELINE,
    OUT_LIMIT,
    HttpProtocol,
    ServerState,
)

pytestmark = pytest.mark.timeout(30)

HIGH_WATER = 256 * 1024  # the recording transport's pause_writing threshold


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: test\r\n%b\r\n" % (path.encode(), extra)


def post(path: str, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(), len(body), body)


class Transport:
    """Records writes; pauses the protocol's writing past HIGH_WATER unread bytes, as a
    real transport does when the client reads nothing."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.unread = 0
        self.protocol: HttpProtocol | None = None
        self.eof = False
        self.aborted = False
        self.reading = True  # what the protocol asked of the transport's reading
        self.pauses = 0
        self.paused = False  # what the transport told the protocol of its writing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: bytes) -> None:
        assert not self.eof, "a write after the FIN"
        self.writes.append(data)
        self.unread += len(data)
        if self.unread > HIGH_WATER and self.protocol is not None and not self.paused:
            self.paused = True  # (once until resumed, as uvloop's and asyncio's do)
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.unread

    def client_reads(self, size: int) -> None:
        """Part of what is buffered: not enough for the protocol's writing to resume."""
        self.unread -= size

    def client_reads_everything(self) -> None:
        self.unread = 0
        assert self.protocol is not None
        self.paused = False
        self.protocol.resume_writing()

    @property
    def received(self) -> bytes:
        return b"".join(self.writes)

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.eof or self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True


def bodies(data: bytes) -> list[bytes]:
    """The bodies of the responses in `data` (content-length framed, as these apps are)."""
    out = []
    at = 0
    while at < len(data):
        end = data.index(b"\r\n\r\n", at)
        length = 0
        for line in data[at:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append(data[end + 4:end + 4 + length])
        at = end + 4 + length
    return out


def connect(loop: asyncio.AbstractEventLoop, interface: str, app: Any, **options: Any
            ) -> tuple[HttpProtocol, Transport]:
    state = ServerState(Config(app="test", interface=interface, **options), loop)
    if interface == "asgi":
        from forkd.http.asgi import ASGICycle

        factory: Any = ASGICycle.bind(app, {}, "")
    else:
        from forkd.http.wsgi import WSGICycle
        from forkd.http.wsgipool import WSGIPool

        pool = WSGIPool(loop, 0, "always")  # every call inline, on the loop's thread

        def factory(proto: Any, method: str, target: bytes, headers: Any, version: str,
                    keep_alive: bool) -> Any:
            return WSGICycle(app, pool, "", proto, method, target, headers, version,
                             keep_alive)
    state.cycle_factory = factory
    proto = HttpProtocol(state)
    transport = Transport()
    transport.protocol = proto
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


class FakeClock:
    """The clock the protocol reads (its loop's time()), moved only by the test: the
    loop itself runs on, so what is judged against it does not depend on the host's
    load. Set `now` to move it."""

    def __init__(self, proto: HttpProtocol) -> None:
        self.real = proto.loop
        self.now = self.real.time()
        proto.loop = self  # type: ignore[assignment]

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool],
              timeout: float = 5.0) -> None:
    async def wait() -> None:
        deadline = loop.time() + timeout
        while not done():
            assert loop.time() < deadline, "timed out"
            await asyncio.sleep(0.001)

    loop.run_until_complete(wait())


def query(scope_or_environ: dict[str, Any]) -> dict[str, str]:
    if "QUERY_STRING" in scope_or_environ:
        raw = scope_or_environ["QUERY_STRING"]
    else:
        raw = scope_or_environ["query_string"].decode()
    return dict(part.split("=", 1) for part in raw.split("&") if "=" in part)


async def read_body(receive: Any) -> bytes:
    """The request's whole body, as an app reading it to the end gets it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def held_at_slow(release: asyncio.Event) -> Any:
    """asgi_sized, except that /slow waits until `release` is set."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await asgi_sized(scope, receive, send)
    return app


async def asgi_sized(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """?n=N: N bytes of x; POST: the body back."""
    if scope["method"] == "POST":
        body = await read_body(receive)
    else:
        body = b"x" * int(query(scope).get("n", "0"))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def wsgi_sized(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read()
    else:
        body = b"x" * int(query(environ).get("n", "0"))
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


APPS = {"asgi": asgi_sized, "wsgi": wsgi_sized}


@pytest.mark.parametrize("interface", sorted(APPS))
def test_sixteen_pipelined_requests_are_answered_in_order_in_one_write(
        loop: asyncio.AbstractEventLoop, interface: str) -> None:
    proto, transport = connect(loop, interface, APPS[interface])
    batch = [get(f"/?n={n}") if n != 7 else post("/", b"a body") for n in range(16)]
    proto.data_received(b"".join(batch))
    run_until(loop, lambda: len(bodies(transport.received)) == 16)
    expected = [b"x" * n if n != 7 else b"a body" for n in range(16)]
    assert bodies(transport.received) == expected
    assert len(transport.writes) == 1  # one send() for the whole batch
    # and the connection goes on: the next read is answered too
    proto.data_received(get("/?n=3"))
    run_until(loop, lambda: len(bodies(transport.received)) == 17)
    assert bodies(transport.received)[-1] == b"xxx"
    assert not transport.eof


def deliver(proto: HttpProtocol, transport: Transport, pending: bytearray) -> int:
    """What a socket would hand the protocol of `pending` now: reads of FEED_SLICE bytes
    while it reads (the rest waits in the kernel); the bytes taken."""
    taken = 0
    while pending and transport.reading and not transport.eof:
        data = bytes(pending[:FEED_SLICE])
        del pending[:FEED_SLICE]
        proto.data_received(data)
        taken += len(data)
    return taken


@pytest.mark.parametrize("interface", sorted(APPS))
def test_batches_of_sixteen_pipelined_requests_are_read_on_without_a_pause(
        loop: asyncio.AbstractEventLoop, interface: str) -> None:
    """wrk's plaintext shape: each batch is answered whole, and reading never pauses
    (a pause and a resume per batch cost system calls and a pass of the loop)."""
    proto, transport = connect(loop, interface, APPS[interface])
    for want in (16, 32, 48):
        proto.data_received(b"".join(get(f"/?n={n}") for n in range(16)))
        run_until(loop, lambda want=want: len(bodies(transport.received)) == want)
    assert bodies(transport.received) == [b"x" * n for n in range(16)] * 3
    assert transport.pauses == 0 and transport.reading


@pytest.mark.parametrize("interface", sorted(APPS))
def test_a_client_that_pipelines_ten_thousand_requests_and_reads_nothing_is_held_back(
        loop: asyncio.AbstractEventLoop, interface: str) -> None:
    """Large answers it never reads: reading pauses, so the requests parsed and waiting
    stay few and the rest of its bytes stay in the kernel; once it reads, every request
    is answered, in order."""
    proto, transport = connect(loop, interface, APPS[interface])
    one = get("/?n=4096")
    pending = bytearray(one * 10_000)
    taken = deliver(proto, transport, pending)
    loop.run_until_complete(asyncio.sleep(0.05))
    taken += deliver(proto, transport, pending)
    assert not transport.reading
    assert len(proto.pipeline) <= MAX_PIPELINE + FEED_SLICE // len(one) + 1
    assert taken <= HIGH_WATER + 2 * FEED_SLICE, taken  # what it reads from the client
    answered = len(bodies(transport.received))
    assert answered * 4096 < 2 * HIGH_WATER  # its answers wait for it, too

    def served() -> bool:
        transport.client_reads_everything()
        deliver(proto, transport, pending)
        return not pending and proto.cycle is None and not proto.pipeline

    run_until(loop, served, timeout=20.0)
    assert bodies(transport.received) == [b"x" * 4096] * 10_000
    assert not pending and transport.reading


def test_a_pipelined_request_with_a_body_waits_for_its_turn_unread(
        loop: asyncio.AbstractEventLoop) -> None:
    """Its body is read when its app starts (an Expect: 100-continue is answered then):
    until then reading pauses, so its body clocks do not run for a wait the client did
    not cause."""
    release = asyncio.Event()
    proto, transport = connect(loop, "asgi", held_at_slow(release))
    proto.data_received(get("/slow") + b"POST / HTTP/1.1\r\nHost: test\r\n"
                        b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    loop.run_until_complete(asyncio.sleep(0.01))
    assert not transport.reading and transport.received == b""
    release.set()
    run_until(loop, lambda: b"100 Continue" in transport.received)
    assert transport.reading
    proto.data_received(b"body")
    run_until(loop, lambda: len(bodies(transport.received.split(b"100 Continue\r\n\r\n")[-1]))
              == 1)
    assert bodies(transport.received.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]) == [b"body"]


def test_a_request_waiting_for_its_pass_at_the_drain_deadline_is_answered_and_never_run(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the budget, a pipelined request waits for the next pass in the task of the
    one before it; cancelled there (the drain's deadline), its app never starts and it
    is answered 503 with a retry-after (safe to send again: nothing ran), then the
    connection closes."""
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "CHAIN_BUDGET", 0)
    ran: list[str] = []

    def deadline() -> None:  # what ServerState.cancel_tasks does first
        assert len(proto.state.tasks) == 1
        for task in proto.state.tasks:
            task.cancel()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        if scope["path"] == "/first":
            loop.call_soon(deadline)  # on the next pass, before the second's turn
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/first?n=1") + get("/second"))
    run_until(loop, lambda: proto.state.in_progress() == 0)
    assert ran == ["/first"]
    assert bodies(transport.received)[0] == b"x"
    answer = transport.received.split(b"\r\n\r\nx", 1)[1]
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nretry-after: 0\r\n" in answer
    assert transport.eof and proto.state.in_progress() == 0


def test_the_drain_s_503_for_a_request_that_never_ran_has_its_access_line(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --access-log, that 503 is an answer as any other: its line (status, body
    bytes, the request as it came) and its request id, sent back with it."""
    from forkd import log
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "CHAIN_BUDGET", 0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/first":
            loop.call_soon(lambda: [task.cancel() for task in proto.state.tasks])
        await asgi_sized(scope, receive, send)

    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", app, access_log=True)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(get("/first?n=1") + get("/second?q=2", b"X-Request-ID: again-2\r\n"))
        run_until(loop, lambda: proto.state.in_progress() == 0 and len(items) == 2)
    finally:
        log.setup()
    answer = transport.received.split(b"\r\n\r\nx", 1)[1]
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nx-request-id: again-2\r\n" in answer
    # (end, duration, begin's, status, size, client, method, raw path, query, version)
    assert [(item[2][0], item[3], item[4], *item[5:]) for item in items][1:] == [
        (b"again-2", 503, len(answer.split(b"\r\n\r\n", 1)[1]), ("127.0.0.1", 40000),
         "GET", b"/second", b"q=2", "1.1")]
    assert items[0][3:5] == (200, 1)


@pytest.mark.parametrize("interface", sorted(APPS))
def test_a_large_answer_goes_out_before_the_batch_ends_and_back_pressure_holds(
        loop: asyncio.AbstractEventLoop, interface: str) -> None:
    """Answers past OUT_LIMIT are not held; once the client stops reading, the requests
    behind wait for it (the transport's pause_writing still reaches the protocol)."""
    proto, transport = connect(loop, interface, APPS[interface])
    big = HIGH_WATER + OUT_LIMIT
    proto.data_received(get(f"/?n={big}") + get("/?n=1") + get("/?n=2"))
    run_until(loop, lambda: len(transport.received) > big)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert bodies(transport.received) == [b"x" * big]  # the others wait for the reader
    transport.client_reads_everything()
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    assert bodies(transport.received)[1:] == [b"x", b"xx"]


def test_a_streamed_answer_is_not_held_back_by_requests_queued_behind_it(
        loop: asyncio.AbstractEventLoop) -> None:
    more = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await more.wait()  # the client must have the first part before this ends
            await send({"type": "http.response.body", "body": b"last"})
        else:
            await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/stream") + get("/?n=2"))
    run_until(loop, lambda: b"first" in transport.received)
    more.set()
    run_until(loop, lambda: transport.received.endswith(b"\r\n\r\nxx"))
    assert transport.received.count(b"HTTP/1.1 200 OK") == 2
    assert b"5\r\nfirst\r\n4\r\nlast\r\n0\r\n\r\n" in transport.received  # chunked, in order


def test_each_pipelined_asgi_app_runs_as_in_a_task_of_its_own(
        loop: asyncio.AbstractEventLoop) -> None:
    """Context variables set by one request's app are not seen by the next, and every
    app has a current task (sniffio and anyio, so Starlette and FastAPI, need one)."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[str, bool]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((var.get(), asyncio.current_task() is not None))
        var.set(scope["path"])
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/a") + get("/b") + get("/c"))
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    assert seen == [("unset", True)] * 3


def test_a_pipelined_app_after_one_that_swallowed_a_cancellation_has_none_asked_of_it(
        loop: asyncio.AbstractEventLoop) -> None:
    """An app that caught a cancellation and did not uncancel() leaves its task with
    one asked of it: the request pipelined behind gets a task of its own, as it would
    with any other server, not one whose cancelling() (asyncio.timeout, anyio's cancel
    scopes, TaskGroup) counts a cancellation that is not its own. The one behind that
    is chained to that fresh task, as usual."""
    seen: list[tuple[str, asyncio.Task[Any], int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append((scope["path"], task, task.cancelling()))
        if scope["path"] == "/swallow":
            task.cancel()
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/swallow?n=1") + get("/next?n=2") + get("/last?n=3"))
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    assert bodies(transport.received) == [b"x", b"xx", b"xxx"]
    (_, swallowed, _), (_, after, cancelling), (_, last, _) = seen
    assert cancelling == 0 and after is not swallowed
    assert last is after  # (chained: no task of its own when it needs none)
    run_until(loop, lambda: not proto.state.tasks)


def test_work_after_an_answer_does_not_hold_the_next_pipelined_request(
        loop: asyncio.AbstractEventLoop) -> None:
    later = asyncio.Event()
    finished: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asgi_sized(scope, receive, send)
        if scope["path"] == "/background":
            await later.wait()  # e.g. Starlette's BackgroundTasks, after the response
        finished.append(scope["path"])

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/background?n=1") + get("/next?n=2"))
    run_until(loop, lambda: len(bodies(transport.received)) == 2)
    assert finished == ["/next"]
    later.set()
    run_until(loop, lambda: len(finished) == 2)


def test_a_pipelined_asgi_app_waiting_at_the_drain_deadline_is_cancelled(
        loop: asyncio.AbstractEventLoop) -> None:
    forever = asyncio.Event()
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/hang":
            try:
                await forever.wait()
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/?n=1") + get("/hang"))
    run_until(loop, lambda: len(bodies(transport.received)) == 1)
    assert proto.state.in_progress() == 1
    loop.run_until_complete(proto.state.cancel_tasks(1.0))
    assert outcome == ["cancelled"]
    assert transport.received.endswith(b"Internal Server Error\n")  # its 500, then close
    assert transport.eof


@pytest.mark.parametrize("interface", sorted(APPS))
def test_an_answer_that_closes_the_connection_ends_the_pipeline(
        loop: asyncio.AbstractEventLoop, interface: str) -> None:
    """An app that answers `connection: close` in the middle of a pipeline: what was
    asked after it is never run, and nothing follows its answer."""
    calls: list[str] = []

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        headers = [(b"content-length", b"2")]
        if scope["path"] == "/close":
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        headers = [("Content-Length", "2")]
        if environ["PATH_INFO"] == "/close":
            headers.append(("Connection", "close"))
        start_response("200 OK", headers)
        return [b"ok"]

    proto, transport = connect(loop, interface, asgi_app if interface == "asgi" else wsgi_app)
    proto.data_received(get("/a") + get("/close") + get("/never") + get("/never"))
    run_until(loop, lambda: transport.eof)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert calls == ["/a", "/close"]
    assert bodies(transport.received) == [b"ok", b"ok"]
    assert transport.received.count(b"connection: close") == 1


def test_past_the_pass_budget_pipelined_requests_wait_for_the_next_pass(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no budget left, a pipelined request is not run in the pass in which the one
    before it ended, but it is still run, and the answers keep their order."""
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "CHAIN_BUDGET", 0)
    passes: list[int] = []
    pass_number = [0]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        passes.append(pass_number[0])
        await asgi_sized(scope, receive, send)

    def count_passes() -> None:
        pass_number[0] += 1
        loop.call_soon(count_passes)

    loop.call_soon(count_passes)
    proto, transport = connect(loop, "asgi", app)
    proto.data_received(b"".join(get(f"/?n={n}") for n in range(6)))
    run_until(loop, lambda: len(bodies(transport.received)) == 6)
    assert bodies(transport.received) == [b"x" * n for n in range(6)]
    assert len(set(passes)) > 1  # not all in one pass


def test_past_the_pass_budget_a_batch_of_quick_answers_still_goes_out_in_one_write(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many connections pipelining at once spend the budget: their requests then run one
    per pass, each in a task of its own, and the answers still go out in one send() per
    batch (before: one per pass, ten writes per batch of 16 under wrk's plaintext load)."""
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "CHAIN_BUDGET", 0)
    conns = [connect(loop, "asgi", asgi_sized) for _ in range(8)]
    for proto, _ in conns:
        proto.data_received(b"".join(get(f"/?n={n}") for n in range(16)))
    run_until(loop, lambda: all(len(bodies(t.received)) == 16 for _, t in conns))
    for _, transport in conns:
        assert bodies(transport.received) == [b"x" * n for n in range(16)]
        assert len(transport.writes) == 1


def test_a_held_answer_goes_out_while_the_next_pipelined_app_waits(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the budget too: the answers before a slow app's reach the client while
    that app waits, not when it ends."""
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "CHAIN_BUDGET", 0)
    release = asyncio.Event()
    proto, transport = connect(loop, "asgi", held_at_slow(release))
    proto.data_received(get("/?n=1") + get("/?n=2") + get("/slow") + get("/?n=3"))
    run_until(loop, lambda: len(bodies(transport.received)) == 2)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert bodies(transport.received) == [b"x", b"xx"]
    release.set()
    run_until(loop, lambda: len(bodies(transport.received)) == 4)
    assert bodies(transport.received) == [b"x", b"xx", b"", b"xxx"]


def test_an_app_failing_mid_answer_does_not_take_the_answers_before_it_along(
        loop: asyncio.AbstractEventLoop) -> None:
    """The client gets the whole answers of the requests before the one that failed
    halfway (held to go out together), then the reset that says the last one is cut."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/b":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            raise RuntimeError("broken halfway")
        await asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/a?n=3") + get("/b") + get("/c?n=1"))
    run_until(loop, lambda: transport.aborted)
    first = b"HTTP/1.1 " + transport.received.split(b"HTTP/1.1 ")[1]
    assert first.startswith(b"HTTP/1.1 200 OK") and bodies(first) == [b"xxx"]


def test_a_pipelined_app_whose_call_raises_before_its_coroutine_gets_a_500(
        loop: asyncio.AbstractEventLoop) -> None:
    class App:
        def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
            if scope["path"] == "/b":
                raise RuntimeError("no coroutine for you")
            return asgi_sized(scope, receive, send)

    proto, transport = connect(loop, "asgi", App())
    proto.data_received(get("/a?n=2") + get("/b"))
    run_until(loop, lambda: b"Internal Server Error" in transport.received)
    assert bodies(transport.received)[0] == b"xx"
    assert transport.received.count(b"HTTP/1.1 500") == 1


def test_a_request_after_one_that_works_past_its_answer_has_its_own_context(
        loop: asyncio.AbstractEventLoop) -> None:
    """The next request gets a task of its own when the one before does more after its
    answer (Starlette's BackgroundTasks): that task does not start in the other's
    context either."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []
    later = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(var.get())
        var.set(scope["path"])
        await asgi_sized(scope, receive, send)
        if scope["path"] == "/a":
            await later.wait()
        done.append(scope["path"])

    done: list[str] = []
    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/a?n=1") + get("/b?n=2"))
    run_until(loop, lambda: len(bodies(transport.received)) == 2)
    later.set()
    run_until(loop, lambda: len(done) == 2)  # (no task left pending when the loop closes)
    assert seen == ["unset", "unset"]


def test_pipelines_queued_behind_threads_when_their_route_goes_inline_share_the_pass_budget(
        loop: asyncio.AbstractEventLoop) -> None:
    """Every connection has 15 requests queued behind one on a WSGI thread when the
    route is learnt to be quick: the 15 then run inline, each as the one before it is
    answered. They take turns with the rest of the loop (reads, accepts, timers) in
    passes of at most INLINE_PER_PASS calls, instead of one pass running them all."""
    import threading
    import time

    from forkd.http import wsgipool
    from forkd.http.wsgi import WSGICycle

    inline_calls = [0]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if threading.current_thread() is threading.main_thread():
            inline_calls[0] += 1
        elif not pool.runs_inline(b"/"):  # (work enough that the threads do not learn
            until = time.thread_time() + 2 * wsgipool.QUICK_CPU  # the route themselves)
            while time.thread_time() < until:
                pass
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    state = ServerState(Config(app="test", interface="wsgi"), loop)
    pool = wsgipool.WSGIPool(loop, 2, "auto")

    def factory(proto: Any, method: str, target: bytes, headers: Any, version: str,
                keep_alive: bool) -> Any:
        return WSGICycle(app, pool, "", proto, method, target, headers, version, keep_alive)

    state.cycle_factory = factory
    connections = []
    for _ in range(40):
        proto = HttpProtocol(state)
        transport = Transport()
        transport.protocol = proto
        proto.connection_made(transport)  # type: ignore[arg-type]
        connections.append((proto, transport))
    per_pass: list[int] = []

    def count_pass() -> None:
        per_pass.append(inline_calls[0])
        loop.call_soon(count_pass)

    loop.call_soon(count_pass)  # (first in the loop's queue: before any answer)
    try:
        for proto, _ in connections:  # a new route: the first of each 16 goes to a thread
            proto.data_received(get("/") * 16)
        # the threads' answers all wait for the loop (one hand-off per call: its answer,
        # which ends the call too, the app's list having nothing to close)
        deadline = time.monotonic() + 10
        # (and the threads are out of their calls: a call's end still scores its route)
        while len(pool.answers) < len(connections) or pool.busy_since:
            assert time.monotonic() < deadline, "the threads did not answer"
            time.sleep(0.001)
        for _ in range(wsgipool.PROMOTE_AFTER):  # ...when the route is learnt to be quick
            pool.threaded_took(b"/", 0.0001, 0.0001)
        assert pool.runs_inline(b"/")
        run_until(loop, lambda: all(len(bodies(t.received)) == 16 for _, t in connections))
        per_pass.append(inline_calls[0])
    finally:
        pool.shutdown()
    assert all(bodies(t.received) == [b"ok"] * 16 for _, t in connections)
    assert inline_calls[0] == 40 * 15  # all but the first of each
    most = max(after - before for before, after in zip(per_pass, per_pass[1:], strict=False))
    assert most <= wsgipool.INLINE_PER_PASS


BIG = HIGH_WATER + 44 * 1024  # an answer the client does not read: its writing pauses


async def asgi_big(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/big: BIG bytes of b; else as asgi_sized."""
    if scope["path"] != "/big":
        await asgi_sized(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % BIG)]})
    await send({"type": "http.response.body", "body": b"b" * BIG})


def behind_an_unread_answer(loop: asyncio.AbstractEventLoop, app: Any = asgi_big
                            ) -> tuple[HttpProtocol, Transport]:
    """/big is answered and the client stops reading: the connection waits for it to
    read before the next answer, with no request being answered and none queued (so it
    still reads: the next read's requests queue up, owed answers all the same)."""
    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/big"))
    run_until(loop, lambda: proto.awaiting_drain)
    assert proto.cycle is None and not proto.pipeline and transport.reading
    return proto, transport


def test_a_bad_request_behind_one_queued_while_the_client_does_not_read_is_refused_after_it(
        loop: asyncio.AbstractEventLoop) -> None:
    """The 400 (and the close) come after the queued request's answer, not ahead of it
    (the client would take the 400 for that request's answer)."""
    proto, transport = behind_an_unread_answer(loop)
    proto.data_received(get("/?n=1") + b"BAD\x01 / HTTP/1.1\r\n\r\n")
    assert not transport.eof
    transport.client_reads_everything()
    run_until(loop, lambda: transport.eof)
    got = bodies(transport.received)
    assert got[:2] == [b"b" * BIG, b"x"]
    assert got[2].startswith(b"Bad Request") and len(got) == 3
    assert proto.metrics.in_flight == 0


def test_a_websocket_handshake_behind_one_queued_while_the_client_does_not_read_waits(
        loop: asyncio.AbstractEventLoop) -> None:
    """A handshake behind a queued request is not performed (as behind one being
    answered): no 101 ahead of that request's answer; it is answered as plain HTTP,
    in its turn, and nothing stays in flight."""
    from forkd.http.websocket import make_upgrade_factory

    proto, transport = behind_an_unread_answer(loop)
    proto.state.upgrade_factory = make_upgrade_factory(asgi_big, {}, "")
    proto.data_received(get("/?n=1") + get("/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                           b"Sec-WebSocket-Version: 13\r\n"))
    assert b"101" not in transport.received
    transport.client_reads_everything()
    run_until(loop, lambda: transport.eof)
    assert b"HTTP/1.1 101" not in transport.received
    assert bodies(transport.received) == [b"b" * BIG, b"x", b""]
    assert proto.metrics.in_flight == 0


def test_a_head_that_stalls_behind_one_queued_while_the_client_does_not_read_is_cut_after_it(
        loop: asyncio.AbstractEventLoop) -> None:
    """A head begun (not even its target yet) that stalls for --header-timeout: the
    queued request is answered first, then the 408 and the close."""
    proto, transport = behind_an_unread_answer(loop)
    proto.data_received(get("/?n=1") + b"GE")
    timeout = proto.state.config.header_timeout
    # (the client read nothing for less than that: the head's clock ran out first)
    proto.write_paused_at = loop.time() + 1
    proto.check_timeouts(loop.time() + timeout)
    assert not transport.eof and not transport.aborted
    transport.client_reads_everything()
    run_until(loop, lambda: transport.eof)
    assert bodies(transport.received) == [b"b" * BIG, b"x", b"Request Timeout\n"]
    assert not transport.aborted and proto.metrics.in_flight == 0


def tick_until_cut(proto: HttpProtocol, transport: Transport, clock: FakeClock,
                   until: float, step: float = 0.5) -> float:
    """The worker's ticks (every `step` s of the protocol's clock) until the connection
    is cut or `until`: when it was cut (or `until`)."""
    while not transport.aborted and clock.now < until:
        clock.now += step
        proto.state.now = clock.now  # (tick's coarse clock)
        proto.check_timeouts(clock.now)
    return clock.now


@pytest.mark.parametrize("rest", [b"GET /?n=1 HTTP/1.1\r\nHo", b"BAD\x01 / HTTP/1.1\r\n\r\n",
                                  get("/?n=1", b"Connection: close\r\n")],
                         ids=["stalled head", "refused", "closing"])
def test_a_client_taking_none_of_its_answers_is_cut_a_timeout_after_it_last_took_any(
        loop: asyncio.AbstractEventLoop, rest: bytes) -> None:
    """/big waits on a client that takes none of it; just before --header-timeout has
    passed, it pipelines a head that stalls, a request refused at once (400 and the
    close) or one asking for the close: it is still cut --header-timeout after the
    pause (at the first tick past it), not the head's 408 or the close later (they gave
    it up to two or three times as long)."""
    proto, transport = behind_an_unread_answer(loop)
    clock = FakeClock(proto)
    paused = proto.write_paused_at
    timeout = proto.state.config.header_timeout
    clock.now = proto.state.now = paused + timeout - 0.5
    proto.data_received(rest)
    cut = tick_until_cut(proto, transport, clock, paused + 4 * timeout)
    assert transport.aborted and paused + timeout <= cut < paused + timeout + 0.5
    assert proto.state.slow_cuts.count == 1


def test_a_new_pause_after_the_client_took_everything_starts_afresh(
        loop: asyncio.AbstractEventLoop) -> None:
    """The client reads /big's answer whole, late but within --header-timeout; then asks
    for it again and reads nothing: it is cut --header-timeout after the new pause."""
    proto, transport = behind_an_unread_answer(loop)
    clock = FakeClock(proto)
    timeout = proto.state.config.header_timeout
    clock.now = proto.state.now = proto.write_paused_at + timeout - 0.5
    transport.client_reads_everything()
    proto.data_received(get("/big"))
    run_until(loop, lambda: proto.awaiting_drain)
    assert proto.write_paused_at == clock.now
    again = clock.now
    cut = tick_until_cut(proto, transport, clock, again + 3 * timeout)
    assert transport.aborted and again + timeout <= cut < again + timeout + 0.5


def test_a_client_trickling_below_the_floor_across_pipelined_answers_is_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    """An answer just past what the transport buffers, then the client pipelines one
    small request after another without reading their answers, and takes 200 B/s
    (under --min-body-rate's 240): enough for writing to resume every second or two and
    the next answer to go out (and end) before it pauses again. The send-rate window
    runs on across those answers: the client is cut once one window (--header-timeout)
    has passed since the pause, not held while answers keep ending."""
    proto, transport = connect(loop, "asgi", asgi_sized)
    clock = FakeClock(proto)
    proto.data_received(get(f"/?n={HIGH_WATER + 100}"))
    run_until(loop, lambda: proto.awaiting_drain)
    paused = proto.write_paused_at
    timeout = proto.state.config.header_timeout
    answered = 1
    while not transport.aborted and clock.now < paused + 6 * timeout:
        if proto.awaiting_drain and not proto.pipeline:
            proto.data_received(get("/?n=500"))  # (its next request, pipelined)
        transport.client_reads(100)
        if transport.unread < HIGH_WATER - 100:  # (the transport's low-water mark)
            transport.paused = False
            proto.resume_writing()
            run_until(loop, lambda: proto.awaiting_drain)
            answered += 1
        tick_until_cut(proto, transport, clock, clock.now + 0.5)
    assert answered >= 4  # (answers ended within the window)
    assert transport.aborted and paused + timeout <= clock.now < paused + timeout + 0.5


def test_reading_pauses_while_the_client_does_not_read_and_answers_are_owed(
        loop: asyncio.AbstractEventLoop) -> None:
    """/big's answer is not read and a request is queued behind it: nothing more is read
    from the client (what it sends next stays in the kernel) until it reads; then the
    queued request is answered and reading resumes."""
    proto, transport = connect(loop, "asgi", asgi_big)
    proto.data_received(get("/big") + get("/?n=1"))
    run_until(loop, lambda: proto.awaiting_drain)
    assert not transport.reading
    transport.client_reads_everything()
    run_until(loop, lambda: transport.reading)
    assert bodies(transport.received) == [b"b" * BIG, b"x"]
    proto.data_received(get("/?n=2"))
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    assert bodies(transport.received)[2] == b"xx" and not transport.eof


@pytest.mark.parametrize("rest", [get("/?n=1") * MAX_PIPELINE + b"GET /y HTTP/1.1\r\nHo",
                                  b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 9\r\n\r\nhal"])
def test_a_client_that_pipelines_a_partial_request_and_never_reads_is_cut(
        loop: asyncio.AbstractEventLoop, rest: bytes) -> None:
    """/big, then a full pipeline and the start of one more head, or a request with
    part of its body; then it reads nothing: the clock of that head or body stops (we
    do not read it while answers are owed), but the client that reads none of its
    answers for --header-timeout is cut all the same."""
    proto, transport = connect(loop, "asgi", asgi_big)
    proto.data_received(get("/big") + rest)
    run_until(loop, lambda: proto.awaiting_drain)
    assert not transport.reading
    timeout = proto.state.config.header_timeout
    proto.check_timeouts(proto.write_paused_at + timeout / 2)
    assert not transport.aborted
    proto.check_timeouts(proto.write_paused_at + timeout)
    assert transport.aborted


def test_a_fin_behind_queued_requests_closes_after_their_answers(
        loop: asyncio.AbstractEventLoop) -> None:
    """A FIN behind whole requests still queued keeps the connection half-open until
    they are answered; with nothing queued, it closes at once (the app being answered
    learns the client went: http.disconnect)."""
    proto, transport = connect(loop, "asgi", asgi_sized)
    proto.data_received(get("/?n=1") + get("/?n=2") + get("/?n=3"))
    assert proto.eof_received()
    run_until(loop, lambda: transport.eof)
    assert bodies(transport.received) == [b"x", b"xx", b"xxx"]
    proto, transport = connect(loop, "asgi", asgi_sized)
    proto.data_received(get("/?n=1"))
    assert not proto.eof_received()
    run_until(loop, lambda: proto.cycle is None)  # (its app ends: no task left)


async def asgi_reads_first(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """As Django's ASGI handler (and Starlette reading a body) do: the whole body is
    read before the answer, even an empty one; /slow takes a while first."""
    if scope["path"] == "/slow":
        await asyncio.sleep(0.05)
    body = await read_body(receive)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % (len(body) + 2))]})
    await send({"type": "http.response.body", "body": b"ok" + body})


def test_a_fin_behind_queued_requests_waits_for_the_last_app_that_reads_its_body(
        loop: asyncio.AbstractEventLoop) -> None:
    """The last queued request's app reads its (empty) body before answering: that is
    no reason to close before its answer; once it is out, the connection closes."""
    proto, transport = connect(loop, "asgi", asgi_reads_first)
    proto.data_received(get("/slow") + get("/b") + post("/c", b"cc"))
    assert proto.eof_received()
    run_until(loop, lambda: transport.eof)
    assert bodies(transport.received) == [b"ok", b"ok", b"okcc"]
    assert proto.state.in_progress() == 0 and proto.metrics.in_flight == 0


def test_a_fin_read_once_the_last_queued_request_reads_its_body_waits_for_its_answer(
        loop: asyncio.AbstractEventLoop) -> None:
    """Reading paused for the queued requests (one has a body), so the FIN is read
    only when the last of them is answered and its app reads its body: it still came
    after that request, whose answer goes out before the close."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/c":
            await started.wait()  # (works on the body meanwhile)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    started = asyncio.Event()
    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/a") + post("/b", b"bb") + post("/c", b"cc"))
    assert not transport.reading
    run_until(loop, lambda: transport.reading)  # (the FIN, in the kernel, is read now)
    assert not proto.pipeline and proto.cycle is not None
    assert proto.eof_received()
    started.set()
    run_until(loop, lambda: transport.eof)
    assert bodies(transport.received) == [b"ok", b"ok", b"ok"]
    assert proto.state.in_progress() == 0


def test_a_fin_that_cuts_a_queued_body_off_still_lets_the_whole_requests_be_answered(
        loop: asyncio.AbstractEventLoop) -> None:
    """GET, GET, then a POST whose body the FIN cuts off: the two GETs are answered,
    then the connection closes (the POST's app learns the client went)."""
    proto, transport = connect(loop, "asgi", asgi_reads_first)
    proto.data_received(get("/slow") + get("/b")
                        + b"POST /c HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
    proto.eof_received()
    run_until(loop, lambda: transport.eof)
    assert bodies(transport.received) == [b"ok", b"ok"]
    proto.connection_lost(None)  # (what the transport's close leads to)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_fin_with_answers_held_for_a_batch_sends_them_before_the_close(
        loop: asyncio.AbstractEventLoop) -> None:
    """Answers held back to go out together when the FIN comes with nothing queued
    (the request being answered still reads its body): they go out, then the close."""
    proto, transport = connect(loop, "asgi", asgi_reads_first)
    proto.data_received(get("/b") + get("/b")
                        + b"POST /c HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
    eof: asyncio.Future[bool | None] = loop.create_future()

    def fin_when_held() -> None:
        # the FIN comes in the pass where the two answers wait for the batch to go out
        if proto.out and not proto.pipeline:
            eof.set_result(proto.eof_received())
            if eof.result() is None:
                transport.close()  # (as a real transport does then, in that callback)
        else:
            loop.call_soon(fin_when_held)

    loop.call_soon(fin_when_held)
    assert loop.run_until_complete(asyncio.wait_for(eof, 5)) is None
    proto.connection_lost(None)
    assert bodies(transport.received) == [b"ok", b"ok"]
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_fin_after_a_large_body_read_at_once_is_a_disconnect(
        loop: asyncio.AbstractEventLoop) -> None:
    """One POST whose 200 KiB body comes in one read (as from nginx): reading pauses
    for the body (more than the app has taken), not for queued requests. The app reads
    it and waits on receive(); the client closes: the FIN is not held, and the app gets
    http.disconnect (the FIN could not have come after an answer nobody queued)."""
    messages: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body"):
                break
        messages.append(await asyncio.wait_for(receive(), 2))

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(post("/", b"a" * (200 * 1024)))
    run_until(loop, lambda: bool(messages) and not messages[-1].get("more_body"))
    assert sum(len(message["body"]) for message in messages) == 200 * 1024
    assert not proto.eof_received()
    transport.close()  # (what a transport does when eof_received returns None)
    proto.connection_lost(None)
    run_until(loop, lambda: messages[-1]["type"] == "http.disconnect", timeout=1)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_the_last_queued_request_is_freed_once_answered(
        loop: asyncio.AbstractEventLoop) -> None:
    """The last of the queued requests is remembered while it is answered (a FIN then
    is held for it); once answered, it is not kept alive with the connection: its
    scope (and a WSGI environ's body) is freed while the connection serves on."""

    class Held:
        pass

    refs: list[weakref.ref[Held]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/b":
            scope["held"] = Held()  # (lives as long as the scope)
            refs.append(weakref.ref(scope["held"]))
        await asgi_reads_first(scope, receive, send)

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(get("/a") + post("/b", b"bb"))
    run_until(loop, lambda: len(bodies(transport.received)) == 2)
    proto.data_received(get("/c"))
    run_until(loop, lambda: len(bodies(transport.received)) == 3)
    run_until(loop, lambda: proto.state.in_progress() == 0)
    gc.collect()
    assert refs and refs[0]() is None
    assert not transport.eof and not transport.aborted


def test_a_client_sending_its_body_is_not_cut_for_not_reading_an_early_answer(
        loop: asyncio.AbstractEventLoop) -> None:
    """The app answers (at length) before reading the body; the client sends its whole
    body before it reads (as most do): while the body keeps arriving it is not cut
    for reading nothing; once the body stalls, it is."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % BIG)]})
        await send({"type": "http.response.body", "body": b"b" * BIG})

    proto, transport = connect(loop, "asgi", app)
    proto.data_received(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n"
                        % (64 << 20) + b"a" * 65536)
    run_until(loop, lambda: proto.awaiting_drain)
    timeout = proto.state.config.header_timeout
    proto.data_received(b"a" * 65536)
    # the client has read nothing for longer than --header-timeout; its body came just now
    proto.write_paused_at = proto.body_activity - timeout
    proto.check_timeouts(proto.body_activity + timeout / 2)
    assert not transport.aborted and not transport.eof
    proto.check_timeouts(proto.body_activity + 2 * timeout)
    assert transport.eof  # (a 408 for the stalled body, and the close)


def test_a_client_reading_a_large_answer_slowly_is_not_cut_one_reading_nothing_is(
        loop: asyncio.AbstractEventLoop) -> None:
    """/big goes out in one message (Starlette's Response): the response is done while
    the client has most of it still to read. A client that keeps reading, slowly (above
    --min-body-rate), is not cut --header-timeout after the pause; once it stops, it is."""
    proto, transport = behind_an_unread_answer(loop)
    timeout = proto.state.config.header_timeout
    start = proto.write_paused_at
    for step in range(1, 5):  # a little of it per half --header-timeout (600 B/s)
        transport.client_reads(3000)
        proto.check_timeouts(start + step * timeout / 2)
        assert not transport.aborted
    stopped = start + 2 * timeout
    proto.check_timeouts(stopped + timeout / 2)
    assert not transport.aborted
    proto.check_timeouts(stopped + timeout)
    assert transport.aborted


@pytest.mark.parametrize(("per_tick", "min_rate", "cut"), [
    (100, 240, True),  # 200 B/s: below the floor
    (300, 240, False),  # 600 B/s
    (100, 0, False),  # --min-body-rate 0: no floor
])
def test_a_client_taking_its_answer_below_the_rate_floor_is_cut(
        loop: asyncio.AbstractEventLoop, per_tick: int, min_rate: int, cut: bool) -> None:
    """A client that takes a few bytes of /big each tick (0.5 s) is never cut for taking
    nothing, but below --min-body-rate (240 B/s by default) it is, once the rate is
    judged (--header-timeout after the answer was done), and not before."""
    proto, transport = behind_an_unread_answer(loop)
    proto.min_rate = min_rate
    timeout = proto.state.config.header_timeout
    start = proto.send_since
    for tick in range(1, int(3 * timeout / 0.5) + 1):
        transport.client_reads(per_tick)
        now = start + tick * 0.5
        proto.check_timeouts(now)
        if transport.aborted:
            break
    assert transport.aborted == cut
    if cut:  # (at the first tick once the window is --header-timeout long)
        assert start + timeout - 0.01 < now < start + timeout + 0.51


SLOW_SIZE = 8 << 20


async def asgi_large(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % SLOW_SIZE)]})
    await send({"type": "http.response.body", "body": b"b" * SLOW_SIZE})  # one message


def read_slowly(loop: asyncio.AbstractEventLoop, request: bytes, rate: int,
                header_timeout: float) -> tuple[int, float, bool]:
    """A real loopback client that asks for SLOW_SIZE bytes and reads `rate` bytes per
    0.05 s (0: nothing): what it got, how long until the end, and whether that end was
    a reset. The worker's clock ticks every 0.1 s."""
    from forkd.http.asgi import ASGICycle

    state = ServerState(Config(app="test", interface="asgi", header_timeout=header_timeout),
                        loop)
    state.cycle_factory = ASGICycle.bind(asgi_large, {}, "")

    async def ticker() -> None:
        while True:
            state.tick()
            await asyncio.sleep(0.1)

    async def client() -> tuple[int, float, bool]:
        server = await loop.create_server(lambda: HttpProtocol(state), "127.0.0.1", 0)
        ticks = loop.create_task(ticker())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.setblocking(False)
        got, reset, start = 0, False, loop.time()
        try:
            await loop.sock_connect(sock, server.sockets[0].getsockname())
            await loop.sock_sendall(sock, request)
            deadline = start + 20
            while loop.time() < deadline:
                await asyncio.sleep(0.05)
                if not rate:
                    if not state.connections:
                        break  # (the server cut it)
                    continue
                want = rate
                while want > 0:
                    try:
                        chunk = sock.recv(want)
                    except BlockingIOError:
                        break
                    if not chunk:
                        return got, loop.time() - start, False
                    got += len(chunk)
                    want -= len(chunk)
                if got >= SLOW_SIZE:
                    return got, loop.time() - start, False
        except ConnectionResetError:
            reset = True
        finally:
            sock.close()
            ticks.cancel()
            server.close()
            await server.wait_closed()
        return got, loop.time() - start, reset

    return loop.run_until_complete(client())


@pytest.mark.integration
def test_a_slow_steady_reader_gets_a_large_answer_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    """8 MiB at about 2.6 MB/s (3 s) with --header-timeout 0.5: all of it arrives."""
    got, took, reset = read_slowly(loop, get("/"), 128 * 1024, 0.5)
    assert (got, reset) == (SLOW_SIZE, False), took


@pytest.mark.integration
def test_a_client_that_never_reads_a_large_answer_is_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    """The same answer, never read: the connection is cut about --header-timeout (0.5 s)
    after the client stopped taking bytes."""
    got, took, _ = read_slowly(loop, get("/"), 0, 0.5)
    assert took < 3


@pytest.mark.integration
def test_a_slow_steady_reader_gets_a_large_closing_answer_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    """The same with `Connection: close` (HTTP/1.0 clients, every answer of a draining
    worker): the FIN and the linger after it wait until the answer is out, past the
    linger's 2 s; a client that never reads it is still cut."""
    got, took, reset = read_slowly(loop, get("/", b"Connection: close\r\n"), 128 * 1024, 0.5)
    assert (got, reset) == (SLOW_SIZE, False), took
    _, took, _ = read_slowly(loop, get("/", b"Connection: close\r\n"), 0, 0.5)
    assert took < 3


def test_a_fin_on_tls_is_not_held(loop: asyncio.AbstractEventLoop) -> None:
    """uvloop's TLS transport closes on a FIN whatever eof_received returns, and logs a
    warning per connection if it returns True: with requests queued it is not held
    (the answers held for a batch still go out first: see the test above)."""
    proto, transport = connect(loop, "asgi", asgi_reads_first)
    proto.scheme = "https"  # (as connection_made sets it for a --certfile listener)
    proto.data_received(get("/slow") + get("/b") + get("/b"))
    assert proto.pipeline
    assert proto.eof_received() is None
    transport.close()
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_fin_on_tls_cuts_the_answer_being_written_off_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    """The FIN (not held on TLS) comes while an answer is half written, its first part
    held for a batch (a request is queued behind it): the whole answers before it go
    out before the close, but nothing of the half one, which a clean close after it
    could pass off as complete (an HTTP/1.0 body ends at the close)."""
    results: list[bool | None] = []
    messages: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] != "/half":
            await asgi_sized(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})
        results.append(proto.eof_received())  # (the FIN comes now)
        message = await receive()  # (its empty body, then the disconnect)
        while message["type"] != "http.disconnect":
            message = await receive()
        messages.append(message)

    proto, transport = connect(loop, "asgi", app)
    proto.scheme = "https"
    proto.data_received(get("/?n=1") + get("/half") + get("/?n=3"))
    run_until(loop, lambda: bool(results))
    assert results == [None]
    transport.close()
    proto.connection_lost(None)
    run_until(loop, lambda: bool(messages))
    assert messages == [{"type": "http.disconnect"}]
    assert b"half" not in transport.received
    assert bodies(transport.received) == [b"x"]
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_transport_failing_to_name_its_socket_does_not_stop_the_heartbeat(
        loop: asyncio.AbstractEventLoop) -> None:
    """The worker's heartbeat runs tick(), which checks every connection's clocks: a
    transport that raises when asked for its socket (one closing under us) leaves the
    unsent count to its buffer, and tick goes on."""
    proto, transport = behind_an_unread_answer(loop)

    def get_extra_info(name: str, default: Any = None) -> Any:
        if name == "socket":
            raise RuntimeError("the transport is closed")
        return default

    transport.get_extra_info = get_extra_info  # type: ignore[method-assign]
    proto.state.tick()
    assert proto.unsent() == transport.unread and not transport.aborted


def test_an_error_checking_one_connection_cuts_it_and_the_others_are_checked(
        loop: asyncio.AbstractEventLoop) -> None:
    """A bug of ours in one connection's check: that connection is cut and logged, the
    heartbeat's tick still returns and checks the others (an idle one is closed)."""
    broken, broken_transport = connect(loop, "asgi", asgi_sized)
    idle, idle_transport = connect(loop, "asgi", asgi_sized)
    state = broken.state
    state.connections.add(idle)
    idle.idle_since = loop.time() - idle.state.config.keepalive_timeout - 1

    def fail(now: float) -> None:
        raise ZeroDivisionError

    broken.check_timeouts = fail  # type: ignore[method-assign]
    state.tick()
    assert broken_transport.aborted and idle_transport.eof


def test_a_client_that_vanished_after_our_fin_is_cut_after_the_linger(
        loop: asyncio.AbstractEventLoop) -> None:
    """The answer is out and so is our FIN, which the socket counts as unsent until the
    client acknowledges it: a client that vanished never does, and is cut when the
    linger ends (2 s), not --header-timeout later."""
    proto, transport = connect(loop, "asgi", asgi_sized)
    proto.data_received(get("/?n=1", b"Connection: close\r\n"))
    run_until(loop, lambda: transport.eof)
    transport.unread = 1  # (all taken but the FIN)
    start = proto.state.now
    proto.check_timeouts(start + 1)
    assert not transport.aborted
    proto.check_timeouts(start + 2.5)
    assert transport.aborted


async def stream_until_cut(send: Any, told: list[Any]) -> None:
    """Stream 64 KiB pieces until send() raises, and record the error in `told`."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    try:
        while True:
            await send({"type": "http.response.body", "body": b"s" * 65536,
                        "more_body": True})
    except OSError as exc:
        told.append(exc)


def streaming_forever(told: list[Any]) -> Any:
    """An app that streams 64 KiB pieces until send() raises; it records what it was
    told: the error, then what receive() said."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await stream_until_cut(send, told)
        told.append(await receive())

    return app


def test_a_streamed_answer_whose_client_takes_nothing_is_cut_and_its_app_told(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """The app waits in send() while writing is paused: once the client has taken
    nothing for --header-timeout (not before), the connection is cut, the app's send()
    raises an OSError and receive() says http.disconnect; the cut is counted and told
    in tick's summary line."""
    told: list[Any] = []
    proto, transport = connect(loop, "asgi", streaming_forever(told))
    proto.data_received(get("/"))
    run_until(loop, lambda: proto.write_paused)
    timeout = proto.state.config.header_timeout
    proto.check_timeouts(proto.write_paused_at + timeout / 2)
    assert not transport.aborted
    proto.check_timeouts(proto.write_paused_at + timeout)
    assert transport.aborted and proto.state.slow_cuts.count == 1
    proto.connection_lost(None)  # (what the real transport's abort leads to)
    run_until(loop, lambda: len(told) == 2)
    assert type(told[0]).__name__ == "ClientDisconnected"
    assert told[1] == {"type": "http.disconnect"}
    run_until(loop, lambda: proto.state.in_progress() == 0)
    with caplog.at_level("INFO", logger="forkd.http"):
        proto.state.tick()
    assert "cut 1 more connection(s) whose client took its answer too slowly" in caplog.text


def test_a_streamed_answer_taken_slowly_but_above_the_floor_is_not_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    """A client that takes some of it each tick (600 B/s, over --min-body-rate's
    240 B/s), while writing stays paused for three --header-timeouts, is never cut."""
    told: list[Any] = []
    proto, transport = connect(loop, "asgi", streaming_forever(told))
    proto.data_received(get("/"))
    run_until(loop, lambda: proto.write_paused)
    timeout = proto.state.config.header_timeout
    start = proto.write_paused_at
    for tick in range(1, int(3 * timeout / 0.5) + 1):
        transport.client_reads(300)
        proto.check_timeouts(start + tick * 0.5)
        assert not transport.aborted, tick
    assert proto.write_paused and not told
    transport.client_reads_everything()  # (then it goes: the app is told, and ends)
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def upload_while_writing_waits(loop: asyncio.AbstractEventLoop, app: Any
                               ) -> tuple[HttpProtocol, Transport, FakeClock, float]:
    """A chunked POST to the ASGI `app` (--header-timeout 1 s) from a client that reads
    nothing: once writing has paused, it uploads 300 B every 0.1 s of the protocol's
    clock (3 KB/s, well above --min-body-rate), the timeouts checked at each step, for
    three --header-timeouts or until the connection is cut. Gives the clock (where it
    stopped) and when writing paused."""
    proto, transport = connect(loop, "asgi", app, header_timeout=1.0)
    clock = FakeClock(proto)
    proto.data_received(b"POST /up HTTP/1.1\r\nHost: t\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
    run_until(loop, lambda: proto.write_paused)
    paused = proto.write_paused_at
    while not transport.aborted and clock.now < paused + 3.0:
        clock.now += 0.1
        proto.data_received(b"12c\r\n" + b"u" * 300 + b"\r\n")
        loop.run_until_complete(asyncio.sleep(0))
        proto.check_timeouts(clock.now)
    return proto, transport, clock, paused


def test_a_duplex_answer_is_judged_from_the_pause_while_the_upload_arrives(
        loop: asyncio.AbstractEventLoop) -> None:
    """A duplex app (one task reads the request body while another streams the
    answer) waits in send() on a client that uploads (well above --min-body-rate) and
    takes nothing: the app waits on that client, so it is cut --header-timeout after the
    pause (the first tick past it), the upload's own clocks notwithstanding."""
    told: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def upload() -> None:
            while (await receive())["type"] == "http.request":
                pass

        reading = asyncio.ensure_future(upload())
        await stream_until_cut(send, told)
        await reading

    proto, transport, clock, paused = upload_while_writing_waits(loop, app)
    assert transport.aborted and paused + 1.0 <= clock.now < paused + 1.1
    assert proto.state.slow_cuts.count == 1
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)
    assert type(told[0]).__name__ == "ClientDisconnected"


def test_an_app_reading_its_upload_while_its_answer_waits_is_not_cut_for_it(
        loop: asyncio.AbstractEventLoop) -> None:
    """The app wrote part of its answer (the client's buffers are full) and now reads the
    request body, waiting on nothing of the answer: a client uploading well above the
    floor, that will read once it has sent its body (as most do), is not cut while the
    upload goes on; the body's own clocks judge it."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * (4 << 20),
                    "more_body": True})
        while (await receive())["type"] == "http.request":
            pass

    proto, transport, clock, paused = upload_while_writing_waits(loop, app)
    assert not transport.aborted, clock.now - paused
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


@pytest.mark.parametrize("floor, cut", [(4_000_000, True), (800_000, False)])
def test_the_send_rate_is_judged_across_short_pauses(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, floor: int,
        cut: bool) -> None:
    """Writing pauses and resumes many times, each pause shorter than the rate window
    (a host with a small socket buffer): the client takes some 1.6 MB/s while writing
    waits on it. Under a 4 MB/s floor it is cut once a window's worth of waiting has
    passed; under 0.8 MB/s it is not."""
    from forkd.http import protocol

    monkeypatch.setattr(protocol, "RATE_WINDOW", 1.0)  # (a short test: 1 s windows)
    told: list[Any] = []
    proto, transport = connect(loop, "asgi", streaming_forever(told), header_timeout=0.5,
                               min_body_rate=floor)
    clock = FakeClock(proto)  # (the protocol's clock: a loaded host cannot move it)
    proto.data_received(get("/"))
    started = clock.now
    while not transport.aborted and clock.now - started < 3.0:
        run_until(loop, lambda: proto.write_paused)
        clock.now += 0.2  # (the client reads, then:)
        proto.check_timeouts(clock.now)
        if not transport.aborted:
            transport.client_reads_everything()  # (writing resumes)
    assert transport.aborted is cut
    if cut:
        assert 1.0 <= clock.now - started < 2.5
    transport.client_reads_everything()
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def paused_reader(loop: asyncio.AbstractEventLoop, unix: bool = False, **options: Any
                  ) -> tuple[HttpProtocol, Transport, FakeClock, list[Any]]:
    """A streamed answer (streaming_forever) with the config's `options`, writing paused:
    the protocol's clock is the test's. `unix`: on a unix socket, whose reads show only
    in steps of up to UNIX_GRAIN."""
    from forkd.http.protocol import UNIX_GRAIN

    told: list[Any] = []
    proto, transport = connect(loop, "asgi", streaming_forever(told), **options)
    if unix:
        proto.send_grain = UNIX_GRAIN  # (what connection_made sets for an AF_UNIX socket)
    clock = FakeClock(proto)
    proto.data_received(get("/"))
    run_until(loop, lambda: proto.write_paused)
    return proto, transport, clock, told


def test_a_second_pause_without_a_resume_moves_no_clock(
        loop: asyncio.AbstractEventLoop) -> None:
    """A transport that tells the protocol twice that writing is paused (without a
    resume between) restarts none of the clocks judging the client: one that takes
    nothing is cut --header-timeout after the first pause."""
    proto, transport, clock, _ = paused_reader(loop, header_timeout=1.0)
    paused = clock.now
    clock.now = paused + 0.6
    proto.pause_writing()  # (again: nothing was read)
    proto.check_timeouts(paused + 0.9)
    assert not transport.aborted
    proto.check_timeouts(paused + 1.0)
    assert transport.aborted
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def read_for(loop: asyncio.AbstractEventLoop, proto: HttpProtocol, transport: Transport,
             clock: FakeClock, rate: int, seconds: float) -> float:
    """The client takes `rate` bytes a second, in 10 s steps (writing resumes when the
    buffer runs low, as a real transport's does), until cut or `seconds` pass: how long
    it held on."""
    started = clock.now
    while not transport.aborted and clock.now - started < seconds:
        clock.now += 10.0
        transport.client_reads(min(rate * 10, transport.unread))
        if transport.unread < HIGH_WATER // 4:
            transport.paused = False
            proto.resume_writing()
            run_until(loop, lambda: proto.write_paused)
        proto.check_timeouts(clock.now)
    return clock.now - started


def test_a_unix_client_trickling_below_the_floor_is_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    """On a unix socket, with default settings, a client taking a third of
    --min-body-rate (some bytes every 10 s: never still for --header-timeout) is cut
    within half an hour, not held for ever by the allowance for what the socket does not
    show yet."""
    proto, transport, clock, told = paused_reader(loop, unix=True)
    held = read_for(loop, proto, transport, clock, 80, 3600.0)
    assert transport.aborted and held <= 1800.0
    assert proto.state.slow_cuts.count == 1
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_unix_client_reading_steadily_at_twice_the_floor_is_not_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    proto, transport, clock, told = paused_reader(loop, unix=True)
    held = read_for(loop, proto, transport, clock, 480, 3600.0)
    assert not transport.aborted and held >= 3600.0
    transport.client_reads_everything()
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_unix_client_taking_nothing_is_cut_with_the_rate_floor_off(
        loop: asyncio.AbstractEventLoop) -> None:
    """--min-body-rate 0 turns the floor off, not the cut of a client that takes
    nothing: on a unix socket it is cut once a reader at Kestrel's 240 B/s would have
    shown a grain (64 KiB: ~273 s), not held with the app's task for ever."""
    proto, transport, clock, _ = paused_reader(loop, unix=True, min_body_rate=0)
    paused = clock.now
    proto.check_timeouts(paused + 270.0)
    assert not transport.aborted
    proto.check_timeouts(paused + 274.0)
    assert transport.aborted
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


def test_a_client_reading_while_more_is_written_is_not_cut_as_taking_nothing(
        loop: asyncio.AbstractEventLoop) -> None:
    """While writing is paused more still goes out (a WebSocket's send() writes before
    it waits, pongs, other tasks' sends): a client that reads steadily, but no faster
    than that, leaves as much unsent as before, yet it takes bytes and is not cut."""
    proto, transport, clock, _ = paused_reader(loop, header_timeout=1.0)
    paused = clock.now
    while clock.now - paused < 5.0:
        clock.now += 0.5
        transport.client_reads(5000)  # (10 KB/s)
        proto.write(b"x" * 5000)  # (as much written meanwhile)
        proto.check_timeouts(clock.now)
        assert not transport.aborted, clock.now - paused
    transport.client_reads_everything()
    proto.connection_lost(None)
    run_until(loop, lambda: proto.state.in_progress() == 0)


@pytest.mark.parametrize("broken_by", ["413", "408"])
def test_an_answered_request_whose_unread_body_breaks_a_limit_gets_no_second_answer(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch,
        broken_by: str) -> None:
    """The app answers 401 to a chunked POST before reading its body, and the connection
    is kept alive; the rest of that body then overflows --max-body-size, or stalls. The
    request was answered: the client reads that 401 alone, then the close (a 413 or
    408 after it would read as the answer to its next request), and the access log has
    the 401's line alone."""
    from forkd import log

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"nope"})

    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", app, access_log=True, max_body_size=1000)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(b"POST /login HTTP/1.1\r\nHost: test\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        run_until(loop, lambda: proto.state.in_progress() == 0 and len(items) == 1)
        assert not transport.eof  # (kept alive: the body's rest is read and dropped)
        if broken_by == "413":
            proto.data_received(b"800\r\n" + b"a" * 0x800 + b"\r\n")
        else:
            proto.check_timeouts(proto.body_activity + 2 * proto.state.config.header_timeout)
        run_until(loop, lambda: transport.eof)
    finally:
        log.setup()
    answers = transport.received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 and answers[0].startswith(b"401 ")
    assert bodies(transport.received) == [b"nope"]
    assert not transport.aborted  # (closed gracefully: the 401 is not reset away)
    assert [item[3] for item in items] == [401]


def test_a_shed_request_in_absolute_form_is_logged_with_its_path_and_query(
        loop: asyncio.AbstractEventLoop) -> None:
    """The 503 of --limit-concurrency answers a head taken whole: its access line splits
    an absolute-form target into path and query as any request's line does."""
    from forkd import log

    release = asyncio.Event()
    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", held_at_slow(release), access_log=True,
                               limit_concurrency=1)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(get("/slow"))
        run_until(loop, lambda: proto.state.in_progress() == 1)
        shed = HttpProtocol(proto.state)  # another client's connection
        shed.connection_made(Transport())  # type: ignore[arg-type]
        shed.data_received(get("http://test/p?q=1"))
        run_until(loop, lambda: len(items) == 1)  # the 503, while /slow is held
        release.set()
        run_until(loop, lambda: len(items) == 2)
    finally:
        log.setup()
    # (end, duration, begin's, status, size, client, method, raw path, query, version)
    assert [(item[3], *item[6:]) for item in items] == [
        (503, "GET", b"/p", b"q=1", "1.1"), (200, "GET", b"/slow", b"", "1.1")]


@pytest.mark.parametrize("sent", [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                                  b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_a_refused_head_without_an_id_gets_one_made_and_sent_back(
        loop: asyncio.AbstractEventLoop, sent: bytes) -> None:
    """A head refused before it was taken (bytes that are no request, a target too
    long) and that named no X-Request-ID: its line's request id is one forkd made,
    and the refusal carries it back, as for any request."""
    from forkd import log

    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", asgi_sized, access_log=True)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(sent)
        run_until(loop, lambda: transport.eof and len(items) == 1)
    finally:
        log.setup()
    answer = transport.received
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 414 ")), answer[:100]
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    sent_back = [line[len(b"x-request-id: "):] for line in head
                 if line.startswith(b"x-request-id: ")]
    assert len(sent_back) == 1 and len(sent_back[0]) == 32 and sent_back[0].isalnum()
    assert items[0][2][0] == sent_back[0]


@pytest.mark.parametrize("access_log", [True, False])
def test_an_asgi_app_that_deletes_its_path_then_raises_gets_its_500(
        loop: asyncio.AbstractEventLoop, access_log: bool) -> None:
    """forkd's own lines about a request name the path it came with: an app that took
    the scope's path away (a router that pops what it consumed) and then failed, or
    sent past its content-length, still gets its 500 (and, with --access-log, its
    line); nothing of forkd's fails over the missing key."""
    from forkd import log

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        del scope["path"]
        if query(scope).get("over"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"1")]})
            await send({"type": "http.response.body", "body": b"too long"})
            return
        raise ValueError("no route")

    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", app, access_log=access_log)
    over, over_transport = connect(loop, "asgi", app, access_log=access_log)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(get("/gone?a=1"))
        over.data_received(get("/gone?over=1"))
        run_until(loop, lambda: transport.eof and over_transport.eof
                  and proto.state.in_progress() == 0 and over.state.in_progress() == 0)
    finally:
        log.setup()
    assert transport.received.startswith(b"HTTP/1.1 500 ")
    assert over_transport.received.startswith(b"HTTP/1.1 200 ")
    assert bodies(over_transport.received) == [b"t"]  # (cut at its content-length)
    assert sorted((item[3], item[7], item[8]) for item in items) == (
        [(200, b"/gone", b"over=1"), (500, b"/gone", b"a=1")] if access_log else [])


def test_a_second_request_refused_before_its_version_is_logged_without_one(
        loop: asyncio.AbstractEventLoop) -> None:
    """A keep-alive connection's second request, refused 414 before its request line
    ends: its line names no HTTP version (the parser still holds the first request's,
    which this one never said)."""
    from forkd import log

    items: list[tuple[Any, ...]] = []
    proto, transport = connect(loop, "asgi", asgi_sized, access_log=True,
                               limit_request_line=64)
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        run_until(loop, lambda: len(items) == 1)
        proto.data_received(b"GET /" + b"b" * 100)
        run_until(loop, lambda: transport.eof and len(items) == 2)
    finally:
        log.setup()
    assert b"HTTP/1.1 414 " in transport.received
    assert items[0][-1] == "1.1"
    assert items[1][-1] == "-", items[1]
