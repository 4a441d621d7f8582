"""One WSGICycle per HTTP request (PEP 3333). The app runs in the worker's bounded
thread pool so the event loop keeps serving other connections; the thread builds
the response bytes and hands them to the loop, which alone touches the transport."""

from __future__ import annotations

import functools
import io
import logging
import sys
import threading
import time
from asyncio import _get_running_loop, _set_running_loop
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

from forkd.http import accesslog
from forkd.http.asgi import _REQUESTS
from forkd.http.framing import BodyWriter, frame_head, split_target, status_line
from forkd.http.protocol import HIGH_WATER, ClientDisconnected, HttpProtocol, error_answer
from forkd.http.wsgipool import _INLINE, INLINE_LIMIT, WSGIPool

log = logging.getLogger("forkd.http")

_NO_ENVIRON: dict[str, Any] = {}  # (never changed: a cycle's until its call starts)
_NO_HEADERS: list[tuple[str, str]] = []  # (never changed: until start_response)
# the request's fields that say how its body comes (bytes compares are slow in 3.11)
_BODY_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"expect"))
MAX_IN_FLIGHT = 4  # response blocks handed to the loop and not yet written, at most
BACKSTOP_TICK = 0.5  # the protocol's judging period (forkd.worker.TICK), allowed for twice
_ENDED: list[bytes] = []  # a cycle's `pending` once its response ended (never changed)
_SEQUENCES = (list, tuple)  # a result that is all there: one write, with a content-length


def build_environ(
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    http_version: str,
    server: tuple[str, int | None] | None,
    client: tuple[str, int] | None,
    root_path: str,
    body: Any,
    scheme: str = "http",
) -> dict[str, Any]:
    """The PEP 3333 environ of one request; pure, so it is tested alone."""
    return request_environ(connection_environ(server, client, root_path, scheme), method,
                           raw_path, query, headers, http_version, root_path, body)


def connection_environ(
    server: tuple[str, int | None] | None,
    client: tuple[str, int] | None,
    root_path: str,
    scheme: str,
) -> dict[str, Any]:
    """The keys of an environ that are the same for each request of a connection (while
    its client and scheme are: a trusted proxy's headers may change them per request),
    with every per-request key present, so that a copy of it has them in one order."""
    # the keys that never change come from one dict: a copy is cheaper than building them
    environ = _CONSTANT_ENVIRON.copy()
    environ["REQUEST_METHOD"] = ""
    environ["SCRIPT_NAME"] = root_path
    environ["PATH_INFO"] = ""
    environ["QUERY_STRING"] = ""
    if server:
        environ["SERVER_NAME"] = server[0]
        environ["SERVER_PORT"] = str(server[1]) if server[1] is not None else ""
    else:
        environ["SERVER_NAME"] = environ["SERVER_PORT"] = ""
    environ["SERVER_PROTOCOL"] = "HTTP/1.1"  # (the usual: another is set per request)
    if client:
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
    else:
        environ["REMOTE_ADDR"] = environ["REMOTE_PORT"] = ""
    environ["wsgi.url_scheme"] = scheme
    environ["wsgi.input"] = None
    environ["wsgi.errors"] = None
    return environ


def request_environ(
    base: dict[str, Any],
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    http_version: str,
    root_path: str,
    body: Any,
) -> dict[str, Any]:
    """One request's environ: a copy of its connection's (connection_environ) with the
    request's own keys set."""
    # PEP 3333: the percent-decoded bytes, as latin-1 text. (find, not `b"%" in`: for
    # `in`, bytes first try the operand as an int, and the TypeError it raises and
    # drops, its message formatted, cost more than the rest of this function's lines)
    path = (unquote_to_bytes(raw_path) if raw_path.find(b"%") >= 0 else raw_path
            ).decode("latin-1")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        path = path[len(root_path) :]
    environ = base.copy()
    environ["REQUEST_METHOD"] = method
    environ["PATH_INFO"] = path
    if query:
        environ["QUERY_STRING"] = query.decode("latin-1")
    if http_version != "1.1":
        environ["SERVER_PROTOCOL"] = "HTTP/" + http_version
    environ["wsgi.input"] = body
    environ["wsgi.errors"] = sys.stderr  # (looked up each time: an app may replace it)
    keys = _ENVIRON_KEYS
    for name, value in headers:
        key = keys.get(name)
        if key is None:
            key = _environ_key(name)
            if key is None:
                continue
        text = value.decode("latin-1")
        if key in environ:
            text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
        environ[key] = text
    return environ


# header name -> environ key, learnt as names come (bounded: names are the client's)
_ENVIRON_KEYS: dict[bytes, str] = {b"content-length": "CONTENT_LENGTH",
                                   b"content-type": "CONTENT_TYPE"}


def _environ_key(name: bytes) -> str | None:
    if b"_" in name:
        # X_User would land on the same key as X-User: a proxy that strips or checks
        # one spelling could be bypassed with the other, so underscores are dropped
        return None
    key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_ENVIRON_KEYS) < 512:
        _ENVIRON_KEYS[name] = key
    return key


class FileWrapper:
    """wsgi.file_wrapper: iterate a file in blocks, and close it with the response."""

    def __init__(self, filelike: Any, block_size: int = 65536) -> None:
        self.filelike = filelike
        self.block_size = block_size
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        while True:
            block = self.filelike.read(self.block_size)
            if not block:
                return
            yield block


_CONSTANT_ENVIRON: dict[str, Any] = {
    "wsgi.version": (1, 0),
    "wsgi.multithread": True,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
    "wsgi.input_terminated": True,
    "wsgi.file_wrapper": FileWrapper,
}


class BodyInput:
    """wsgi.input for a body that streams in while the app runs: the loop feeds
    it, the app's thread reads it, and reading resumes as the buffer drains."""

    def __init__(self, resume: Callable[[], None], stall: float) -> None:
        self.stall = stall  # seconds the client may send nothing while the app waits
        self.cond = threading.Condition()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.aborted = False
        self.resume = resume

    # loop thread
    def feed(self, data: bytes) -> None:
        with self.cond:
            self.chunks.append(data)
            self.buffered += len(data)
            self.cond.notify()

    def finish(self, aborted: bool = False) -> None:
        with self.cond:
            self.done = True
            self.aborted = aborted
            self.cond.notify()

    # app thread
    def _take(self, size: int, until_newline: bool = False) -> bytes:
        with self.cond:
            while not self.chunks and not self.done:
                if not self.cond.wait(self.stall):
                    raise OSError(f"the request body stalled for {self.stall:g}s")
            if not self.chunks:
                if self.aborted:
                    raise OSError("the client went away before sending the whole body")
                return b""
            was_full = self.buffered >= HIGH_WATER
            out = bytearray()
            while self.chunks and (size < 0 or len(out) < size):
                chunk = self.chunks.popleft()
                if until_newline and b"\n" in chunk:
                    cut = chunk.index(b"\n") + 1
                    chunk, rest = chunk[:cut], chunk[cut:]
                    if rest:
                        self.chunks.appendleft(rest)
                    size = len(out) + len(chunk) if size < 0 else min(size, len(out) + len(chunk))
                if size >= 0 and len(out) + len(chunk) > size:
                    keep = size - len(out)
                    self.chunks.appendleft(chunk[keep:])
                    chunk = chunk[:keep]
                out += chunk
            self.buffered -= len(out)
            if was_full and self.buffered < HIGH_WATER:
                self.resume()
            return bytes(out)

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        if size < 0:
            parts: list[bytes] = []
            while True:
                part = self._take(-1)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        # read(n) returns n bytes unless the body ends first, as a file does: apps
        # read(int(CONTENT_LENGTH)) once and take a short read for the whole body.
        parts = []
        missing = size
        while missing > 0:
            part = self._take(missing)
            if not part:
                break
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        line = bytearray()
        while size < 0 or len(line) < size:
            part = self._take(size - len(line) if size >= 0 else -1, until_newline=True)
            if not part:
                break
            line += part
            if line.endswith(b"\n"):
                break
        return bytes(line)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        total = 0
        while hint <= 0 or total < hint:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class WSGICycle:
    __slots__ = (
        "proto", "app", "pool", "inline", "root_path", "method", "target", "route",
        "headers", "http_version", "keep_alive", "body", "body_size", "more_body",
        "stream", "wait_for_body", "submitted", "disconnected", "replaced", "flow", "in_flight",
        "blocked", "expect_continue", "overrun_logged", "client", "scheme",
        "access", "length", "query", "ending", "environ", "status", "reason",
        "response_headers", "writer", "pending",
    )  # fmt: skip

    @classmethod
    def bind(cls, app: Any, pool: WSGIPool, root_path: str) -> Callable[..., WSGICycle]:
        """The cycle factory of one app, for ServerState.cycle_factory: it takes the
        protocol's arguments (a partial, in C: no wrapper call of ours per request)."""
        return functools.partial(cls, app, pool, root_path)

    def __init__(
        self,
        app: Any,
        pool: WSGIPool,
        root_path: str,
        proto: HttpProtocol,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self.proto = proto
        self.app = app
        self.pool = pool
        self.inline = False  # this call runs on the loop's thread (wsgipool)
        self.root_path = root_path
        self.method = method
        self.target = target
        self.route = b""  # the raw path, once submitted
        self.query = b""  # the raw query string, once submitted
        # a threaded call whose result has nothing to close: 1, its final block's hand-off
        # to the loop (or fail()'s 500's) ends the call too (one hand-off, not two); 2
        # once it did
        self.ending = 0
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        # the body as it arrives, read in the loop up to --wsgi-body-buffer before a
        # thread is taken: a slow client then holds a connection, not a thread
        self.body: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self.stream: BodyInput | None = None
        self.wait_for_body = False
        self.submitted = False
        self.disconnected = False
        # (`replaced`, a refusal answered in the app's place, is set by disconnect alone:
        # a request pays nothing for it)
        # write flow control between the app's thread and the loop, made by the app's
        # thread at its first block of a streamed response (a response written in one
        # block, and an inline call, need none). disconnect() sets `disconnected` before
        # it looks for it, and the thread makes it before it reads `disconnected`.
        self.flow: threading.Condition | None = None
        self.in_flight = 0  # blocks handed to the loop, not yet written
        self.blocked = False  # the client is not reading: the transport paused writing
        self.expect_continue = False
        self.overrun_logged = False
        self.client = proto.req_client  # (a trusted proxy's word applied)
        self.scheme = proto.req_scheme
        if proto.state.access_log:  # (before the environ is made: the app sees a made id too)
            self.access = accesslog.begin(headers)
        else:
            self.access = accesslog.NONE
        length: int | None = 0
        for name, value in headers:
            if name not in _BODY_FIELDS:  # (most fields: one lookup, not three compares)
                continue
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                length = None
            elif value.lower() == b"100-continue":  # (expect)
                self.expect_continue = http_version == "1.1"
        self.length = length
        # the response (start_response, write() and the framing: the app's thread)
        self.environ: dict[str, Any] = _NO_ENVIRON  # (made as the call starts)
        self.status: int | None = None
        self.reason: bytes | None = None  # None: the standard phrase
        self.response_headers: list[tuple[str, str]] = _NO_HEADERS
        self.writer: BodyWriter | None = None  # set once the head is framed
        self.pending: list[bytes] = []  # blocks gathered for one write

    # -- the protocol's side (loop thread) -------------------------------------------
    def start(self) -> None:
        if self.length == 0 or not self.more_body:
            self.more_body = False  # (an inline call answers before the parser says so)
            # (an empty BytesIO: a tenth of the cost of a RawIOBase of ours, whose
            # finaliser runs in Python)
            self._submit(io.BytesIO(self._take_body()) if self.body_size else io.BytesIO())
            return
        if self.expect_continue:
            self.proto.send_continue()
        if self.body_size > self.proto.state.config.wsgi_body_buffer and self.pool.size:
            self._stream_body()
        else:  # (with --threads 0 no thread could read it as it comes: it is read whole)
            self.wait_for_body = True
        self.proto.resume_reading()  # (paused if this request was pipelined)

    def _take_body(self) -> bytes:
        parts = self.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.body = []
        self.body_size = 0
        return body

    def _stream_body(self) -> None:
        """The body outgrew the loop's buffer: a thread reads the rest as it comes
        (the protocol's --min-body-rate frees it from a client that trickles)."""
        self.wait_for_body = False
        self.stream = BodyInput(self._resume_soon, self.proto.state.config.header_timeout)
        if self.body:
            self.stream.feed(self._take_body())
        self._submit(self.stream)

    def _submit(self, body: Any) -> None:
        self.submitted = True
        self.proto.state.calls += 1  # a drain waits for it, close() included
        target = self.target
        if target[:1] == b"/":  # origin-form, as nearly every request
            route, _, self.query = target.partition(b"?")
        else:
            route, self.query = split_target(target)
        self.route = route
        pool = self.pool
        # (pool.runs_inline, inline: once per request)
        if self.stream is None and (pool.always or pool.routes.get(route) == _INLINE):
            self.inline = True
            if pool.pass_left > 0 and not pool.waiting:  # (the loop's share: wsgipool)
                pool.pass_left -= 1
                self.run(body)
            else:
                pool.run_inline(self.run, body)  # in a later pass of the loop
        else:
            pool.submit(self.run, body, route)  # (timed for the route: WSGIPool._work)

    def _call_ended(self) -> None:
        self.proto.state.calls -= 1

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self.inline:
            fn(*args)
        else:
            self.pool.to_loop(fn, *args)

    def _resume_soon(self) -> None:
        self.pool.to_loop(self.proto.resume_reading)

    def feed_body(self, body: bytes) -> None:
        if self.stream is not None:
            self.stream.feed(body)
            return
        self.body.append(body)
        self.body_size += len(body)
        if (self.wait_for_body and self.body_size > self.proto.state.config.wsgi_body_buffer
                and self.pool.size):
            self._stream_body()

    def body_complete(self) -> None:
        self.more_body = False
        if self.stream is not None:
            self.stream.finish()
        elif self.wait_for_body and not self.submitted:
            self.wait_for_body = False
            self._submit(io.BytesIO(self._take_body()))

    def body_buffered(self) -> int:
        if self.stream is not None:
            return self.stream.buffered
        # while waiting for the body, the buffer's own limit bounds it
        return 0 if self.wait_for_body else self.body_size

    def disconnect(self, replaced: bool = False) -> None:
        self.replaced = replaced  # (before `disconnected`: the thread reads it after)
        self.disconnected = True
        if self.stream is not None:
            self.stream.finish(aborted=True)
        if self.flow is not None:
            with self.flow:
                self.flow.notify_all()

    # -- the app's side (pool thread) ---------------------------------------------------
    def run(self, body: Any) -> bool:
        """The call, inline or on a thread (WSGIPool._work times a threaded one: True if
        its times say something of its route; an inline call's return means nothing)."""
        proto = self.proto
        base = proto.wsgi_base  # (client, scheme, connection_environ of them)
        if base is None or base[0] is not self.client or base[1] is not self.scheme:
            base = proto.wsgi_base = (self.client, self.scheme, connection_environ(
                proto.server, self.client, self.root_path, self.scheme))
        environ = request_environ(base[2], self.method, self.route, self.query,
                                  self.headers, self.http_version, self.root_path, body)
        self.environ = environ
        inline = self.inline
        if inline:
            started = time.perf_counter()
            if started > self.pool.look_due:  # (the waits for a CPU: wsgipool)
                self.pool.look(started)
        # An inline call is judged as soon as it returns: its answer may run the next
        # pipelined request inline, nested (response_done), whose time, and waits for a
        # CPU, are not this one's. Until then no other call ran, so the pool's last look
        # at the waits is this call's own (or under LOOK_EVERY before it): inline_took
        # then reads the waits of this call only.
        took = 0.0
        result: Any = None
        ended = True  # this call is over when run returns (not when _stream took it on)
        try:
            if inline:
                # On the loop's thread, the app must not see the worker's running loop:
                # asyncio.run() and asgiref's async_to_sync refuse to run where one is.
                loop = _get_running_loop()
                _set_running_loop(None)
                try:
                    result = self.app(environ, self.start_response)
                finally:
                    _set_running_loop(loop)
            else:
                result = self.app(environ, self.start_response)
            if type(result) is list or isinstance(result, _SEQUENCES):
                pending = self.pending
                for chunk in result:  # all there already: one write, with a content-length
                    if type(chunk) is not bytes or self.status is None:
                        self.gather(chunk)  # (it raises the error that fits)
                    else:  # (gather, inline: once per block)
                        pending.append(chunk)
                if not inline and not hasattr(result, "close"):
                    self.ending = 1
            elif inline and self.pool.size:
                # A streamed body's blocks may be slow to come: iterate it on a thread
                # (with --threads 0 there is none: it is iterated here, as the app ran).
                took = time.perf_counter() - started
                self._judge(took)
                self.inline = False
                ended = False  # _stream closes the result and ends the call
                self.pool.submit(self._stream, result)
                return False
            else:  # (--threads 0: the blocks come on the loop's thread, as the app ran)
                _off_loop(self._iterate, result)
            if inline:
                took = time.perf_counter() - started
                if took > INLINE_LIMIT or self.pool.strikes:  # (else nothing to note)
                    self.pool.inline_took(self.route, took)
            if self.status is None:  # (_finish, inline: once per request)
                raise RuntimeError("the WSGI app returned without calling start_response")
            self._flush(True)  # (and logged where its last block is written)
        except BaseException as exc:  # the app's code: anything can come out
            if inline and not took:
                took = time.perf_counter() - started
                self._judge(took)
            self._failed(exc)
        finally:
            if ended:
                if inline and type(result) is list:  # (the usual end: nothing to close)
                    self.proto.state.calls -= 1
                elif self.ending != 2:
                    # (a failed app may have returned nothing to close: it ends anyway)
                    self._close(result)
                # (else threaded, nothing to close, and the final block's (or the 500's)
                # hand-off ended the call, refusing a write() from then on: _close's
                # work is done)
        # (threaded: a call that read a streamed body, or waited for its client to read,
        # timed the client as much as the app: it teaches the route nothing. Inline, no
        # one reads it: the test of `inline` first costs an inline call the least)
        return inline or (self.stream is None and self.flow is None)

    def _judge(self, took: float) -> None:
        """(run's less usual ends) An inline call's time, for its route's place."""
        if took > INLINE_LIMIT or self.pool.strikes:
            self.pool.inline_took(self.route, took)

    def _iterate(self, result: Any) -> None:
        for chunk in result:  # each block goes out as it comes (PEP 3333)
            if chunk:
                self.write(chunk)
            if self.disconnected:
                break

    def _stream(self, result: Any) -> None:
        try:
            self._iterate(result)
            self._finish()
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._close(result)

    def _finish(self) -> None:
        if self.status is None:
            raise RuntimeError("the WSGI app returned without calling start_response")
        self._flush(final=True)  # (logged where it is written: _write_final)

    def _failed(self, exc: BaseException) -> None:
        # (the raw path, not the environ's PATH_INFO: the app may have changed or
        # removed that, and a lookup raising here would lose the answer)
        path = self.route.decode("latin-1")
        if isinstance(exc, OSError) and self.disconnected:
            # an ordinary disconnect: the app stopped on being told, not an error, and
            # routine (its access line tells it: the status it started, the bytes sent)
            log.debug("%s %s ended by %s: the client disconnected", self.method, path,
                      type(exc).__name__)
            if self.writer is not None and self.proto.state.access_log:
                # (as nginx does: the status it started, the bytes sent, if the client
                # got any of it: judged on the loop, as _write_final judges, since
                # hand_off told the client went and no last block reaches it)
                self._to_loop(self._log_if_reached)
            return
        log.error("exception in WSGI app for %s %s", self.method, path, exc_info=exc)
        self.fail()

    def _close(self, result: Any) -> None:
        self.pending = _ENDED  # (a write() from close() is refused)
        try:
            if result is not None and hasattr(result, "close"):
                if self.inline:
                    _off_loop(result.close)
                else:
                    result.close()
        except BaseException as exc:  # (as run() does: an app's SystemExit ends no worker)
            log.error("exception in the WSGI result's close()", exc_info=exc)
        finally:
            if self.inline:
                self.proto.state.calls -= 1
            elif self.ending != 2:  # (else the final block's or the 500's hand-off ended it)
                self.pool.to_loop(self._call_ended)

    def _log_access(self) -> None:
        sent = self.writer.sent if self.writer is not None else 0
        accesslog.ended(self.access, self.status or 0, sent, self.client, self.method,
                        self.route, self.query, self.http_version)

    def hand_off(self, data: bytes, final: bool, keep_alive: bool) -> None:
        """Called in the app's thread: pass bytes to the loop. The thread waits only
        while the client is not reading (or several blocks are queued). A client that
        takes nothing for --header-timeout, or less than --min-body-rate, is cut by the
        protocol (check_timeouts), as every answer's is: the wait then ends with
        ClientDisconnected, and the app's result is closed. (Should the protocol fail
        to cut it, _wait_for_client's backstop ends the wait all the same.)"""
        if self.inline:  # on the loop's thread: write now (the app made it already; an
            self.proto.write(data)  # inline final block is _flush's own end)
            return
        if final:
            if self.disconnected:  # (before `ending` moves: _close then ends the call)
                raise ClientDisconnected("the client went away")
            self.pending = _ENDED  # (a write() after this is refused)
            if self.ending == 1:
                self.ending = 2
                self.pool.to_loop(self._write_final_ended, data, keep_alive)
            else:
                self.pool.to_loop(self._write_final, data, keep_alive)
            return
        flow = self.flow
        if flow is None:
            flow = self.flow = threading.Condition()
        with flow:
            self.in_flight += 1
            self.pool.to_loop(self._write_more, data)
            if (self.blocked or self.in_flight > MAX_IN_FLIGHT) and not self.disconnected:
                self._wait_for_client(flow)
        if self.disconnected:
            raise ClientDisconnected("the client went away")

    def _wait_for_client(self, flow: threading.Condition) -> None:
        """(hand_off, `flow` held) Wait until the loop takes more blocks. A backstop
        against a bug of ours: the protocol cuts a client that takes nothing for
        send_stall (--header-timeout), judged at its ticks; should a client whose
        writing is paused have taken nothing for twice that and two ticks, by the
        protocol's own clock and its last look at the client (write_paused_at), the
        thread stops waiting and the connection is cut, rather than the thread being
        held for ever. The loop's clock stops when the loop does: a loop behind on its
        work never makes a client that reads look like one that does not."""
        proto = self.proto
        state = proto.state
        limit = 2 * proto.send_stall() + 2 * BACKSTOP_TICK
        while (self.blocked or self.in_flight > MAX_IN_FLIGHT) and not self.disconnected:
            flow.wait(limit / 4)  # (_write_more, _wait_writable or disconnect notify)
            if (self.blocked and proto.write_paused and not self.disconnected
                    and state.now - proto.write_paused_at >= limit):
                log.warning("a WSGI thread waited %.0fs on a client that took nothing, "
                            "and the connection was not cut: it is cut now",
                            state.now - proto.write_paused_at)
                self.disconnected = True  # (the loop's disconnect() says it too, later)
                self.pool.to_loop(self._cut_stuck)

    def _cut_stuck(self) -> None:
        """(loop) The backstop's cut: unless the connection is closed or being cut
        already (the protocol's own cut may have come meanwhile: counted once)."""
        proto = self.proto
        transport = proto.transport
        if not proto.closed and transport is not None and not transport.is_closing():
            proto.cut_reader()

    def _write_more(self, data: bytes) -> None:
        proto = self.proto
        proto.write(data)
        blocked = proto.write_paused and not proto.closed
        flow = self.flow
        assert flow is not None
        with flow:
            self.in_flight -= 1
            self.blocked = blocked
            flow.notify_all()
        if blocked:
            proto.loop.create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        await self.proto.wait_writable()
        flow = self.flow
        assert flow is not None
        with flow:
            self.blocked = False
            flow.notify_all()

    def _reached_client(self) -> bool:
        """(loop, once the answer's last bytes were handed to the protocol) Whether the
        client got this answer, whole or in part: then its access line is due (cut
        mid-way, the status it started with and the bytes sent, as nginx logs it). Not
        when a refusal of forkd's went in its place (the rest of the body broke a limit:
        reject; the refusal has the line), nor when the client left before any of it
        went out (the protocol wrote nothing of it)."""
        return not self.disconnected or (
            not getattr(self, "replaced", False) and self.proto.response_begun)

    def _log_if_reached(self) -> None:
        """(loop) The line of an answer its app stopped, told its client went."""
        if self._reached_client():
            self._log_access()

    def _write_final(self, data: bytes, keep_alive: bool) -> None:
        """(loop) A threaded answer's last block: written, and its access line logged,
        here, where it goes out, not in the thread that handed it over: until now a
        refusal of forkd's may have answered the request in its place, or the client
        may have left (_reached_client)."""
        proto = self.proto
        if data:
            proto.write(data)
        if proto.state.access_log and self._reached_client():
            self._log_access()
        proto.response_done(self, keep_alive)

    def _write_final_ended(self, data: bytes, keep_alive: bool) -> None:
        proto = self.proto
        try:  # (_write_final, inline: once per threaded request)
            if data:
                proto.write(data)
            if proto.state.access_log and self._reached_client():
                self._log_access()
            proto.response_done(self, keep_alive)
        finally:  # (a write that raised still ends the call: a drain waits for it)
            proto.state.calls -= 1

    # -- the response: start_response, write() and the framing (app thread) ------------
    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.writer is not None:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise RuntimeError("start_response called twice without exc_info")
        parsed = _STATUSES.get(status) if type(status) is str else None
        if parsed is None:
            parsed = _parse_status(status)
        self.status, self.reason = parsed
        self.response_headers = headers
        return self.write

    def gather(self, data: bytes) -> None:
        """Keep a block for the final write (a list result: it is all there)."""
        if type(data) is not bytes:
            raise TypeError(f"a WSGI body block must be bytes, not {type(data).__name__}")
        if self.status is None:
            raise RuntimeError("the WSGI app returned a body without calling start_response")
        self.pending.append(data)

    def write(self, data: bytes) -> None:
        """The write() callable, and each block of an iterable result: sent at once."""
        if self.pending is _ENDED:  # (say, from the result's close(): past the end)
            raise RuntimeError("write() after the response ended")
        self.gather(data)
        self._flush(final=False)

    def fail(self) -> None:
        """The app failed (it raised, or its answer could not be framed): its answer is
        ended on the loop, where what the client gets is known (a refusal of forkd's may
        have answered in its place meanwhile: reject)."""
        if self.writer is not None:  # part of it may be out: cut
            self._to_loop(self._cut_failed)
            return
        if self.disconnected:  # (the client went, or a refusal answered instead; before
            return  # `ending` moves: _close then ends the call)
        logged = self.proto.state.access_log
        # an answer as any other for the access log: its line, its request id
        data, size = error_answer(500, "Internal Server Error", self.proto.state.date_header,
                                  accesslog.id_field(self.access) if logged else b"")
        self.pending = _ENDED  # (a write() after this is refused)
        ended = self.ending == 1  # (as hand_off: the hand-off ends the call too)
        if ended:
            self.ending = 2
        self._to_loop(self._write_error, data, size, ended)

    def _write_error(self, data: bytes, size: int, ended: bool) -> None:
        """(loop) fail()'s 500: written, and logged as any answer unless the client got
        none (it went, or a refusal answered in its place: disconnect)."""
        proto = self.proto
        try:
            proto.write(data)
            if proto.state.access_log and not self.disconnected:
                accesslog.ended(self.access, 500, size, self.client, self.method,
                                self.route, self.query, self.http_version)
            proto.response_done(self, False)
        finally:
            if ended:
                proto.state.calls -= 1

    def _cut_failed(self) -> None:
        """(loop) An app that failed once its answer began: logged as nginx does (the
        status it started, the body bytes sent) if the client got any of it
        (_reached_client), and cut, unless a refusal is closing the connection or the
        client is gone (nothing to cut, and a reset would lose the refusal's answer)."""
        if self.proto.state.access_log and self._reached_client():
            self._log_access()
        if not self.disconnected:
            self.proto.abort()

    def _byte_headers(self) -> list[tuple[bytes, bytes]]:
        """The app's header pairs as bytes. A name or value may be a subclass of str
        (markupsafe's Markup, Django's SafeString), as gunicorn accepts: equal text,
        equal bytes, whether the pair was learnt from a plain str or not."""
        fields = []
        known = _HEADER_BYTES
        for pair in self.response_headers:
            try:
                field = known.get(pair)
            except TypeError:  # (a list pair, or an unhashable name or value: checked)
                field = None
            if field is None:
                name, value = pair
                if not isinstance(name, str) or not isinstance(value, str):
                    raise TypeError(f"WSGI header {name!r}: {value!r} is not a pair of str")
                field = (name.encode("latin-1"), value.encode("latin-1"))
                if (type(pair) is tuple and len(value) <= _MAX_KEPT_VALUE
                        and len(name) <= _MAX_KEPT_VALUE):
                    if len(known) >= _MAX_KEPT:
                        known.clear()  # (the pairs met since come back as they are used)
                    known[pair] = field
            fields.append(field)
        return fields

    def _flush(self, final: bool) -> None:
        pending = self.pending
        body = pending[0] if len(pending) == 1 else b"".join(pending)
        if not final:  # (after the final block nothing is gathered: no new list)
            self.pending = []
        writer = self.writer
        # answered before its body was read: the rest of the body is unread
        unread = final and self.more_body
        if writer is None:
            status = self.status
            assert status is not None
            proto = self.proto
            state = proto.state
            head, writer = frame_head(  # (positional: cheaper)
                status, self._byte_headers(),
                _REQUESTS[self.method == "HEAD", self.http_version == "1.1",
                          self.keep_alive],
                len(body) if final else None, state.date_header,
                unread or (state.draining and not proto.pipeline), self.reason,
                self.access[0])
            self.writer = writer
            if final:
                data = head + writer.last(body)  # (write and end in one call)
            else:
                data = head + writer.write(body) if body else head
        elif final:
            data = writer.last(body)
        else:
            data = writer.write(body)
        if writer.overrun and not self.overrun_logged:
            self.overrun_logged = True
            log.warning("WSGI app sent more than its content-length for %s %s: cut, "
                        "the connection closes", self.method, self.route.decode("latin-1"))
        if final and self.inline:  # (the usual end: on the loop's thread, written now;
            proto = self.proto  # _write_final, inline)
            self.pending = _ENDED  # (a write() kept by the app is refused from now on)
            if data:
                proto.write(data)
            # (logged before the next pipelined request may start; a call that waited
            # for a pass of the loop may run after its client left: _reached_client)
            if proto.state.access_log and (not self.disconnected or self._reached_client()):
                self._log_access()
            proto.response_done(self, writer.keep_alive and not unread)
        else:
            self.hand_off(data, final, writer.keep_alive and not unread)


# an app's (name, value) header -> its bytes, learnt as they come. Bounded: the values of
# some headers differ per response (a redirect's Location that echoes the request's
# path, up to 8 KB), so only short pairs are kept, and a full table is emptied.
_HEADER_BYTES: dict[tuple[str, str], tuple[bytes, bytes]] = {}
_MAX_KEPT = 1024  # pairs
_MAX_KEPT_VALUE = 256  # characters of a name, of a value

# status text -> (code, reason bytes or None for the standard phrase), learnt as they come
_STATUSES: dict[str, tuple[int, bytes | None]] = {}


def _parse_status(status: Any) -> tuple[int, bytes | None]:
    if (not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit()
            or status[3:4] not in ("", " ")):
        raise ValueError(f"invalid WSGI status {status!r}")
    code = int(status[:3])
    reason = status[4:]
    parsed = (code, None if reason == _phrase(code) else reason.encode("latin-1"))
    if type(status) is str and len(_STATUSES) < 256:  # (an app's own texts: bounded)
        _STATUSES[status] = parsed
    return parsed


_PHRASES: dict[int, str] = {}


def _phrase(status: int) -> str:
    phrase = _PHRASES.get(status)
    if phrase is None:
        line = status_line(status).decode("latin-1")
        phrase = _PHRASES[status] = line[13:-2]
    return phrase


def _off_loop(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` on the loop's thread as if on another: no running loop seen (as
    WSGICycle.run calls an app inline)."""
    loop = _get_running_loop()
    _set_running_loop(None)
    try:
        return call(*args)
    finally:
        _set_running_loop(loop)
