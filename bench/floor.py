"""The pure-Python floor: the thinnest correct HTTP/1.1 server on uvloop + httptools.

A measuring stick for issue 20, not a server to deploy. It does what any pure-Python
server on these two libraries must do for a request, and nothing else, so its speed is
the ceiling of every such design: whatever forkd's Python does per request, it can at
best approach this (see bench/profiles/README.md, "The pure-Python floor").

    python -m bench.floor bench.apps.hello_asgi:app -b 127.0.0.1:8000 -w 2 --interface asgi
    python -m bench.floor bench.apps.hello_wsgi:app -b 127.0.0.1:8000 -w 2 --interface wsgi \\
        --blocking /io

What it does: a primary binds one listening socket and forks N workers that share it;
each runs a uvloop loop with an asyncio.Protocol that parses with httptools, builds a
PEP 3333 environ or an ASGI scope, calls the app (ASGI: one asyncio task per request, so
`asyncio.current_task()` works as apps expect), frames the answer with a Content-Length,
keeps the connection alive, answers pipelined requests in order, and writes once per
response, or once for all the answers that were due together (a pipelined batch).
WSGI calls run on the loop's thread, except on the paths named by --blocking: those go
to a pool of plain threads (a queue, no futures) and come back by call_soon_threadsafe.
The floor knows in advance which paths block; forkd has to learn it.

What it leaves out, on purpose: request bodies are read whole before the app runs and
answers are sent whole (no streaming, no chunked answers, no flow control); no limits,
timeouts, metrics, logging, lifespan, upgrades, health, accept balancing, graceful stop,
header checks on the app's answers. The Date header (RFC 9110 says an origin server with
a clock must send one) is refreshed by one timer a second, not per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import io
import os
import queue
import signal
import socket
import sys
import threading
import traceback
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import httptools

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
SERVER_ERROR = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n"
                b"connection: close\r\n\r\n")
FLUSH_AT = 65536  # pipelined answers held for one write: at most this many bytes
DATE = b""


def _refresh_date(loop: asyncio.AbstractEventLoop | None = None) -> None:
    global DATE
    DATE = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
    if loop is not None:
        loop.call_later(1.0, _refresh_date, loop)


_refresh_date()


class _Protocol(asyncio.Protocol):
    """What both interfaces share: parsing, the order of answers, writing."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.parser = httptools.HttpRequestParser(self)
        # requests in order; None: answer 400 and close, (): close
        self.pending: deque[tuple[Any, ...] | None] = deque()
        self.busy = False  # a request of this connection is being answered
        self.out: list[bytes] = []  # answers due, not written yet
        self.held = 0  # their size
        self.open = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        here, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        # (a Unix socket's names are strings: then none, as ASGI says)
        self.server = tuple(here[:2]) if isinstance(here, tuple) else None
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False

    def data_received(self, data: bytes) -> None:
        if not self.open:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.pause_reading()
            self.on_request(None)
        except httptools.HttpParserUpgrade:  # (answered as plain HTTP; the floor has no
            self.transport.pause_reading()  # other protocol: close after the answer)
            self.on_request(())
        self.flush()

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        p = self.parser
        self.on_request((p.get_method(), self.url, self.headers, self.body,
                         p.should_keep_alive(), p.get_http_version()))

    def on_request(self, request: tuple[Any, ...] | None) -> None:
        if self.busy:
            self.pending.append(request)
        else:
            self.busy = True
            self.serve(request)

    def serve(self, request: tuple[Any, ...] | None) -> None:
        raise NotImplementedError

    def answered(self, response: bytes, keep_alive: bool) -> bool:
        """One answer is due; False if the connection ends with it."""
        self.out.append(response)
        self.held += len(response)
        if not keep_alive:
            self.flush()
            self.transport.close()
            self.open = False
            self.pending.clear()
            return False
        if self.held >= FLUSH_AT:
            self.flush()
        return True

    def flush(self) -> None:
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self.held = 0


# --------------------------------------------------------------------------- ASGI

ASGI = {"version": "3.0", "spec_version": "2.3"}
DISCONNECT = {"type": "http.disconnect"}


class ASGIProtocol(_Protocol):
    lost: asyncio.Future[None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.lost is not None:
            self.lost.set_result(None)

    def serve(self, request: tuple[Any, ...] | None) -> None:
        if not request:
            self.answered(b"" if request == () else BAD_REQUEST, False)
        else:
            self.loop.create_task(Cycle(self, request).run())

    def done(self, response: bytes, keep_alive: bool) -> None:
        """The app's answer is complete: the next request's turn, or write."""
        if self.open and self.answered(response, keep_alive):
            if self.pending:
                self.serve(self.pending.popleft())
            else:
                self.busy = False
                self.flush()


class Cycle:
    """One ASGI request: its scope, receive and send."""

    __slots__ = ("proto", "scope", "body", "keep_alive", "status", "headers", "chunks",
                 "finished", "received")

    def __init__(self, proto: ASGIProtocol, request: tuple[Any, ...]) -> None:
        method, url, headers, self.body, self.keep_alive, version = request
        parsed = httptools.parse_url(url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        self.proto = proto
        self.scope = {
            "type": "http", "asgi": ASGI, "http_version": version, "server": proto.server,
            "client": proto.client, "scheme": "http", "method": method.decode("ascii"),
            "root_path": "", "path": path, "raw_path": raw_path,
            "query_string": parsed.query or b"", "headers": headers,
        }  # fmt: skip
        self.status = 0
        self.chunks: list[bytes] = []
        self.finished = self.received = False

    async def run(self) -> None:
        try:
            await self.proto.app(self.scope, self.receive, self.send)
        except Exception:
            traceback.print_exc()
        if not self.finished:  # failed, or returned without a whole answer
            self.finished = True
            if self.status:  # (the head is not written yet, but it was promised)
                self.proto.transport.close()
            else:
                self.proto.done(SERVER_ERROR, False)

    async def receive(self) -> dict[str, Any]:
        if not self.received:
            self.received = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        proto = self.proto
        if proto.open and not self.finished:
            if proto.lost is None:
                proto.lost = proto.loop.create_future()
            await proto.lost
        return DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.status:
            self.status = message["status"]
            self.headers = message.get("headers", ())
        elif kind == "http.response.body" and self.status and not self.finished:
            body = message.get("body", b"")
            if body:
                self.chunks.append(body)
            if not message.get("more_body", False):
                self.finished = True
                self.proto.done(self.frame(), self.keep_alive)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def frame(self) -> bytes:
        status = self.status
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        length = False
        for name, value in self.headers:
            if name.lower() == b"content-length":
                length = True
            parts += (name, b": ", value, b"\r\n")
        parts.append(DATE)
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not length and status >= 200 and status not in (204, 304):
            parts.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if self.scope["method"] != "HEAD":
            parts.append(body)
        return b"".join(parts)


# --------------------------------------------------------------------------- WSGI

_HEADER_KEYS: dict[bytes, str] = {b"content-type": "CONTENT_TYPE",
                                  b"content-length": "CONTENT_LENGTH"}


def _header_key(name: bytes) -> str:
    key = _HEADER_KEYS[name] = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    return key


class WSGIProtocol(_Protocol):
    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop,
                 jobs: queue.SimpleQueue[Any] | None = None,
                 blocking: frozenset[bytes] = frozenset()) -> None:
        super().__init__(app, loop)
        self.jobs = jobs
        self.blocking = blocking

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.base = {
            "SCRIPT_NAME": "", "SERVER_NAME": self.server[0] if self.server else "localhost",
            "SERVER_PORT": str(self.server[1]) if self.server else "",
            "REMOTE_ADDR": self.client[0] if self.client else "", "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": True, "wsgi.run_once": False,
        }  # fmt: skip

    def serve(self, request: tuple[Any, ...] | None) -> None:
        """Answer requests in order until one goes to a thread or none is left."""
        while True:
            if not request:
                self.answered(b"" if request == () else BAD_REQUEST, False)
                return
            method, url, headers, body, keep_alive, version = request
            parsed = httptools.parse_url(url)
            raw_path = parsed.path
            environ = self.base.copy()
            environ["REQUEST_METHOD"] = method.decode("ascii")
            environ["PATH_INFO"] = (unquote_to_bytes(raw_path) if b"%" in raw_path
                                    else raw_path).decode("latin-1")
            environ["QUERY_STRING"] = (parsed.query or b"").decode("latin-1")
            environ["SERVER_PROTOCOL"] = "HTTP/" + version
            environ["wsgi.input"] = io.BytesIO(body)
            keys = _HEADER_KEYS
            for name, value in headers:
                key = keys.get(name) or _header_key(name)
                text = value.decode("latin-1")
                environ[key] = environ[key] + "," + text if key in environ else text
            if raw_path in self.blocking and self.jobs is not None:
                self.jobs.put((self, environ, keep_alive))
                return
            if not self.answered(call_wsgi(self.app, environ, keep_alive), keep_alive):
                return
            if not self.pending:
                self.busy = False
                return
            request = self.pending.popleft()

    def done(self, response: bytes, keep_alive: bool) -> None:
        """A thread's answer, back on the loop."""
        if self.open and self.answered(response, keep_alive):
            if self.pending:
                self.serve(self.pending.popleft())
            else:
                self.busy = False
            self.flush()


def call_wsgi(app: Any, environ: dict[str, Any], keep_alive: bool) -> bytes:
    """Call a WSGI app; its whole answer, framed."""
    head: list[Any] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        if exc_info and head:
            raise exc_info[1].with_traceback(exc_info[2])
        head[:] = (status, headers)
        return chunks.append

    try:
        result = app(environ, start_response)
        try:
            for chunk in result:
                if chunk:
                    chunks.append(chunk)
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = head
    except Exception:
        traceback.print_exc()
        return SERVER_ERROR
    lines = ["HTTP/1.1 ", status, "\r\n"]
    length = False
    for name, value in headers:
        if name.lower() == "content-length":
            length = True
        lines += (name, ": ", value, "\r\n")
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not length:
        lines.append(f"content-length: {len(body)}\r\n")
    if not keep_alive:
        lines.append("connection: close\r\n")
    elif environ["SERVER_PROTOCOL"] == "HTTP/1.0":
        lines.append("connection: keep-alive\r\n")
    head_bytes = "".join(lines).encode("latin-1")
    if environ["REQUEST_METHOD"] == "HEAD":
        body = b""
    return b"".join((head_bytes, DATE, b"\r\n", body))


def pool_thread(jobs: queue.SimpleQueue[Any], loop: asyncio.AbstractEventLoop) -> None:
    while True:
        proto, environ, keep_alive = jobs.get()
        response = call_wsgi(proto.app, environ, keep_alive)
        loop.call_soon_threadsafe(proto.done, response, keep_alive)


# --------------------------------------------------------------------------- processes


def worker(sock: socket.socket, args: argparse.Namespace) -> None:
    import uvloop

    module, _, name = args.app.partition(":")
    app = getattr(importlib.import_module(module), name or "app")
    gc.freeze()  # (as forkd's worker does once the app is loaded)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    factory: Any
    if args.interface == "asgi":
        def factory() -> ASGIProtocol:
            return ASGIProtocol(app, loop)
    else:
        jobs: queue.SimpleQueue[Any] | None = None
        blocking = frozenset(p.encode() for p in args.blocking)
        if blocking:
            jobs = queue.SimpleQueue()
            for _ in range(args.threads):
                threading.Thread(target=pool_thread, args=(jobs, loop), daemon=True).start()

        def factory() -> WSGIProtocol:
            return WSGIProtocol(app, loop, jobs, blocking)
    loop.run_until_complete(loop.create_server(factory, sock=sock, backlog=2048))
    _refresh_date(loop)
    loop.run_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("app", help="module:attribute")
    parser.add_argument("-b", "--bind", default="127.0.0.1:8000")
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--interface", choices=["asgi", "wsgi"], default="asgi")
    parser.add_argument("--threads", type=int, default=32, help="WSGI: pool threads")
    parser.add_argument("--blocking", action="append", default=[], metavar="PATH",
                        help="WSGI: a path whose calls run on the pool's threads")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    sock.setblocking(False)
    children: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # (before the forks, so that no worker outlives a primary stopped while forking)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                worker(sock, args)
            finally:
                os._exit(1)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
