"""forkd.http.balance: when a worker stops accepting, and that it always starts again."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from forkd.http import balance
from forkd.http.balance import Balancer, ConnectionTable, Listening


class Loop:
    """The one call a Balancer makes of its loop; timers fire when the test says."""

    def __init__(self) -> None:
        self.timers: list[Any] = []
        self.now = 100.0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> Any:
        loop = self

        class Handle:
            def cancel(self) -> None:
                if self in loop.timers:
                    loop.timers.remove(self)

            def __call__(self) -> None:
                loop.timers.remove(self)
                callback()

        handle = Handle()
        self.timers.append(handle)
        return handle

    def fire(self) -> None:
        for timer in list(self.timers):
            timer()


class Worker:
    def __init__(self, table: ConnectionTable, row: int | None = None) -> None:
        self.loop = Loop()
        self.accepting = True
        self.held = 0
        self.row = table.take() if row is None else row
        assert self.row is not None
        self.balancer = Balancer(table, self.row, self.loop, self.pause, self.resume)
        self.balancer.refresh(0)

    def pause(self) -> None:
        assert self.accepting
        self.accepting = False

    def resume(self) -> None:
        assert not self.accepting
        self.accepting = True

    def accept(self) -> None:
        assert self.accepting
        self.held += 1
        self.balancer.opened(self.held)

    def close(self) -> None:
        self.held -= 1
        self.balancer.closed(self.held)


def test_a_worker_past_its_share_pauses_and_someone_always_accepts() -> None:
    table = ConnectionTable()
    a, b, c = workers = [Worker(table) for _ in range(3)]
    for _ in range(2):  # up to 2 above the least-loaded: still its share
        a.accept()
    assert a.accepting
    a.accept()  # 3 against 0: more than its share
    assert not a.accepting
    for turn in range(60):
        # the kernel gives each connection to the first worker to wake that accepts:
        # always the same one when it can (without pauses, a would get them all)
        accepting = [worker for worker in workers if worker.accepting]
        assert accepting
        accepting[0].accept()
        if turn % 4 == 3:  # now and then, RECHECK has passed
            for worker in workers:
                worker.loop.fire()
    held = [worker.held for worker in workers]
    assert max(held) - min(held) <= 3 + min(held) // 8, held


def test_a_paused_worker_accepts_again_when_a_connection_of_its_own_closes() -> None:
    table = ConnectionTable()
    a, _idle = Worker(table), Worker(table)
    for _ in range(3):
        a.accept()
    assert not a.accepting
    a.close()
    assert a.accepting  # 2 against 0 is its share again


def test_a_paused_worker_stays_paused_while_the_others_take_connections() -> None:
    table = ConnectionTable()
    a, b, _idle = Worker(table), Worker(table), Worker(table)
    for _ in range(3):
        a.accept()
    b.accept()
    a.loop.fire()  # b took one since the pause (c still holds none): a waits on
    assert not a.accepting and a.loop.timers
    a.loop.now += balance.STALLED / 2
    a.loop.fire()
    assert not a.accepting and a.loop.timers
    a.loop.now += balance.STALLED  # the others took none since: none came, or they
    a.loop.fire()  # cannot take them now (their loops are busy)
    assert a.accepting and not a.loop.timers


def test_a_stale_or_departed_worker_counts_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    table = ConnectionTable()
    a, b = Worker(table), Worker(table)
    now = [1_000_000]
    monkeypatch.setattr(balance, "_now_ms", lambda: now[0])
    b.balancer.refresh(0)
    a.balancer.refresh(0)
    now[0] += int(balance.STALE * 1000) + 1  # b's loop has not run since (blocked, killed)
    for _ in range(10):
        a.accept()
    assert a.accepting  # no live other: it takes them all
    b.balancer.refresh(0)  # b's loop runs again
    a.accept()
    assert not a.accepting
    b.balancer.leave()  # b drains: it accepts no more
    a.loop.fire()
    assert a.accepting
    a.accept()
    assert a.accepting


def test_a_lone_worker_never_pauses_and_rows_run_out_politely() -> None:
    table = ConnectionTable()
    alone = Worker(table)
    for _ in range(50):
        alone.accept()
    assert alone.accepting
    rows = [table.take() for _ in range(balance.ROWS - 1)]
    assert None not in rows and table.take() is None  # a worker then does not take part
    assert table.others(rows[-1]) == (50, 50, True)  # (rows not yet written: not counted)


def test_a_reloaded_slot_s_outgoing_worker_does_not_hide_its_replacement() -> None:
    """In a rolling reload the new worker of a slot is ready before the old one drains:
    each has a row of its own, so the old one leaving (or being reaped) leaves the new
    one counted, and the others keep sending it its share."""
    table = ConnectionTable()
    old, other = Worker(table), Worker(table)
    for _ in range(10):
        (old if old.held <= other.held else other).accept()
    new = Worker(table)  # the replacement: ready, holding nothing yet
    old.balancer.leave()  # the old one drains
    table.release(old.row)  # and is reaped
    other.accept()
    assert not other.accepting  # 6 against the new worker's 0: the new one takes them
    for _ in range(6):
        new.accept()
    assert new.accepting
    other.loop.fire()  # and the other takes its turn again
    assert other.accepting
    assert table.take() == old.row  # the row is free for the next worker


class Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()


def test_listening_pauses_resumes_and_never_outlives_close() -> None:
    """The worker's servers: pause closes them (the listener stays open), resume makes
    new ones, a listener that fails closes what was made for the others and is tried
    again, and close leaves nothing running and nothing to retry."""
    import asyncio

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listeners = [socket.socket(), socket.socket()]
        made: list[Server] = []
        fail = [False]

        async def create(sock: socket.socket) -> Any:
            if fail[0] and sock.fileno() > 0 and len(made) % 2 == 1:
                raise OSError(24, "Too many open files")
            made.append(Server(sock))
            return made[-1]

        listening = Listening(loop, listeners, create)
        listening.RETRY = 0.01
        await listening.start()
        assert len(listening.servers) == 2
        listening.pause()
        assert listening.servers == [] and all(s.sock.fileno() == -1 for s in made)
        assert all(sock.fileno() != -1 for sock in listeners)  # the shared ones stay open
        fail[0] = True  # the second listener's server cannot be made
        listening.resume()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert listening.servers == [] and made[-1].sock.fileno() == -1  # none left half-made
        assert listening.retry is not None
        fail[0] = False
        await asyncio.sleep(0.05)  # the retry
        assert len(listening.servers) == 2
        fail[0] = True
        listening.pause()
        listening.resume()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert listening.retry is not None
        listening.close()  # the drain: no retry after it
        assert listening.retry is not None and listening.closed
        count = len(made)
        await asyncio.sleep(0.05)
        assert len(made) == count and listening.servers == []
        assert all(sock.fileno() == -1 for sock in listeners)

    asyncio.run(scenario())
