"""Spreading a pool's connections evenly over its workers.

Every worker accepts from the one shared listening socket. The kernel wakes them all
when connections arrive, and the first to run takes everything queued. So a burst of
keep-alive connections (a load balancer's pool, a benchmark's 64) can land on one
worker while another holds none: half the pool's CPU idle, and twice the latency on the
busy half, for as long as those connections live.

So each worker publishes how many connections it holds in a page of shared memory that
the primary made before its first fork (`ConnectionTable`), and stops accepting for a
moment when it holds more than its share: more than `slack` above the least-loaded live
worker. The kernel then hands what is queued to the others. It accepts again as soon as
that is no longer so (one of its own connections closes, or a recheck every RECHECK
seconds sees the others caught up), or once the others have taken no connection for
STALLED seconds: none came, or they cannot take them now (a loop busy with a slow
request), so a pause never holds a connection back for long.

Safety: a worker pauses only while another one is accepting, so someone always accepts
(two that decide at the same instant are undone by the next recheck). A worker's entry
counts only while it is fresh: it is rewritten on every connection event and every tick
of its loop, so a worker whose loop is blocked, that was killed, or that drains (it
clears its entry) counts for nothing within STALE seconds.

Cost: per connection opened or closed, a store into the page (and, past `slack`
connections, a scan of the entries of the slots in use); nothing per request.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from typing import Any

MAX_SLOTS = 256  # workers beyond this slot number do not take part
STALE = 1.5  # seconds after which an entry not rewritten counts for nothing
RECHECK = 0.001  # seconds between checks of a paused worker
STALLED = 0.01  # seconds in which the others took no connection: a paused worker resumes
_GONE = -1


def _now_ms() -> int:
    return int(time.monotonic() * 1000)  # CLOCK_MONOTONIC: one clock for every process


class ConnectionTable:
    """Per slot: connections held (or -1), when that was last written (monotonic ms),
    and whether the worker has paused its accepting; `high[0]` is one past the highest
    slot that ever took part, so a scan reads only the slots in use."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, 8 * (3 * MAX_SLOTS + 1))  # shared with every child forked
        view = memoryview(self.page).cast("q")
        self.high = view[0:1]
        self.counts = view[1:MAX_SLOTS + 1]
        self.stamps = view[MAX_SLOTS + 1:2 * MAX_SLOTS + 1]
        self.paused = view[2 * MAX_SLOTS + 1:]
        for slot in range(MAX_SLOTS):
            self.counts[slot] = _GONE

    def publish(self, slot: int, count: int, paused: bool) -> None:
        self.counts[slot] = count
        self.stamps[slot] = _now_ms()
        self.paused[slot] = paused
        if self.high[0] <= slot:
            self.high[0] = slot + 1

    def others(self, slot: int) -> tuple[int | None, int, bool]:
        """Of the live workers other than `slot`: the fewest connections one holds (None:
        there is no other), how many they hold together, and whether one is accepting."""
        high = self.high[0]
        counts, stamps = self.counts[:high].tolist(), self.stamps[:high].tolist()
        paused = self.paused[:high].tolist()
        fresh = _now_ms() - int(STALE * 1000)
        least, total, accepting = None, 0, False
        for other in range(high):
            count = counts[other]
            if other != slot and count >= 0 and stamps[other] >= fresh:
                total += count
                accepting = accepting or not paused[other]
                if least is None or count < least:
                    least = count
        return least, total, accepting


class Balancer:
    """One worker's side: `opened`/`closed` after each connection event, with the count
    it now holds; `refresh` on every tick; `leave` when it stops accepting for good.
    `pause` and `resume` stop and restart its accepting (see forkd.worker)."""

    def __init__(self, table: ConnectionTable, slot: int, loop: Any,
                 pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.table = table
        self.slot = slot
        self.loop = loop
        self.pause_accepting = pause
        self.resume_accepting = resume
        self.paused = False
        self.count = 0
        self.recheck: Any = None
        self.left = False
        self.others_total = 0  # while paused: what the others held when last seen to grow
        self.others_took = 0.0  # and when that was (loop time)

    @staticmethod
    def slack(least: int) -> int:
        # a few connections of difference are noise; among many, an eighth is
        return 2 + least // 8

    def over(self, count: int) -> int | None:
        """None when `count` is this worker's share, else what the others hold."""
        if count <= 2:
            return None
        least, total, accepting = self.table.others(self.slot)
        if least is None or count <= least + self.slack(least) or not accepting:
            return None  # (when every other has paused, someone must accept: this one)
        return total

    def opened(self, count: int) -> None:
        self.count = count
        if self.left:
            return
        self.table.publish(self.slot, count, self.paused)
        if not self.paused:
            others = self.over(count)
            if others is not None:
                self.paused = True
                self.table.paused[self.slot] = True
                self.others_total, self.others_took = others, self.loop.time()
                self.pause_accepting()
                self.recheck = self.loop.call_later(RECHECK, self._check)

    def closed(self, count: int) -> None:
        self.count = count
        if self.left:
            return
        self.table.publish(self.slot, count, self.paused)
        if self.paused and self.over(count) is None:
            self._resume()

    def refresh(self, count: int) -> None:
        """On every tick: the entry stays fresh while the loop runs."""
        self.closed(count)

    def leave(self) -> None:
        """Draining: this worker accepts no more; the others stop counting it."""
        self.left = True
        if self.recheck is not None:
            self.recheck.cancel()
        self.paused = False
        self.table.counts[self.slot] = _GONE

    def _check(self) -> None:
        """Paused: stay so only while the others are taking connections. When they
        took none for STALLED seconds, either none came (accepting is harmless) or
        they cannot take them (a loop busy with a slow request): accept again."""
        self.recheck = None
        if not self.paused or self.left:
            return
        others = self.over(self.count)
        if others is None:
            self._resume()
            return
        now = self.loop.time()
        if others > self.others_total:
            self.others_total, self.others_took = others, now
        elif now - self.others_took >= STALLED:
            self._resume()
            return
        self.recheck = self.loop.call_later(RECHECK, self._check)

    def _resume(self) -> None:
        self.paused = False
        self.table.paused[self.slot] = False
        if self.recheck is not None:
            self.recheck.cancel()
            self.recheck = None
        self.resume_accepting()
