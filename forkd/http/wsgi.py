"""One WSGICycle per HTTP request (PEP 3333). The app runs in the worker's bounded
thread pool so the event loop keeps serving other connections; the thread builds
the response bytes and hands them to the loop, which alone touches the transport."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any
from urllib.parse import unquote_to_bytes

from forkd.http.asgi import split_target
from forkd.http.protocol import HIGH_WATER, HttpProtocol, error_response, status_line

log = logging.getLogger("forkd.http")

SMALL_BODY = 64 * 1024  # a body up to this size is read whole before the app is called
MAX_IN_FLIGHT = 4  # response blocks handed to the loop and not yet written, at most
_NO_BODY_STATUSES = frozenset((204, 304))


def build_environ(
    *,
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    http_version: str,
    server: tuple[str, int | None] | None,
    client: tuple[str, int] | None,
    root_path: str,
    body: Any,
) -> dict[str, Any]:
    """The PEP 3333 environ of one request; pure, so it is tested alone."""
    # PEP 3333: the percent-decoded bytes, as latin-1 text
    path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode("latin-1")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        path = path[len(root_path) :]
    server_name, server_port = server if server else ("", None)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": root_path,
        "PATH_INFO": path,
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port) if server_port is not None else "",
        "SERVER_PROTOCOL": "HTTP/" + http_version,
        "REMOTE_ADDR": client[0] if client else "",
        "REMOTE_PORT": str(client[1]) if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }
    for name, value in headers:
        if name == b"content-length":
            environ["CONTENT_LENGTH"] = value.decode("latin-1")
            continue
        if name == b"content-type":
            environ["CONTENT_TYPE"] = value.decode("latin-1")
            continue
        if b"_" in name:
            # X_User would land on the same key as X-User: a proxy that strips or checks
            # one spelling could be bypassed with the other, so underscores are dropped
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key in environ:
            text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
        environ[key] = text
    return environ


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


class _Empty(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return 0


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
    def __init__(
        self,
        proto: HttpProtocol,
        app: Any,
        executor: Executor,
        root_path: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self.proto = proto
        self.app = app
        self.executor = executor
        self.root_path = root_path
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.body = b""
        self.more_body = True
        self.stream: BodyInput | None = None
        self.wait_for_body = False
        self.submitted = False
        self.disconnected = False
        # write flow control between the app's thread and the loop
        self.flow = threading.Condition()
        self.in_flight = 0  # blocks handed to the loop, not yet written
        self.blocked = False  # the client is not reading: the transport paused writing
        self.stall = proto.state.config.header_timeout
        self.expect_continue = False
        length: int | None = 0
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                length = None
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = http_version == "1.1"
        self.length = length

    # -- the protocol's side (loop thread) -------------------------------------------
    def start(self) -> None:
        if self.length == 0 or not self.more_body:
            self._submit(_Empty() if not self.body else io.BytesIO(self.body))
        elif self.length is not None and self.length <= SMALL_BODY:
            self.wait_for_body = True
            if self.expect_continue:
                self.proto.send_continue()
            self.proto.resume_reading()  # (paused if this request was pipelined)
        else:
            if self.expect_continue:
                self.proto.send_continue()
            self.stream = BodyInput(self._resume_soon, self.stall)
            if self.body:
                self.stream.feed(self.body)
                self.body = b""
            self._submit(self.stream)
            self.proto.resume_reading()

    def _submit(self, body: Any) -> None:
        self.submitted = True
        self.proto.state.calls += 1  # a drain waits for it, close() included
        self.executor.submit(self.run, body)

    def _call_ended(self) -> None:
        self.proto.state.calls -= 1

    def _resume_soon(self) -> None:
        self.proto.loop.call_soon_threadsafe(self.proto.resume_reading)

    def feed_body(self, body: bytes) -> None:
        if self.stream is not None:
            self.stream.feed(body)
        else:
            self.body += body

    def body_complete(self) -> None:
        self.more_body = False
        if self.stream is not None:
            self.stream.finish()
        elif self.wait_for_body and not self.submitted:
            self._submit(io.BytesIO(self.body))
            self.body = b""

    def body_buffered(self) -> int:
        return self.stream.buffered if self.stream is not None else len(self.body)

    def disconnect(self) -> None:
        self.disconnected = True
        if self.stream is not None:
            self.stream.finish(aborted=True)
        with self.flow:
            self.flow.notify_all()

    # -- the app's side (pool thread) ---------------------------------------------------
    def run(self, body: Any) -> None:
        proto = self.proto
        raw_path, query = split_target(self.target)
        environ = build_environ(
            method=self.method,
            raw_path=raw_path,
            query=query,
            headers=self.headers,
            http_version=self.http_version,
            server=proto.server,
            client=proto.client,
            root_path=self.root_path,
            body=body,
        )
        response = _Response(self, environ)
        result: Any = None
        try:
            result = self.app(environ, response.start_response)
            if isinstance(result, list | tuple):
                for chunk in result:  # all there already: one write, with a content-length
                    response.gather(chunk)
            else:
                for chunk in result:  # each block goes out as it comes (PEP 3333)
                    if chunk:
                        response.write(chunk)
                    if self.disconnected:
                        break
            response.finish()
        except BaseException as exc:  # the app's code: anything can come out
            log.error("exception in WSGI app for %s %s", self.method, environ["PATH_INFO"],
                      exc_info=exc)
            response.fail()
        finally:
            try:
                if result is not None and hasattr(result, "close"):
                    result.close()
            except Exception as exc:
                log.error("exception in the WSGI result's close()", exc_info=exc)
            finally:
                proto.loop.call_soon_threadsafe(self._call_ended)

    def hand_off(self, data: bytes, final: bool, keep_alive: bool) -> None:
        """Called in the app's thread: pass bytes to the loop. The thread waits only
        while the client is not reading (or several blocks are queued), and gives up
        when that lasts longer than the stall limit."""
        loop = self.proto.loop
        if final:
            loop.call_soon_threadsafe(self._write_final, data, keep_alive)
            return
        with self.flow:
            self.in_flight += 1
            loop.call_soon_threadsafe(self._write_more, data)
            while (self.blocked or self.in_flight > MAX_IN_FLIGHT) and not self.disconnected:
                if not self.flow.wait(self.stall):
                    self.abort()
                    raise OSError(f"the client read nothing for {self.stall:g}s")
        if self.disconnected:
            raise OSError("the client went away")

    def _write_more(self, data: bytes) -> None:
        proto = self.proto
        proto.write(data)
        blocked = proto.write_paused and not proto.closed
        with self.flow:
            self.in_flight -= 1
            self.blocked = blocked
            self.flow.notify_all()
        if blocked:
            proto.loop.create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        await self.proto.wait_writable()
        with self.flow:
            self.blocked = False
            self.flow.notify_all()

    def _write_final(self, data: bytes, keep_alive: bool) -> None:
        if data:
            self.proto.write(data)
        self.proto.response_done(self, keep_alive)

    def abort(self) -> None:
        self.proto.loop.call_soon_threadsafe(self.proto.abort)


class _Response:
    """start_response, write() and the framing of one WSGI response (app thread)."""

    def __init__(self, cycle: WSGICycle, environ: dict[str, Any]) -> None:
        self.cycle = cycle
        self.environ = environ
        self.status: int | None = None
        self.status_text = ""
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.chunked = False
        self.keep_alive = cycle.keep_alive
        self.content_length: int | None = None
        self.body_sent = 0  # body bytes handed on, checked against content_length
        self.head_only = cycle.method == "HEAD"
        self.no_body = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise RuntimeError("start_response called twice without exc_info")
        if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit():
            raise ValueError(f"invalid WSGI status {status!r}")
        self.status = int(status[:3])
        self.status_text = status
        self.headers = headers
        return self.write

    def gather(self, data: bytes) -> None:
        """Keep a block for the final write (a list result: it is all there)."""
        if type(data) is not bytes:
            raise TypeError(f"a WSGI body block must be bytes, not {type(data).__name__}")
        if self.status is None:
            raise RuntimeError("the WSGI app returned a body without calling start_response")
        self.pending.append(data)
        self.pending_size += len(data)

    def write(self, data: bytes) -> None:
        """The write() callable, and each block of an iterable result: sent at once."""
        self.gather(data)
        self._flush(final=False)

    def finish(self) -> None:
        if self.status is None:
            raise RuntimeError("the WSGI app returned without calling start_response")
        self._flush(final=True)

    def fail(self) -> None:
        cycle = self.cycle
        if self.head_sent:
            cycle.abort()
            return
        data = error_response(500, "Internal Server Error", cycle.proto.state.date_header)
        cycle.hand_off(data, final=True, keep_alive=False)

    def _head(self, final: bool) -> list[bytes]:
        status = self.status
        assert status is not None
        parts = [status_line(status) if self.status_text[3:4] in ("", " ") and
                 self.status_text[4:] == _phrase(status) else
                 b"HTTP/1.1 " + self.status_text.encode("latin-1") + b"\r\n"]
        has_date = False
        for name, value in self.headers:
            if type(name) is not str or type(value) is not str:
                raise TypeError(f"WSGI header {name!r}: {value!r} is not a pair of str")
            lname = name.lower()
            if lname == "content-length":
                self.content_length = int(value)
            elif lname == "connection":
                if value.lower() == "close":
                    self.keep_alive = False
                continue
            elif lname == "transfer-encoding":
                continue
            elif lname == "date":
                has_date = True
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError(f"invalid character in WSGI header {name!r}")
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        proto = self.cycle.proto
        if final and self.cycle.more_body:
            self.keep_alive = False  # answered before its body was read: the rest is unread
        if not has_date:
            parts.append(proto.state.date_header)
        self.no_body = status in _NO_BODY_STATUSES or status < 200
        if not self.no_body and self.content_length is None:
            if final and self.head_only and not self.pending_size:
                pass  # a HEAD answered without a body: the length is unknown, not 0
            elif final:
                parts.append(b"content-length: %d\r\n" % self.pending_size)
            elif self.cycle.http_version == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if proto.state.draining and not proto.pipeline:
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.cycle.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return parts

    def _flush(self, final: bool) -> None:
        parts = [] if self.head_sent else self._head(final)
        self.head_sent = True
        keep_alive = self.keep_alive
        body = self.pending
        if self.content_length is not None and not (self.head_only or self.no_body):
            room = self.content_length - self.body_sent
            if self.pending_size > room:
                log.error("WSGI app sent more than its content-length %d: the rest is dropped",
                          self.content_length)
                body = [b"".join(body)[: max(room, 0)]]
                self.pending_size = max(room, 0)
            if final and self.body_sent + self.pending_size < self.content_length:
                log.error("WSGI app sent less than its content-length %d: closing",
                          self.content_length)
                keep_alive = False  # the client sees the close and knows it is short
        self.body_sent += self.pending_size
        if not (self.head_only or self.no_body):
            if self.chunked:
                if self.pending_size:
                    parts += (b"%x\r\n" % self.pending_size, *body, b"\r\n")
                if final:
                    parts.append(b"0\r\n\r\n")
            else:
                parts += body
        self.pending = []
        self.pending_size = 0
        if final and self.cycle.more_body:
            keep_alive = False  # answered before its body was read: the rest is unread
        self.cycle.hand_off(b"".join(parts), final, keep_alive)


_PHRASES: dict[int, str] = {}


def _phrase(status: int) -> str:
    phrase = _PHRASES.get(status)
    if phrase is None:
        line = status_line(status).decode("latin-1")
        phrase = _PHRASES[status] = line[13:-2]
    return phrase
