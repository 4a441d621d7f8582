"""One ASGICycle per HTTP request: builds the `http` scope, feeds the app its
`http.request` events and turns its `http.response.*` events into bytes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

from forkd.http.protocol import HttpProtocol, error_response, status_line

log = logging.getLogger("forkd.http")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_NO_BODY_STATUSES = frozenset((204, 304))
_HTTP_VERSIONS = {"1.1": "1.1", "1.0": "1.0"}


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Request target -> (raw path, query string); absolute-form and `*` included."""
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
        return path, query
    if target == b"*":
        return b"*", b""
    url = httptools.parse_url(target)
    return url.path or b"/", url.query or b""


def decode_path(raw_path: bytes) -> str:
    """The ASGI `path`: percent-decoded UTF-8; invalid bytes become U+FFFD (the exact
    bytes stay in `raw_path`)."""
    if b"%" not in raw_path:
        return raw_path.decode("latin-1")  # llhttp lets only ASCII through
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


class ASGICycle:
    __slots__ = (
        "proto",
        "app",
        "scope",
        "method",
        "keep_alive",
        "body",
        "more_body",
        "receive_waiter",
        "started",
        "complete",
        "disconnected",
        "chunked",
        "expect_continue",
        "status",
        "head_headers",
        "status_has_no_body",
        "delivered_last",
    )

    def __init__(
        self,
        proto: HttpProtocol,
        app: Any,
        lifespan_state: dict[str, Any],
        root_path: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self.proto = proto
        self.app = app
        raw_path, query = split_target(target)
        self.scope = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": _HTTP_VERSIONS.get(http_version, http_version),
            "server": proto.server,
            "client": proto.client,
            "scheme": "http",
            "method": method,
            "root_path": root_path,
            "path": root_path + decode_path(raw_path),
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": dict(lifespan_state),
        }
        self.method = method
        self.keep_alive = keep_alive
        self.body = b""
        self.more_body = True
        self.receive_waiter: asyncio.Future[None] | None = None
        self.started = False
        self.complete = False
        self.disconnected = False
        self.chunked = False
        self.status = 0
        self.head_headers: Any = ()
        self.status_has_no_body = False
        self.delivered_last = False
        self.expect_continue = False
        if http_version == "1.1":
            for name, value in headers:
                if name == b"expect" and value.lower() == b"100-continue":
                    self.expect_continue = True

    # -- the protocol's side ----------------------------------------------------
    def start(self) -> None:
        tasks = self.proto.state.tasks
        task = self.proto.loop.create_task(self.run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def feed_body(self, body: bytes) -> None:
        if not self.complete:  # after the response, the rest of the body is dropped
            self.body += body
            self._wake()

    def body_complete(self) -> None:
        self.more_body = False
        self._wake()

    def body_buffered(self) -> int:
        return len(self.body)

    def disconnect(self) -> None:
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
        try:
            await self.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("exception in ASGI app for %s %s", self.method, self.scope["path"],
                      exc_info=exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self._fail()
        else:
            if not self.complete:
                if self.started:
                    log.error("ASGI app returned before finishing its response")
                else:
                    log.error("ASGI app returned without starting a response")
                self._fail()

    def _fail(self) -> None:
        if self.complete:
            return
        proto = self.proto
        self.complete = True
        if self.started and not self.status:  # status is cleared once the head is written
            proto.abort()  # part of a response is out: the client must see it is cut
        else:
            proto.write(error_response(500, "Internal Server Error", proto.state.date_header))
            proto.response_done(self, keep_alive=False)

    async def receive(self) -> dict[str, Any]:
        if self.expect_continue:
            self.expect_continue = False
            if not self.started and self.more_body:
                self.proto.send_continue()
        if not self.delivered_last:
            while not self.body and self.more_body and not self.disconnected:
                await self._wait()
            if not self.disconnected and not self.complete:
                body = self.body
                self.body = b""
                more = self.more_body
                self.delivered_last = not more
                self.proto.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more}
        # the whole body is delivered: wait until the client goes or the response ends
        while not (self.disconnected or self.complete):
            await self._wait()
        return {"type": "http.disconnect"}

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
            if not self.started:
                raise RuntimeError("http.response.body sent before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body sent after the response ended")
            if self.disconnected:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            head = self.status  # 0 once the head is out
            if head:
                self._write_head(body, more)
                self.status = 0
            elif self.method == "HEAD" or self.status_has_no_body:
                pass
            elif self.chunked:
                if body:
                    proto.write(b"%x\r\n%b\r\n" % (len(body), body))
            elif body:
                proto.write(body)
            if not more:
                self.complete = True
                if self.chunked and not head and self.method != "HEAD":
                    proto.write(b"0\r\n\r\n")
                self._wake()
                proto.response_done(self, self.keep_alive)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status = message["status"]
            self.status = status
            self.head_headers = message.get("headers", ())
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r} for http")

    def _write_head(self, body: bytes, more: bool) -> None:
        proto = self.proto
        state = proto.state
        status = self.status
        parts = [status_line(status)]
        content_length: int | None = None
        has_date = False
        for name, value in self.head_headers:
            lname = name.lower()
            if lname == b"content-length":
                content_length = int(value)
            elif lname == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            elif lname == b"transfer-encoding":
                continue  # framing is ours to choose
            elif lname == b"date":
                has_date = True
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise RuntimeError(f"invalid character in response header {name!r}")
            parts += (name, b": ", value, b"\r\n")
        if not has_date:
            parts.append(state.date_header)
        no_body = status in _NO_BODY_STATUSES or status < 200
        head_only = self.method == "HEAD"
        if no_body:
            self.status_has_no_body = True
        elif content_length is None:
            if not more:
                parts.append(b"content-length: %d\r\n" % len(body))
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the end of the body is the close
        if state.draining and not proto.pipeline:
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not (head_only or no_body) and body:
            if self.chunked:
                parts += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                parts.append(body)
        if not more and self.chunked and not head_only:
            parts.append(b"0\r\n\r\n")
            self.chunked = False
        proto.write(b"".join(parts))
        if state.access_log:
            from forkd.http.accesslog import log_access

            log_access(self.scope, status, content_length if content_length is not None
                       else len(body))
