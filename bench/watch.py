"""Following a server's workers during a run, and the timeline arithmetic on top of it.

A worker counts as *ready* from the moment it finished importing the hello app (the
marker file it writes, see bench/apps/_marker.py) until it dies: the instant we SIGKILLed
it, or else the first poll that no longer finds it among the primary's children. This is
the same probe for every server, and needs nothing from any server's own status API.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from bench.harness import RunningServer


@dataclass
class WorkerLife:
    pid: int
    first_seen: float
    ready_at: float | None = None
    gone_at: float | None = None


@dataclass
class WorkerWatch:
    """Polls the primary's children every `interval` seconds in a background thread."""

    server: RunningServer
    interval: float = 0.02
    lives: dict[int, WorkerLife] = field(default_factory=dict)
    killed_at: dict[int, float] = field(default_factory=dict)
    primary_exit_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> WorkerWatch:
        self.poll()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        now = time.time()
        if self.primary_exit_at is None and not self.server.alive():
            self.primary_exit_at = now
        live = set(self.server.worker_pids())
        for pid in live:
            life = self.lives.setdefault(pid, WorkerLife(pid, first_seen=now))
            if life.ready_at is None:
                life.ready_at = self.server.loaded_at(pid)
        for life in self.lives.values():
            if life.gone_at is None and life.pid not in live:
                life.gone_at = now
                if life.ready_at is None:  # it may have loaded between two polls
                    life.ready_at = self.server.loaded_at(life.pid)

    def record_kill(self, pid: int, at: float) -> None:
        self.killed_at[pid] = at

    def ready_now(self) -> list[int]:
        return [
            life.pid
            for life in list(self.lives.values())
            if life.ready_at is not None and life.gone_at is None
        ]

    def intervals(self) -> list[tuple[float, float]]:
        """[ready, dead) of every worker that ever loaded the app; open ends are +inf."""
        out = []
        for life in self.lives.values():
            if life.ready_at is None:
                continue
            end = self.killed_at.get(life.pid, life.gone_at)
            if self.primary_exit_at is not None:
                end = min(end if end is not None else float("inf"), self.primary_exit_at)
            out.append((life.ready_at, end if end is not None else float("inf")))
        return out


def time_below(
    intervals: list[tuple[float, float]], wanted: int, start: float, end: float
) -> tuple[float, float]:
    """Seconds within [start, end) during which fewer than `wanted` intervals overlap, and
    during which none does. Pure: a sweep over the interval edges."""
    edges: list[tuple[float, int]] = []
    for lo, hi in intervals:
        lo, hi = max(lo, start), min(hi, end)
        if lo < hi:
            edges.append((lo, +1))
            edges.append((hi, -1))
    # Ends sort before starts at the same instant: a gap of zero length stays zero.
    edges.sort(key=lambda e: (e[0], e[1]))
    below = none = 0.0
    count, t = 0, start
    for at, delta in edges:
        if count < wanted:
            below += at - t
        if count == 0:
            none += at - t
        count += delta
        t = at
    if count < wanted:
        below += end - t
    if count == 0:
        none += end - t
    return below, none
