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
  long as one that sleeps), except at its extreme: a route that once took NEVER_INLINE on
  a thread blocks for long at times, and never runs inline. Inline, the wall clock is
  honest: a call over SLOW_INLINE sends its route back to the threads at once, and
  STRIKES calls in a row over INLINE_LIMIT (it waits on something: a database, a sleep)
  do too, for the rest of the worker's life. The cost of a wrong guess is a few calls of
  that route holding the loop, once per worker. `--wsgi-inline never` turns this off;
  `always` (or `--threads 0`) runs every call inline, for apps that never block.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

PROMOTE_AFTER = 32  # quick threaded calls in a row before a route is run inline
QUICK_CPU = 0.0005  # seconds of the thread's CPU under which a threaded call is quick
NEVER_INLINE = 0.100  # a threaded call this long (wall clock) keeps its route on the threads
SLOW_INLINE = 0.010  # an inline call this long sends its route back to the threads at once
INLINE_LIMIT = 0.0005  # inline calls over this, STRIKES in a row, send it back too
STRIKES = 3
MAX_ROUTES = 4096  # routes remembered; others stay on the threads

_INLINE = -1
_THREADS = -2


class WSGIPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, inline: str = "auto"
                 ) -> None:
        self.loop = loop
        self.size = size
        self.mode = "always" if size == 0 else inline
        self.calls: queue.SimpleQueue[tuple[Callable[..., None], Any] | None] = (
            queue.SimpleQueue()
        )
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.lock = threading.Lock()
        self.answers: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self.wake_pending = False
        self.routes: dict[bytes, int] = {}  # score, or _INLINE / _THREADS
        self.strikes: dict[bytes, int] = {}  # inline routes' slow calls in a row

    # -- loop thread ------------------------------------------------------------------
    def runs_inline(self, route: bytes) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "never":
            return False
        return self.routes.get(route) == _INLINE

    def submit(self, fn: Callable[..., None], arg: Any) -> None:
        with self.lock:
            start = self.idle == 0 and len(self.threads) < self.size
            if not start:
                self.idle -= 1
        if start:
            thread = threading.Thread(target=self._work, name=f"forkd-wsgi-{len(self.threads)}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()
        self.calls.put((fn, arg))

    def inline_took(self, route: bytes, seconds: float) -> None:
        if self.mode != "auto":
            return
        if seconds <= INLINE_LIMIT:
            if route in self.strikes:
                del self.strikes[route]
            return
        strikes = self.strikes.get(route, 0) + 1
        if seconds > SLOW_INLINE or strikes >= STRIKES:
            self.routes[route] = _THREADS
            self.strikes.pop(route, None)
        else:
            self.strikes[route] = strikes

    def shutdown(self) -> None:
        for _ in self.threads:
            self.calls.put(None)

    def _run_answers(self) -> None:
        self.wake_pending = False
        answers = self.answers
        while answers:
            fn, args = answers.popleft()
            fn(*args)

    # -- pool threads -----------------------------------------------------------------
    def to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the loop soon. The loop is woken only when it is not
        already due to run the queue (it clears the flag before emptying it, so an
        answer appended after that either is seen by it or wakes it again)."""
        self.answers.append((fn, args))
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self._run_answers)

    def threaded_took(self, route: bytes, wall: float, cpu: float) -> None:
        if self.mode != "auto":
            return
        score = self.routes.get(route, 0)
        if score < 0:
            return
        if wall > NEVER_INLINE:
            self.routes[route] = _THREADS
        elif cpu > QUICK_CPU:
            self.routes[route] = 0
        elif score + 1 >= PROMOTE_AFTER:
            self.routes[route] = _INLINE
        elif score or len(self.routes) < MAX_ROUTES:
            self.routes[route] = score + 1

    def _work(self) -> None:
        calls = self.calls
        while True:
            item = calls.get()
            if item is None:
                return
            fn, arg = item
            fn(arg)
            with self.lock:
                self.idle += 1


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()
