"""One ASGICycle per HTTP request: builds the `http` scope, feeds the app its
`http.request` events and turns its `http.response.*` events into bytes."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Generator
from contextvars import copy_context
from typing import Any
from urllib.parse import unquote_to_bytes

from forkd.http import accesslog
from forkd.http.framing import BodyWriter, Request, frame_head, split_target
from forkd.http.protocol import ClientDisconnected, HttpProtocol, error_answer

log = logging.getLogger("forkd.http")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
MAX_PATHS = 256  # (ASGICycle.paths)
MAX_KEPT_PATH = 256
# every framing.Request there is, made once: (head_only, http11, keep_alive) -> it
_REQUESTS = {(head_only, http11, keep_alive): Request(head_only, http11, keep_alive)
             for head_only in (False, True) for http11 in (False, True)
             for keep_alive in (False, True)}


def decode_path(raw_path: bytes) -> str:
    """The ASGI `path`: percent-decoded UTF-8; invalid bytes become U+FFFD (the exact
    bytes stay in `raw_path`)."""
    if raw_path.find(b"%") < 0:  # (not `b"%" in`: see wsgi.py's unquoting)
        return raw_path.decode("latin-1")  # llhttp lets only ASCII through
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def connection_scope(server: tuple[str, int | None] | None, client: tuple[str, int] | None,
                     scheme: str, root_path: str) -> dict[str, Any]:
    """An `http` scope with the keys that are the same for each request of a connection
    (its client and scheme, unless a trusted proxy names others), in the order of a
    request's scope: ASGICycle copies it and sets the others."""
    return {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": "1.1",
        "server": server,
        "client": client,
        "scheme": scheme,
        "method": "GET",
        "root_path": root_path,
        "path": "",
        "raw_path": b"",
        "query_string": b"",
        "headers": [],
        "state": {},
    }


class ASGICycle:
    """One request of an app: made by the class `bind` returns, one per worker."""

    __slots__ = (
        "proto",
        "scope",
        "method",
        "keep_alive",
        "body",
        "body_size",
        "more_body",
        "receive_waiter",
        "started",
        "complete",
        "disconnected",
        "writer",
        "expect_continue",
        "status",
        "head_headers",
        "delivered_last",
        "overrun_logged",
        "access",
        "line",
        "task",
    )
    # (set by bind, on the class it makes)
    app: Any = None
    lifespan_state: dict[str, Any] = {}
    root_path = ""
    # raw path -> scope path (root_path and the decoded path): the same few paths come
    # again and again; bounded (MAX_PATHS of at most MAX_KEPT_PATH bytes, emptied when full)
    paths: dict[bytes, str] = {}

    @classmethod
    def bind(cls, app: Any, lifespan_state: dict[str, Any], root_path: str
             ) -> type[ASGICycle]:
        """The cycle class of one app, for ServerState.cycle_factory: it takes the
        protocol's arguments directly (no wrapper call per request)."""
        return type("ASGICycle", (cls,), {"__slots__": (), "app": staticmethod(app),
                                          "lifespan_state": lifespan_state,
                                          "root_path": root_path, "paths": {}})

    def __init__(
        self,
        proto: HttpProtocol,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self.proto = proto
        if target[:1] == b"/":  # origin-form, as nearly every request
            raw_path, _, query = target.partition(b"?")
        else:
            raw_path, query = split_target(target)
        root_path = self.root_path
        # a copy of the connection's scope (cheaper than a new dict of 14 keys), with this
        # request's keys set
        base = proto.asgi_base
        if base is None:
            base = proto.asgi_base = connection_scope(proto.server, proto.client,
                                                      proto.scheme, root_path)
        scope = self.scope = base.copy()
        scope["http_version"] = http_version  # (the protocol let only 1.1 and 1.0 through)
        scope["method"] = method
        path = self.paths.get(raw_path)
        if path is None:
            path = root_path + (raw_path.decode("latin-1") if raw_path.find(b"%") < 0
                                else decode_path(raw_path))
            if len(raw_path) <= MAX_KEPT_PATH:
                if len(self.paths) >= MAX_PATHS:
                    self.paths.clear()
                self.paths[raw_path] = path
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["headers"] = headers
        scope["state"] = dict(self.lifespan_state)
        if proto.req_client is not proto.client:  # a trusted proxy's headers named them
            scope["client"] = proto.req_client
        if proto.req_scheme is not proto.scheme:
            scope["scheme"] = proto.req_scheme
        self.method = method
        self.keep_alive = keep_alive
        self.body: list[bytes] | tuple[()] = ()  # parts, joined when the app receives them
        self.body_size = 0
        self.more_body = True
        self.receive_waiter: asyncio.Future[None] | None = None
        self.started = False
        self.complete = False
        self.disconnected = False
        self.writer: BodyWriter | None = None  # set once the head is framed
        self.status = 0
        self.head_headers: Any = ()
        self.delivered_last = False
        self.overrun_logged = False
        if proto.state.access_log:  # the scope's headers are this list: the app sees a made id too
            self.access = accesslog.begin(headers)
            # the access line's request as it came, whatever the app then does to its
            # scope (and always values the line can render)
            self.line = (proto.req_client, raw_path, query, http_version)
        else:
            self.access = accesslog.NONE
        # an Expect: 100-continue is looked for at the app's first receive(), the only
        # time it matters (most requests have no body, and many apps never receive)
        self.expect_continue = True
        # the task that runs this request, set by start, which makes it; None until then
        # (an eager task factory, Python 3.12+, runs run() inside create_task)
        self.task: asyncio.Task[None] | None = None

    # -- the protocol's side ----------------------------------------------------
    def start(self) -> None:
        proto = self.proto
        if proto.ending:
            # A pipelined request, started as the app before it ends its response: the
            # task of that app runs this one too once that app returns, with no task of
            # its own and no pass of the loop in between. If that app does more after
            # its response (it awaits), this request gets a task on the next pass.
            proto.chained = self
            if not proto.chain_scheduled:
                proto.chain_scheduled = True
                proto.loop.call_soon(_start_chained, proto)
            return
        # (in a context of its own: start may run in the task of the request before this
        # one, whose context variables are not this request's)
        task = self.task = proto.loop.create_task(self.run(), context=proto.context.copy())
        proto.state.tasks.add(task)  # (run takes it out as it ends: no done callback)
        if proto.flush_scheduled:  # (that flush_soon runs first: it lets this task run)
            proto.task_unstarted = True

    def feed_body(self, body: bytes) -> None:
        if not self.complete:  # after the response, the rest of the body is dropped
            if self.body:
                self.body.append(body)  # type: ignore[union-attr]
            else:
                self.body = [body]
            self.body_size += len(body)
            if self.receive_waiter is not None:
                self._wake()

    def body_complete(self) -> None:
        self.more_body = False
        if self.receive_waiter is not None:
            self._wake()

    def body_buffered(self) -> int:
        return self.body_size

    def disconnect(self, replaced: bool = False) -> None:
        # (a replaced answer is never logged: send() raises from now on)
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.receive_waiter
        if waiter is not None:
            self.receive_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the app's side ------------------------------------------------------------
    async def run(self) -> None:
        """The task of this request, then of the pipelined requests chained to it (see
        start) while it can start them as a task of their own would: no cancellation
        asked of it, and its context still equal to the connection's (a new task's is
        a copy of that). Else the next one gets a task of its own. Past the pass
        budget (ServerState.may_chain), the next one runs on the next pass, in this
        task still."""
        proto = self.proto
        task = self.task
        state = proto.state
        cycle = self
        del self  # (the chain's later requests keep none of the first one's objects)
        wait_pass = False
        try:
            while True:
                try:
                    if wait_pass:  # (inside the try: a cancellation now is answered)
                        wait_pass = False
                        if proto.flush_scheduled:  # (as in start)
                            proto.task_unstarted = True
                        try:
                            await _next_pass()
                        except asyncio.CancelledError:
                            cycle._never_run()  # (then _raised finds it answered)
                            raise
                    await cycle.app(cycle.scope, cycle.receive, cycle.send)
                except BaseException as exc:
                    if cycle._raised(exc):
                        raise
                else:
                    if not cycle.complete:
                        if cycle.disconnected:
                            cycle._left()
                        else:
                            cycle._returned_early()
                cycle = proto.chained
                if cycle is None:
                    return
                proto.chained = None  # (taken: _start_chained finds nothing)
                # A task of its own for it if this task is unfit: an app swallowed a
                # cancellation (asyncio.timeout and anyio's cancel scopes of the next
                # app would count it as theirs), or set a context variable and left it
                # set (its value would reach the next app).
                if (task is None or task.cancelling()
                        or len(copy_context()) != len(proto.context)  # (_as_new's
                        or (proto.context and not _as_new(proto))):  # usual case, inline)
                    cycle.start()
                    return
                # If the rest of this pass is for other connections, it runs on the next
                # pass, in this task still: a task of its own would cost a new Task and
                # its context for each such request, and under many pipelining clients
                # that is most of them.
                wait_pass = not state.may_chain()
        finally:
            # the task's last step: it leaves the set now, cheaper than a done
            # callback (one more pass of the loop) and as exact
            state.tasks.discard(task)

    def _never_run(self) -> None:
        """Cancelled (the drain's deadline) while waiting for its turn: its app never
        saw it, so the client may safely send it again, to another worker."""
        proto = self.proto
        self.complete = True
        logged = proto.state.access_log
        data, size = error_answer(
            503, "Service Unavailable: this worker is stopping; retry", proto.state.date_header,
            b"retry-after: 0\r\n" + accesslog.id_field(self.access) if logged
            else b"retry-after: 0\r\n")
        proto.write(data)
        if logged and not self.disconnected:  # (an answer as any other, as _fail's 500)
            self.status = 503
            self._log_access(size)
        proto.response_done(self, keep_alive=False)

    def _returned_early(self) -> None:
        if self.started:
            log.error("ASGI app returned before finishing its response")
        else:
            log.error("ASGI app returned without starting a response")
        self._fail()

    def _path(self) -> str:
        """The request's path in forkd's own lines about it: the raw path it came with
        (with --access-log, its line's), never a lookup that raises: the app may have
        changed or removed its scope's, and its 500 must not be lost over that."""
        if self.proto.state.access_log:
            return self.line[1].decode("latin-1")
        return str(self.scope.get("path", "-"))  # (kept only with --access-log)

    def _raised(self, exc: BaseException) -> bool:
        """The app raised `exc`: answer for it; True if it must go on up."""
        if self.disconnected and isinstance(exc, Exception):
            # the client went away and the app stopped on being told (send raised;
            # Starlette turns that into its own ClientDisconnect): not an error, and
            # routine (its access line tells it, if the answer had started)
            log.debug("%s %s ended by %s: the client disconnected", self.method,
                      self._path(), type(exc).__name__)
            self._left()
            return False
        if isinstance(exc, asyncio.CancelledError):  # the drain's deadline passed
            self._fail()
            return True
        log.error("exception in ASGI app for %s %s", self.method, self._path(),
                  exc_info=exc)
        self._fail()
        return isinstance(exc, KeyboardInterrupt | SystemExit)

    def _left(self) -> None:
        """The client went away before the response ended: logged, as nginx does, with
        the status it started and the body bytes sent (not before it started: there is
        no status to log)."""
        if self.complete:
            return
        self.complete = True
        if self.writer is not None and self.proto.state.access_log:
            self._log_access(self.writer.sent)

    def _fail(self) -> None:
        if self.complete:
            return
        proto = self.proto
        self.complete = True
        logged = proto.state.access_log
        if self.writer is not None:
            if logged:  # (as nginx does: the status it started, the body bytes sent)
                self._log_access(self.writer.sent)
            proto.abort()  # part of a response is out: the client must see it is cut
        else:
            # an answer as any other for the access log: its line, its request id
            data, size = error_answer(500, "Internal Server Error", proto.state.date_header,
                                      accesslog.id_field(self.access) if logged else b"")
            proto.write(data)
            if logged and not self.disconnected:  # (a client gone was sent nothing: no line)
                self.status = 500
                self._log_access(size)
            proto.response_done(self, keep_alive=False)

    async def receive(self) -> dict[str, Any]:
        if self.expect_continue:  # the first receive()
            self.expect_continue = False
            if not self.started and self.more_body and self._expects_continue():
                self.proto.send_continue()
        if not self.delivered_last:
            while not self.body and self.more_body and not self.disconnected:
                await self._wait()
            if not self.disconnected and not self.complete:
                parts = self.body
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                self.body = ()
                self.body_size = 0
                more = self.more_body
                self.delivered_last = not more
                self.proto.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more}
        # the whole body is delivered: wait until the client goes or the response ends
        while not (self.disconnected or self.complete):
            await self._wait()
        return {"type": "http.disconnect"}

    def _expects_continue(self) -> bool:
        scope: Any = self.scope
        if scope["http_version"] != "1.1":
            return False
        for name, value in scope["headers"]:
            if name == b"expect" and value.lower() == b"100-continue":
                return True
        return False

    async def _wait(self) -> None:
        waiter = self.receive_waiter = self.proto.loop.create_future()
        self.proto.resume_reading()
        await waiter

    async def send(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.write_paused:
            await proto.wait_writable()
        kind = message["type"]
        if kind == "http.response.body":
            writer = self.writer
            if writer is None:
                if not self.started:
                    raise RuntimeError("http.response.body sent before http.response.start")
            elif self.complete:
                raise RuntimeError("http.response.body sent after the response ended")
            if self.disconnected:
                # ASGI 2.4: the app learns the client is gone, so a stream stops
                raise ClientDisconnected("the client disconnected")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if writer is None:
                state = proto.state
                data, writer = frame_head(  # (positional: cheaper)
                    self.status, self.head_headers,
                    _REQUESTS[self.method == "HEAD", self.scope["http_version"] == "1.1",
                              self.keep_alive],
                    None if more else len(body), state.date_header,
                    state.draining and not proto.pipeline, None, self.access[0],
                    None if more else body)  # (a whole body: framed with the head)
                self.writer = writer
                if more:
                    if body:
                        data += writer.write(body)
                else:
                    self.complete = True
            elif more:
                data = writer.write(body)
            else:
                data = writer.last(body)
                self.complete = True
            if writer.overrun and not self.overrun_logged:
                self.overrun_logged = True
                log.warning("ASGI app sent more than its content-length for %s %s: cut, "
                            "the connection closes", self.method, self._path())
            if data:
                proto.write(data)
            if not more:
                if self.receive_waiter is not None:
                    self._wake()
                if proto.state.access_log:
                    self._log_access(writer.sent)
                if proto.pipeline:  # (the only case where response_done starts one)
                    proto.ending = True  # (a pipelined request started now is chained)
                    try:
                        proto.response_done(self, writer.keep_alive)
                    finally:
                        proto.ending = False
                else:
                    proto.response_done(self, writer.keep_alive)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            if self.disconnected:
                raise ClientDisconnected("the client disconnected")
            self.started = True
            self.status = message["status"]
            self.head_headers = message.get("headers", ())
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r} for http")

    def _log_access(self, size: int) -> None:
        client, raw_path, query, version = self.line
        accesslog.ended(self.access, self.status, size, client, self.method, raw_path, query,
                        version)


def _as_new(proto: HttpProtocol) -> bool:
    """Is the running task's context as the connection's, which a new request's task
    would start from? (An app that set a context variable, and did not reset it, made
    it differ: its value would reach the next request.)"""
    context = copy_context()
    base = proto.context
    if len(context) != len(base):
        return False
    if not base:  # (usually: both are empty)
        return True
    return all(context.get(var, _MISSING) is value for var, value in base.items())


_MISSING = object()


@types.coroutine
def _next_pass() -> Generator[None, None, None]:
    """Awaited: the task goes on in the loop's next pass (asyncio.sleep(0), without
    its wrapper call)."""
    yield


def _start_chained(proto: HttpProtocol) -> None:
    """A pass after a request was chained: if the app before it has not returned yet
    (it does more after its response), the request gets a task of its own."""
    proto.chain_scheduled = False
    cycle = proto.chained
    if cycle is not None:
        proto.chained = None
        cycle.start()  # (not while a response ends: a task of its own)
