"""forkd.http.balance: when a worker stops accepting, and that it always starts again."""

from __future__ import annotations

from typing import Any

import pytest

from forkd.http import balance
from forkd.http.balance import Balancer, ConnectionTable


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
    def __init__(self, table: ConnectionTable, slot: int) -> None:
        self.loop = Loop()
        self.accepting = True
        self.held = 0
        self.balancer = Balancer(table, slot, self.loop, self.pause, self.resume)
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
    a, b, c = workers = [Worker(table, slot) for slot in range(3)]
    for _ in range(2):  # up to 2 above the least-loaded: still its share
        a.accept()
    assert a.accepting
    a.accept()  # 3 against 0: more than its share
    assert not a.accepting
    for turn in range(60):  # the kernel gives each connection to some accepting worker
        accepting = [worker for worker in workers if worker.accepting]
        assert accepting
        accepting[turn % len(accepting)].accept()
        if turn % 4 == 3:  # now and then, RECHECK has passed
            for worker in workers:
                worker.loop.fire()
    held = [worker.held for worker in workers]
    assert max(held) - min(held) <= 3 + min(held) // 8, held


def test_a_paused_worker_accepts_again_when_a_connection_of_its_own_closes() -> None:
    table = ConnectionTable()
    a, _idle = Worker(table, 0), Worker(table, 1)
    for _ in range(3):
        a.accept()
    assert not a.accepting
    a.close()
    assert a.accepting  # 2 against 0 is its share again


def test_a_paused_worker_stays_paused_while_the_others_take_connections() -> None:
    table = ConnectionTable()
    a, b, _idle = Worker(table, 0), Worker(table, 1), Worker(table, 2)
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
    a, b = Worker(table, 0), Worker(table, 1)
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


def test_workers_past_the_table_or_alone_never_pause() -> None:
    table = ConnectionTable()
    alone = Worker(table, 0)
    for _ in range(50):
        alone.accept()
    assert alone.accepting
    assert table.others(balance.MAX_SLOTS - 1) == (50, 50, True)
