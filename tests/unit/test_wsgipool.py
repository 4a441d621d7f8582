"""How the WSGI pool learns which routes run inline (pure bookkeeping, no threads run)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from forkd.http import wsgipool
from forkd.http.wsgipool import WSGIPool


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def pool(loop: asyncio.AbstractEventLoop) -> WSGIPool:
    return WSGIPool(loop, 4, "auto")


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


def test_a_very_slow_call_keeps_the_route_on_the_threads(pool: WSGIPool) -> None:
    pool.threaded_took(b"/a", wsgipool.NEVER_INLINE * 2, 0.0)  # waited on I/O: little CPU
    for _ in range(wsgipool.PROMOTE_AFTER * 2):
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


@pytest.mark.parametrize(("mode", "size", "inline"), [
    ("always", 4, True), ("never", 4, False), ("auto", 0, True),
])
def test_modes(loop: asyncio.AbstractEventLoop, mode: str, size: int, inline: bool) -> None:
    pool = WSGIPool(loop, size, mode)
    assert pool.runs_inline(b"/") is inline


def test_calls_that_mostly_wait_let_the_pool_run_more_threads(
        loop: asyncio.AbstractEventLoop) -> None:
    pool = WSGIPool(loop, 32, "auto")
    assert pool.limit == wsgipool.FLOOR
    for _ in range(wsgipool.WINDOW):  # 1 ms of waiting, 25 us of CPU: about 20 in flight help
        pool.threaded_took(b"/io", 0.001, 0.000025)
    assert pool.limit == 20
    for _ in range(wsgipool.WINDOW):  # waiting on a slow database: as many as allowed
        pool.threaded_took(b"/db", 0.050, 0.000025)
    assert pool.limit == 32


def test_cpu_bound_calls_keep_the_pool_at_its_floor(loop: asyncio.AbstractEventLoop) -> None:
    pool = WSGIPool(loop, 32, "never")
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/mix", 0.0012, 0.0002)  # 1 ms of waiting, 0.2 ms of Python
    assert pool.limit == wsgipool.FLOOR
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/", 0.00003, 0.00003)
    assert pool.limit == wsgipool.FLOOR


def test_a_small_pool_is_its_own_floor(loop: asyncio.AbstractEventLoop) -> None:
    pool = WSGIPool(loop, 4, "auto")
    for _ in range(wsgipool.WINDOW):
        pool.threaded_took(b"/io", 0.050, 0.000025)
    assert pool.limit == 4


class Clock:
    """The pool's probation clock, moved by the test (wsgipool._clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(wsgipool, "_clock", clock)
    return clock


def learn(pool: WSGIPool, route: bytes) -> None:
    for _ in range(wsgipool.PROMOTE_AFTER):
        pool.threaded_took(route, *QUICK)


def test_a_quick_route_preempted_once_runs_inline_again_after_its_probation(
        pool: WSGIPool, clock: Clock) -> None:
    """One inline call descheduled for 20 ms by a loaded host looks like a call that
    blocked: its route goes back to the threads, but only for a while."""
    learn(pool, b"/a")
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    assert not pool.runs_inline(b"/a")
    clock.now += wsgipool.RETRY_AFTER / 2
    learn(pool, b"/a")
    assert not pool.runs_inline(b"/a")  # too early: still on the threads
    clock.now += wsgipool.RETRY_AFTER / 2
    pool.threaded_took(b"/a", *QUICK)  # the first call after the wait starts its probation
    assert not pool.runs_inline(b"/a")  # which it must pass as a new route would
    learn(pool, b"/a")
    assert pool.runs_inline(b"/a")


def test_a_route_that_keeps_blocking_waits_longer_each_time(pool: WSGIPool, clock: Clock
                                                            ) -> None:
    waits = []
    for _ in range(10):
        learn(pool, b"/db")
        assert pool.runs_inline(b"/db")
        for _ in range(wsgipool.STRIKES):
            pool.inline_took(b"/db", wsgipool.INLINE_LIMIT * 4)  # it waits on a database
        assert not pool.runs_inline(b"/db")
        began = clock.now
        for _ in range(int(wsgipool.RETRY_MAX) + 1):  # its threaded calls: one a second
            clock.now += 1.0
            pool.threaded_took(b"/db", 0.002, 0.00005)
            if pool.routes[b"/db"] != wsgipool._THREADS:
                break
        else:
            pytest.fail("the route never learnt afresh")
        waits.append(clock.now - began)
    assert waits[:4] == [wsgipool.RETRY_AFTER, wsgipool.RETRY_AFTER * 2,
                         wsgipool.RETRY_AFTER * 4, wsgipool.RETRY_AFTER * 8]
    assert waits[-1] == wsgipool.RETRY_MAX


def test_a_route_long_back_inline_starts_its_back_off_over(pool: WSGIPool, clock: Clock
                                                           ) -> None:
    learn(pool, b"/a")
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    clock.now += wsgipool.RETRY_AFTER
    pool.threaded_took(b"/a", *QUICK)
    learn(pool, b"/a")
    assert pool.runs_inline(b"/a")
    clock.now += wsgipool.RETRY_MAX * 2  # inline and quick for long
    pool.inline_took(b"/a", wsgipool.SLOW_INLINE * 2)
    assert pool.retry[b"/a"] == (clock.now + wsgipool.RETRY_AFTER, wsgipool.RETRY_AFTER)


def test_routes_sent_back_are_bounded(pool: WSGIPool, clock: Clock) -> None:
    for i in range(wsgipool.MAX_ROUTES + 100):
        pool.threaded_took(b"/item/%d" % i, wsgipool.NEVER_INLINE * 2, 0.0)
    assert len(pool.routes) == wsgipool.MAX_ROUTES
    assert len(pool.retry) == wsgipool.MAX_ROUTES


def test_a_thread_past_the_floor_starts_only_when_every_thread_is_blocked(
        loop: asyncio.AbstractEventLoop) -> None:
    """Calls queued behind threads in calls begun just now wait for them (they may be
    quick); behind threads all in calls for BLOCKED_AFTER or more, one more starts."""
    import threading
    import time

    pool = WSGIPool(loop, 16, "never")
    release = threading.Event()
    started = threading.Semaphore(0)

    def block(_: Any) -> None:
        started.release()
        release.wait(10)

    try:
        for _ in range(wsgipool.FLOOR):
            pool.submit(block, None)
        for _ in range(wsgipool.FLOOR):
            assert started.acquire(timeout=10)
        pool.submit(block, None)  # the threads' calls began just now: it waits
        assert len(pool.threads) == wsgipool.FLOOR
        time.sleep(wsgipool.BLOCKED_AFTER * 2)  # (the condition itself: time in the calls)
        pool.submit(block, None)  # every thread blocked for long enough: one more
        assert len(pool.threads) == wsgipool.FLOOR + 1
    finally:
        release.set()
        pool.shutdown()
