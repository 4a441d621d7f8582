"""Spreading a pool's connections evenly over its workers.

Every worker accepts from the one shared listening socket. The kernel wakes them all
when connections arrive, and the first to run takes everything queued. So a burst of
keep-alive connections (a load balancer's pool, a benchmark's 64) can land on one
worker while another holds none: half the pool's CPU idle, and twice the latency on the
busy half, for as long as those connections live.

So each worker publishes how many connections it holds in a page of shared memory that
the primary made before its first fork (`ConnectionTable`: a row per live worker, given
at its spawn and cleared when it is reaped, so a reload's outgoing and incoming workers
of one slot never share one), and stops accepting for a
moment when it holds more than its share: more than `slack` above the least-loaded live
worker. The kernel then hands what is queued to the others. It accepts again as soon as
that is no longer so (one of its own connections closes, or a recheck every RECHECK
seconds sees the others caught up), or once the others have taken no connection for
STALLED seconds: none came, or they cannot take them now (a loop busy with a slow
request), so a pause never holds a connection back for long.

Safety: a worker pauses only while another one is accepting, so someone always accepts
(two that decide at the same instant are undone by the next recheck). A worker's entry
counts only while it is fresh: it is rewritten on every connection event and every tick
of its loop, so a worker whose loop is blocked counts for nothing within STALE seconds;
one that drains clears its entry, and so does the primary when it reaps one.

A TLS connection is counted once its handshake is done (when uvloop hands it over), so
a burst of TLS connects is spread less well than plain ones.

Cost: per connection opened or closed, a store into the page (and, past `slack`
connections, a scan of the entries of the slots in use); nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("forkd.worker")

ROWS = 256  # workers alive at once beyond this many do not take part
STALE = 1.5  # seconds after which an entry not rewritten counts for nothing
RECHECK = 0.001  # seconds between checks of a paused worker
STALLED = 0.01  # seconds in which the others took no connection: a paused worker resumes
_GONE = -1


def _now_ms() -> int:
    return int(time.monotonic() * 1000)  # CLOCK_MONOTONIC: one clock for every process


class ConnectionTable:
    """Per row (one per live worker): connections held (or -1), when that was last
    written (monotonic ms), and whether the worker has paused its accepting; `high[0]`
    is one past the highest row that ever took part, so a scan reads only those.
    The primary hands out rows (`take`) and takes them back (`release`)."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, 8 * (3 * ROWS + 1))  # shared with every child forked
        view = memoryview(self.page).cast("q")
        self.high = view[0:1]
        self.counts = view[1:ROWS + 1]
        self.stamps = view[ROWS + 1:2 * ROWS + 1]
        self.paused = view[2 * ROWS + 1:]
        for row in range(ROWS):
            self.counts[row] = _GONE
        self.taken: set[int] = set()  # (the primary's own bookkeeping)

    def take(self) -> int | None:
        """A free row for a worker about to be forked (the primary's); None: all taken."""
        for row in range(ROWS):
            if row not in self.taken:
                self.taken.add(row)
                self.clear(row)
                return row
        return None

    def release(self, row: int) -> None:
        """Its worker was reaped (the primary's)."""
        self.taken.discard(row)
        self.clear(row)

    def clear(self, row: int) -> None:
        self.counts[row] = _GONE
        self.paused[row] = False

    def publish(self, row: int, count: int, paused: bool) -> None:
        self.counts[row] = count
        self.stamps[row] = _now_ms()
        self.paused[row] = paused
        if self.high[0] <= row:
            self.high[0] = row + 1

    def others(self, row: int) -> tuple[int | None, int, bool]:
        """Of the live workers other than `row`'s: the fewest connections one holds (None:
        there is no other), how many they hold together, and whether one is accepting."""
        high = self.high[0]
        counts, stamps = self.counts[:high].tolist(), self.stamps[:high].tolist()
        paused = self.paused[:high].tolist()
        fresh = _now_ms() - int(STALE * 1000)
        least, total, accepting = None, 0, False
        for other in range(high):
            count = counts[other]
            if other != row and count >= 0 and stamps[other] >= fresh:
                total += count
                accepting = accepting or not paused[other]
                if least is None or count < least:
                    least = count
        return least, total, accepting


class Balancer:
    """One worker's side: `opened`/`closed` after each connection event, with the count
    it now holds; `refresh` on every tick; `leave` when it stops accepting for good.
    `pause` and `resume` stop and restart its accepting (see forkd.worker)."""

    def __init__(self, table: ConnectionTable, row: int, loop: Any,
                 pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.table = table
        self.row = row
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
        least, total, accepting = self.table.others(self.row)
        if least is None or count <= least + self.slack(least) or not accepting:
            return None  # (when every other has paused, someone must accept: this one)
        return total

    def opened(self, count: int) -> None:
        self.count = count
        if self.left:
            return
        self.table.publish(self.row, count, self.paused)
        if not self.paused:
            others = self.over(count)
            if others is not None:
                self.paused = True
                self.table.paused[self.row] = True
                self.others_total, self.others_took = others, self.loop.time()
                self.pause_accepting()
                self.recheck = self.loop.call_later(RECHECK, self._check)

    def closed(self, count: int) -> None:
        self.count = count
        if self.left:
            return
        self.table.publish(self.row, count, self.paused)
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
        self.table.clear(self.row)

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
        self.table.paused[self.row] = False
        if self.recheck is not None:
            self.recheck.cancel()
            self.recheck = None
        self.resume_accepting()


class Listening:
    """A worker's servers on the shared listeners, which it can stop and start again
    (the Balancer's pause and resume). Each server gets a copy of its listener's
    descriptor, which closing the server closes; the listeners stay open until `close`.
    Starting again can fail (out of descriptors): the others accept meanwhile, and it
    is tried again every RETRY seconds while wanted."""

    RETRY = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[socket.socket],
                 create: Callable[[socket.socket], Awaitable[asyncio.AbstractServer]]
                 ) -> None:
        self.loop = loop
        self.listeners = listeners
        self.create = create
        self.servers: list[asyncio.AbstractServer] = []
        self.wanted = True  # (a resume while the servers are still being made is kept)
        self.closed = False
        self.starting: asyncio.Task[None] | None = None
        self.retry: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """A server on every listener, or none (what was made is closed, and the error
        raised)."""
        servers: list[asyncio.AbstractServer] = []
        try:
            for sock in self.listeners:
                copy = sock.dup()
                try:
                    servers.append(await self.create(copy))
                except BaseException:
                    copy.close()
                    raise
        except BaseException:
            for server in servers:
                server.close()
            raise
        if self.closed or not self.wanted:  # paused (or closed) meanwhile
            for server in servers:
                server.close()
            return
        self.servers = servers

    def pause(self) -> None:
        self.wanted = False
        self._stop()

    def resume(self) -> None:
        if self.closed:
            return
        self.wanted = True
        if not self.servers and (self.starting is None or self.starting.done()):
            self.starting = self.loop.create_task(self._restart())

    def close(self) -> None:
        """For good (the drain): no server, no retry, and the listeners closed."""
        self.closed = True
        self.pause()
        if self.starting is not None:
            self.starting.cancel()
        if self.retry is not None:
            self.retry.cancel()
        for sock in self.listeners:
            sock.close()

    async def _restart(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            if self.closed:
                return
            logger.warning("could not accept again (%s); retrying in %g s", exc, self.RETRY)
            self.retry = self.loop.call_later(self.RETRY, self._retry)

    def _retry(self) -> None:
        self.retry = None
        if self.wanted:
            self.resume()

    def _stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []
