"""WebSocket connections for ASGI apps: RFC 6455 under the ASGI `websocket` scope.

The handshake's checks, the framing, masking, UTF-8 of close reasons, automatic pongs,
`--ws-max-size` (close 1009) and permessage-deflate are the `websockets` package's
sans-I/O `ServerProtocol`: bytes in, events out, no I/O of its own. This module is
only the shell around it: it takes the connection over from `HttpProtocol` once the
upgrade request's head is parsed (the transport switches protocol objects, so no
per-byte branch is added to plain HTTP), feeds the app its `websocket.*` events,
writes what the protocol object wants written, pings idle clients on the worker's
coarse clock, and closes with 1012 when a draining worker runs out of time.

Phases of one connection:

    HANDSHAKE --websocket.accept--> OPEN --close frames both ways / lost--> (closed)
        |--websocket.http.response.start--> DENIAL --last body--> (closed)
        '--websocket.close / app returns--> 403, (closed)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import deque
from typing import Any

from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

from forkd.http import accesslog
from forkd.http.asgi import ASGI_VERSION, decode_path
from forkd.http.framing import split_target
from forkd.http.protocol import HttpProtocol, error_answer, status_line

log = logging.getLogger("forkd.http")
# The library logs every opening and closing at INFO: noise at one line per connection
# (the access log already says it). Its warnings and errors still come through.
_protocol_log = logging.getLogger("forkd.http.websocket")
_protocol_log.setLevel(logging.WARNING)

CLOSE_TIMEOUT = 3.0  # seconds the client gets to finish a closing handshake
HIGH_WATER = 1 << 20  # received message bytes the app has not taken, above which reading pauses
SERVICE_RESTART = 1012  # RFC 6455 registry: "service restart"; the client should reconnect
NORMAL = 1000
INTERNAL_ERROR = 1011
ABNORMAL = 1006


class ClientDisconnected(OSError):
    """Raised by `send` once the WebSocket is closed (ASGI: a subclass of OSError)."""


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for the app to accept or refuse
    DENIAL = "denial"  # the app is sending an HTTP response instead of accepting
    OPEN = "open"  # accepted: messages flow until close frames or the connection ends
    DONE = "done"  # the app's side is over (refused, or the WebSocket closed)


def wants_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an upgrade request asks for a WebSocket (not, say, h2c)."""
    for name, value in headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def _request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    # httptools has parsed and bounded the head already; the websockets parser gets it
    # again in its own form (a few microseconds once per connection) so that only its
    # public API is used.
    lines = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class WebSocketConnection(asyncio.Protocol):
    """One upgraded connection and the ASGI app call that serves it."""

    def __init__(self, http: HttpProtocol, app: Any, lifespan_state: dict[str, Any],
                 root_path: str, method: str, target: bytes,
                 headers: list[tuple[bytes, bytes]]) -> None:
        state = http.state
        config = state.config
        self.http = http
        self.state = state
        self.loop = state.loop
        self.transport = http.transport
        self.app = app
        self.ws = ServerProtocol(
            extensions=(enable_server_permessage_deflate(None)
                        if config.ws_per_message_deflate else None),
            max_size=config.ws_max_size,
            logger=_protocol_log,
        )
        raw_path, query = split_target(target)
        subprotocols: list[str] = []
        for name, value in headers:
            if name == b"sec-websocket-protocol":
                subprotocols += [p.strip() for p in value.decode("latin-1").split(",")
                                 if p.strip()]
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": ASGI_VERSION,
            "http_version": "1.1",
            "scheme": "wss" if http.req_scheme == "https" else "ws",
            "server": http.server,
            "client": http.req_client,
            "root_path": root_path,
            "path": root_path + decode_path(raw_path),
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": subprotocols,
            "state": dict(lifespan_state),
            "extensions": {"websocket.http.response": {}},
        }
        # the access line's fields as the handshake came (the app may change its scope),
        # its request id one forkd made if it sent none (the app sees it among the
        # headers, and the answer carries it back, as for any request)
        self.access: tuple[Any, bytes, bytes, tuple[bytes, bytes, bytes, float]] | None = (
            (http.req_client, raw_path, query, accesslog.begin(headers))
            if state.access_log else None)
        self.head = _request_head(method, target, headers)
        self.received_at = time.perf_counter()
        self.phase = Phase.HANDSHAKE
        self.response: Response | None = None  # the 101 until the app accepts
        self.denial: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.denial_body: list[bytes] = []
        self.messages: deque[dict[str, Any]] = deque()
        self.buffered = 0
        self.receive_waiter: asyncio.Future[None] | None = None
        self.connect_delivered = False
        self.disconnect: dict[str, Any] | None = None  # set once the WebSocket is over
        self.fragments: list[bytes] = []
        self.fragments_text = False
        self.closed = False  # the transport is gone
        self.counted = False  # in state.websockets
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_seen = state.now
        self.ping_sent_at: float | None = None
        self.ping_payload = b""  # what its pong must echo
        self.close_deadline: float | None = None

    # -- taking the connection over from HttpProtocol ---------------------------------
    def take_over(self, leftover: bytes) -> None:
        state = self.state
        transport = self.transport
        assert transport is not None
        state.connections.discard(self.http)
        state.connections.add(self)
        transport.set_protocol(self)
        # uvloop tells a pause once: one that began under HTTP (an answer left unread
        # before the upgrade) holds for this protocol too, its clocks already running
        self.write_paused = self.http.write_paused
        if self.http.read_paused:
            transport.resume_reading()
        ws = self.ws
        ws.receive_data(self.head + leftover)
        self.head = b""
        events = ws.events_received()
        request = events[0] if events and isinstance(events[0], Request) else None
        if state.draining:
            # a worker on its way out takes no new WebSocket: the client retries at once
            # and lands on a worker that stays
            data, size = error_answer(503, "Service Unavailable: this worker is restarting; "
                                      "retry", state.date_header,
                                      b"retry-after: 0\r\n" + self._id_field())
            self._write(data)
            self._answered(503, size)
            self._finish_app_side()
            self._half_close()
            return
        if request is None:
            data, size = error_answer(400, "Bad Request: invalid WebSocket handshake",
                                      state.date_header, self._id_field())
            self._write(data)
            self._answered(400, size)
            self._finish_app_side()
            self._half_close()
            return
        response = ws.accept(request)
        if getattr(ws.handshake_exc, "name", None) == "Sec-WebSocket-Version":
            # RFC 6455 4.4: 426 naming the version this server speaks, so a client can retry
            response = ws.reject(426, f"Failed to open a WebSocket connection: "
                                      f"{ws.handshake_exc}.\n")
            response.headers["Sec-WebSocket-Version"] = "13"
        if response.status_code != 101:
            # a malformed handshake: the library's 4xx names what is wrong
            log.info("refused a WebSocket handshake from %s: %d %s", self.http.client,
                     response.status_code, ws.handshake_exc)
            self._add_id(response)
            ws.send_response(response)
            self._answered(response.status_code, len(response.body or b""))
            self._finish_app_side()
            self._flush()
            return
        self.response = response
        task = self.loop.create_task(self.run())
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        # frames that came in the same read as the handshake (a client that does not wait
        # for the 101): parsed already, and no later read brings them again
        self._on_frames(events[1:])

    # -- the transport's side ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # (set_protocol does not call it; the transport is the HTTP connection's)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.connections.discard(self)
        if self.state.balance is not None:
            self.state.balance.closed(len(self.state.connections))
        if self.counted:
            self.counted = False
            self.state.metrics.websockets -= 1
            self.state.websockets.discard(self)
        self._disconnected(ABNORMAL, "")
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.state.now
        self.ws.receive_data(data)
        self._on_frames(self.ws.events_received())

    def _on_frames(self, received: list[Any]) -> None:
        ws = self.ws
        for frame in received:
            if not isinstance(frame, Frame):
                continue  # the handshake's Request, consumed in take_over
            opcode = frame.opcode
            if opcode is Opcode.PONG:
                # (only the echo of our ping answers it: RFC 6455 5.5.3 lets a client
                # send pongs of its own, as a heartbeat, which prove nothing)
                if frame.data == self.ping_payload:
                    self.ping_sent_at = None
            elif opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                if opcode is not Opcode.CONT:
                    self.fragments_text = opcode is Opcode.TEXT
                self.fragments.append(bytes(frame.data))
                if frame.fin:
                    self._message_complete()
        if ws.state is State.CONNECTING:
            # frames before the app accepted: data waits for it; a ping's pong must not go
            # out before the 101 (nor anything else: see _accept); a close from the client
            # is the app's disconnect, and no 101 follows
            if ws.close_rcvd is not None:
                self._disconnected(ws.close_rcvd.code, ws.close_rcvd.reason)
            return
        if ws.state is not OPEN:
            self._closing()
        self._flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._closing()
        self._flush()
        return None

    def pause_writing(self) -> None:
        if self.write_paused:  # (told again without a resume: the clocks run on)
            return
        self.write_paused = True
        self.http.send_paused()  # (its clocks judge what the client takes)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.http.send_resumed()
        waiter = self.drain_waiter
        self.drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _message_complete(self) -> None:
        data = b"".join(self.fragments) if len(self.fragments) > 1 else self.fragments[0]
        self.fragments = []
        if self.phase is not Phase.OPEN and self.phase is not Phase.HANDSHAKE:
            return  # the app has closed its side (or denies): nobody reads this
        # (in HANDSHAKE the message waits: the app reads it once it has accepted)
        message: dict[str, Any]
        if self.fragments_text:
            try:
                message = {"type": "websocket.receive", "text": bytes(data).decode("utf-8")}
            except UnicodeDecodeError as exc:
                self.ws.fail(1007, f"invalid UTF-8 at position {exc.start}")
                return
        else:
            message = {"type": "websocket.receive", "bytes": bytes(data)}
        self.messages.append(message)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def _closing(self) -> None:
        """The protocol left OPEN: a close frame came or went, or it failed."""
        ws = self.ws
        if self.close_deadline is None:
            self.close_deadline = self.state.now + CLOSE_TIMEOUT
        close = ws.close_rcvd or ws.close_sent
        if close is not None:
            self._disconnected(close.code, close.reason)
        elif ws.state is not State.CONNECTING:
            self._disconnected(ABNORMAL, "")

    def _disconnected(self, code: int, reason: str) -> None:
        if self.disconnect is None:
            self.disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
            self._wake()

    # -- the app's side ---------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("exception in ASGI app for WebSocket %s", self.scope["path"], exc_info=exc)
            self._app_ended(failed=True)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        else:
            self._app_ended(failed=False)

    def _app_ended(self, failed: bool) -> None:
        phase = self.phase
        self.phase = Phase.DONE
        if self.closed:
            return
        if phase is Phase.HANDSHAKE:
            # never accepted: a failure is the server's error, a plain return a refusal
            self._deny_plain(500 if failed else 403)
        elif phase is Phase.DENIAL:
            if failed or self.denial is not None:
                self.abort()  # a denial cut short: the client must not take it as whole
        elif phase is Phase.OPEN and self.ws.state is OPEN:
            self.ws.send_close(INTERNAL_ERROR if failed else NORMAL)
            self._closing()
            self._flush()

    async def receive(self) -> dict[str, Any]:
        if not self.connect_delivered:
            self.connect_delivered = True
            return {"type": "websocket.connect"}
        while not self.messages:
            if self.disconnect is not None:
                return self.disconnect
            waiter = self.receive_waiter = self.loop.create_future()
            await waiter
        message = self.messages.popleft()
        self.buffered -= len(message.get("bytes") or message.get("text") or "")
        if self.read_paused and self.buffered <= HIGH_WATER // 4 and not self.closed:
            self.read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return message

    def _wake(self) -> None:
        waiter = self.receive_waiter
        if waiter is not None:
            self.receive_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        phase = self.phase
        if kind == "websocket.send":
            if phase is not Phase.OPEN:
                raise RuntimeError("websocket.send before websocket.accept or after close")
            if self.ws.state is not OPEN or self.closed:
                raise ClientDisconnected("the WebSocket is closed")
            text = message.get("text")
            if text is not None:
                self.ws.send_text(text.encode("utf-8"))
            else:
                self.ws.send_binary(message.get("bytes") or b"")
            self._flush()
            if self.write_paused and not self.closed:
                waiter = self.drain_waiter
                if waiter is None:
                    waiter = self.drain_waiter = self.loop.create_future()
                await waiter
        elif kind == "websocket.accept":
            if phase is not Phase.HANDSHAKE:
                raise RuntimeError(f"websocket.accept in phase {phase.value}")
            self._accept(message)
        elif kind == "websocket.close":
            if phase is Phase.HANDSHAKE:
                self.phase = Phase.DONE
                self._deny_plain(403)
            elif phase is Phase.OPEN:
                if self.ws.state is OPEN and not self.closed:
                    self.ws.send_close(int(message.get("code", NORMAL)),
                                       message.get("reason") or "")
                    self._closing()
                    self._flush()
            else:
                raise RuntimeError(f"websocket.close in phase {phase.value}")
        elif kind == "websocket.http.response.start":
            if phase is not Phase.HANDSHAKE:
                raise RuntimeError(f"{kind} in phase {phase.value}")
            self.phase = Phase.DENIAL
            self.denial = (int(message["status"]), list(message.get("headers", ())))
        elif kind == "websocket.http.response.body":
            if phase is not Phase.DENIAL or self.denial is None:
                raise RuntimeError(f"{kind} before websocket.http.response.start")
            self.denial_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                self._send_denial()
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r} for websocket")

    def _accept(self, message: dict[str, Any]) -> None:
        response = self.response
        assert response is not None
        self.response = None
        # what the library queued while CONNECTING (a pong, the end of stream after the
        # client's close) cannot precede the 101
        for _ in self.ws.data_to_send():
            pass
        if self.closed or self.ws.close_rcvd is not None:
            self.phase = Phase.OPEN  # (its receive() gets the disconnect)
            if not self.closed:
                self._half_close()  # the client closed before the accept: no 101
            return
        subprotocol = message.get("subprotocol")
        if subprotocol is not None:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in message.get("headers", ()):
            key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if "\r" in key or "\n" in key or "\r" in text or "\n" in text:
                raise RuntimeError(f"invalid character in response header {key!r}")
            response.headers[key] = text
        self._add_id(response)
        self.ws.send_response(response)
        self.phase = Phase.OPEN
        self.counted = True
        self.state.metrics.websockets += 1  # forkd_websockets
        self.state.websockets.add(self)
        self.last_seen = self.state.now
        self._flush()
        self._answered(101, 0)

    def _send_denial(self) -> None:
        assert self.denial is not None
        status, headers = self.denial
        self.denial = None
        body = b"".join(self.denial_body)
        self.denial_body = []
        self.phase = Phase.DONE
        parts = [status_line(status)]
        has_length = has_id = False
        for name, value in headers:
            lname = name.lower()
            if lname in (b"connection", b"transfer-encoding"):
                continue
            if lname == b"content-length":
                has_length = True
            elif lname == b"x-request-id":  # (the app's own: kept, as framing does)
                has_id = True
            if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value:
                raise RuntimeError(f"invalid character in response header {name!r}")
            parts += (name, b": ", value, b"\r\n")
        if not has_length:
            parts.append(b"content-length: %d\r\n" % len(body))
        if not has_id:
            parts.append(self._id_field())
        parts += (self.state.date_header, b"connection: close\r\n\r\n", body)
        self._write(b"".join(parts))
        self._answered(status, len(body))
        self._half_close()

    def _deny_plain(self, status: int) -> None:
        text = "Forbidden" if status == 403 else "Internal Server Error"
        data, size = error_answer(status, text, self.state.date_header, self._id_field())
        self._write(data)
        self._answered(status, size)
        self._half_close()

    def _finish_app_side(self) -> None:
        self.phase = Phase.DONE
        self.response = None

    # -- writing and closing -----------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.http.sent += len(data)  # (what the client took: HttpProtocol.unsent_now)
            self.transport.write(data)

    def _flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self._write(chunk)
            else:  # the protocol's end-of-stream: the server closes TCP first (RFC 6455 7.1.1)
                self._half_close()

    def _half_close(self) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        if self.close_deadline is None:
            self.close_deadline = self.state.now + CLOSE_TIMEOUT
        if transport.can_write_eof():
            transport.write_eof()
            if self.read_paused:  # read (and drop) until the client closes too
                self.read_paused = False
                transport.resume_reading()
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _id_field(self) -> bytes:
        """The x-request-id field of an answer forkd frames itself (with --access-log)."""
        return b"" if self.access is None else accesslog.id_field(self.access[3])

    def _add_id(self, response: Response) -> None:
        """The request id on an answer the library frames (the 101, its refusals),
        unless the app gave one of its own (with --access-log)."""
        if self.access is not None and "X-Request-ID" not in response.headers:
            response.headers["X-Request-ID"] = self.access[3][0].decode("latin-1")

    def _answered(self, status: int, size: int) -> None:
        """The handshake's answer (101, a denial, a refusal): counted in
        forkd_http_requests_total like any response, and access-logged."""
        duration = time.perf_counter() - self.received_at
        self.state.metrics.record(b"GET", b"%d" % status, duration)
        if self.access is not None:  # (as any request's: begin took its fields)
            client, raw_path, query, fields = self.access
            accesslog.ended(fields, status, size, client, "GET", raw_path, query, "1.1")

    # -- the worker's clock and drain -----------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        if self.close_deadline is not None:
            if now >= self.close_deadline:
                self.abort()
            return
        if self.write_paused:
            # The app's send() waits on the client: one that takes none of it for
            # --header-timeout, or too little, is cut as an HTTP answer's would be
            # (HttpProtocol.check_timeouts), whatever it sends meanwhile.
            http = self.http
            http.unsent_now(now)
            if now - http.write_paused_at >= http.send_stall() or http.send_too_slow(now):
                http.cut_reader()
                return
        if self.phase is not Phase.OPEN or self.ws.state is not OPEN:
            return
        config = self.state.config
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= config.ws_ping_timeout:
                log.info("WebSocket from %s: no pong in %.1fs, closing", self.http.client,
                         config.ws_ping_timeout)
                self.ws.fail(INTERNAL_ERROR, "keepalive ping timeout")
                self._closing()
                self._flush()
        elif config.ws_ping_interval and now - self.last_seen >= config.ws_ping_interval:
            self.ping_sent_at = now
            self.ping_payload = os.urandom(4)
            self.ws.send_ping(self.ping_payload)
            self._flush()

    def drain(self) -> None:
        """A draining worker lets open WebSockets run; `restart` ends them at the deadline."""

    def restart(self) -> None:
        """The worker's graceful time is nearly up: close with 1012 so the client
        reconnects (to another worker), and give it a moment to answer."""
        if self.closed:
            return
        if self.phase is Phase.OPEN and self.ws.state is OPEN:
            self.ws.send_close(SERVICE_RESTART, "service restart")
            self._closing()
            self._flush()
        elif self.close_deadline is None:
            self.abort()


def make_upgrade_factory(app: Any, lifespan_state: dict[str, Any], root_path: str) -> Any:
    """What the worker gives `ServerState.upgrade_factory` for an ASGI app."""

    def factory(http: HttpProtocol, method: str, target: bytes,
                headers: list[tuple[bytes, bytes]], version: str) -> WebSocketConnection | None:
        if method != "GET" or version != "1.1" or not wants_websocket(headers):
            return None  # not a WebSocket handshake: the app answers it as plain HTTP
        return WebSocketConnection(http, app, lifespan_state, root_path, method, target,
                                   headers)

    return factory
