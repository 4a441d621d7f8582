"""A WSGI pool thread keeps the connection it answered: the lease (issue 20, `/io`).

A threaded WSGI request costs two hand-offs, loop -> thread (a queue put, a thread
woken) and thread -> loop (the answer), with the GIL passed back and forth each time:
on a route that sleeps 1 ms that was a third of the worker's CPU in the kernel (context
switches, futexes). So when a threaded call's answer is written and its connection is
idle, the loop may lend the connection to a pool thread, which serves the client's next
requests itself, with blocking reads and writes on the socket, as long as they come
back to back; anything else hands it back to the loop.

The loop keeps everything else:
- it grants a lease (`grant`) only to a plain TCP or unix connection (not TLS: uvloop's
  SSL transport owns the bytes) that is idle and clean: its answer written (nothing in
  the transport's buffer), no request queued, parsed in part or held unparsed, no
  callback of its own pending, reading and writing not paused, not draining, with a
  thread idle in the pool. It pauses the transport's reading first, so the loop neither
  reads nor writes that socket until the lease ends; check_timeouts skips it meanwhile.
- the thread waits for the next request at most WAIT (looking every SLICE at the drain
  and at the pool: it holds its thread only while another is idle and no call waits),
  then hands the connection back; so does anything unusual (below). A head that
  arrives in pieces is fed to the protocol's parser as it came and handed back with it:
  the loop's header timeout and limits go on from there.
- the thread feeds what it reads to the protocol's own data_received: the same parser
  callbacks, checks, framing, access log and metrics as on the loop. What those would do
  through the loop or the transport goes through this object instead, which stands in
  for both while the lease lasts (HttpProtocol.transport, .loop, .state, .metrics are
  swapped by the loop as it grants, and back as the lease ends):
  - write: straight to the socket (non-blocking); what the socket does not take at once
    is kept and written by the loop as the lease ends (writing would wait on the client:
    the loop's flow control takes over);
  - close, abort, write_eof: noted, done by the loop as the lease ends; reading is then
    resumed if the protocol wants it (its read_paused flag says so);
  - call_soon: noted, scheduled by the loop as the lease ends;
  - a call that cannot run at once on this thread (a streamed request body, a streamed
    answer: both need the loop) is submitted to the pool by the loop as the lease ends.
- counters the loop also writes are the lease's own while it lasts (the requests count
  and the calls in flight on a LeaseState, the request metrics on a RequestCounters of
  its own), handed to the loop in batches: between requests every MERGE_EVERY, and as
  the lease ends. No lock is taken on either side; the loop's hot path is unchanged.
  While a lease lasts, the worker's forkd_http_requests_in_flight counts it as one
  request (from the grant to the end: the client's next request is due at once).

Not leased (each behaves exactly as without leases): --max-requests (its count must be
exact as each request starts) and --limit-concurrency (it counts the calls in flight as
each head arrives) turn leases off; `--wsgi-lease off` too.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forkd.metrics.counters import RequestCounters

if TYPE_CHECKING:
    from forkd.http.protocol import HttpProtocol, ServerState
    from forkd.http.wsgipool import WSGIPool

log = logging.getLogger("forkd.http")

WAIT = float(os.environ.get("FORKD_LEASE_WAIT", "0.005"))  # longest a leased thread waits for its client's next request
MERGE_EVERY = 0.25  # seconds between two hand-overs of the lease's counters
READ_SIZE = 65536
import ctypes as _ctypes  # noqa: E402
_libc = _ctypes.PyDLL(None, use_errno=True)
_recv = _libc.recv
_recv.argtypes = [_ctypes.c_int, _ctypes.c_void_p, _ctypes.c_size_t, _ctypes.c_int]
_recv.restype = _ctypes.c_ssize_t
_send = _libc.send
_send.argtypes = [_ctypes.c_int, _ctypes.c_char_p, _ctypes.c_size_t, _ctypes.c_int]
_send.restype = _ctypes.c_ssize_t
_DONTWAIT = 0x40
_NOSIGNAL = 0x4000
_MAXL = int(os.environ.get("FORKD_LEASE_MAX", "100000"))
_GIL = bool(os.environ.get("FORKD_LEASE_GIL"))


class LeaseState:
    """HttpProtocol.state while leased: the worker's ServerState as the request path
    reads it (what never changes copied, what does read through), with the counters the
    loop also writes kept apart (handed to the loop by Lease.merge)."""

    __slots__ = ("real", "requests", "calls", "request_limit", "on_limit", "cycle_factory",
                 "config", "access_log", "trusted", "upgrade_factory", "limit_concurrency",
                 "health_path", "timeouts", "slow_cuts")

    def __init__(self, real: ServerState, cycle_factory: Any) -> None:
        self.real = real
        self.requests = 0
        self.calls = 0
        self.request_limit = 0  # (leases are off with --max-requests)
        self.on_limit = None
        self.cycle_factory = cycle_factory
        self.config = real.config
        self.access_log = real.access_log
        self.trusted = real.trusted
        self.upgrade_factory = real.upgrade_factory
        self.limit_concurrency = real.limit_concurrency
        self.health_path = real.health_path
        self.timeouts = real.timeouts
        self.slow_cuts = real.slow_cuts

    @property
    def now(self) -> float:
        return self.real.now

    @property
    def draining(self) -> bool:
        return self.real.draining

    @property
    def date_header(self) -> bytes:
        return self.real.date_header

    def in_progress(self) -> int:
        return self.real.in_progress()

    def healthy(self) -> bool:
        return self.real.healthy()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Lease:
    """One connection lent to one pool thread: its transport, loop and pool while the
    lease lasts (see the module's docstring)."""

    def __init__(self, proto: HttpProtocol, pool: WSGIPool, transport: Any, fd: int) -> None:
        from forkd.http.wsgi import LeasedCycle

        self.proto = proto
        self.pool = pool
        self.real = transport
        self.fd = fd
        self.real_state = proto.state
        self.real_loop = proto.loop
        self.real_metrics = proto.metrics
        factory: Any = proto.state.cycle_factory
        app, _, root_path = factory.args  # (WSGICycle.bind's partial)
        leased: Any = self  # (as the cycle's pool: see submit, to_loop and the rest)
        self.state = LeaseState(proto.state, functools.partial(LeasedCycle, app, leased,
                                                               root_path))
        self.pending: list[bytes] = []  # written, not taken by the socket: for the loop
        self.ending = False  # hand the connection back as soon as the thread can
        self.closing = self.aborting = self.eof = False
        self.deferred: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.merged_at = time.monotonic()
        # what WSGICycle.run asks of its pool (a leased call is judged by no one: it
        # is not on the loop, and its thread's clocks include its client's waits)
        self.size = pool.size
        self.always = False
        self.lease = False  # (a leased call grants no lease)
        self.look_due = math.inf
        self.strikes: dict[bytes, int] = {}

    # -- the transport (the lease's thread) ----------------------------------------------
    def write(self, data: bytes) -> None:
        if self.aborting or self.closing or self.eof:
            return
        if self.pending:
            self.pending.append(bytes(data))
            return
        if _GIL:
            sent = _send(self.fd, data, len(data), _DONTWAIT | _NOSIGNAL)
            if sent < 0:
                if _ctypes.get_errno() != 11:
                    self.aborting = self.ending = True
                    return
                sent = 0
        else:
          try:
            sent = os.write(self.fd, data)
          except BlockingIOError:
            sent = 0
          except OSError:  # (the client went: the loop's close tells the protocol)
            self.aborting = self.ending = True
            return
        if sent < len(data):  # the client is not taking it: the loop writes the rest
            self.pending.append(bytes(data[sent:]))
            self.ending = True

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.pending))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        pass  # (the socket is read only by this thread; the protocol's flag says the rest)

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True  # (TCP and unix stream sockets: a TLS connection is never leased)

    def write_eof(self) -> None:
        self.eof = self.ending = True

    def close(self) -> None:
        self.closing = self.ending = True

    def abort(self) -> None:
        self.aborting = self.ending = True

    def is_closing(self) -> bool:
        return self.closing or self.aborting

    # -- the loop (the lease's thread) ---------------------------------------------------
    @staticmethod
    def time() -> float:
        return time.monotonic()  # (uvloop's clock: CLOCK_MONOTONIC in milliseconds)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.deferred.append((self.real_loop.call_soon, (callback, *args)))
        self.ending = True

    # -- the pool, as a leased call sees it (the lease's thread) -------------------------
    def submit(self, fn: Callable[..., None], arg: Any) -> None:
        """A call that cannot run here (it needs the loop): submitted by the loop once
        the connection is back."""
        cycle = getattr(fn, "__self__", None)
        if cycle is not None:  # (from now on the call is an ordinary threaded one)
            cycle.pool = self.pool
        self.deferred.append((self.pool.submit, (fn, arg)))
        self.ending = True

    def to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        self.pool.to_loop(fn, *args)

    def inline_took(self, route: bytes, seconds: float) -> None:
        pass

    def threaded_took(self, route: bytes, wall: float, cpu: float, judged: bool = True
                      ) -> None:
        pass

    # -- the lease's thread ---------------------------------------------------------------
    def serve(self, _: Any = None) -> None:
        if os.environ.get("FORKD_LEASE_BLOCKING"):
            self.serve_blocking()
            return
        if os.environ.get("FORKD_LEASE_GIL"):
            self.serve_gil()
            return
        proto = self.proto
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not os.environ.get("FORKD_LEASE_NOWAKE"):
            poller.register(self.pool.wake_fd, select.POLLIN)
        try:
            while (self.open() or DBG.update(["notopen"])) and self.wait(poller):
                try:
                    data = os.read(self.fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    break  # (a reset: the loop's read sees the connection end)
                if not data:
                    break  # the client's FIN: the loop reads it too, and closes
                proto.data_received(data)
                DBG["served"] += 1
                if not proto.heads and time.monotonic() - self.merged_at >= MERGE_EVERY:
                    self.hand_counters()
        except BaseException as exc:  # (a bug of ours: the connection is cut, not lost)
            log.error("error serving a leased connection: it is cut", exc_info=exc)
            self.aborting = True
        finally:
            self.pool.to_loop(self.end)

    def serve_gil(self) -> None:
        """EXPERIMENT: socket reads and writes that keep the GIL (non-blocking, through
        ctypes.PyDLL); only the wait for the client's bytes releases it."""
        proto = self.proto
        pool = self.pool
        state = self.real_state
        fd = self.fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        buf = _ctypes.create_string_buffer(READ_SIZE)
        try:
            while self.open() and not state.draining and pool.idle >= 0:
                got = _recv(fd, buf, READ_SIZE, _DONTWAIT)
                if got < 0:
                    if _ctypes.get_errno() not in (11,):
                        break
                    if not poller.poll(WAIT * 1000):
                        DBG["w:timeout"] += 1
                        break
                    continue
                if got == 0:
                    break
                proto.data_received(buf.raw[:got])
                DBG["served"] += 1
                if not proto.heads and time.monotonic() - self.merged_at >= MERGE_EVERY:
                    self.hand_counters()
        except BaseException as exc:  # (a bug of ours: the connection is cut, not lost)
            log.error("error serving a leased connection: it is cut", exc_info=exc)
            self.aborting = True
        finally:
            self.pool.to_loop(self.end)

    def serve_blocking(self) -> None:
        proto = self.proto
        pool = self.pool
        state = self.real_state
        fd = self.fd
        sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)  # (a dup: options only)
        usec = int(WAIT * 1e6)
        timeout = struct.pack("ll", usec // 1000000, usec % 1000000)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            os.set_blocking(fd, True)
            while self.open() and not state.draining and pool.idle >= 0:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    DBG["w:timeout"] += 1
                    break
                except OSError:
                    break  # (a reset: the loop's read sees the connection end)
                if not data:
                    break  # the client's FIN: the loop reads it too, and closes
                proto.data_received(data)
                DBG["served"] += 1
                if not proto.heads and time.monotonic() - self.merged_at >= MERGE_EVERY:
                    self.hand_counters()
            else:
                DBG["w:pool"] += 1
        except BaseException as exc:  # (a bug of ours: the connection is cut, not lost)
            log.error("error serving a leased connection: it is cut", exc_info=exc)
            self.aborting = True
        finally:
            try:
                os.set_blocking(fd, False)
                zero = struct.pack("ll", 0, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, zero)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, zero)
            except OSError:
                pass
            sock.close()
            self.pool.to_loop(self.end)

    def open(self) -> bool:
        """The connection is idle and clean, as when it was granted: its next request
        may be read here."""
        proto = self.proto
        return not (self.ending or proto.cycle is not None or proto.pipeline
                    or proto.parsing is not None or proto.head_open or proto.read_paused
                    or proto.linger_until is not None or proto.pending_error is not None
                    or proto.unparsed is not None or proto.awaiting_drain
                    or proto.upgrade is not None or proto.out)

    def wait(self, poller: select.poll) -> bool:
        """Wait for the client's next bytes, WAIT at most, while the worker is not
        draining and no call waits for a thread: for each call that waits, the pool
        wakes one lease (WSGIPool.submit), which gives its connection back and takes
        the call."""
        pool = self.pool
        state = self.real_state
        deadline = time.monotonic() + WAIT
        while not state.draining:
            got = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not got:
                DBG["w:timeout"] += 1
                return False
            for fd, _ in got:
                if fd != self.fd:  # the pool's wake-up: one lease ends per waiting call
                    try:
                        os.eventfd_read(pool.wake_fd)
                    except BlockingIOError:  # (another lease took it)
                        continue
                    DBG["w:woken"] += 1
                    return False
            if any(fd == self.fd for fd, _ in got):
                return not state.draining
        return False

    def hand_counters(self) -> None:
        """(between requests) The lease's counts so far, to the loop."""
        proto = self.proto
        metrics, proto.metrics = proto.metrics, RequestCounters()
        state = self.state
        requests, state.requests = state.requests, 0
        calls, state.calls = state.calls, 0
        self.merged_at = time.monotonic()
        self.pool.to_loop(self.merge, metrics, requests, calls)

    # -- the loop's thread ---------------------------------------------------------------
    def merge(self, part: RequestCounters, requests: int, calls: int) -> None:
        state = self.real_state
        state.requests += requests
        state.calls += calls
        metrics = self.real_metrics
        answered = metrics.answered
        for key, count in part.answered.items():
            answered[key] = answered.get(key, 0) + count
        buckets = metrics.buckets
        for index, count in enumerate(part.buckets):
            if count:
                buckets[index] += count
        metrics.duration_sum += part.duration_sum
        now = self.real_loop.time()
        for _ in range(part.in_flight):  # (heads parsed here, answered by the loop)
            metrics.begin(now)

    def end(self) -> None:
        """The connection is back: the protocol as it was, the lease's counts merged,
        what it noted done."""
        proto = self.proto
        state = self.state
        self.merge(proto.metrics, state.requests, state.calls)
        proto.transport = self.real
        proto.state = self.real_state
        proto.loop = self.real_loop
        proto.metrics = self.real_metrics
        proto.leased = False
        self.pool.leases -= 1
        self.real_metrics.end(self.real_loop.time())  # (the lease's own, see grant)
        transport = self.real
        if self.pending:
            data = b"".join(self.pending)
            self.pending = []
            if proto.write_paused:
                proto.sent += len(data)
            transport.write(data)
        if self.aborting:
            transport.abort()
        elif self.closing:
            transport.close()
        else:
            if self.eof:
                transport.write_eof()
            if not proto.read_paused and not proto.closed:
                transport.resume_reading()
        if self.real_state.draining:
            proto.drain()
        for fn, args in self.deferred:
            fn(*args)
        self.deferred = []


def grant(proto: HttpProtocol, pool: WSGIPool) -> None:
    """(loop thread, after a threaded call's answer) Lend the connection to a pool
    thread if it is idle and clean and the pool has a thread to spare."""
    state = proto.state
    transport = proto.transport
    DBG["grant?"] += 1
    if DBG["grant?"] % 2000 == 0 and os.environ.get("FORKD_LEASE_DEBUG"):
        import sys as _s
        _s.stderr.write(f"LEASE {os.getpid()} {dict(DBG)} idle={pool.idle} threads={len(pool.threads)} limit={pool.limit}\n")
    if pool.idle <= 0:
        DBG["noidle"] += 1
    if ((pool.idle <= 0 and len(pool.threads) >= pool.size) or pool.leases >= _MAXL or proto.leased or transport is None or proto.cycle is not None
            or proto.pipeline or proto.parsing is not None or proto.closed
            or proto.linger_until is not None or proto.pending_error is not None
            or proto.unparsed is not None or proto.awaiting_drain or proto.write_paused
            or proto.read_paused or proto.fin_held or proto.head_open or proto.body_parts
            or proto.flush_scheduled or proto.feed_scheduled or proto.out
            or proto.upgrade is not None or proto.scheme != "http" or not proto.at_boundary
            or state.draining or state.request_limit or state.limit_concurrency
            or transport.get_write_buffer_size()):
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    lease = Lease(proto, pool, transport, sock.fileno())
    DBG["granted"] += 1
    transport.pause_reading()  # (the protocol's read_paused stays: what it wants)
    proto.leased = True
    proto.transport = lease  # type: ignore[assignment]
    proto.loop = lease  # type: ignore[assignment]
    proto.state = lease.state  # type: ignore[assignment]
    proto.metrics = RequestCounters()
    pool.leases += 1
    lease.real_metrics.begin(lease.real_loop.time())  # (ended by Lease.end)
    pool.submit(lease.serve, None)


# DEBUG (temporary)
import collections as _c  # noqa: E402
import sys as _sys  # noqa: E402
import threading as _t  # noqa: E402

DBG: _c.Counter[str] = _c.Counter()
if os.environ.get("FORKD_LEASE_DEBUG"):
    def _dump() -> None:
        while True:
            time.sleep(2)
            _sys.stderr.write(f"LEASE {os.getpid()} {dict(DBG)}\n")
    _t.Thread(target=_dump, daemon=True).start()
