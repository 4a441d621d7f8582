"""When a threaded WSGI call counts as ended (ServerState.calls: what a drain waits
for): with its answer when its result has nothing to close, in one hand-off to the loop;
only after close() returned when it has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_pipelined_writes import Transport, bodies, get, run_until

from forkd.config import Config
from forkd.http import wsgipool
from forkd.http.protocol import HttpProtocol, ServerState
from forkd.http.wsgi import WSGICycle
from forkd.http.wsgipool import WSGIPool

pytestmark = pytest.mark.timeout(30)


def serve_app(loop: asyncio.AbstractEventLoop, app: Any, threads: int = 2,
              inline: str = "never", transport: Transport | None = None, **options: Any
              ) -> tuple[ServerState, WSGIPool, HttpProtocol, Transport]:
    """A connection to `app` on a pool of `threads` (`inline`: the pool's mode; by
    default two threads, every call on one), made on `transport` if given; `options`:
    the rest of its Config."""
    state = ServerState(Config(app="test", interface="wsgi", threads=threads, **options),
                        loop)
    pool = WSGIPool(loop, threads, inline)
    state.cycle_factory = WSGICycle.bind(app, pool, "")
    proto = HttpProtocol(state)
    transport = transport or Transport()
    transport.protocol = proto
    proto.connection_made(transport)  # type: ignore[arg-type]
    return state, pool, proto, transport


def connect(loop: asyncio.AbstractEventLoop, app: Any
            ) -> tuple[ServerState, WSGIPool, Transport]:
    """A GET / to `app`, every call on a thread."""
    state, pool, proto, transport = serve_app(loop, app)
    proto.data_received(get("/"))
    return state, pool, transport


def ask_in_turn(loop: asyncio.AbstractEventLoop, state: ServerState, proto: HttpProtocol,
                transport: Transport, *paths: str) -> None:
    """GET each path once the answer before it is complete and its call has ended."""
    for number, path in enumerate(paths, 1):
        proto.data_received(get(path))
        run_until(loop, lambda n=number: state.calls == 0
                  and transport.received.count(b"HTTP/1.1 ") == n, timeout=2)


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


gate = threading.Event()


def paths_app(environ: dict[str, Any], start_response: Any) -> Any:
    """Each query a way a threaded call can end."""
    q = environ["QUERY_STRING"]
    if q == "wait":
        gate.wait(10)
    if q == "nostart":
        return [b"x"]
    if q == "badhdr":
        start_response("200 OK", [("X", "\u20ac")])  # not latin-1: raises in the framing
        return [b"x"]
    if q == "strbody":
        start_response("200 OK", [])
        return ["x"]
    if q == "raise":
        raise ValueError("boom")
    start_response("200 OK", [("Content-Length", "2")])
    return (b"o", b"k") if q == "tuple" else [b"ok"]


def open_conn(loop: asyncio.AbstractEventLoop, transport: Transport | None = None
              ) -> tuple[ServerState, WSGIPool, HttpProtocol, Transport]:
    return serve_app(loop, paths_app, transport=transport)


def settled(pool: WSGIPool) -> bool:
    """Every thread back idle and every answer it handed to the loop run."""
    return (bool(pool.threads) and pool.idle == len(pool.threads) and not pool.answers
            and not pool.wake_pending)


@pytest.mark.parametrize(("query", "status"), [
    ("", b"200"), ("tuple", b"200"), ("nostart", b"500"), ("badhdr", b"500"),
    ("strbody", b"500"), ("raise", b"500"),
])
def test_a_threaded_call_ends_exactly_once_however_it_ends(
        loop: asyncio.AbstractEventLoop, query: str, status: bytes) -> None:
    """A call's end is counted once (ServerState.calls: what a drain waits for): not
    missed, which would hold a drain to its timeout, nor twice, which would let a drain
    end with a call still running."""
    state, pool, proto, transport = open_conn(loop)
    try:
        proto.data_received(get("/?" + query))
        run_until(loop, lambda: settled(pool))
        assert transport.received.startswith(b"HTTP/1.1 " + status + b" ")
        assert state.calls == 0
    finally:
        pool.shutdown()


def test_pipelined_threaded_calls_each_end_once(loop: asyncio.AbstractEventLoop) -> None:
    state, pool, proto, transport = open_conn(loop)
    try:
        proto.data_received(b"".join(get("/?" + q) for q in ["", "tuple"] * 20))
        run_until(loop, lambda: transport.received.count(b"HTTP/1.1 200 ") == 40
                  and settled(pool))
        assert bodies(transport.received) == [b"ok"] * 40
        assert state.calls == 0
    finally:
        pool.shutdown()


def test_a_call_whose_client_left_ends_once(loop: asyncio.AbstractEventLoop) -> None:
    state, pool, proto, transport = open_conn(loop)
    gate.clear()
    try:
        proto.data_received(get("/?wait"))
        run_until(loop, lambda: bool(pool.busy_since))  # the app is in its call
        proto.connection_lost(None)
        gate.set()
        run_until(loop, lambda: settled(pool))
        assert transport.received == b""
        assert state.calls == 0
    finally:
        gate.set()
        pool.shutdown()


class FailingTransport(Transport):
    """A transport whose write raises (uvloop's, on a handle already closed)."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation: the handler is closed")


def test_a_final_write_that_raises_still_ends_the_call(loop: asyncio.AbstractEventLoop
                                                       ) -> None:
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    state, pool, proto, transport = open_conn(loop, FailingTransport())
    try:
        proto.data_received(get("/"))
        run_until(loop, lambda: settled(pool))
        assert [type(e.get("exception")) for e in errors] == [RuntimeError]  # reported
        assert state.calls == 0  # and the call is over: a drain does not wait for it
    finally:
        pool.shutdown()


def test_an_answer_that_raises_does_not_hold_back_the_next_ones(
        loop: asyncio.AbstractEventLoop) -> None:
    """Answers handed to the loop together run together: one that raises (a write to a
    closed transport) is reported and the others are still written."""
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    pool = WSGIPool(loop, 2, "never")
    ran: list[str] = []
    pool.to_loop(ran.append, "first")
    pool.to_loop(lambda: 1 / 0)
    pool.to_loop(ran.append, "last")
    run_until(loop, lambda: not pool.answers and not pool.wake_pending)
    assert ran == ["first", "last"]
    assert [type(e.get("exception")) for e in errors] == [ZeroDivisionError]


def test_a_call_that_waited_on_a_slow_upload_teaches_its_route_nothing(
        loop: asyncio.AbstractEventLoop) -> None:
    """A quick app behind a client that uploads slowly: the call's wall clock is the
    client's, so the route must not be kept off the loop for good (NEVER_INLINE)."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        size = len(environ["wsgi.input"].read())
        start_response("200 OK", [("Content-Length", str(len(str(size))))])
        return [str(size).encode()]

    state, pool, proto, transport = serve_app(loop, app, 2, "auto", wsgi_body_buffer=4)
    try:
        proto.data_received(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 16\r\n\r\n"
                            b"12345678")  # more than the buffer: the body streams in
        run_until(loop, lambda: bool(pool.busy_since))  # the app reads, and waits
        time.sleep(wsgipool.NEVER_INLINE * 1.5)  # the client is slow to send the rest
        proto.data_received(b"abcdefgh")
        run_until(loop, lambda: bool(bodies(transport.received)))
        assert bodies(transport.received) == [b"16"]
        assert pool.routes.get(b"/up", 0) >= 0  # still learning, not kept off for good
    finally:
        pool.shutdown()


# -- --threads 0: no thread at all, every call (and its result's blocks) on the loop --

class Streamed:
    """A streamed result (as Flask's and Django's are: no list), counting its close()."""

    def __init__(self, blocks: list[bytes], fail_after: int | None = None) -> None:
        self.blocks = blocks
        self.fail_after = fail_after
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, block in enumerate(self.blocks):
            if i == self.fail_after:
                raise ValueError("boom")
            yield block

    def close(self) -> None:
        self.closed += 1


def threadless(loop: asyncio.AbstractEventLoop, result: Streamed
               ) -> tuple[ServerState, HttpProtocol, Transport]:
    def app(environ: dict[str, Any], start_response: Any) -> Streamed:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return result

    state, pool, proto, transport = serve_app(loop, app, 0, "auto")  # what --threads 0 makes
    return state, proto, transport


def test_without_threads_a_streamed_result_is_answered(loop: asyncio.AbstractEventLoop
                                                        ) -> None:
    result = Streamed([b"one ", b"two ", b"three"])
    state, proto, transport = threadless(loop, result)
    proto.data_received(get("/") + get("/"))
    run_until(loop, lambda: transport.received.count(b"0\r\n\r\n") == 2, timeout=2)
    answers = transport.received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [a.partition(b"\r\n\r\n")[2] for a in answers] == [
        b"4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"] * 2
    assert result.closed == 2  # once per call
    assert state.calls == 0  # both over: a drain does not wait for them
    assert not transport.aborted and not transport.eof


@pytest.mark.parametrize("fail_after", [0, 1])
def test_without_threads_a_streamed_result_that_raises_ends_its_call(
        loop: asyncio.AbstractEventLoop, fail_after: int) -> None:
    """Before any block: a 500. After one: the connection is cut (the client sees no
    complete answer). Either way close() runs once, the call is over and the
    worker serves the next connection."""
    result = Streamed([b"one ", b"two "], fail_after=fail_after)
    state, proto, transport = threadless(loop, result)
    proto.data_received(get("/"))
    run_until(loop, lambda: transport.aborted or transport.eof, timeout=2)
    if fail_after == 0:
        assert transport.received.startswith(b"HTTP/1.1 500 ")
    else:
        assert transport.aborted  # (what was still corked goes with it)
        assert b"0\r\n\r\n" not in transport.received  # no complete answer
    assert result.closed == 1
    assert state.calls == 0
    after = Streamed([b"fine"])
    next_proto = HttpProtocol(state)
    next_transport = Transport()
    next_transport.protocol = next_proto
    state.cycle_factory = WSGICycle.bind(
        lambda environ, start_response: (start_response("200 OK", []), after)[1],
        WSGIPool(loop, 0, "auto"), "")
    next_proto.connection_made(next_transport)  # type: ignore[arg-type]
    next_proto.data_received(get("/"))
    run_until(loop, lambda: next_transport.received.endswith(b"0\r\n\r\n"), timeout=2)
    assert b"4\r\nfine\r\n0\r\n\r\n" in next_transport.received


def test_without_threads_a_body_past_the_buffer_is_read_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    """Past --wsgi-body-buffer a thread reads the body as it comes; with --threads 0
    there is none, so the loop reads it whole (up to --max-body-size) and the app runs."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    state = ServerState(Config(app="test", interface="wsgi", threads=0, wsgi_body_buffer=4),
                        loop)
    state.cycle_factory = WSGICycle.bind(app, WSGIPool(loop, 0, "auto"), "")
    for first, second in ((b"12345678", b"abcdefgh"), (b"12", b"345678abcdefgh")):
        proto = HttpProtocol(state)
        transport = Transport()
        transport.protocol = proto
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 16\r\n\r\n"
                            + first)
        proto.data_received(second)
        run_until(loop, lambda t=transport: bool(bodies(t.received)), timeout=2)
        assert bodies(transport.received) == [b"12345678abcdefgh"]
        assert state.calls == 0


def test_an_app_that_removes_path_info_then_raises_gets_its_500(
        loop: asyncio.AbstractEventLoop) -> None:
    """The error's log line names the request by its raw path, not by the environ the
    app may have changed: more such calls than threads, each answered 500, and the
    next request still answered."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/bad":
            del environ["PATH_INFO"]
            raise ValueError("boom")
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    state = ServerState(Config(app="test", interface="wsgi"), loop)
    pool = WSGIPool(loop, 1, "never")
    state.cycle_factory = WSGICycle.bind(app, pool, "")

    def conn(path: str) -> Transport:
        proto = HttpProtocol(state)
        transport = Transport()
        transport.protocol = proto
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(get(path))
        return transport

    try:
        for _ in range(3):
            bad = conn("/bad")
            run_until(loop, lambda t=bad: t.eof, timeout=2)
            assert bad.received.startswith(b"HTTP/1.1 500 ")
        good = conn("/good")
        run_until(loop, lambda: bool(bodies(good.received)), timeout=2)
        assert bodies(good.received) == [b"ok"]
        run_until(loop, lambda: settled(pool))
        assert state.calls == 0
    finally:
        pool.shutdown()


class LateGen:
    """A streamed result whose close() calls the write() start_response gave."""

    def __init__(self, write: Any) -> None:
        self.write = write

    def __iter__(self) -> Iterator[bytes]:
        yield b"hello"

    def close(self) -> None:
        self.write(b"LATE")


class LateList(list[bytes]):
    def close(self) -> None:
        self.write(b"LATE")  # type: ignore[attr-defined]


def late_app(environ: dict[str, Any], start_response: Any) -> Any:
    write = start_response("200 OK", [])
    if environ["QUERY_STRING"] == "list":
        result = LateList([b"hello"])
        result.write = write  # type: ignore[attr-defined]
        return result
    return LateGen(write)


@pytest.mark.parametrize("threads", [2, 0])
@pytest.mark.parametrize("kind", ["gen", "list"])
def test_a_write_after_the_response_ended_is_refused(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, threads: int,
        kind: str) -> None:
    """write() from the result's close() comes after the response's end: it is the
    app's error, logged, and nothing of it reaches the connection, whose next
    response is as clean as the first."""
    state, pool, proto, transport = serve_app(
        loop, late_app, threads, "never" if threads else "auto")
    try:
        with caplog.at_level(logging.ERROR, logger="forkd.http"):
            ask_in_turn(loop, state, proto, transport, "/?" + kind, "/?" + kind)
        if kind == "gen":
            one = b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        else:
            one = b"content-length: 5\r\n\r\nhello"
        answers = transport.received.split(b"HTTP/1.1 200 OK\r\n")
        assert answers[0] == b""
        assert [a.partition(b"\r\n")[2] for a in answers[1:]] == [one, one]
        errors = [r for r in caplog.records if r.exc_info]
        assert [str(r.exc_info[1]) for r in errors if r.exc_info] == [
            "write() after the response ended"] * 2
        assert not transport.aborted and not transport.eof
    finally:
        pool.shutdown()


def keeping_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """/keep keeps its write(); /late calls the kept one and answers what it got."""
    if environ["PATH_INFO"] == "/keep":
        keeping_app.kept = start_response("200 OK", [])  # type: ignore[attr-defined]
        return [b"kept"]
    try:
        keeping_app.kept(b"LATE")  # type: ignore[attr-defined]
        answer = b"accepted"
    except RuntimeError as exc:
        answer = str(exc).encode()
    start_response("200 OK", [])
    return [answer]


@pytest.mark.parametrize(("threads", "inline"), [(0, "auto"), (2, "always"), (2, "never")])
def test_a_kept_write_of_an_ended_list_response_is_refused(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, threads: int,
        inline: str) -> None:
    """An app that keeps the write() of a plain list response and calls it later gets
    an error, on every path (inline or threaded): nothing goes to the connection and
    no content-length overrun is reported for a response that ended cleanly."""
    state, pool, proto, transport = serve_app(
        loop, keeping_app, threads, inline)
    try:
        with caplog.at_level(logging.WARNING, logger="forkd.http"):
            ask_in_turn(loop, state, proto, transport, "/keep", "/late")
        answers = transport.received.split(b"HTTP/1.1 200 OK\r\n")
        assert [a.partition(b"\r\n\r\n")[2] for a in answers[1:]] == [
            b"kept", b"write() after the response ended"]
        assert not [r for r in caplog.records if "content-length" in r.getMessage()]
        assert not transport.aborted and not transport.eof
    finally:
        pool.shutdown()


class ExitingList(list[bytes]):
    def close(self) -> None:
        raise SystemExit(3)


def exiting_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return ExitingList([b"bye"]) if environ["PATH_INFO"] == "/exit" else [b"ok"]


@pytest.mark.parametrize("threads", [0, 2])
def test_a_system_exit_from_close_is_the_apps_error(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture,
        threads: int) -> None:
    """A result whose close() raises SystemExit is logged as the app's error, as an app
    raising it is: the worker's loop goes on, and the next request is answered."""
    state, pool, proto, transport = serve_app(
        loop, exiting_app, threads, "never" if threads else "auto")
    try:
        with caplog.at_level(logging.ERROR, logger="forkd.http"):
            ask_in_turn(loop, state, proto, transport, "/exit", "/next")
        assert [a.partition(b"\r\n\r\n")[2] for a in transport.received.split(
            b"HTTP/1.1 200 OK\r\n")[1:]] == [b"bye", b"ok"]
        assert ["exception in the WSGI result's close()"] == [
            r.getMessage() for r in caplog.records if r.exc_info]
    finally:
        pool.shutdown()


class Closing:
    """A result with a close(), as a framework's response is."""

    def __init__(self, closed: list[bool]) -> None:
        self.closed = closed

    def __iter__(self) -> Iterator[bytes]:
        yield b"forbidden"

    def close(self) -> None:
        self.closed.append(True)


PAST_THE_LIMIT = b"1000\r\n" + b"a" * 0x1000 + b"\r\n"  # (after the first 2 KiB)


@contextlib.contextmanager
def a_form_below_the_limit(loop: asyncio.AbstractEventLoop, app: Any,
                          watch: logging.Handler | None = None
                          ) -> Iterator[tuple[ServerState, WSGIPool, HttpProtocol,
                                              Transport, list[tuple[Any, ...]]]]:
    """A connection to `app` with the access log on (its lines: the list yielded) and a
    4 KiB --max-body-size, sent the head and first 2 KiB of a chunked POST /form: past
    --wsgi-body-buffer, so the call starts on a thread that reads the body as it comes.
    Sending PAST_THE_LIMIT then outgrows the limit. `watch` is handed forkd's log
    records until the block ends."""
    from forkd import log

    state, pool, proto, transport = upload_to(loop, app, access_log=True, max_body_size=4096)
    items: list[tuple[Any, ...]] = []
    forkd_logger = logging.getLogger("forkd")
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        if watch is not None:
            # (forkd's logger, set up as a worker's, does not pass its records on:
            # watched where it writes them)
            forkd_logger.addHandler(watch)
        proto.data_received(b"POST /form HTTP/1.1\r\nHost: test\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n"
                            b"800\r\n" + b"a" * 0x800 + b"\r\n")
        yield state, pool, proto, transport, items
    finally:
        if watch is not None:
            forkd_logger.removeHandler(watch)
        log.setup()
        pool.shutdown()


@pytest.mark.parametrize("ends", ["list", "closing", "raise"])
def test_an_answer_after_a_refused_body_is_neither_sent_nor_logged(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, ends: str
        ) -> None:
    """The body outgrows --max-body-size while a thread reads it: forkd answers 413 in
    the app's place. The app catches the read's OSError and answers anyway (Django's
    CsrfViewMiddleware answers 403 so), or raises: the client gets the 413 alone, the
    access log has its line alone, the result is closed and the call ends once."""
    closed: list[bool] = []
    read_failed = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            environ["wsgi.input"].read()
        except OSError:
            read_failed.set()
            if ends == "raise":
                raise ValueError("no body, no answer") from None
            start_response("403 Forbidden", [("Content-Length", "9")])
            return [b"forbidden"] if ends == "list" else Closing(closed)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with a_form_below_the_limit(loop, app, watch=caplog.handler) as (
            state, pool, proto, transport, items):
        run_until(loop, lambda: bool(pool.busy_since))  # a thread reads the body
        proto.data_received(PAST_THE_LIMIT)
        run_until(loop, lambda: read_failed.is_set() and settled(pool) and state.calls == 0)
    answers = transport.received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 and answers[0].startswith(b"413 ")
    assert [item[3] for item in items] == [413]
    assert state.calls == 0
    assert closed == ([True] if ends == "closing" else [])
    # (the app's own error is logged as such; nothing of ours fails after it)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == (
        ["exception in WSGI app for POST /form"] if ends == "raise" else [])


def test_an_answer_begun_then_refused_is_not_logged_nor_cut(
        loop: asyncio.AbstractEventLoop) -> None:
    """The app starts its answer (a block handed to the loop, not written yet), then its
    body read fails because the body outgrew --max-body-size, and it raises: forkd's 413
    went out in its place. The app's failure neither logs its started answer nor resets
    the connection (which would cut the 413 the client is reading)."""
    wrote = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        write = start_response("200 OK", [])
        write(b"partial")
        wrote.set()
        try:
            environ["wsgi.input"].read()
        except OSError:
            raise ValueError("no body, no answer") from None
        return [b"x"]

    with a_form_below_the_limit(loop, app) as (state, pool, proto, transport, items):
        # (the loop does not run meanwhile: the app's block waits for it, unwritten)
        assert wrote.wait(5)
        proto.data_received(PAST_THE_LIMIT)
        run_until(loop, lambda: settled(pool) and state.calls == 0)
    answers = transport.received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 and answers[0].startswith(b"413 ")
    assert [item[3] for item in items] == [413]
    assert not transport.aborted


def answer_waits_then_body_refused(loop: asyncio.AbstractEventLoop, app: Any,
                                   broken_by: str, first_out: threading.Event | None = None
                                   ) -> tuple[Transport, list[int]]:
    """A chunked POST past the body buffer (a thread takes the call) to an app that
    answers before it reads its body; once its answer's last block waits for the loop
    (which does not run meanwhile), the rest of the body overflows --max-body-size
    (413) or stalls (408). With `first_out`, the app's first block goes out before it
    is set. Returns what the client got and the statuses of the access lines."""
    from forkd import log

    state, pool, proto, transport = upload_to(loop, app, threads=2, access_log=True,
                                              max_body_size=4096)
    items: list[tuple[Any, ...]] = []
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(b"POST /form HTTP/1.1\r\nHost: test\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n"
                            b"800\r\n" + b"a" * 0x800 + b"\r\n")
        if first_out is not None:
            run_until(loop, lambda: proto.response_begun)
            first_out.set()
        deadline = time.monotonic() + 10
        while not (pool.answers and pool.idle == len(pool.threads)):
            assert time.monotonic() < deadline, "the thread did not answer"
            time.sleep(0.001)
        if broken_by == "413":
            proto.data_received(b"1000\r\n" + b"a" * 0x1000 + b"\r\n")  # past the limit
        else:
            proto.check_timeouts(proto.body_activity + 2 * state.config.header_timeout)
        run_until(loop, lambda: settled(pool) and state.calls == 0)
    finally:
        log.setup()
        pool.shutdown()
    return transport, [item[3] for item in items]


@pytest.mark.parametrize("broken_by", ["413", "408"])
@pytest.mark.parametrize("ends", ["list", "closing", "raise"])
def test_an_answer_handed_over_then_replaced_by_a_refusal_has_the_refusal_s_line_alone(
        loop: asyncio.AbstractEventLoop, ends: str, broken_by: str) -> None:
    """The app answers a chunked POST on its thread before reading the body (a 401 as a
    list, or with a close(); or it raises: a 500), and that answer's last block waits
    for the loop. Before the loop writes it, the rest of the body overflows
    --max-body-size, or stalls: forkd's refusal answers in its place. The client gets
    the refusal alone, and the access log has one line, the refusal's."""

    closed: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if ends == "raise":
            raise ValueError("no answer on purpose")
        start_response("401 Unauthorized", [("Content-Length", "9")])
        return [b"forbidden"] if ends == "list" else Closing(closed)

    transport, lines = answer_waits_then_body_refused(loop, app, broken_by)
    answers = transport.received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 and answers[0].startswith(broken_by.encode() + b" ")
    assert lines == [int(broken_by)]
    assert closed == ([True] if ends == "closing" else [])


@pytest.mark.parametrize("broken_by", ["413", "408"])
def test_a_streamed_answer_cut_by_a_refusal_keeps_its_line(
        loop: asyncio.AbstractEventLoop, broken_by: str) -> None:
    """The app streams a first block of its answer before reading its body (it goes
    out), then returns its last one; before the loop writes that, the rest of the body
    overflows --max-body-size, or stalls. No refusal can follow bytes already sent: the
    connection is cut, and the access line is the answer's, with the status it started
    with and the bytes the client got, as for any answer cut mid-way."""

    go = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        write = start_response("200 OK", [])
        write(b"partial")
        go.wait(10)
        return [b"end"]

    transport, lines = answer_waits_then_body_refused(loop, app, broken_by, first_out=go)
    assert transport.aborted
    assert transport.received.count(b"HTTP/1.1 ") == 1 and b"partial" in transport.received
    assert lines == [200]


@pytest.mark.parametrize("leaves", ["answer_queued", "app_running"])
def test_a_threaded_answer_whose_client_left_before_it_went_out_has_no_line(
        loop: asyncio.AbstractEventLoop, leaves: str) -> None:
    """The client leaves before any of its answer went out: while the whole answer
    waits for the loop, or while the app still works on it (its thread is then told as
    it hands the answer over). Nothing is sent and, as for any client gone before an
    answer started, no line is logged."""
    from forkd import log

    go = threading.Event()
    if leaves == "answer_queued":
        go.set()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        go.wait(10)
        start_response("200 OK", [("Content-Length", "5")])
        return [b"hello"]

    state, pool, proto, transport = serve_app(loop, app, access_log=True)
    items: list[tuple[Any, ...]] = []
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        proto.data_received(get("/"))
        if leaves == "answer_queued":
            deadline = time.monotonic() + 10
            while not (pool.answers and pool.idle == len(pool.threads)):
                assert time.monotonic() < deadline, "the thread did not answer"
                time.sleep(0.001)
        else:
            run_until(loop, lambda: bool(pool.busy_since))  # the app runs on its thread
        proto.connection_lost(None)
        go.set()
        run_until(loop, lambda: settled(pool) and state.calls == 0)
    finally:
        log.setup()
        pool.shutdown()
    assert transport.received == b""
    assert items == []


def test_an_inline_call_run_after_its_client_left_has_no_line(
        loop: asyncio.AbstractEventLoop) -> None:
    """An inline call waiting for the loop's next pass (its share spent) runs after its
    client left: nothing is sent, and no line is logged."""
    from forkd import log

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "5")])
        return [b"hello"]

    state, pool, proto, transport = serve_app(loop, app, threads=0, inline="always",
                                              access_log=True)
    items: list[tuple[Any, ...]] = []
    try:
        log.setup(slot=0, json_sink=lambda line: None, access_sink=items.append)
        pool.pass_left = 0  # (this pass's share of inline calls is spent)
        proto.data_received(get("/"))
        assert pool.waiting  # (the call waits for the next pass)
        proto.connection_lost(None)
        run_until(loop, lambda: not pool.waiting and state.calls == 0)
    finally:
        log.setup()
        pool.shutdown()
    assert transport.received == b""
    assert items == []


def streaming_before_the_body(told: list[Any]) -> Any:
    """A WSGI app that streams 64 KiB blocks before it reads its request body, until
    write() raises; it records the error in `told`."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        try:
            while True:
                write(b"s" * 65536)
        except OSError as exc:
            told.append(exc)
            raise
    return app


def upload_to(loop: asyncio.AbstractEventLoop, app: Any, **options: Any
              ) -> tuple[ServerState, WSGIPool, HttpProtocol, Transport]:
    """A connection to `app` on a pool of 2 threads, never inline, whose calls start
    once 1 KiB of their body is in (--wsgi-body-buffer): a body larger than that is
    read on the app's thread as it arrives."""
    return serve_app(loop, app, wsgi_body_buffer=1024, **options)


def test_a_thread_answering_before_the_body_is_freed_from_a_client_trickling_its_upload(
        loop: asyncio.AbstractEventLoop) -> None:
    """The app streams its answer before it reads the body; the client trickles the
    body (600 B/s, above --min-body-rate) and reads nothing: it is cut --header-timeout
    after writing paused (the first tick past it), and the app's thread is freed (its
    write() raises ClientDisconnected; the call ends)."""
    from test_pipelined_writes import FakeClock, tick_until_cut

    told: list[Any] = []
    state, pool, proto, transport = upload_to(loop, streaming_before_the_body(told))
    clock = FakeClock(proto)
    try:
        proto.data_received(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                            % (1 << 20) + b"u" * 4096)
        run_until(loop, lambda: proto.write_paused)
        paused = proto.write_paused_at
        timeout = state.config.header_timeout
        while not transport.aborted and clock.now < paused + 3 * timeout:
            proto.data_received(b"u" * 300)  # (each tick: 600 B/s)
            tick_until_cut(proto, transport, clock, clock.now + 0.5)
        assert transport.aborted and paused + timeout <= clock.now < paused + timeout + 0.5
        proto.connection_lost(None)  # (what the real transport's abort leads to)
        run_until(loop, lambda: bool(told) and state.calls == 0, timeout=5)
        assert type(told[0]).__name__ == "ClientDisconnected"
    finally:
        pool.shutdown()


def test_a_thread_waiting_on_a_client_is_freed_if_the_connection_is_never_cut(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """A backstop for a bug of ours: should the protocol never cut a client that takes
    nothing (here its checks never run), the app's thread waits for it no longer than
    twice --header-timeout and two ticks after it last took bytes, by the protocol's
    clock (here moved by the test): its write() raises ClientDisconnected, the
    connection is cut once, and the call ends. While that clock stands still (a loop
    behind on its work) the thread goes on waiting."""
    from forkd.http import wsgi

    told: list[Any] = []
    state, pool, proto, transport = upload_to(loop, streaming_before_the_body(told),
                                              header_timeout=0.25)
    limit = 2 * 0.25 + 2 * wsgi.BACKSTOP_TICK
    try:
        proto.data_received(get("/"))
        run_until(loop, lambda: proto.write_paused)
        state.now = proto.write_paused_at + limit * 0.9
        # (two of the thread's looks, a quarter of the limit apart: none gives up)
        with pytest.raises(AssertionError):
            run_until(loop, lambda: bool(told), timeout=limit / 2)
        state.now = proto.write_paused_at + limit
        with caplog.at_level("WARNING", logger="forkd.http"):
            run_until(loop, lambda: bool(told), timeout=5)
        assert type(told[0]).__name__ == "ClientDisconnected"
        run_until(loop, lambda: transport.aborted, timeout=2)
        proto.connection_lost(None)
        proto.cut_reader()  # (the protocol's own cut, late: counted once all the same)
        assert "waited" in caplog.text and state.slow_cuts.count == 1
        run_until(loop, lambda: state.calls == 0, timeout=5)
    finally:
        pool.shutdown()
