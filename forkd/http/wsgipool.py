"""Where a WSGI call runs: on the worker's threads, or on the loop's own thread.

Profiling a hello-world WSGI app (bench/profiles/) showed that little of a request's time
is the app's or even the server's Python: it goes to handing the call to a thread and the
answer back (a Future and its Condition per call, a self-pipe write per hand-off, and the
GIL passed back and forth). So:

- the pool is a plain queue and N threads, no futures;
- answers go back to the loop in batches: a thread appends to a queue and wakes the loop
  only when the loop is not already due to empty it;
- a call that is known to be quick runs inline on the loop's thread, with no hand-off at
  all. "Known" is learnt per route: a route is run inline after PROMOTE_AFTER threaded calls
  in a row that each used less than QUICK_CPU of the thread's CPU. Wall-clock time cannot
  tell a quick call from a slow one on the threads (under load a call waits for the GIL as
  long as one that sleeps), except at its extreme: a route one of whose calls, threaded or
  inline, once took NEVER_INLINE blocks for long at times, and stays on the threads for
  good. Inline, the wall clock is honest while no thread is in a call: a call over
  SLOW_INLINE then sends its route back to the threads at once, and STRIKES calls in a row
  over INLINE_LIMIT (it waits on something: a database, a sleep) do too. While threads
  run calls, an inline call waits for the GIL they hold (5 ms a turn, often more than one:
  hello calls of 10-23 ms were seen as a route went inline with threaded calls still
  queued), so a slow call then counts as one strike only. Nor is an inline call's time
  its own while the loop's thread waits for a CPU: on a host running more threads than
  cores, the scheduler held 0.15 ms calls for 12 ms, and their quick route went back to
  the threads. So a slow inline call's time, less what the thread waited for a CPU since
  the last look (the kernel's run_delay: read before a call when the last look is
  LOOK_EVERY old, so a wait before the call hides at most LOOK_EVERY of its time, and
  as a slow call returns: before its answer, which may run the next pipelined request
  inline, nested, whose waits are not its own), is judged. Each route sent back from
  the loop is logged (event `wsgi-route-to-threads`, with the part of the call's time
  the thread waited for a CPU, at most one line per LOG_EVERY, with the count of those
  not logged). `--wsgi-inline never` turns this off; `always` (or
  `--threads 0`) runs every call inline, for apps that never block.

A route sent back by SLOW_INLINE or STRIKES is not kept there for good: a call can be
slow because the scheduler took the CPU away from it (a host running more than its
cores) in ways its clocks cannot tell from a call that waits on I/O (where the kernel
does not count the waits, or a stall of the whole process), and a quick route would
then stay on the threads for the rest of the worker's life. So after RETRY_AFTER
it is on probation: it learns afresh (PROMOTE_AFTER quick threaded calls, then inline;
the first call timed after the wait is judged as the others: while it waits, one in
SAMPLE_EVERY of a thread's calls is timed, _work), and each time it is sent back
again the wait doubles, up to RETRY_MAX, and never shrinks again. A call over
NEVER_INLINE, on probation or on the threads while it waits, ends that for good. So a
route that waits on something (a database) costs at most STRIKES calls on the loop per
back-off, one every RETRY_MAX once it has been sent back seven times, and a route that
hangs (an upstream's timeout) one call, once.

Inline calls share the loop's passes with everything else it does, and uvloop accepts
one connection per pass: with every call of a pass run inline, a pass lasted as long as
all the requests its reads brought (wrk's pipelined 16 on each of 128 connections: a
quarter of a second here), and a burst of 256 new connections waited seconds in the
accept queue, past wrk's 2 s timeout. So a pass runs at most INLINE_PER_PASS calls inline;
calls past that wait in a queue for the next passes, in turn (a connection's next
pipelined request joins the queue's end when its turn comes).

How many threads: more threads than the GIL can keep busy only make them queue for it
(and the loop with them, which needs it to read and write): a hello-world app on 64
threads served a third less than on 8, an app waiting 1 ms then computing 0.2 ms 40%
less. An app that waits on I/O needs more: one thread per call in flight, or its calls
queue behind sleeping threads (8 threads cap a 1 ms route at 8,000 calls/s per worker).
So the pool runs up to FLOOR threads as before, and more, up to `--threads`, only when
calls wait for a thread and either
- every thread has been in its call for BLOCKED_AFTER or longer (they wait on something,
  not on the GIL: a quick call would have ended), or
- the threaded calls of late spent most of their time waiting: over each WINDOW calls
  timed (every call of a route still learnt, one in SAMPLE_EVERY of the others: _work),
  their wall time over twice their CPU time (the loop's part of a request is about as
  much as the thread's) estimates how many calls can be in flight before the GIL is the
  limit. Wall and CPU are read with the GIL held, at the call's start and end, so time
  spent queueing for a thread or for the GIL before the call does not count.
Threads above the estimate retire when no call waits, so a burst of waiting leaves no
crowd behind for the CPU-bound calls after it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from forkd import log

PROMOTE_AFTER = 32  # quick threaded calls in a row before a route is run inline
QUICK_CPU = 0.0005  # seconds of the thread's CPU under which a threaded call is quick
NEVER_INLINE = 0.100  # a call this long (wall clock) keeps its route on the threads for good
SLOW_INLINE = 0.010  # an inline call this long sends its route back to the threads at once
INLINE_LIMIT = 0.0005  # inline calls over this, STRIKES in a row, send it back too
STRIKES = 3
MAX_ROUTES = 4096  # routes remembered; others stay on the threads
FLOOR = 8  # threads a pool may always run (the old fixed default)
BLOCKED_AFTER = 0.005  # every thread in its call this long: they wait, one more may start
WINDOW = 64  # threaded calls per estimate of the threads that help
LOOP_SHARE = 2.0  # a request's GIL time over its thread's CPU time (the loop's part too)
INLINE_PER_PASS = 32  # inline calls per pass of the loop (a hello call: about 60 us)
LOOK_EVERY = 0.002  # an inline call looks at the waits for a CPU first, if none this long
RETRY_AFTER = 10.0  # seconds a route sent back to the threads waits to learn afresh
RETRY_MAX = 640.0  # the longest wait (doubled per return to the threads)
LOG_EVERY = 10.0  # seconds between two lines about routes sent back to the threads
SAMPLE_EVERY = 8  # a thread's calls per CPU reading, on routes no longer learnt (_work)

_INLINE = -1
_THREADS = -2  # until its probation (retry)
_NEVER = -3  # for good: a call blocked for NEVER_INLINE


class WSGIPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, inline: str = "auto"
                 ) -> None:
        self.loop = loop
        self.size = size
        self.mode = "always" if size == 0 else inline
        self.always = self.mode == "always"  # (every call inline: no route is looked up)
        self.calls: queue.SimpleQueue[
            tuple[Callable[..., Any], Any, bytes | None] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.started = 0  # threads started so far (for their names)
        self.idle = 0  # idle threads, less the calls queued for one
        self.limit = min(FLOOR, size)  # threads started without further question
        self.busy_since: dict[int, float] = {}  # thread id -> when its call began
        self.last_start = 0.0  # when the newest call on a thread began
        self.window = [0, 0.0, 0.0]  # threaded calls, their wall and CPU seconds
        self.check_due = False  # a look at blocked threads is scheduled (loop thread)
        self.lock = threading.Lock()
        self.answers: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self.wake_pending = False
        self.routes: dict[bytes, int] = {}  # score, or _INLINE / _THREADS / _NEVER
        self.strikes: dict[bytes, int] = {}  # inline routes' slow calls in a row
        # routes sent back to the threads -> (when they learn afresh, the wait before that)
        self.retry: dict[bytes, tuple[float, float]] = {}
        self.logged_at = -LOG_EVERY  # (_clock) when a route sent back was last logged
        self.unlogged = 0  # routes sent back since then, not logged
        self.pass_left = INLINE_PER_PASS  # inline calls that may run before a new pass
        self.pass_due = False  # _next_pass is scheduled
        self.waiting: deque[tuple[Callable[..., Any], Any]] = deque()  # inline, for a pass
        # the loop thread's waits for a CPU (its schedstat, open: made on the loop's thread;
        # only `auto` learns routes from their calls' times), at the last look, and when
        # the next call inline is to look first
        self.stats = _open_stats() if self.mode == "auto" else None
        self.cpu_waited = _run_delay(self.stats)
        self.look_due = 0.0 if self.mode == "auto" else math.inf

    # -- loop thread ------------------------------------------------------------------
    def runs_inline(self, route: bytes) -> bool:
        """(WSGICycle._submit asks the same, inline; in `never` mode no route is learnt)"""
        return self.always or self.routes.get(route) == _INLINE

    def run_inline(self, fn: Callable[..., Any], arg: Any) -> None:
        """fn(arg) on the loop's thread, once the share runs afresh: the caller found it
        spent, or calls waiting (WSGICycle runs the call itself when neither is so)."""
        self.waiting.append((fn, arg))
        if not self.pass_due:
            self.pass_due = True
            self.loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        """A new pass: the share counts afresh, and the calls that wait run first (one
        that answers a pipelined request may add the next one behind them: each
        connection takes its turn). The count goes on over the passes after this one
        until it is spent again: no pass runs more than the share, and a pass that runs
        few costs no callback to reset it."""
        self.pass_due = False
        self.pass_left = INLINE_PER_PASS
        waiting = self.waiting
        while waiting and self.pass_left > 0:
            fn, arg = waiting.popleft()
            self.pass_left -= 1
            fn(arg)
        if waiting and not self.pass_due:
            self.pass_due = True
            self.loop.call_soon(self._next_pass)

    def submit(self, fn: Callable[..., Any], arg: Any, route: bytes | None = None) -> None:
        """fn(arg) on a thread. With a `route`, the call is timed for it (_work): fn
        returns True if its times say something of the route (threaded_took's `judged`)."""
        thread = None
        with self.lock:
            count = len(self.threads)
            if self.idle <= 0 and count < self.size and (
                    count < self.limit or self._all_blocked(count)):
                thread = self._new_thread()
            else:
                self.idle -= 1
                queued = self.idle < 0 and count < self.size
        if thread is not None:
            thread.start()
        elif queued and not self.check_due:
            # the calls waiting now may wait on threads that wait on I/O: look again soon
            self.check_due = True
            self.loop.call_later(BLOCKED_AFTER, self._check_blocked)
        self.calls.put((fn, arg, route))

    def _check_blocked(self) -> None:
        """Calls wait for a thread: if every thread is stuck in a call, one more thread
        for each waiting call (up to --threads), and look again while calls wait."""
        self.check_due = False
        started = []
        with self.lock:
            count = len(self.threads)
            if self.idle >= 0 or count >= self.size:
                return
            if self._all_blocked(count):
                for _ in range(min(-self.idle, self.size - count)):
                    started.append(self._new_thread())
                    self.idle += 1  # (it takes one of the waiting calls)
            again = self.idle < 0 and len(self.threads) < self.size
        for thread in started:
            thread.start()
        if again:
            self.check_due = True
            self.loop.call_later(BLOCKED_AFTER, self._check_blocked)

    def _new_thread(self) -> threading.Thread:
        """(lock held) A thread for one more call, started by the caller."""
        thread = threading.Thread(target=self._work, name=f"forkd-wsgi-{self.started}",
                                  daemon=True)
        self.started += 1
        self.threads.append(thread)
        return thread

    def _all_blocked(self, count: int) -> bool:
        """Every thread is in a call begun BLOCKED_AFTER ago or more (lock held). While
        every thread is in a call, the newest call begun is one of theirs: O(1), where
        the newest of busy_since cost 2.5 us per call queued behind 24 busy threads."""
        return (len(self.busy_since) >= count
                and self.last_start < time.perf_counter() - BLOCKED_AFTER)

    def inline_took(self, route: bytes, seconds: float) -> None:
        if self.mode != "auto":
            return
        own = seconds
        if seconds > INLINE_LIMIT:  # (not the time it waited for a CPU: the docstring)
            waited = self.cpu_waited
            self.look(time.perf_counter())
            own -= max(0.0, self.cpu_waited - waited)
        if own <= INLINE_LIMIT:
            if route in self.strikes:
                del self.strikes[route]
            return
        with self.lock:  # (threaded_took changes routes on the threads)
            if own > NEVER_INLINE:
                self.strikes.pop(route, None)
                sent = self._never(route)
                wait = None
            else:
                strikes = self.strikes.get(route, 0) + 1
                if strikes < STRIKES and (own <= SLOW_INLINE or self.busy_since):
                    self.strikes[route] = strikes
                    return
                self.strikes.pop(route, None)
                wait = self._to_threads(route)
                sent = wait is not None
        if sent:
            self._log_sent_back(route, seconds, seconds - own, wait)

    def look(self, now: float) -> None:
        """How long the loop's thread has waited for a CPU: read before an inline call
        when the last look is LOOK_EVERY old (WSGICycle.run), and as a slow one returns
        (inline_took: WSGICycle.run calls it then, before the call's answer)."""
        self.cpu_waited = _run_delay(self.stats)
        self.look_due = now + LOOK_EVERY

    def _to_threads(self, route: bytes) -> float | None:
        """(lock held) An inline route goes back to the threads until its probation
        (the module's docstring): the wait before it, or None if it was not inline (a
        call that was due inline before its route went back)."""
        if self.routes.get(route) != _INLINE:
            return None
        last = self.retry.get(route)
        wait = RETRY_AFTER if last is None else min(last[1] * 2, RETRY_MAX)
        self.retry[route] = (_clock() + wait, wait)
        self.routes[route] = _THREADS
        return wait

    def _never(self, route: bytes) -> bool:
        """(lock held) The route stays on the threads for good; True if it was inline."""
        was = self.routes.get(route)
        if was is None and len(self.routes) >= MAX_ROUTES:
            return False  # (unknown routes run on the threads anyway)
        self.routes[route] = _NEVER
        self.retry.pop(route, None)
        return was == _INLINE

    def _log_sent_back(self, route: bytes, seconds: float, cpu_wait: float,
                       wait: float | None) -> None:
        """A route that held the loop goes back to the threads: say which, for how long
        it held the loop, and how much of that the loop's thread waited for a CPU (not
        judged; at most one line per LOG_EVERY: a host that stalls every process for a
        moment could send many routes back at once)."""
        now = _clock()
        if now - self.logged_at < LOG_EVERY:
            self.unlogged += 1
            return
        self.logged_at = now
        unlogged, self.unlogged = self.unlogged, 0
        log.event("wsgi-route-to-threads", logging.WARNING, path=route.decode("latin-1"),
                  duration_ms=round(seconds * 1000, 3),
                  cpu_wait_ms=round(cpu_wait * 1000, 3) or None,  # (None, left out)
                  retry_s=wait,  # (None, left out: for good)
                  not_logged=unlogged or None)

    def shutdown(self) -> None:
        for _ in self.threads:
            self.calls.put(None)
        if self.stats is not None:
            os.close(self.stats)
            self.stats = None

    def _run_answers(self) -> None:
        self.wake_pending = False
        answers = self.answers
        while answers:
            fn, args = answers.popleft()
            try:
                fn(*args)
            except Exception as exc:  # (the others' answers wait behind it: run them)
                self.loop.call_exception_handler({
                    "message": "exception in a WSGI answer", "exception": exc})

    # -- pool threads -----------------------------------------------------------------
    def to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the loop soon. The loop is woken only when it is not
        already due to run the queue (it clears the flag before emptying it, so an
        answer appended after that either is seen by it or wakes it again)."""
        self.answers.append((fn, args))
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self._run_answers)

    def threaded_took(self, route: bytes, wall: float, cpu: float,
                      judged: bool = True) -> None:
        """A threaded call ended: `wall` and `cpu` seconds. `judged` False: it waited on
        its client (a streamed body, a slow reader), so it says nothing of the route."""
        with self.lock:
            self._took(route, wall, cpu, judged)

    def _took(self, route: bytes, wall: float, cpu: float, judged: bool,
              sampled: bool = True) -> None:
        """(lock held) threaded_took. `sampled`: the call is one of the window's sample
        (a call timed only because its route is learnt is not: see _work)."""
        if sampled:
            window = self.window
            window[0] += 1
            window[1] += wall
            window[2] += cpu
            if window[0] >= WINDOW:
                helps = window[1] / max(window[2] * LOOP_SHARE, 1e-6)
                self.limit = max(min(FLOOR, self.size), min(self.size, math.ceil(helps)))
                window[:] = [0, 0.0, 0.0]
        if self.mode != "auto" or not judged:
            return
        # (under the lock: one call's bookkeeping at a time, so no flag is lost)
        routes = self.routes
        score = routes.get(route, 0)
        if score < 0:
            if score != _THREADS:
                return  # (an inline route's streamed upload says nothing of the app)
            if wall <= NEVER_INLINE and _clock() < self.retry.get(route, _DUE)[0]:
                return
            score = routes[route] = 0  # probation: this call is judged as the others
        if wall > NEVER_INLINE:
            self._never(route)
        elif cpu > QUICK_CPU:
            if score:  # (an unknown route is not added: routes stay bounded)
                routes[route] = 0
        elif score + 1 >= PROMOTE_AFTER:
            routes[route] = _INLINE
        elif score or route in routes or len(routes) < MAX_ROUTES:
            routes[route] = score + 1

    def _work(self) -> None:
        """Run calls. A call submitted with its route is timed here: its wall time
        always (a call over NEVER_INLINE keeps its route on the threads for good), its
        thread's CPU time (a system call: 0.4 us, with the GIL held) only while the route
        is learnt (`auto`, a score of 0 or more: every call counts towards its place)
        or due for its probation (the module's docstring), and on every
        SAMPLE_EVERY-th call of the thread. Only those sampled calls feed the window's
        estimate of the threads that help: a share of all calls taken whatever their
        route, so their wall over CPU is the whole's, only measured less often (the
        calls timed for learning would weigh the routes still learnt, or never learnt,
        several times over). The end of a call (its judgement, the thread's count)
        takes the lock once."""
        calls = self.calls
        busy_since = self.busy_since
        routes = self.routes
        learns = self.mode == "auto"
        lock = self.lock
        me = threading.get_ident()
        clock = time.perf_counter
        skip = 0  # calls to leave untimed before the next sample
        while True:
            item = calls.get()
            if item is None:
                return
            fn, arg, route = item
            start = self.last_start = busy_since[me] = clock()
            if route is None:
                timed = sampled = False
            else:
                if skip:
                    skip -= 1
                    sampled = False
                else:
                    skip = SAMPLE_EVERY - 1
                    sampled = True
                timed = sampled
                if learns and not timed:
                    score = routes.get(route, 0)
                    # (a probation that is due starts at its route's next call, whatever
                    # the thread's count: calls in lock-step with it could skip it forever)
                    timed = score >= 0 or (score == _THREADS and _clock()
                                           >= self.retry.get(route, _DUE)[0])
            if timed:
                cpu = time.thread_time()
            judged = False
            try:
                judged = fn(arg)
            except BaseException as exc:  # (a bug of ours: the thread and its count live)
                _log.error("exception in a WSGI pool thread's call", exc_info=exc)
            if route is not None:
                wall = clock() - start
                if timed:
                    cpu = time.thread_time() - cpu
            with lock:
                del busy_since[me]
                if route is not None:
                    try:
                        if timed:
                            self._took(route, wall, cpu, judged, sampled)
                        elif (wall > NEVER_INLINE and judged
                              and routes.get(route) == _THREADS):  # (as _took judges it)
                            self._never(route)
                    except Exception as exc:  # (a bug of ours: the thread and its count
                        _log.error("exception in a WSGI pool's bookkeeping",  # live)
                                   exc_info=exc)
                if self.idle >= 0 and len(self.threads) > self.limit:
                    # more threads than help, and no call waits: this one retires
                    self.threads.remove(threading.current_thread())
                    return
                self.idle += 1


_log = logging.getLogger("forkd.http")
_DUE = (0.0, 0.0)  # (the retry entry of a route sent back with none: its probation is due)
_clock = time.monotonic  # (the probation's clock; tests move it)


def _open_stats() -> int | None:
    """The calling thread's scheduler counts (Linux), open; None where there are none."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _run_delay(stats: int | None) -> float:
    """Seconds the thread of `stats` has waited for a CPU so far (the kernel's
    run_delay; 0 where it is not at hand: every slow call is then judged whole).
    Tests replace it."""
    if stats is None:
        return 0.0
    try:
        return int(os.pread(stats, 128, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0

