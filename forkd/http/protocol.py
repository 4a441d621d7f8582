"""One HttpProtocol per connection: it owns the transport and httptools' parser
callbacks, queues pipelined requests, enforces the limits on hostile input, and
hands each request to a cycle object (asgi.ASGICycle or wsgi.WSGICycle)."""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import ipaddress
import logging
import re
import resource
import socket
import struct
import sys
import termios
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Protocol

import httptools

from forkd.config import Config
from forkd.http import accesslog
from forkd.http.balance import Balancer
from forkd.http.framing import status_line
from forkd.http.health import DRAINING, READY, HealthFlag
from forkd.http.proxy import (
    PROXY_HEADERS,
    ProxyHeaderError,
    TrustedPeers,
    parse_proxy_header,
    resolve_forwarded,
)
from forkd.metrics.counters import RequestCounters
from forkd.metrics.snapshot import BOUNDS

log = logging.getLogger("forkd.http")

HIGH_WATER = 64 * 1024  # buffered request body above which reading pauses
# Bytes handed to the parser at once when a read is larger: between slices the pipeline
# is checked, so a burst of tiny pipelined requests is never parsed into more than
# about MAX_PIPELINE + one slice's worth of request objects (the rest stays raw bytes,
# which are far smaller than the objects they would become).
FEED_SLICE = 4096
MAX_PIPELINE = 16  # requests parsed ahead of the one being answered
# Responses held back to go out in one write (one send() for a batch of pipelined
# requests), at most: past it they go out at once, so the transport's back-pressure
# (pause_writing) still reaches a response that is large or an app that streams.
OUT_LIMIT = 64 * 1024
# Pipelined ASGI requests a worker runs per pass of the loop in the task of the request
# before them (forkd.http.asgi), at most: past it, such a task runs its next request on
# the next pass, so a pass stays short however many connections pipeline. A long pass
# delays everything else, and uvloop accepts new connections only between passes.
# (A count, not a time: a worker descheduled on a busy machine would find any time
# slice spent at once.)
CHAIN_BUDGET = 128
RATE_WINDOW = 5.0  # seconds over which a request body's data rate is judged
# What a chunked body's framing may add on top of --max-body-size on the wire: a fair
# client's chunks cost a few bytes each; one-byte chunks cost six times the body.
CHUNK_OVERHEAD = 64 * 1024
# RFC 9112 7: the codings a request may name; forkd decodes only chunked, the others
# are known (400 where they break framing, else 501), anything else is 501 at once.
KNOWN_CODINGS = frozenset((b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress",
                           b"x-compress"))
LINGER_SECONDS = 2.0  # how long a closing connection reads and drops the client's leftovers
FD_MARGIN = 32  # descriptors a worker keeps besides its connections (listeners, pipes, app)
LOG_EVERY = 10.0  # seconds between summary lines of counted events (408s)
# SIOCOUTQ (Linux: the same number as TIOCOUTQ): a socket's bytes not yet acknowledged
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
# SO_LINGER on, 0 s: the close resets the connection and the kernel drops what it still
# holds for the client (see HttpProtocol.cut_reader)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# A unix stream socket's SIOCOUTQ counts whole kernel buffers (skbs, up to some 37 KB of
# data each) until its reader has taken all of one, and wakes the writer only when three
# quarters of its send buffer are free: what a client took shows in steps up to this large
# (HttpProtocol.send_grain), however steadily it reads
UNIX_GRAIN = 64 * 1024
# The rate at which a unix-socket client is expected to show one UNIX_GRAIN when
# --min-body-rate is 0 (send_stall): Kestrel's default floor
UNSET_RATE = 240
# HttpProtocol.write_seen before the first look (sent - unsent may be below 0: see sent)
UNSEEN = -(1 << 62)
DRAIN_IDLE_GRACE = 1.0  # how long a drained worker waits for the next request on an idle connection


# RFC 9112 3.2 / RFC 3986 3.2: uri-host [":" port]; the host is a reg-name, an IPv4
# address or a bracketed IP literal. An empty Host is valid (a URI without authority).
_HOST = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_AUTHORITY = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+):[0-9]+")
# the usual methods' names as str, made once (a decode per request costs more than a
# lookup, and the method's hash is needed for the metrics anyway)
METHOD_NAMES = {name.encode(): name for name in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")}
# Request fields on_headers_complete looks at besides Host (HttpProtocol.check_fields)
SPECIAL_FIELDS = frozenset((b"content-length", b"content-type", b"transfer-encoding",
                            b"connection", b"proxy-connection")) | PROXY_HEADERS
# RFC 9110 6.5.1: fields a sender must not put in a trailer because they frame, route,
# authenticate or modify the request; a trailer is never merged into the headers anyway,
# but one of these in it is a request built to be misread by someone: refused.
FORBIDDEN_TRAILERS = frozenset((
    b"host", b"content-length", b"transfer-encoding", b"content-type", b"content-encoding",
    b"content-range", b"trailer", b"te", b"connection", b"keep-alive", b"upgrade",
    b"expect", b"range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"if-range", b"max-forwards", b"cache-control", b"pragma",
    b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"www-authenticate",
    b"proxy-authenticate", b"age", b"expires", b"date", b"location", b"retry-after", b"vary",
    b"warning", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
))


_valid_hosts: set[bytes] = set()  # Host values seen valid (bounded): the same few repeat


def valid_authority(value: bytes, port_required: bool = False) -> bool:
    """A Host value (or, with `port_required`, CONNECT's authority-form target)."""
    if not port_required:
        if value in _valid_hosts:
            return True
        if _check_authority(value, False):
            if len(_valid_hosts) < 256:
                _valid_hosts.add(value)
            return True
        return False
    return _check_authority(value, True)


def _check_authority(value: bytes, port_required: bool) -> bool:
    match = (_AUTHORITY if port_required else _HOST).fullmatch(value)
    if match is None:
        return False
    literal = match.group(1)
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    return True


class ClientDisconnected(OSError):
    """Raised by ASGI send() (and a WSGI write) once the client has gone (ASGI 2.4)."""


class ConnectionClosing(Exception):
    """Raised in a parser callback to stop parsing: the connection is closing."""


class RequestError(Exception):
    """A request that must be refused with `status` before it reaches the app."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Cycle(Protocol):
    """What the protocol needs of one request/response cycle."""

    def start(self) -> None: ...
    def feed_body(self, body: bytes) -> None: ...
    def body_complete(self) -> None: ...
    def disconnect(self, replaced: bool = False) -> None:
        """The client went, or (`replaced`) a refusal of forkd's answers in the app's
        place, with its own access line (reject): the app's answer is never sent."""
    def body_buffered(self) -> int: ...


CycleFactory = Callable[..., Cycle]


class CountedEvents:
    """Events counted, not logged one by one (a slowloris would write thousands of
    lines): ServerState.tick logs a summary at most once per LOG_EVERY."""

    __slots__ = ("count", "logged", "log_at")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.logged = 0  # the count at the last summary
        self.log_at = now  # the next summary's earliest time

    def due(self, now: float) -> int:
        """How many came since the last summary, if one is due now (else 0)."""
        if self.count == self.logged or now < self.log_at:
            return 0
        more = self.count - self.logged
        self.logged = self.count
        self.log_at = now + LOG_EVERY
        return more


class ServerState:
    """What every connection of one worker shares: the app, the limits, a coarse
    clock and the Date header (both refreshed by `tick`), and the counters the
    heartbeat reports."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.connections: set[Any] = set()  # HttpProtocol, or what an upgrade turned it into
        self.websockets: set[Any] = set()  # open WebSockets (forkd.http.websocket), also above
        # ASGI only: (protocol, method, target, headers, version) -> an object with
        # take_over(leftover), or None to answer the upgrade request as plain HTTP
        self.upgrade_factory: Callable[..., Any] | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # the loop keeps tasks only weakly
        self.requests = 0
        self.request_limit = 0  # --max-requests: on_limit runs as this request starts
        self.on_limit: Callable[[], None] | None = None
        self.calls = 0  # WSGI calls still running in the pool (close() included)
        self.draining = False
        self.drain_started = 0.0
        self.now = loop.time()
        self.date_header = b""
        self.cycle_factory: CycleFactory | None = None
        self.access_log = config.access_log
        self.trusted = TrustedPeers(config.forwarded_allow_ips)
        self.health_path = config.health_path.encode() if config.health_path else None
        self.health_flag: HealthFlag | None = None
        self.balance: Balancer | None = None  # set by the worker (forkd.http.balance)
        self.limit_concurrency = config.limit_concurrency
        self.metrics = RequestCounters()  # read by the heartbeat; see metrics/counters.py
        # 408s, and connections cut for a client that takes its answers too slowly
        # (HttpProtocol.cut_reader). (One attribute each: this object is near CPython
        # 3.11's limit of 30 keys for instances that share them; past it every lookup
        # of an attribute, several per request, costs more: ~200 instructions per
        # ASGI hello.)
        started = self.loop.time()
        self.timeouts = CountedEvents(started)
        self.slow_cuts = CountedEvents(started)
        # libuv handles EMFILE on accept by itself (it accepts and closes, so the client
        # sees a reset) and tells nobody: the worker watches its own count instead
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_full_at = started
        self.chain_budget = CHAIN_BUDGET  # what is left of it in this pass
        self.chain_counted = False  # a pass with chained requests: reset on the next
        self.tick()

    def may_chain(self) -> bool:
        """May a pipelined ASGI request run now in the task of the one before it?"""
        if not self.chain_counted:
            self.chain_counted = True
            self.loop.call_soon(self._next_pass)
        self.chain_budget -= 1
        return self.chain_budget >= 0

    def _next_pass(self) -> None:
        self.chain_counted = False
        self.chain_budget = CHAIN_BUDGET

    def tick(self) -> None:
        self.now = self.loop.time()
        self.date_header = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
        for connection in list(self.connections):
            try:
                connection.check_timeouts(self.now)
            except Exception:
                # (a bug of ours must not stop the worker's heartbeat, which calls this:
                # the primary would kill the worker and every connection with it)
                log.exception("error checking a connection's timeouts: it is cut")
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
        if (len(self.connections) >= self.fd_limit - FD_MARGIN
                and self.now >= self.fd_full_at):
            log.warning("at the open files limit (%d): %d connections open, new ones are "
                        "refused by the kernel or reset", self.fd_limit,
                        len(self.connections))
            self.fd_full_at = self.now + LOG_EVERY
        more = self.timeouts.due(self.now)
        if more:
            log.info("answered %d more request(s) 408 (timed out): %d since start", more,
                     self.timeouts.count)
        more = self.slow_cuts.due(self.now)
        if more:
            log.info("cut %d more connection(s) whose client took its answer too slowly "
                     "(nothing for --header-timeout, or under --min-body-rate): %d since "
                     "start", more, self.slow_cuts.count)

    def in_progress(self) -> int:
        """Requests being served: ASGI requests' tasks and WSGI calls."""
        return len(self.tasks) + self.calls

    def healthy(self) -> bool:
        flag = self.health_flag
        return not self.draining and (flag is None or not flag.failing)

    def busy(self) -> bool:
        """Something of ours is still running: a connection, a WSGI call, or an ASGI
        request's task (which includes what the app does after its response, such as
        Starlette's BackgroundTasks)."""
        return bool(self.connections or self.calls or self.tasks)

    async def cancel_tasks(self, grace: float) -> None:
        """At the drain's deadline: cancel the requests' tasks and give their cleanup
        (`finally` blocks) up to `grace` seconds, instead of dropping them unrun."""
        tasks = list(self.tasks)
        if not tasks:
            return
        log.warning("graceful timeout: cancelling %d request task(s)", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=grace)
        # (a task cancelled before its first step never ran the code that takes it out)
        self.tasks.difference_update(task for task in tasks if task.done())

    def start_drain(self) -> None:
        self.draining = True
        self.drain_started = self.now = self.loop.time()
        for connection in list(self.connections):
            connection.drain()


def error_answer(status: int, message: str, date_header: bytes, extra: bytes = b""
                 ) -> tuple[bytes, int]:
    """A plain-text answer forkd gives itself, which closes the connection, and its
    body's size (the access line's bytes)."""
    body = message.encode("utf-8", "replace") + b"\n"
    return b"".join(
        (
            status_line(status),
            date_header,
            extra,
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    ), len(body)


class FixedCycle:
    """A response forkd gives itself (--health-path, --limit-concurrency's 503): it takes
    its turn among pipelined requests like any other and never reaches the app. With
    `line` (accesslog.refused's) it is access-logged, with its request id sent back."""

    def __init__(self, proto: HttpProtocol, status: int, body: bytes, keep_alive: bool,
                 extra: bytes = b"", line: accesslog.Refused | None = None) -> None:
        self.proto = proto
        self.status = status
        self.body = body
        self.keep_alive = keep_alive
        self.line = line
        self.extra = extra if line is None else extra + accesslog.id_field(line[0])

    @property
    def access(self) -> tuple[bytes, bytes, bytes, float] | None:
        """begin's fields of its request, as any cycle's (HttpProtocol.refused_line)."""
        return None if self.line is None else self.line[0]

    def start(self) -> None:
        proto = self.proto
        keep_alive = self.keep_alive and not proto.state.draining
        proto.write(b"".join((
            status_line(self.status), proto.state.date_header, self.extra,
            b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n",
            b"content-length: %d\r\n" % len(self.body),
            b"\r\n" if keep_alive else b"connection: close\r\n\r\n",
            self.body,
        )))
        if self.line is not None:
            accesslog.ended(self.line[0], self.status, len(self.body), *self.line[1:])
        proto.response_done(self, keep_alive and proto.parsing is not self)

    def feed_body(self, body: bytes) -> None:
        pass

    def body_complete(self) -> None:
        pass

    def disconnect(self, replaced: bool = False) -> None:
        pass

    def body_buffered(self) -> int:
        return 0


class HealthCycle(FixedCycle):
    """--health-path: the state is read when its turn comes, not when it was parsed."""

    def start(self) -> None:
        if not self.proto.state.healthy():
            self.status, self.body = 503, DRAINING
        super().start()


class HttpProtocol(asyncio.Protocol):
    # Slots: an instance's attributes in a dict of its own (over 30 of them, past what
    # 3.11 keeps inline) made every method call on it unspecialised and each attribute
    # a dict lookup: about 3,600 instructions of a hello request (bench/profiles). The
    # `__dict__` slot keeps any other attribute working, only slower: add new ones here
    # (tests/unit/test_protocol_slots.py says which are missing).
    __slots__ = (
        "__dict__", "__weakref__",
        "asgi_base", "at_boundary", "awaiting_drain", "blank_bytes", "body_activity", "body_length",
        "body_parts", "body_received", "chain_scheduled", "chained", "chunked", "client",
        "closed", "context", "corked", "cycle", "drain_waiter", "ending", "feed_scheduled",
        "fin_held",
        "flush_scheduled", "head_open", "head_size", "headers", "heads", "idle_since",
        "in_trailers", "limit_field", "limit_fields", "limit_head", "limit_line",
        "limit_line_open", "line_bytes", "linger_until", "loop", "max_body", "metrics",
        "min_rate", "out", "out_complete", "out_size", "parser", "parsing", "peer_trusted",
        "pending_error", "pipeline", "queued_cycle", "rate_bytes", "rate_since", "read_paused",
        "req_client", "req_scheme", "request_started", "response_begun", "response_status",
        "scheme", "send_since", "send_taken", "server", "state", "task_unstarted", "trailers",
        "transport", "unparsed",
        "upgrade", "url", "wire_body", "wire_limit", "write_paused", "write_paused_at",
        "write_seen", "send_grain", "sent",
        "wsgi_base",
    )  # fmt: skip

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = state.loop
        config = state.config
        self.limit_line = config.limit_request_line
        self.limit_fields = config.limit_request_fields
        self.limit_field = config.limit_request_field_size
        self.max_body = config.max_body_size
        # limits checked after each slice fed while a head (or a trailer section) is
        # unfinished: llhttp buffers an unfinished field whole, so they must hold as the
        # bytes arrive. The slack of one slice covers where in it the head began.
        self.limit_line_open = max(self.limit_line + 32, self.limit_field) + FEED_SLICE
        self.limit_head = (self.limit_line + self.limit_fields * (self.limit_field + 2)
                           + FEED_SLICE)
        self.wire_limit = self.max_body + max(CHUNK_OVERHEAD, self.max_body >> 3)
        self.min_rate = config.min_body_rate
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.peer_trusted = False  # the peer is in --forwarded-allow-ips
        # the client and scheme of the request being parsed, once a trusted proxy's
        # headers are applied; cycles read them when they are made
        self.req_client: tuple[str, int] | None = None
        self.req_scheme = "http"
        self.body_activity = 0.0  # when the request being parsed last sent body bytes
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.cycle: Cycle | None = None  # the cycle whose response is being produced
        self.parsing: Cycle | None = None  # the cycle whose body the parser is reading
        self.pipeline: deque[Cycle] = deque()
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.request_started: float | None = None
        self.idle_since: float | None = None
        self.linger_until: float | None = None
        # a refusal owed after the answers before it: (status, message, its access line)
        self.pending_error: tuple[int, str, accesslog.Refused | None] | None = None
        self.body_received = 0  # body bytes of the request being parsed, for --max-body-size
        self.body_length = 0  # its Content-Length
        self.response_begun = False  # bytes of the current cycle's final response are out
        self.closed = False
        self.in_trailers = False  # the parser is past this request's head
        self.at_boundary = True  # the next bytes start a new request
        self.blank_bytes = 0  # CR/LF seen before the request line
        self.trailers = 0
        self.metrics = state.metrics
        # (start time, method) of each request parsed and not yet answered, in order
        self.heads: deque[tuple[float, bytes]] = deque()
        self.response_status = b"000"  # the current response's code, from its status line
        self.upgrade: Any = None  # a WebSocket taking the connection over after this head
        self.head_open = False  # a head or trailer section is being parsed
        self.head_size = 0  # bytes of its complete field lines
        self.line_bytes = 0  # bytes of its unfinished line
        self.body_parts: list[bytes] = []  # body bytes of one slice, handed over at once
        self.chunked = False
        self.wire_body = 0  # bytes on the wire of a chunked body, framing included
        self.rate_since = 0.0  # the start of the body's data-rate window
        self.rate_bytes = 0  # body bytes received before that window
        self.unparsed: bytes | None = None  # raw bytes held while the pipeline is full
        self.feed_scheduled = False
        self.awaiting_drain = False  # the next request waits for the client to read
        self.fin_held = False  # a FIN read behind queued requests: closes after them
        self.queued_cycle: Cycle | None = None  # the last of them, read on for (above)
        self.write_paused_at = 0.0  # when the client last took bytes (see unsent_now)
        self.write_seen = 0  # what the client had taken then (sent - unsent, or UNSEEN)
        self.sent = 0  # bytes given to the transport while writing was paused (what was
        # taken since the pause: sent - unsent(), less the same at the pause. An add per
        # write costs an int's allocation: ~370 instructions per ASGI hello, this ~10)
        self.send_since = 0.0  # the start of the answers' send-rate window (send_too_slow)
        self.send_taken = 0  # bytes the client took in it
        self.send_grain = 0  # what it took that the socket may not show yet (UNIX_GRAIN)
        # Responses written while more are due at once (inside data_received, or while
        # pipelined requests wait behind the one answered) are held here and go out in
        # one transport write: at the end of the read, with the last response queued,
        # past OUT_LIMIT, or at the latest on the loop's next pass (flush_soon).
        self.out: list[bytes] = []
        self.out_size = 0
        self.out_complete = 0  # held parts before the current answer's first one
        self.corked = False  # inside data_received
        self.flush_scheduled = False
        # ASGI: a request's task is made, or waits for the next pass, while a flush_soon
        # is queued before it (see flush_soon); that flush_soon clears it
        self.task_unstarted = False
        # ASGI (forkd.http.asgi): a request started while the app before it ends its
        # response, which the task of that app runs once the app returns
        self.ending = False
        self.chained: Any = None
        self.context = contextvars.Context()
        self.chain_scheduled = False
        # WSGI (forkd.http.wsgi): this connection's environ keys that do not change per
        # request, kept with the client and scheme they were made for
        self.wsgi_base: Any = None
        # ASGI (forkd.http.asgi): this connection's scope, which each request's copies
        self.asgi_base: dict[str, Any] | None = None

    # -- connection events ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        # what a request's task starts from (a copy of it: the context of the loop's
        # callbacks); a chained ASGI request gets a copy of this one
        self.context = contextvars.copy_context()
        connections = self.state.connections
        connections.add(self)
        if self.state.balance is not None:  # (forkd.http.balance: no more than our share)
            self.state.balance.opened(len(connections))
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        if isinstance(sockname, tuple):
            self.server = (str(sockname[0]), int(sockname[1]))
        else:
            self.server = (str(sockname or ""), None)
        if isinstance(peername, tuple):
            self.client = (str(peername[0]), int(peername[1]))
            self.peer_trusted = self.state.trusted.trusts(self.client[0])
        else:  # a unix socket: only local processes with the socket's permissions reach
            # it, so its peer is trusted as loopback is (nginx in front, on the same host)
            self.peer_trusted = self.state.trusted.trusts("127.0.0.1")
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                self.send_grain = UNIX_GRAIN  # (see send_stall)
        if transport.get_extra_info("ssl_object") is not None:  # a --certfile listener
            self.scheme = "https"
        self.idle_since = self.state.now
        if self.state.draining:
            self.idle_since = None
            self.request_started = self.state.now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.out.clear()
        self.state.connections.discard(self)
        if self.state.balance is not None:
            self.state.balance.closed(len(self.state.connections))
        if self.heads:  # requests that will never be answered leave the in-flight set
            self._abandon(self.loop.time())
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.disconnect()
        self.pipeline.clear()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.linger_until is not None or self.pending_error is not None:
            return  # a closing connection: drop what the client still sends
        if self.unparsed is not None:  # the pipeline is full: keep the bytes raw
            self.unparsed += data
            return
        if self.at_boundary and data[0] in (13, 10):  # CR, LF
            # RFC 9112 2.2 asks a server to skip one empty line before a request (after a
            # body some old clients add one); llhttp skips any number: more is refused.
            self.blank_bytes += len(data) - len(data.lstrip(b"\r\n"))
            if self.blank_bytes > 2:
                self.reject(400, "Bad Request: empty lines before the request line")
                return
        # what the requests of this read are answered with at once (a WSGI call run
        # inline, --health-path, refusals) goes out in one write at its end
        self.corked = True
        try:
            if len(data) > FEED_SLICE:
                self.feed_sliced(data)
            else:  # (feed, inline: once per read)
                try:
                    self.parser.feed_data(data)
                except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
                    if self.parse_failed(exc, data, None, 0):
                        self.after_feed(data)
                else:  # (after_feed's three cases, tested here first: most reads,
                    # whole bodiless requests, have none of them. Keep the two alike.)
                    if self.body_parts or self.head_open or self.chunked:
                        self.after_feed(data)
        finally:
            self.corked = False
            if self.out:
                self.flush()

    def feed_sliced(self, data: bytes) -> None:
        view = memoryview(data)
        start = 0
        while start < len(data):
            if len(self.pipeline) >= MAX_PIPELINE:
                self.unparsed = data[start:]
                self.pause_reading()
                return
            step = FEED_SLICE
            if self.parsing is not None and not self.chunked:
                # the rest of a sized body goes in at once: nothing in it can start a request
                step = max(step, self.body_length - self.body_received)
            if not self.feed(view[start:start + step], data, start):
                return
            start += step

    def feed(self, data: bytes | memoryview, whole: bytes | None = None, at: int = 0
             ) -> bool:
        """Parse bytes (a slice of `whole` from `at`, when sliced); False once the
        connection refuses more (an error answered) or is handed over (an upgrade)."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            if not self.parse_failed(exc, data, whole, at):
                return False
        return self.after_feed(data)

    def parse_failed(self, exc: Exception, data: bytes | memoryview, whole: bytes | None,
                     at: int) -> bool:
        """The parser stopped with `exc`: True if parsing goes on (an upgrade that was
        not performed), else the connection refuses more or is handed over."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self.upgrade is not None:  # a WebSocket: hand it the connection, and
                upgrade, self.upgrade = self.upgrade, None  # the rest of the read
                self.flush()  # (the answers before it first: it writes to the transport)
                rest = data[exc.args[0]:] if whole is None else whole[at + exc.args[0]:]
                upgrade.take_over(bytes(rest))
                return False
            return True  # no protocol switch: the app answered the request as plain HTTP
        if isinstance(exc, httptools.HttpParserCallbackError):
            if self.linger_until is not None:
                return False  # closed by an answer given inside the parse (on_message_begin)
            cause = exc.__context__
            if isinstance(cause, RequestError):
                self.reject(cause.status, cause.reason)
            else:
                log.exception("error in the HTTP parser callback", exc_info=cause)
                self.reject(500, "Internal Server Error")
            return False
        self.reject(400, f"Bad Request: {exc}")
        return False

    def after_feed(self, data: bytes | memoryview) -> bool:
        """What a parsed slice leaves to do: its body bytes handed over, an unfinished
        head's limits, a chunked body's framing; False once the connection refuses more.
        (data_received calls it only if `body_parts or head_open or chunked`, its three
        cases: a case added here must be added there too.)"""
        if self.body_parts:
            self.flush_body()
        if self.head_open:
            return self.check_head(data)
        if self.chunked and self.parsing is not None:
            self.wire_body += len(data)
            if self.wire_body > self.wire_limit:
                self.reject(413, "Content Too Large: chunk framing")
                return False
        return self.linger_until is None and self.pending_error is None

    def check_head(self, data: bytes | memoryview) -> bool:
        """An unfinished head after a read: its open line and its whole size so far
        must be within the limits now, not when the line ends."""
        chunk = data if isinstance(data, bytes) else bytes(data)  # (a slice: small)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            line = len(chunk) - newline - 1
        else:
            line = self.line_bytes + len(data)
        self.line_bytes = line
        if line > self.limit_line_open:
            self.reject(431, "Request Header Fields Too Large")
            return False
        if len(self.url) + self.head_size + line > self.limit_head:
            self.reject(431, "Request Header Fields Too Large: the head is too large")
            return False
        return self.linger_until is None and self.pending_error is None

    def flush_body(self) -> None:
        """Hand the body bytes of one slice to the request at once: a body of tiny
        chunks wakes its app (or its WSGI reader) once per read, not once per chunk."""
        parts = self.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        cycle = self.parsing
        if cycle is None:
            return
        self.body_activity = self.loop.time()  # (exact: the coarse clock may be a tick old)
        cycle.feed_body(body)
        if cycle.body_buffered() > HIGH_WATER:
            self.pause_reading()

    def eof_received(self) -> bool | None:
        # A FIN cannot be told apart from a client that went away, and apps rely on
        # http.disconnect to stop work nobody waits for (as with uvicorn): close.
        # Unless requests read whole wait in the pipeline (`printf '...' | nc`): the
        # FIN came after them, and with reading paused for them (as a longer pipeline
        # still is) it would be read only once they are answered. So it is held: we
        # read no more (read_paused), and where reading would resume, we close.
        # The same for the last of them once it is answered: reading resumed for it
        # (its app reads its body) with its whole request read, so the FIN came after it.
        if ((self.pipeline or (self.cycle is not None and self.cycle is self.queued_cycle
                               and self.parsing is None))
                and self.linger_until is None and not self.closed
                and self.scheme != "https"):  # (TLS closes on a FIN whatever we return)
            self.fin_held = True
            self.read_paused = True  # (the transport reads nothing after a FIN either)
            return True  # half-open: the answers still go out
        self.queued_cycle = None
        if self.cycle is not None and self.response_begun:
            # the answer being written is cut (as abort does): its first part held here
            # would go out with a clean close after it, which makes a close-delimited
            # (HTTP/1.0) body look complete
            del self.out[self.out_complete:]
        self.flush()  # (whole answers held for a batch go out before the close)
        return None

    # -- write flow control -------------------------------------------------
    def pause_writing(self) -> None:
        if self.write_paused:  # (told again without a resume: the clocks run on)
            return
        self.write_paused = True
        self.send_paused()

    def send_paused(self) -> None:
        """Writing paused (once until send_resumed): the clocks judging what the client
        takes start from now."""
        # (check_timeouts judges the client's progress from now: the loop's clock, as
        # the coarse one may be a tick old.) The send-rate window goes on from the last
        # pause, less the time writing did not wait on the client (since resume_writing
        # set write_paused_at): else pauses shorter than the window, as a small socket
        # buffer makes them, would each restart it and the floor never be judged.
        now = self.loop.time()
        self.send_since += now - self.write_paused_at
        self.write_paused_at = now
        self.write_seen = self.sent - self.unsent()

    def unsent(self) -> int:
        """Bytes we wrote that the client has not taken yet: the transport's buffer and
        the socket's send queue (which the transport refills only once a third of it
        is free: megabytes on a fast link, so the buffer alone moves in large steps)."""
        transport = self.transport
        if transport is None:
            return 0
        size = transport.get_write_buffer_size()
        if _OUTQ is not None:
            try:  # (the lookup too: from tick(), an exception would stop the heartbeat)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    size += int.from_bytes(fcntl.ioctl(sock.fileno(), _OUTQ, bytes(4)),
                                           sys.byteorder)
            except Exception:  # (a transport closing under us: the buffer's size will do)
                pass
        return size

    def unsent_now(self, now: float) -> int:
        """`unsent`, and write_paused_at, when the client last took bytes: each time
        it has taken more than at the last look, that clock restarts, so a client that
        reads a large answer slowly, but reads, is not cut as one reading nothing.
        (What it took counts, not less unsent: more written meanwhile, as a WebSocket's
        send() does before it waits, would hide a client reading no faster than that.)"""
        size = self.unsent()
        taken = self.sent - size
        if taken > self.write_seen > UNSEEN:
            self.write_paused_at = now
            self.send_taken += taken - self.write_seen
        self.write_seen = taken
        return size

    def send_too_slow(self, now: float) -> bool:
        """The client takes our answers (while writing is paused: an answer being
        streamed, answers done and awaiting_drain, or the last one while lingering)
        at less than --min-body-rate, judged over RATE_WINDOW and never sooner than
        --header-timeout (so one taking nothing at all is still cut by that rule, no
        sooner): it must not hold the connection and megabytes of buffered answer for
        hours by taking one segment per --header-timeout, which that rule alone allows.
        The request body's floor serves the answers too (as Kestrel's
        MinResponseDataRate: 240 B/s); 0 turns both off. (On a unix socket what the
        client took may show up to send_grain late: so much is allowed for, and the
        window is judged only once it spans four grains at the floor (64 KiB at 240 B/s:
        ~18 minutes), so the allowance is at most a quarter of what the floor asks: a
        shorter one would pass a client taking nothing but that allowance each time.)"""
        window = now - self.send_since
        min_rate = self.min_rate
        if not min_rate or window < max(RATE_WINDOW, self.state.config.header_timeout,
                                        4 * self.send_grain / min_rate):
            return False
        if self.send_taken + self.send_grain < min_rate * window:
            return True
        self.send_since = now
        self.send_taken = 0
        return False

    def send_stall(self) -> float:
        """How long a client may seem to take none of what waits on it before it is
        cut: --header-timeout. A unix socket shows what its reader took only in steps
        of up to send_grain (UNIX_GRAIN): there, at least the time a reader at
        --min-body-rate needs for one (64 KiB at 240 B/s: 273 s); with the floor off (0),
        at Kestrel's 240 B/s: the floor's off for one reading slowly, not for one
        reading nothing, which would hold the app's task or thread (and a draining
        worker) for ever."""
        timeout = self.state.config.header_timeout
        if not self.send_grain:
            return timeout
        return max(timeout, self.send_grain / (self.min_rate or UNSET_RATE))

    def send_resumed(self) -> None:
        """Writing resumed: what the client took up to now counts in the send-rate
        window, which stands still until the next pause_writing."""
        now = self.loop.time()
        self.unsent_now(now)
        self.write_paused_at = now  # (for pause_writing)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_resumed()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        self.drain_waiter = None
        if self.awaiting_drain and self.cycle is None and not self.closed:
            self.awaiting_drain = False
            self.next_request()

    async def wait_writable(self) -> None:
        if self.write_paused and not self.closed:
            if self.drain_waiter is None:
                self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.pipeline and self.transport is not None:
            if self.unparsed is not None:  # parse what is held first (not from inside
                if not self.feed_scheduled:  # a parser callback: the loop runs it)
                    self.feed_scheduled = True
                    self.loop.call_soon(self.feed_unparsed)
                return
            if self.fin_held:  # the FIN read behind the queued requests
                if self.cycle is not None and self.parsing is None:
                    # its app reads its body (Django's always does), all of it read:
                    # its answer is still owed; response_done comes back here after it
                    return
                self.close_gracefully()  # (the answers held go out, then the close)
                return
            self.read_paused = False
            if not self.closed:
                # the client was not at fault while we paused: its body clocks restart
                now = self.loop.time()
                self.body_activity = self.rate_since = now
                self.rate_bytes = self.body_received
                if self.request_started is not None:
                    self.request_started = now
                self.transport.resume_reading()

    def feed_unparsed(self) -> None:
        self.feed_scheduled = False
        data = self.unparsed
        self.unparsed = None
        if data is None or self.closed or self.linger_until is not None:
            return
        self.feed_sliced(data)
        if self.unparsed is None and self.pending_error is None:
            self.resume_reading()

    # -- parser callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        if self.linger_until is not None:
            # an answer given during this read closed the connection (a WSGI call run
            # inline that said `connection: close`): what follows is never run
            raise ConnectionClosing
        self.head_open = True
        self.head_size = 0
        self.chunked = False
        self.at_boundary = False
        self.blank_bytes = 0
        self.in_trailers = False
        self.url = b""
        self.headers = []
        self.idle_since = None
        # the exact time, not the coarse clock (up to a tick old): a client gets its
        # whole --header-timeout, never less
        self.request_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limit_line:
            raise RequestError(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            self.on_trailer(name.lower(), len(name) + len(value) + 2)
            return
        headers = self.headers
        if len(headers) >= self.limit_fields:
            raise RequestError(431, "Request Header Fields Too Large: too many header fields")
        # the whole field line, `name: value` (llhttp has dropped the space after the colon)
        size = len(name) + len(value) + 2
        if size > self.limit_field:
            raise RequestError(431, "Request Header Fields Too Large")
        self.head_size += size + 2
        # llhttp drops the whitespace before a value but not after it (RFC 9112 5: not part of it)
        headers.append((name.lower(), value.rstrip(b" \t")))

    def on_trailer(self, name: bytes, size: int) -> None:
        """A trailer field: never merged into the headers (the app saw them already, and
        a proxy that checked the head did not check these)."""
        if name in FORBIDDEN_TRAILERS:
            raise RequestError(400, f"Bad Request: {name.decode('latin-1')} in a trailer")
        self.trailers += 1
        self.head_size += size + 2
        if size > self.limit_field:
            raise RequestError(431, "Request Header Fields Too Large: a trailer field")
        if self.trailers > self.limit_fields:
            raise RequestError(431, "Request Header Fields Too Large: too many trailer fields")

    def on_headers_complete(self) -> None:
        parser = self.parser
        alive = parser.should_keep_alive()
        # Of the versions llhttp parses (0.9, 1.0, 1.1, 2.0), it keeps a request without
        # a Connection field (nor a Proxy-Connection, which it reads as one) alive only if
        # it is HTTP/1.1: the usual request's version, known without get_http_version,
        # which formats a new string per call. (Asked below if there was such a field.)
        if alive:
            version = "1.1"
        else:
            version = parser.get_http_version()
            if version not in ("1.1", "1.0"):  # llhttp also parses HTTP/0.9 and HTTP/2.0 lines
                raise RequestError(505, "HTTP Version Not Supported")
        self.in_trailers = True
        self.head_open = False
        self.line_bytes = 0
        target = self.url
        method = parser.get_method()
        if target[:1] != b"/" or method == b"CONNECT":
            self.check_target(method, target)
        hosts = 0
        special = False  # a field that frames, routes or proxies the request
        headers = self.headers
        for name, value in headers:
            if name == b"host":
                hosts += 1  # (valid_authority's cache of valid values, looked at inline)
                if value not in _valid_hosts and not valid_authority(value):  # RFC 9112 3.2
                    raise RequestError(400, "Bad Request: invalid Host header")
            elif name in SPECIAL_FIELDS:  # (one set lookup: most fields are none of them)
                special = True
        if special:
            content_length, chunked, proxied, version = self.check_fields(
                headers, alive, version, hosts)
        else:  # (check_fields' first check, for a request without such fields)
            if hosts != 1 and (hosts or version == "1.1"):
                raise RequestError(400, "Bad Request: an HTTP/1.1 request needs one Host header")
            content_length = 0
            chunked = proxied = False
        # An Upgrade other than a WebSocket's (ASGI) is not performed, and httptools stops
        # parsing a read at an upgrade request (the rest of that read is dropped; later
        # reads would be parsed, but the close after it stops them): the connection
        # cannot carry another request, so it closes after this one.
        state = self.state
        upgrading = parser.should_upgrade()
        keep_alive = alive and not state.draining and not upgrading
        self.req_client = self.client
        self.req_scheme = self.scheme
        if proxied and self.peer_trusted:
            headers = self.apply_forwarded(headers)
        upgrade = None
        if (upgrading and state.upgrade_factory is not None and self.cycle is None
                and not self.pipeline):  # (answers owed first: not while any are queued)
            upgrade = state.upgrade_factory(self, method.decode("ascii"), target, headers,
                                            version)  # None: not a WebSocket handshake
        cycle: Cycle
        if target == state.health_path:
            cycle = HealthCycle(self, 200, READY, keep_alive)
        elif state.limit_concurrency and state.in_progress() >= state.limit_concurrency:
            # shed at once rather than queue without bound: a client (or its balancer)
            # retries elsewhere, and the worker stays responsive to what it has taken
            cycle = FixedCycle(self, 503, b"Service Unavailable: too many requests\n",
                               keep_alive, b"retry-after: 1\r\n",
                               accesslog.refused(self.req_client, method, target, version,
                                                 None, accesslog.begin(headers), None)
                               if state.access_log else None)
        elif upgrade is not None:  # it takes the connection over when the parser stops
            self.upgrade = upgrade
            self.request_started = None
            state.requests += 1  # a handshake is a request, for --max-requests too
            if state.requests == state.request_limit and state.on_limit is not None:
                state.on_limit()
            return
        else:
            factory = state.cycle_factory
            assert factory is not None
            cycle = factory(self, METHOD_NAMES.get(method) or method.decode("ascii"), target,
                            headers, version, keep_alive)
        if content_length or chunked:  # a body is coming: its stall clock starts now
            self.body_activity = self.rate_since = self.loop.time()
            self.rate_bytes = 0
            self.body_received = 0  # (only a request with a body has any, or trailers)
            self.trailers = 0
            self.chunked = chunked
            self.body_length = content_length
            self.wire_body = 0
        started = self.request_started or state.now
        self.heads.append((started, method))
        metrics = self.metrics  # (its begin(), inlined: once per request)
        metrics.in_flight += 1
        if metrics.in_flight == 1:
            metrics.busy_since = started
        self.request_started = None
        state.requests += 1
        if state.requests == state.request_limit and state.on_limit is not None:
            state.on_limit()
        self.parsing = cycle
        if self.cycle is None and not self.awaiting_drain:
            self.cycle = cycle
            self.response_begun = False
            cycle.start()
        else:
            self.pipeline.append(cycle)
            # Reading pauses once MAX_PIPELINE requests wait (a client that pipelines and
            # never reads parses no further: its bytes stay in the kernel), or at once for
            # one with a body: its body, and an Expect: 100-continue, wait for its turn,
            # and so do its body clocks. A short pipeline of bodiless requests (wrk's 16)
            # is read on: no pause and resume, no lost read pass, per batch.
            if content_length or chunked or len(self.pipeline) >= MAX_PIPELINE:
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        # kept until the slice is parsed (flush_body): one hand-over per read
        self.head_open = False
        self.body_parts.append(body)
        # the whole body counts, not what is buffered: an app draining it as it
        # arrives must still never be handed more than the limit
        self.body_received += len(body)
        if self.body_received > self.max_body:
            raise RequestError(413, "Content Too Large")

    def on_chunk_header(self) -> None:
        # after the last chunk's header come the trailers: a head-like section whose
        # lines are limited as the head's are (a chunk with data clears it in on_body)
        self.head_open = True
        self.head_size = 0

    def on_message_complete(self) -> None:
        self.at_boundary = True
        self.head_open = False
        self.line_bytes = 0
        if self.body_parts:
            self.flush_body()
        if self.parsing is not None:
            self.parsing.body_complete()
            self.parsing = None

    def check_fields(self, headers: list[tuple[bytes, bytes]], alive: bool, version: str,
                     hosts: int) -> tuple[int, bool, bool, str]:
        """on_headers_complete's checks of a request with fields that frame, route or proxy
        it (SPECIAL_FIELDS): (its Content-Length or 0, chunked, proxied, its version)."""
        content_length = None
        content_types = 0
        chunked = proxied = connection = False
        codings: list[bytes] | None = None  # (a list only for a transfer-encoding)
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)  # llhttp has checked it is a number
            elif name == b"content-type":
                content_types += 1
            elif name == b"transfer-encoding":
                chunked = True
                if codings is None:
                    codings = []
                codings.extend(value.lower().split(b","))
            elif name == b"connection" or name == b"proxy-connection":  # (llhttp: alike)
                connection = True
            elif name in PROXY_HEADERS:
                proxied = True
        if connection and alive:  # (a 1.0 or 2.0 request with keep-alive is kept alive too)
            version = self.parser.get_http_version()
            if version not in ("1.1", "1.0"):
                raise RequestError(505, "HTTP Version Not Supported")
        if hosts != 1 and (hosts or version == "1.1"):
            # RFC 9112 3.2: a 1.1 request has exactly one Host; two invite cache poisoning
            raise RequestError(400, "Bad Request: an HTTP/1.1 request needs one Host header")
        if content_types > 1:  # which one the app and a proxy in front would each pick differs
            raise RequestError(400, "Bad Request: more than one Content-Type header")
        if chunked and version == "1.0":  # RFC 9112 6.1: faulty framing from a 1.0 client
            raise RequestError(400, "Bad Request: Transfer-Encoding in an HTTP/1.0 request")
        if codings is not None and codings != [b"chunked"]:
            self.check_codings(codings)
        if content_length is not None and content_length > self.max_body:
            raise RequestError(413, "Content Too Large")
        return content_length or 0, chunked, proxied, version

    def apply_forwarded(self, headers: list[tuple[bytes, bytes]]
                        ) -> list[tuple[bytes, bytes]]:
        """A trusted proxy's Forwarded / X-Forwarded-* become the request's client,
        scheme and Host; the headers themselves are passed on as they came."""
        forwarded = resolve_forwarded(headers, self.state.trusted)
        if forwarded.client is not None:
            self.req_client = forwarded.client
        if forwarded.scheme is not None:
            self.req_scheme = "https" if forwarded.scheme in ("https", "wss") else "http"
        if forwarded.host is not None:
            host = forwarded.host
            if valid_authority(host):
                headers = [(name, host if name == b"host" else value)
                           for name, value in headers]
                if not any(name == b"host" for name, _ in headers):
                    headers.append((b"host", host))
        return headers

    @staticmethod
    def check_codings(codings: list[bytes]) -> None:
        """Transfer codings other than a lone chunked: RFC 9112 6.1 and 7."""
        names = [coding.strip(b" \t").split(b";", 1)[0].strip(b" \t") for coding in codings]
        for name in names:
            if name not in KNOWN_CODINGS:
                raise RequestError(501, "Not Implemented: transfer coding "
                                   + name.decode("latin-1")[:40])
        if names[-1] != b"chunked" or names.count(b"chunked") > 1:
            raise RequestError(400, "Bad Request: chunked must be the last transfer coding")
        raise RequestError(501, "Not Implemented: only the chunked transfer coding")

    @staticmethod
    def check_target(method: bytes, target: bytes) -> None:
        """The forms of RFC 9112 3.2 other than origin-form, each for its method only."""
        if method == b"CONNECT":
            if not valid_authority(target, port_required=True):
                raise RequestError(400, "Bad Request: CONNECT needs a host:port target")
        elif target == b"*":
            if method != b"OPTIONS":
                raise RequestError(400, "Bad Request: the target * is for OPTIONS only")
        else:
            try:  # absolute-form
                httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                raise RequestError(400, "Bad Request: invalid request target") from None

    # -- called by cycles -----------------------------------------------------
    def write(self, data: bytes) -> None:
        # nothing more goes out once closing began (a cycle detached by reject may still write)
        if not self.closed and self.transport is not None and self.linger_until is None:
            if not self.response_begun:
                self.response_begun = True
                self.response_status = data[9:12]  # b"HTTP/1.1 200 ..."
                self.out_complete = len(self.out)  # what is held before is whole answers
            if self.corked or self.pipeline:
                # more answers follow at once: hold this one to write them together
                self.out.append(data)
                self.out_size += len(data)
                if self.out_size > OUT_LIMIT:
                    self.flush()
                elif not self.corked and not self.flush_scheduled:
                    # (the next answer may not come in this pass of the loop: an app
                    # that streams, or does more after its response)
                    self.flush_scheduled = True
                    self.loop.call_soon(self.flush_soon)
            elif self.out:
                self.out.append(data)
                self.flush()
            else:
                if self.write_paused:  # (only then is it judged; before the write, which
                    self.sent += len(data)  # may pause writing: see unsent_now)
                self.transport.write(data)

    def flush(self) -> None:
        """Write what is held back, in one transport write."""
        out = self.out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.out_size = 0
            self.out_complete = 0  # (the current answer's later parts start a new batch)
            if not self.closed and self.transport is not None:
                if self.write_paused:
                    self.sent += len(data)
                self.transport.write(data)

    def flush_soon(self) -> None:
        if self.task_unstarted:
            # The next request's task (a pipelined request past the pass budget, see
            # CHAIN_BUDGET) runs in this pass, after this: its answer joins the held
            # ones, so a batch goes out in one write, not one per pass. Once per task
            # made: if its app then waits on something, what is held goes out on the
            # next pass.
            self.task_unstarted = False
            self.loop.call_soon(self.flush_soon)
            return
        self.flush_scheduled = False
        self.flush()

    def send_continue(self) -> None:
        """The interim 100 (Continue): not the start of the final response."""
        if not self.closed and self.transport is not None and self.linger_until is None:
            self.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.flush()  # the client waits for it: now, after what came before it

    def response_done(self, cycle: Cycle, keep_alive: bool) -> None:
        """The cycle's response is complete: start the next pipelined request, or go idle."""
        if cycle is not self.cycle:
            return
        self.cycle = None
        if cycle is self.queued_cycle:  # (answered: a FIN now is no longer held for it,
            self.queued_cycle = None  # nor its request kept alive with the connection)
        if self.closed:
            return
        if self.heads:  # (RequestCounters.finish, inline: once per request)
            started, method = self.heads.popleft()
            metrics = self.metrics
            now = self.loop.time()
            duration = now - started
            metrics.duration_sum += duration
            metrics.buckets[bisect_left(BOUNDS, duration)] += 1
            key = (method, self.response_status)
            answered = metrics.answered
            answered[key] = answered.get(key, 0) + 1
            if metrics.in_flight > 0:
                metrics.in_flight -= 1
                if metrics.in_flight == 0:
                    metrics.busy += now - metrics.busy_since
        if not keep_alive:
            if self.parsing is cycle:  # the app answered before reading the whole body
                self.parsing = None
            self.close_gracefully()
            return
        if self.write_paused:
            # the client is not reading what we wrote: the next request waits until it
            # does, so a client that pipelines and never reads cannot make us buffer
            self.awaiting_drain = True  # (its clocks run on from the pause: send_paused)
            if self.pipeline:  # and reads nothing more while answers are owed (as when
                self.pause_reading()  # a request is being answered with more queued)
            return
        if self.pipeline or self.pending_error is not None:
            self.next_request()
        else:  # (next_request's last case, inline: the usual one)
            self.idle_since = self.state.now
            if self.read_paused:
                self.resume_reading()

    def next_request(self) -> None:
        if self.pipeline:
            cycle = self.cycle = self.pipeline.popleft()
            self.response_begun = False
            if not self.pipeline and self.read_paused and self.parsing is None:
                # the last of the queued requests, read whole while reading was paused
                # for them: a FIN read while it is answered (its app reads its body, and
                # reading resumes) came after it (see eof_received). Known only here: a
                # pause for a large body (flush_body) is no such thing.
                self.queued_cycle = cycle
            cycle.start()
            return
        if self.pending_error is not None:
            status, message, line = self.pending_error
            self.pending_error = None
            self.reject(status, message, line=line)
            return
        self.idle_since = self.state.now
        self.resume_reading()

    def reject(self, status: int, message: str, started: float | None = None,
               line: accesslog.Refused | None = None) -> None:
        """Refuse a request before it reaches the app; the connection then closes.
        (`started`: when its head began, if request_started no longer says; `line`: its
        access line's fields, taken when it was first refused, see pending_error.)"""
        broken = self.parsing  # a request whose body can now never arrive whole
        if broken is not None and broken is not self.cycle and broken not in self.pipeline:
            # Its response is done already (its app answered before reading its body,
            # and the connection was kept alive to read the rest): the request was
            # answered, only its unread body broke. No answer (a client would read it
            # as the next request's) and no second access line: the connection closes.
            self.parsing = None
            if status == 408:
                self.state.timeouts.count += 1  # counted; tick logs a summary
            else:
                log.info("closed a connection from %s: the unread body of an answered "
                         "request broke a limit (%d %s)", self.client, status, message)
            self.close_gracefully()
            return
        if line is None and self.state.access_log:
            line = self.refused_line(broken, started)
        self.parsing = None
        if broken is not None and broken is not self.cycle:
            self.pipeline.remove(broken)  # queued, never started: the error answers it
        elif broken is not None:
            # The request being answered lost its body: its app is told the client went,
            # and the error replaces its response, unless that response is already going
            # out (then only a cut connection can tell the client).
            self.cycle = None
            broken.disconnect(replaced=not self.response_begun)
            if self.response_begun:
                log.info("cut a response to %s: %d %s", self.client, status, message)
                self.abort()
                return
        if self.cycle is not None or self.pipeline:
            # requests before it are still owed answers (one may be queued while none is
            # being answered: the client is not reading, awaiting_drain): refuse after them
            self.pending_error = (status, message, line)
            self.pause_reading()
            return
        if status == 408:
            self.state.timeouts.count += 1  # counted; tick logs a summary
        else:
            log.info("refused a request from %s: %d %s", self.client, status, message)
        self._count_refusal(status)
        data, size = error_answer(status, message, self.state.date_header,
                                  b"" if line is None else accesslog.id_field(line[0]))
        self.write(data)
        if line is not None:  # (as nginx: a refused request is logged with its status)
            accesslog.ended(line[0], status, size, *line[1:])
        self.close_gracefully()

    def refused_line(self, cycle: Cycle | None, started: float | None) -> accesslog.Refused:
        """The access line's fields of a request refused now: the request line as far as
        it was parsed, and the request id begin made for its cycle if it got one (the
        request whose body is being read), else the one among its fields parsed so
        far. Bytes before any request line are a request of which nothing is known."""
        if cycle is None and self.at_boundary:
            return accesslog.refused(self.client, None, b"", "", None, None, None)
        parser = self.parser
        started = self.request_started if started is None else started
        # (llhttp keeps the last request's version until a new one is parsed: a head
        # refused before any of its fields is told as one whose version is unknown)
        version = parser.get_http_version() if cycle is not None or self.headers else "0.0"
        return accesslog.refused(
            self.client if cycle is None else self.req_client,
            parser.get_method() if self.url else None, self.url, version,
            self.headers, getattr(cycle, "access", None),
            None if started is None else self.loop.time() - started)

    def _count_refusal(self, status: int) -> None:
        """A refusal answers the newest request (if it got that far); it is also the
        connection's last answer, so nothing else on it stays in flight."""
        now = self.loop.time()
        code = b"%d" % status
        if self.heads:
            started, method = self.heads.pop()
            self.metrics.finish(method, code, started, now)
        else:
            # (the parser read a method only when it got as far as the target)
            method = self.parser.get_method() if self.url else b"other"
            self.metrics.record(method, code, now - (self.request_started or now))
        self._abandon(now)

    def _abandon(self, now: float) -> None:
        metrics = self.metrics
        while self.heads:
            self.heads.pop()
            metrics.end(now)

    def abort(self) -> None:
        """Reset the connection: the answer being written is cut, but the whole answers
        held before it (pipelined requests) go out first."""
        whole = self.out[:self.out_complete] if self.response_begun else self.out
        self.out = []
        self.out_size = 0
        if self.transport is not None and not self.closed:
            if whole:  # (not counted in sent: the connection ends here)
                self.transport.write(b"".join(whole))
            self.transport.abort()

    def close_gracefully(self) -> None:
        """Close without resetting: send FIN after the response, then read and drop
        what the client still sends until it closes too (or LINGER_SECONDS pass).
        Closing with unread input would send a reset that can destroy the response."""
        transport = self.transport
        if transport is None or self.closed or self.linger_until is not None:
            return
        self.flush()  # (before the FIN, and before write() refuses more)
        self.linger_until = self.state.now + LINGER_SECONDS
        if not self.write_paused:  # (check_timeouts: the answer going out, nothing
            # taken yet seen. While writing waits on the client its clocks run on from
            # when it last took bytes: the close is no fresh start for one taking none.)
            self.write_paused_at = self.send_since = self.state.now
            self.send_taken = 0
            self.write_seen = UNSEEN
        self.unparsed = None
        self.body_parts.clear()
        self.idle_since = None
        self.request_started = None
        if self.fin_held:  # the client's FIN is read already: nothing to linger for
            transport.close()
        elif transport.can_write_eof():
            transport.write_eof()
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
        else:
            transport.close()

    # -- timeouts and drain ---------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        config = self.state.config
        if self.linger_until is not None:
            if self.transport is None:
                return
            if self.unsent_now(now) > 1:  # (1: our FIN, which SIOCOUTQ counts until
                # it is acknowledged: a client that vanished never does so)
                # The last answer is still going out (large, to a slow reader): the
                # linger starts once it is out; a client that takes none of it for
                # --header-timeout (send_stall) is cut, as one reading none of its
                # answers is, and so is one taking it too slowly.
                if now - self.write_paused_at >= self.send_stall() or self.send_too_slow(now):
                    self.cut_reader()
                else:
                    self.linger_until = now + LINGER_SECONDS
            elif now >= self.linger_until:
                self.transport.abort()  # close() would wait on a client that reads nothing
            return
        if self.request_started is not None and not self.read_paused:
            # a head arriving, whatever the connection does meanwhile (an endless head
            # behind a long response is cut too)
            if now - self.request_started >= config.header_timeout:
                started, self.request_started = self.request_started, None
                if self.cycle is None and not self.pipeline and not (self.url or self.headers):
                    self.close_gracefully()  # (nothing owed, nothing to answer: just close)
                else:
                    self.reject(408, "Request Timeout", started)
                return
            if not self.write_paused:
                return
            # (a client that takes none of the answers owed meanwhile is cut below: a
            # head it sends is no progress in taking them)
        elif self.parsing is not None and self.pending_error is None and not self.read_paused:
            self.check_body_rate(now, config.header_timeout)
            if self.parsing is None or not self.write_paused or self.linger_until is not None:
                return
            waiter = self.drain_waiter
            if waiter is None or waiter.done():
                # Answers wait on a client still sending its body (most send it whole
                # before they read), and nothing of the app waits on it (an app reading
                # the body, answers done): their taking is judged from the body's end,
                # not from the pause, long past by then (the body's own clocks bound
                # the wait, as any upload's).
                self.write_paused_at = self.send_since = now
                self.send_taken = 0
                self.write_seen = self.sent - self.unsent()  # (taken before: not this window's)
                return
            # An app waits on its client to take its answer (a WSGI thread in write(),
            # an ASGI task in send()) while the body still arrives: the body's own rules
            # judge the upload, the answer's judge the taking, from the pause (else a
            # client trickling its body and reading nothing held the thread as long).
        if self.write_paused:
            # Our writing waits on the client: answers done (awaiting_drain), or one
            # being streamed, whose app waits in send() (ASGI) or write() (a WSGI
            # thread). A client that takes none of them for --header-timeout, or too
            # little (send_too_slow), is cut: else it would hold the connection, the
            # app's task or thread, and the buffered answer for ever.
            self.unsent_now(now)
            if now - self.write_paused_at >= self.send_stall() or self.send_too_slow(now):
                self.cut_reader()
                return
        if self.request_started is not None or self.parsing is not None:
            # a head or a body we do not read because requests before it are still being
            # answered (its clocks restart after; a client that reads none of their
            # answers is cut just above)
            return
        if self.idle_since is not None:
            limit = config.keepalive_timeout
            if self.state.draining:
                limit = min(limit, DRAIN_IDLE_GRACE)
            if now - self.idle_since >= limit:
                self.close_gracefully()

    def cut_reader(self) -> None:
        """Cut a client that takes its answers too slowly (check_timeouts): counted,
        logged by tick as a summary, and reset, so the kernel also drops what it still
        holds for it (up to megabytes of send buffer per connection, which a plain
        close would go on trying to deliver for minutes). The app of an answer being
        written is told the client went (connection_lost). A connection closed already
        is not cut, nor counted."""
        if self.closed:
            return
        self.state.slow_cuts.count += 1
        transport = self.transport
        if transport is not None:
            try:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            except Exception:  # (a transport closing under us: the close will do)
                pass
        self.abort()

    def check_body_rate(self, now: float, stall: float) -> None:
        """A body that stopped arriving, or trickles in below --min-body-rate, must
        not hold the request (a WSGI thread, a --limit-concurrency slot) for ever."""
        if self.read_paused:
            return  # we are not reading: not the client's fault
        if now - self.body_activity >= stall:
            self.reject(408, "Request Timeout: the request body stalled")
            return
        window = now - self.rate_since
        if self.min_rate and window >= min(RATE_WINDOW, stall):
            if self.body_received - self.rate_bytes < self.min_rate * window:
                self.reject(408, "Request Timeout: the request body is too slow")
                return
            self.rate_since = now
            self.rate_bytes = self.body_received

    def drain(self) -> None:
        """The worker is stopping. In-flight requests finish and are answered with
        `connection: close`; an idle keep-alive connection is given a short grace in
        which a request its client already sent is still answered (with close), since
        cutting it at once would race with that request."""
        if self.idle_since is not None:
            self.idle_since = max(self.idle_since, self.state.drain_started)


class ProxyProtocolHttp(HttpProtocol):
    """--proxy-protocol: a TCP connection starts with a PROXY v1/v2 header from a trusted
    peer, which names the real client; then HTTP as usual. A subclass, so that the
    plain protocol's hot path carries no check for it."""

    __slots__ = ("proxy_buffer",)

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.proxy_buffer: bytes | None = None  # bytes of the header so far; None: done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(transport.get_extra_info("peername"), tuple):  # not unix sockets
            if not self.peer_trusted:
                log.warning("closed a connection from %s: not in --forwarded-allow-ips, "
                            "which --proxy-protocol requires", self.client)
                self.abort()
                return
            self.proxy_buffer = b""

    def data_received(self, data: bytes) -> None:
        if self.proxy_buffer is None:
            super().data_received(data)
            return
        buffer = self.proxy_buffer + data
        try:
            header = parse_proxy_header(buffer)
        except ProxyHeaderError as exc:
            log.warning("closed a connection from %s: %s", self.client, exc)
            self.abort()
            return
        if header is None:
            self.proxy_buffer = buffer
            return
        self.proxy_buffer = None
        if header.client is not None:
            self.client = header.client
            # the proxy vouched for the client: whether the client's own headers are
            # believed now depends on the client's address
            self.peer_trusted = self.state.trusted.trusts(header.client[0])
        if header.server is not None:
            self.server = header.server
        rest = buffer[header.length:]
        if rest:
            super().data_received(rest)


def make_protocol_factory(state: ServerState) -> Callable[[], Any]:
    kind = ProxyProtocolHttp if state.config.proxy_protocol else HttpProtocol

    def factory() -> HttpProtocol:
        return kind(state)

    return factory
