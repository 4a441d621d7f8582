"""How the WSGI pool learns which routes run inline: its bookkeeping, and (where the order
of the calls matters) requests served through the protocol and WSGICycle in process."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from test_pipelined_writes import Transport, get, run_until

from forkd import log
from forkd.config import Config
from forkd.http import wsgi, wsgipool
from forkd.http.protocol import HttpProtocol, ServerState
from forkd.http.wsgi import WSGICycle
from forkd.http.wsgipool import WSGIPool
from forkd.logs.record import Entry


class Reading:
    """A reading the pool takes by calling it, at `value`: it moves only when the test
    moves it, whatever the machine running the tests does."""

    def __init__(self, value: float, arity: int) -> None:
        self.value = value
        self.arity = arity  # the arguments the pool passes: a call with others is a bug

    def __call__(self, *args: object) -> float:
        assert len(args) == self.arity, args
        return self.value


@pytest.fixture
def cpu_waits(monkeypatch: pytest.MonkeyPatch) -> Reading:
    """The loop thread's waits for a CPU so far (wsgipool._run_delay): none unless a test
    says so."""
    waits = Reading(0.0, 1)
    monkeypatch.setattr(wsgipool, "_run_delay", waits)
    return waits


@pytest.fixture
def pool(loop: asyncio.AbstractEventLoop, cpu_waits: Reading) -> Iterator[WSGIPool]:
    pool = WSGIPool(loop, 4, "auto")
    yield pool
    pool.shutdown()  # (its threads, if a test started some, and its schedstat fd)


@pytest.fixture
def new_pool(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[[int, str], WSGIPool]]:
    """Pools of the test's size and mode, shut down after it (an `auto` pool holds the
    loop thread's schedstat fd open until then)."""
    made: list[WSGIPool] = []

    def make(size: int, mode: str) -> WSGIPool:
        made.append(WSGIPool(loop, size, mode))
        return made[-1]

    yield make
    for pool in made:
        pool.shutdown()


QUICK = (0.0001, 0.0001)  # wall, cpu


def test_a_route_runs_inline_after_enough_quick_calls(pool: WSGIPool) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER - 1):
        pool.threaded_took(b"/a", *QUICK)
    assert not pool.runs_inline(b"/a")
    pool.threaded_took(b"/a", *QUICK)
    assert pool.runs_inline(b"/a")
    assert not pool.runs_inline(b"/b")


def test_a_cpu_heavy_call_starts_the_count_again(pool: WSGIPool) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER - 1):
        pool.threaded_took(b"/a", *QUICK)
    pool.threaded_took(b"/a", 0.002, wsgipool.QUICK_CPU * 2)
    pool.threaded_took(b"/a", *QUICK)
    assert not pool.runs_inline(b"/a")


def test_waiting_on_the_gil_on_a_thread_does_not_stop_a_promotion(pool: WSGIPool) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(b"/a", wsgipool.NEVER_INLINE / 2, 0.0001)
    assert pool.runs_inline(b"/a")


def test_an_inline_call_that_blocked_long_sends_the_route_back(pool: WSGIPool) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(b"/a", *QUICK)
    pool.inline_took(b"/a", wsgipool.INLINE_LIMIT / 2)
    assert pool.runs_inline(b"/a")
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/a")


def test_an_inline_call_slow_only_while_it_waited_for_a_cpu_keeps_its_route_inline(
        pool: WSGIPool, cpu_waits: Reading) -> None:
    """A host running more threads than cores held a 0.15 ms call for 12 ms: that call
    blocked nothing, and its route stays on the loop's thread (it went back to the
    threads for 10 s, and a deep pipelined batch then ran on them)."""
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(b"/a", *QUICK)
    for _ in range(wsgipool.STRIKES + 1):
        cpu_waits.value += 0.012
        pool.inline_took(b"/a", 0.012 + 0.00015)
    assert pool.runs_inline(b"/a")
    cpu_waits.value += 0.012  # a call that also slept 20 ms goes back at once
    pool.inline_took(b"/a", 0.012 + wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/a")


class Timer:
    """The clock inline calls are timed by (time.perf_counter, as wsgi.py and wsgipool.py
    read it), moved by the test only: a loaded machine's pauses in the test's calls time
    none of them. The time module's other functions are the real ones."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def timer(monkeypatch: pytest.MonkeyPatch) -> Timer:
    timer = Timer()
    monkeypatch.setattr(wsgi, "time", timer)
    monkeypatch.setattr(wsgipool, "time", timer)
    return timer


def probe(cpu_waits: Reading, timer: Timer) -> Callable[..., Any]:
    """A WSGI app that answers with the name of the thread that ran it. Its query:
    `held=MS`: the scheduler holds the thread that long (a wait for a CPU: the clock and
    the waits move on); `sleep=MS`: it blocks that long; `queued=MS`: the thread waited
    that long for a CPU while it ran (counted only); `raise=MS`: it blocks that long,
    then raises; `stream=MS`: it blocks that long, then answers with a generator."""
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        what, _, ms = environ["QUERY_STRING"].partition("=")
        seconds = int(ms or 0) / 1000
        if what == "held":
            timer.now += seconds
            cpu_waits.value += seconds
        elif what in ("sleep", "raise", "stream"):
            timer.now += seconds
        elif what == "queued":
            cpu_waits.value += seconds
        if what == "raise":
            raise RuntimeError("the app failed")
        name = threading.current_thread().name.encode()
        start_response("200 OK", [("Content-Length", str(len(name)))])
        if what == "stream":
            return iter([name])
        return [name]
    return app


def responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """The complete responses in `data` (content-length framed): status line, body."""
    out = []
    at = 0
    while (end := data.find(b"\r\n\r\n", at)) >= 0:
        lines = data[at:end].split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if len(data) < end + 4 + length:
            break
        out.append((lines[0], data[end + 4:end + 4 + length]))
        at = end + 4 + length
    return out


class Conn:
    """A client's connection to `app` served by `pool` (the real protocol and WSGICycle,
    in the test's thread: the loop runs only while the test waits for answers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: WSGIPool, app: Any) -> None:
        state = ServerState(Config(app="test", interface="wsgi", threads=pool.size), loop)
        state.cycle_factory = WSGICycle.bind(app, pool, "")
        self.loop = loop
        self.pool = pool
        self.proto = HttpProtocol(state)
        self.transport = Transport()
        self.transport.protocol = self.proto
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, *paths: str) -> list[bytes]:
        """The paths' requests in one read; which thread answered each."""
        before = len(responses(self.transport.received))
        self.proto.data_received(b"".join(get(path) for path in paths))
        run_until(self.loop, lambda: len(responses(self.transport.received))
                  == before + len(paths))
        answers = responses(self.transport.received)[before:]
        assert all(status == b"HTTP/1.1 200 OK" for status, _ in answers), answers
        return [body for _, body in answers]

    def pipelined(self, *paths: str) -> list[bytes]:
        """The paths' requests in one read, behind quick calls of the first one's route
        that spend the loop's share of inline calls for this pass (INLINE_PER_PASS): the
        first of them then waits for the next pass with the others queued behind it,
        and each runs inside the answer of the one before it, as in a deep pipelined
        batch; which thread answered each."""
        ahead = self.pool.pass_left
        quick = paths[0].partition("?")[0]
        return self.send(*[quick] * ahead, *paths)[ahead:]


def test_a_call_held_by_the_scheduler_with_requests_pipelined_behind_it_stays_inline(
        loop: asyncio.AbstractEventLoop, pool: WSGIPool, cpu_waits: Reading, timer: Timer
        ) -> None:
    """The request behind it runs inline inside its answer and looks at the waits for
    a CPU first: that look is not the held call's (it lost its wait, was judged at its
    12 ms, and its route went back to the threads)."""
    learn(pool, b"/a")
    conn = Conn(loop, pool, probe(cpu_waits, timer))
    assert conn.pipelined("/a?held=12", "/a", "/a") == [b"MainThread"] * 3
    assert conn.send("/a") == [b"MainThread"]
    assert pool.runs_inline(b"/a")


def test_a_blocking_call_goes_back_whatever_the_requests_pipelined_behind_it_wait(
        loop: asyncio.AbstractEventLoop, pool: WSGIPool, cpu_waits: Reading, timer: Timer
        ) -> None:
    """A call that blocks 15 ms is judged by its own time, before the pipelined requests
    behind it run: their waits for a CPU on a loaded host take nothing off it (they did,
    and a blocking route stayed on the loop's thread), and they run on the threads."""
    learn(pool, b"/a")
    conn = Conn(loop, pool, probe(cpu_waits, timer))
    served = conn.pipelined("/a?sleep=15", "/a?queued=20", "/a?queued=20", "/a?queued=20")
    assert served[0] == b"MainThread"
    assert all(name.startswith(b"forkd-wsgi-") for name in served[1:]), served
    assert conn.send("/a")[0].startswith(b"forkd-wsgi-")


def test_a_wait_for_a_cpu_long_before_a_blocking_call_does_not_hide_it(
        loop: asyncio.AbstractEventLoop, pool: WSGIPool, cpu_waits: Reading, timer: Timer
        ) -> None:
    """An inline call looks at the waits first when the last look is LOOK_EVERY old
    (WSGICycle.run): waits from before the call then take nothing off its time."""
    learn(pool, b"/a")
    conn = Conn(loop, pool, probe(cpu_waits, timer))
    cpu_waits.value += 1.0  # (the host was busy a while ago; no look since)
    assert conn.send("/a?sleep=15") == [b"MainThread"]
    assert conn.send("/a")[0].startswith(b"forkd-wsgi-")
    assert not pool.runs_inline(b"/a")


def test_a_blocking_inline_call_that_raises_sends_its_route_back(
        loop: asyncio.AbstractEventLoop, pool: WSGIPool, cpu_waits: Reading, timer: Timer
        ) -> None:
    """A call that blocks 15 ms and then raises held the loop as long as one that
    answers: its client gets a 500, and the route's next request runs on a thread."""
    learn(pool, b"/a")
    conn = Conn(loop, pool, probe(cpu_waits, timer))
    conn.proto.data_received(get("/a?raise=15"))
    run_until(loop, lambda: bool(responses(conn.transport.received)))
    assert [status for status, _ in responses(conn.transport.received)] == [
        b"HTTP/1.1 500 Internal Server Error"]
    assert Conn(loop, pool, probe(cpu_waits, timer)).send("/a")[0].startswith(
        b"forkd-wsgi-")


def test_a_blocking_inline_call_that_streams_its_answer_sends_its_route_back(
        loop: asyncio.AbstractEventLoop, pool: WSGIPool, cpu_waits: Reading, timer: Timer
        ) -> None:
    """An inline call that blocks 15 ms and answers with a generator (its blocks are
    iterated on a thread) is judged by the time it held the loop: the request
    pipelined behind it, and the route's next ones, run on the threads."""
    learn(pool, b"/a")
    conn = Conn(loop, pool, probe(cpu_waits, timer))
    served = conn.pipelined("/a?stream=15", "/a")
    assert served[0] == b"MainThread"
    assert served[1].startswith(b"forkd-wsgi-"), served
    assert conn.send("/a")[0].startswith(b"forkd-wsgi-")


def test_a_slow_inline_call_while_threads_run_calls_is_one_strike_only(pool: WSGIPool
                                                                      ) -> None:
    """Threads in calls hold the GIL an inline call needs: its wall time says little then,
    and only slow calls in a row send the route back."""
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(b"/a", *QUICK)
    pool.busy_since[1] = 0.0  # a thread is in a call (its id -> since when)
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    pool.inline_took(b"/a", wsgipool.INLINE_LIMIT / 2)  # and the next call is quick again
    assert pool.runs_inline(b"/a")
    for _ in range(wsgipool.STRIKES):
        pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/a")


def test_inline_calls_that_wait_a_little_every_time_send_the_route_back(pool: WSGIPool
                                                                        ) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(b"/a", *QUICK)
    slow = wsgipool.INLINE_LIMIT * 2  # a 1 ms sleep, say
    for _ in range(wsgipool.STRIKES - 1):
        pool.inline_took(b"/a", slow)
        pool.inline_took(b"/a", wsgipool.INLINE_LIMIT / 2)  # (a pause now and then: kept)
    assert pool.runs_inline(b"/a")
    for _ in range(wsgipool.STRIKES):
        pool.inline_took(b"/a", slow)
    assert not pool.runs_inline(b"/a")
    for _ in range(wsgipool.PROMOTE_AFTER * 2):
        pool.threaded_took(b"/a", *QUICK)
    assert not pool.runs_inline(b"/a")


def test_routes_remembered_are_bounded(pool: WSGIPool) -> None:
    for i in range(wsgipool.MAX_ROUTES + 100):
        pool.threaded_took(b"/item/%d" % i, *QUICK)
    assert len(pool.routes) == wsgipool.MAX_ROUTES
    for i in range(100):  # CPU-heavy calls of routes never seen: not remembered either
        pool.threaded_took(b"/heavy/%d" % i, 0.002, wsgipool.QUICK_CPU * 2)
    assert len(pool.routes) == wsgipool.MAX_ROUTES


def test_a_known_route_still_learns_once_the_table_is_full(pool: WSGIPool) -> None:
    pool.threaded_took(b"/a", *QUICK)
    pool.threaded_took(b"/a", 0.002, wsgipool.QUICK_CPU * 2)  # its count starts again
    for i in range(wsgipool.MAX_ROUTES):
        pool.threaded_took(b"/item/%d" % i, *QUICK)
    learn(pool, b"/a")
    assert pool.runs_inline(b"/a")


@pytest.mark.parametrize(("mode", "size", "inline"), [
    ("always", 4, True), ("never", 4, False), ("auto", 0, True),
])
def test_modes(new_pool: Callable[[int, str], WSGIPool], mode: str, size: int, inline: bool
               ) -> None:
    pool = new_pool(size, mode)
    assert pool.runs_inline(b"/") is inline


def test_calls_that_mostly_wait_let_the_pool_run_more_threads(
        new_pool: Callable[[int, str], WSGIPool]) -> None:
    pool = new_pool(32, "auto")
    assert pool.limit == wsgipool.FLOOR
    for _ in range(wsgipool.WINDOW):  # 1 ms of waiting, 25 us of CPU: about 20 in flight help
        pool.threaded_took(b"/io", 0.001, 0.000025)
    assert pool.limit == 20
    for _ in range(wsgipool.WINDOW):  # waiting on a slow database: as many as allowed
        pool.threaded_took(b"/db", 0.050, 0.000025)
    assert pool.limit == 32


def test_cpu_bound_calls_keep_the_pool_at_its_floor(
        new_pool: Callable[[int, str], WSGIPool]) -> None:
    pool = new_pool(32, "never")
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/mix", 0.0012, 0.0002)  # 1 ms of waiting, 0.2 ms of Python
    assert pool.limit == wsgipool.FLOOR
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/", 0.00003, 0.00003)
    assert pool.limit == wsgipool.FLOOR


def test_a_small_pool_is_its_own_floor(new_pool: Callable[[int, str], WSGIPool]) -> None:
    pool = new_pool(4, "auto")
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/io", 0.050, 0.000025)
    assert pool.limit == 4


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Reading:
    """The pool's probation clock (wsgipool._clock)."""
    clock = Reading(1000.0, 0)
    monkeypatch.setattr(wsgipool, "_clock", clock)
    return clock


def learn(pool: WSGIPool, route: bytes) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(route, *QUICK)


def test_a_quick_route_preempted_once_runs_inline_again_after_its_probation(
        pool: WSGIPool, clock: Reading) -> None:
    """One inline call descheduled for 20 ms by a loaded host, where the kernel does not
    count the wait (no schedstat), looks like a call that blocked: its route goes back
    to the threads, but only for a while."""
    learn(pool, b"/a")
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/a")
    clock.value += wsgipool.RETRY_AFTER / 2
    learn(pool, b"/a")
    assert not pool.runs_inline(b"/a")  # too early: still on the threads
    clock.value += wsgipool.RETRY_AFTER / 2
    pool.threaded_took(b"/a", *QUICK)  # the first call after the wait starts its probation
    assert not pool.runs_inline(b"/a")  # which it must pass as a new route would
    learn(pool, b"/a")
    assert pool.runs_inline(b"/a")


def test_a_route_that_keeps_blocking_waits_longer_each_time(pool: WSGIPool, clock: Reading
                                                            ) -> None:
    waits = []
    for _ in range(10):
        learn(pool, b"/db")
        assert pool.runs_inline(b"/db")
        for _ in range(wsgipool.STRIKES):
            pool.inline_took(b"/db", wsgipool.INLINE_LIMIT * 4)  # it waits on a database
        assert not pool.runs_inline(b"/db")
        began = clock.value
        for _ in range(int(wsgipool.RETRY_MAX) + 1):  # its threaded calls: one a second
            clock.value += 1.0
            pool.threaded_took(b"/db", 0.002, 0.00005)
            if pool.routes[b"/db"] != wsgipool._THREADS:
                break
        else:
            pytest.fail("the route never learnt afresh")
        waits.append(clock.value - began)
    assert waits[:4] == [wsgipool.RETRY_AFTER, wsgipool.RETRY_AFTER * 2,
                         wsgipool.RETRY_AFTER * 4, wsgipool.RETRY_AFTER * 8]
    assert waits[-1] == wsgipool.RETRY_MAX


def test_a_route_long_back_inline_keeps_its_longest_wait(pool: WSGIPool, clock: Reading
                                                         ) -> None:
    """A route that waits on a database every few minutes is inline for long between
    two of its slow spells: each spell still sends it back for RETRY_MAX, not for
    RETRY_AFTER again (which would put it back on the loop within seconds)."""
    for _ in range(10):
        learn(pool, b"/db")
        pool.inline_took(b"/db", wsgipool.SLOW_INLINE * 2)
        clock.value = pool.retry[b"/db"][0]
    assert pool.retry[b"/db"][1] == wsgipool.RETRY_MAX
    learn(pool, b"/db")
    clock.value += wsgipool.RETRY_MAX * 3  # inline and quick for long
    for _ in range(100):
        pool.inline_took(b"/db", wsgipool.INLINE_LIMIT / 2)
    pool.inline_took(b"/db", wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/db")
    assert pool.retry[b"/db"] == (clock.value + wsgipool.RETRY_MAX, wsgipool.RETRY_MAX)


def make_inline(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    learn(pool, route)
    assert pool.runs_inline(route)


def slow_threaded(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    pool.threaded_took(route, wsgipool.NEVER_INLINE * 2, 0.0)  # waited on I/O: little CPU


def slow_first(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    slow_threaded(pool, clock, route)


def slow_inline(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    make_inline(pool, clock, route)
    pool.inline_took(route, wsgipool.NEVER_INLINE * 2)


def slow_while_sent_back(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    make_inline(pool, clock, route)
    pool.inline_took(route, wsgipool.SLOW_INLINE * 2)  # (preempted, maybe: probation due)
    slow_threaded(pool, clock, route)


def slow_starting_probation(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    make_inline(pool, clock, route)
    pool.inline_took(route, wsgipool.SLOW_INLINE * 2)
    clock.value += wsgipool.RETRY_AFTER
    slow_threaded(pool, clock, route)  # the probation's first call is judged too


def slow_on_probation(pool: WSGIPool, clock: Reading, route: bytes) -> None:
    make_inline(pool, clock, route)
    for _ in range(wsgipool.STRIKES):
        pool.inline_took(route, wsgipool.INLINE_LIMIT * 4)
    clock.value += wsgipool.RETRY_AFTER
    for _ in range(wsgipool.PROMOTE_AFTER // 2):
        pool.threaded_took(route, *QUICK)
    slow_threaded(pool, clock, route)


@pytest.mark.parametrize("slow", [slow_first, slow_inline, slow_while_sent_back,
                                  slow_starting_probation, slow_on_probation])
def test_a_route_that_once_blocked_long_never_runs_inline_again(
        pool: WSGIPool, clock: Reading, slow: Callable[[WSGIPool, Reading, bytes], None]
        ) -> None:
    """A call over NEVER_INLINE (an upstream that hangs now and then): the route stays
    on the threads for good, whenever that call came and however long the route is
    quick afterwards; its next hang would freeze every connection of the worker."""
    slow(pool, clock, b"/api")
    assert not pool.runs_inline(b"/api")
    for _ in range(3):
        clock.value += wsgipool.RETRY_MAX
        for _ in range(100):
            pool.threaded_took(b"/api", *QUICK)
            assert not pool.runs_inline(b"/api")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[Entry]:
    got: list[Entry] = []
    monkeypatch.setattr(log.state, "sink", got.append)
    monkeypatch.setattr(log.state, "level", logging.INFO)
    return got


def test_a_route_sent_back_is_logged_with_how_long_it_held_the_loop(
        pool: WSGIPool, clock: Reading, cpu_waits: Reading, events: list[Entry]) -> None:
    make_inline(pool, clock, b"/report")
    cpu_waits.value += 0.002  # (of its 44.1 ms, the loop's thread waited 2 for a CPU)
    pool.inline_took(b"/report", 0.0441)
    make_inline(pool, clock, b"/hang")
    pool.inline_took(b"/hang", 3.0)  # within LOG_EVERY of the last line: counted only
    clock.value += wsgipool.LOG_EVERY
    make_inline(pool, clock, b"/db")
    for _ in range(wsgipool.STRIKES):
        pool.inline_took(b"/db", 0.002)
    assert [(e.event, e.level, e.fields) for e in events] == [
        ("wsgi-route-to-threads", "warning",
         {"path": "/report", "duration_ms": 44.1, "cpu_wait_ms": 2.0,
          "retry_s": wsgipool.RETRY_AFTER, "not_logged": None}),
        ("wsgi-route-to-threads", "warning",
         {"path": "/db", "duration_ms": 2.0, "cpu_wait_ms": None,
          "retry_s": wsgipool.RETRY_AFTER, "not_logged": 1}),
    ]
    assert not pool.runs_inline(b"/hang")


def test_routes_sent_back_are_bounded(pool: WSGIPool, clock: Reading) -> None:
    for i in range(wsgipool.MAX_ROUTES + 100):  # each learnt, then sent back
        learn(pool, b"/item/%d" % i)
        pool.inline_took(b"/item/%d" % i, wsgipool.SLOW_INLINE * 2)
    assert len(pool.routes) == wsgipool.MAX_ROUTES
    assert len(pool.retry) == wsgipool.MAX_ROUTES
    for i in range(wsgipool.MAX_ROUTES + 100):  # and then blocked for good
        pool.threaded_took(b"/item/%d" % i, wsgipool.NEVER_INLINE * 2, 0.0)
    assert len(pool.routes) == wsgipool.MAX_ROUTES
    assert not pool.retry


def test_a_thread_past_the_floor_starts_only_when_every_thread_is_blocked(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls queued behind threads in calls begun just now wait for them (they may be
    quick); behind threads all in calls for BLOCKED_AFTER or more, one more starts. The
    pool's clock is the test's: a loaded machine's pauses do not change the outcome."""
    now = [1000.0]
    monkeypatch.setattr(wsgipool, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    pool = WSGIPool(loop, 16, "never")
    release = threading.Event()
    started = threading.Semaphore(0)

    def block(_: Any) -> None:
        started.release()
        release.wait(10)

    try:
        for _ in range(wsgipool.FLOOR - 1):
            pool.submit(block, None)
        for _ in range(wsgipool.FLOOR - 1):
            assert started.acquire(timeout=10)
        now[0] += wsgipool.BLOCKED_AFTER * 2
        pool.submit(block, None)  # the last thread's call begins BLOCKED_AFTER later
        assert started.acquire(timeout=10)
        assert len(pool.threads) == wsgipool.FLOOR
        now[0] += wsgipool.BLOCKED_AFTER / 2  # the others' blocked, not the newest's
        pool.submit(block, None)  # it waits
        assert len(pool.threads) == wsgipool.FLOOR
        now[0] += wsgipool.BLOCKED_AFTER  # every thread blocked for long enough
        pool.submit(block, None)  # one more
        assert len(pool.threads) == wsgipool.FLOOR + 1
    finally:
        release.set()
        pool.shutdown()


@pytest.mark.timeout(30)
def test_a_call_that_raises_leaves_its_thread_serving(loop: asyncio.AbstractEventLoop,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """A call that raises out of the pool's thread (a bug of the server's: an app's
    exceptions are caught in the call) is logged; the thread lives and takes the next
    calls, its bookkeeping as before."""
    pool = WSGIPool(loop, 1, "never")
    done = threading.Event()

    def broken(arg: Any) -> None:
        raise KeyError(arg)

    try:
        with caplog.at_level(logging.ERROR, logger="forkd.http"):
            for i in range(3):
                pool.submit(broken, i)
            pool.submit(lambda arg: done.set(), None)
            assert done.wait(10), "the call after the failed ones never ran"
        assert [t.is_alive() for t in pool.threads] == [True]
        deadline = time.monotonic() + 10
        while pool.idle != 1 or pool.busy_since:
            assert time.monotonic() < deadline, (pool.idle, pool.busy_since)
            time.sleep(0.001)
        assert [r.getMessage() for r in caplog.records].count(
            "exception in a WSGI pool thread's call") == 3
    finally:
        pool.shutdown()


@pytest.mark.timeout(30)
def test_the_kernel_counts_a_threads_waits_for_a_cpu() -> None:
    """The real reading (no stand-in): a thread at nice 19 on one core beside a process
    that computes without end waits for the CPU, and a call it runs whose wall time is
    nearly all that wait keeps its route inline (before, it went back to the threads)."""
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("no /proc/thread-self/schedstat here: the kernel counts no waits")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    seen: dict[str, Any] = {}

    def measure() -> None:
        try:
            core = min(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {core})  # (this thread only)
            os.sched_setaffinity(hog.pid, {core})
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # (this thread)
            loop = asyncio.new_event_loop()
            pool = WSGIPool(loop, 4, "auto")
            try:
                for _ in range(wsgipool.PROMOTE_AFTER):
                    pool.threaded_took(b"/a", *QUICK)
                # a call the scheduler holds past SLOW_INLINE: it spins until one pause
                # between two readings of the clock is that long (a few ms of CPU)
                cpu = time.thread_time()
                started = last = time.perf_counter()
                deadline = started + 10
                while last < deadline:
                    now = time.perf_counter()
                    if now - last > wsgipool.SLOW_INLINE * 2:
                        break
                    last = now
                seen["took"] = time.perf_counter() - started
                seen["cpu"] = time.thread_time() - cpu
                seen["waited"] = wsgipool._run_delay(pool.stats) - pool.cpu_waited
                pool.inline_took(b"/a", seen["took"])
                seen["inline"] = pool.runs_inline(b"/a")
            finally:
                pool.shutdown()
                loop.close()
        except BaseException as exc:  # (the test's thread raises it)
            seen["error"] = exc

    try:
        thread = threading.Thread(target=measure)
        thread.start()
        thread.join(20)
    finally:
        hog.kill()
        hog.wait(5)
    assert not thread.is_alive()
    if "error" in seen:
        raise seen["error"]
    assert seen["took"] > wsgipool.SLOW_INLINE * 2, "the scheduler never held the thread"
    if not seen["waited"]:
        pytest.skip("the kernel counted no wait for a CPU (run_delay stays 0: "
                    "schedstats off?)")
    assert seen["cpu"] < wsgipool.SLOW_INLINE, seen  # (else the call was slow on its own)
    assert seen["inline"], f"a call of {seen['cpu'] * 1000:.1f} ms of CPU held for " \
        f"{seen['took'] * 1000:.1f} ms by the scheduler went back to the threads"


class ThreadClocks:
    """wsgipool's `time` for calls on its real threads: a wall and a CPU clock that move
    only inside the test's calls (each call says how long it waited and computed), and a
    count of the CPU readings (a system call each, which the pool takes sparingly)."""

    def __init__(self) -> None:
        self.wall = 1000.0
        self.cpu = 1.0
        self.cpu_readings = 0

    def perf_counter(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        self.cpu_readings += 1
        return self.cpu

    def call(self, waits: float, computes: float) -> Callable[[Any], bool]:
        def call(_: Any) -> bool:
            self.wall += waits + computes
            self.cpu += computes
            return True  # (its times are the route's: no client was waited for)
        return call


@pytest.fixture
def thread_clocks(monkeypatch: pytest.MonkeyPatch) -> ThreadClocks:
    clocks = ThreadClocks()
    monkeypatch.setattr(wsgipool, "time", clocks)
    return clocks


def served(pool: WSGIPool, calls: list[tuple[Callable[[Any], bool], bytes]]) -> None:
    """Submit the calls as the loop does (with their routes) and wait until the pool's
    threads have run and counted them all."""
    done = threading.Event()
    for fn, route in calls:
        pool.submit(fn, None, route)
    pool.submit(lambda _: done.set(), None)  # (after the others: a one-thread pool)
    assert done.wait(10), "the pool's thread never ran the calls"
    deadline = time.monotonic() + 10
    while pool.busy_since or pool.idle != len(pool.threads):
        assert time.monotonic() < deadline, (pool.busy_since, pool.idle)
        time.sleep(0.001)


@pytest.mark.timeout(30)
def test_calls_on_the_threads_teach_their_route_each_one_timed(
        new_pool: Callable[[int, str], WSGIPool], thread_clocks: ThreadClocks) -> None:
    """While a route is learnt every threaded call of it counts: PROMOTE_AFTER quick ones
    (their CPU read at each) and it runs inline; one heavy call among them starts the
    count again."""
    pool = new_pool(1, "auto")
    quick = thread_clocks.call(0.001, 0.00002)
    heavy = thread_clocks.call(0.0, wsgipool.QUICK_CPU * 2)
    served(pool, [(quick, b"/a")] * (wsgipool.PROMOTE_AFTER - 1) + [(heavy, b"/a")]
           + [(quick, b"/a")] * (wsgipool.PROMOTE_AFTER - 1))
    assert thread_clocks.cpu_readings == 2 * 2 * wsgipool.PROMOTE_AFTER - 2
    assert not pool.runs_inline(b"/a")
    served(pool, [(quick, b"/a")])
    assert pool.runs_inline(b"/a")


@pytest.mark.timeout(30)
def test_a_route_no_longer_learnt_reads_the_cpu_on_a_share_of_its_calls(
        new_pool: Callable[[int, str], WSGIPool], thread_clocks: ThreadClocks) -> None:
    """Calls of a route that is not learnt (`never`) read their thread's CPU once in
    SAMPLE_EVERY calls; those calls still tell how many threads help: calls that wait
    1 ms for 25 us of CPU let the pool run 20."""
    pool = new_pool(32, "never")
    calls = wsgipool.WINDOW * wsgipool.SAMPLE_EVERY
    served(pool, [(thread_clocks.call(0.001 - 0.000025, 0.000025), b"/io")] * calls)
    # (each thread reads at its first call, then at one in SAMPLE_EVERY: not at each)
    assert thread_clocks.cpu_readings <= 2 * (wsgipool.WINDOW + len(pool.threads))
    assert pool.limit == 20


@pytest.mark.timeout(30)
def test_an_untimed_call_that_blocks_long_keeps_its_route_on_the_threads(
        new_pool: Callable[[int, str], WSGIPool], clock: Reading,
        thread_clocks: ThreadClocks) -> None:
    """A route sent back to the threads, waiting for its probation, whose call blocks for
    NEVER_INLINE, stays on the threads for good, whether its CPU was read or not: the
    wall clock is read on every call."""
    pool = new_pool(1, "auto")  # (one thread: which of its calls is sampled is known)
    pool.routes[b"/db"] = wsgipool._THREADS
    pool.retry[b"/db"] = (clock.value + wsgipool.RETRY_AFTER, wsgipool.RETRY_AFTER)
    quick = thread_clocks.call(0.001, 0.00002)
    served(pool, [(quick, b"/db")])  # (a thread's first call is timed: the next is not)
    readings = thread_clocks.cpu_readings
    served(pool, [(thread_clocks.call(wsgipool.NEVER_INLINE * 2, 0.0), b"/db")])
    assert thread_clocks.cpu_readings == readings  # (not a timed one)
    clock.value += wsgipool.RETRY_MAX * 2
    learn(pool, b"/db")
    assert not pool.runs_inline(b"/db")


@pytest.mark.timeout(30)
def test_the_window_samples_every_route_alike(
        new_pool: Callable[[int, str], WSGIPool], clock: Reading,
        thread_clocks: ThreadClocks) -> None:
    """The estimate of the threads that help takes one call in SAMPLE_EVERY, whatever
    its route: a CPU-heavy route, timed at each call because it is still learnt, weighs
    in it as much as its share of the calls, not SAMPLE_EVERY times more."""
    pool = new_pool(1, "auto")
    pool.routes[b"/io"] = wsgipool._THREADS  # (sent back; its probation far off)
    pool.retry[b"/io"] = (clock.value + wsgipool.RETRY_MAX, wsgipool.RETRY_MAX)
    io = thread_clocks.call(0.004, 0.000025)
    heavy = thread_clocks.call(0.0, wsgipool.QUICK_CPU * 2)
    # (5 calls a round, 8 rounds: the samples fall once on each place of the round)
    served(pool, ([(io, b"/io")] * 4 + [(heavy, b"/cpu")]) * wsgipool.SAMPLE_EVERY)
    count, wall, cpu = pool.window
    assert count == 5
    assert wall == pytest.approx(4 * 0.004025 + wsgipool.QUICK_CPU * 2)
    assert cpu == pytest.approx(4 * 0.000025 + wsgipool.QUICK_CPU * 2)


@pytest.mark.timeout(30)
def test_a_due_probation_starts_whatever_the_threads_count(
        new_pool: Callable[[int, str], WSGIPool], clock: Reading,
        thread_clocks: ThreadClocks) -> None:
    """A route back on the threads, its probation due, is timed at its next call even
    when its calls never fall on the thread's sampled ones (here every other call, in
    lock-step with SAMPLE_EVERY): it is learnt afresh and, quick, runs inline."""
    pool = new_pool(1, "auto")
    pool.routes[b"/never"] = wsgipool._NEVER
    pool.routes[b"/db"] = wsgipool._THREADS
    pool.retry[b"/db"] = (clock.value - 1, wsgipool.RETRY_AFTER)  # (due)
    quick = thread_clocks.call(0.001, 0.00002)
    served(pool, [(quick, b"/never"), (quick, b"/db")] * (wsgipool.PROMOTE_AFTER + 1))
    assert pool.runs_inline(b"/db")


@pytest.mark.timeout(30)
def test_a_failure_in_the_bookkeeping_leaves_the_thread_serving(
        new_pool: Callable[[int, str], WSGIPool], thread_clocks: ThreadClocks,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours in a call's bookkeeping is logged; the pool's one thread lives on,
    counted idle, and serves the next call."""
    pool = new_pool(1, "auto")

    def broken(*args: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(pool, "_took", broken)
    quick = thread_clocks.call(0.001, 0.00002)
    served(pool, [(quick, b"/a")])
    served(pool, [(quick, b"/a")])  # (served() waits for the thread counted idle)
    assert len(pool.threads) == 1
