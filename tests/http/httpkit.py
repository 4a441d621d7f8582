"""Client-side tools for the HTTP server tests: a strict little HTTP/1.x response
reader over a raw socket (so a test sees exactly what the server framed: status,
headers in order, chunked or sized or close-delimited bodies, and whether the server
closed), and a handle on one running forkd serving a test app."""

from __future__ import annotations

import importlib.util
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from support import APPS, Forkd, wait_until


def _load_app_module(name: str) -> ModuleType:
    # the apps folder is on the servers' path, not the tests'
    spec = importlib.util.spec_from_file_location(name, APPS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pattern = _load_app_module("http_asgi_probe").pattern  # the bytes /stream serves


class Truncated(Exception):
    """The connection ended (or timed out) before a whole response arrived."""

    def __init__(self, message: str, received: bytes, head: Response | None = None) -> None:
        super().__init__(f"{message}; received {received[:300]!r}")
        self.received = received
        self.head = head


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in the order sent
    body: bytes = b""
    chunked: bool = False
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [value.decode("latin-1") for k, value in self.headers if k == key]

    @property
    def closes(self) -> bool:
        value = self.header("connection")
        return value is not None and "close" in value.lower()

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Conn:
    """One client connection and its receive buffer."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset: bool = False

    @classmethod
    def open(cls, port: int, timeout: float = 5.0) -> Conn:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    # -- receiving ---------------------------------------------------------------
    def fill(self) -> bool:
        """Read once more; False at end of stream (EOF or reset)."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if not self.fill():
                raise Truncated("connection ended inside a line", bytes(self.buffer))

    def _exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise Truncated(f"connection ended {size - len(self.buffer)} bytes short",
                                bytes(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including `marker` (for hand-made framing checks)."""
        while True:
            end = self.buffer.find(marker)
            if end >= 0:
                data = bytes(self.buffer[: end + len(marker)])
                del self.buffer[: end + len(marker)]
                return data
            if not self.fill():
                raise Truncated(f"connection ended before {marker!r}", bytes(self.buffer))

    def read_to_eof(self) -> bytes:
        while self.fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def read_head(self) -> Response:
        try:
            status_line = self._line()
        except TimeoutError as exc:
            raise Truncated("no response in time", bytes(self.buffer)) from exc
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise AssertionError(f"not an HTTP/1.x status line: {status_line!r}")
        headers = []
        raw = [status_line]
        while True:
            line = self._line()
            raw.append(line)
            if not line:
                break
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise AssertionError(f"malformed response header line {line!r}")
            headers.append((name.lower(), value.strip(b" \t")))
        return Response(version, int(code), reason, headers, raw_head=b"\r\n".join(raw))

    def read_response(self, method: str = "GET") -> Response:
        """One whole response, framed the way a client must frame it (RFC 9112 6.3)."""
        response = self.read_head()
        try:
            if method == "HEAD" or response.status < 200 or response.status in (204, 304):
                return response
            coding = response.header("transfer-encoding")
            if coding is not None:
                if coding.lower() != "chunked":
                    raise AssertionError(f"unexpected transfer-encoding {coding!r}")
                response.chunked = True
                response.body = self._chunked_body()
                return response
            lengths = response.header_all("content-length")
            if lengths:
                if len(lengths) != 1 or not lengths[0].isdigit():
                    raise AssertionError(f"bad content-length in response: {lengths!r}")
                response.body = self._exact(int(lengths[0]))
                return response
            response.body = self.read_to_eof()
            return response
        except Truncated as exc:
            exc.head = response
            raise
        except TimeoutError as exc:
            raise Truncated("the body stalled", bytes(self.buffer), response) from exc

    def _chunked_body(self) -> bytes:
        parts = []
        while True:
            size_line = self._line()
            size_text = size_line.split(b";", 1)[0].strip()
            size = int(size_text, 16)
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self._exact(size))
            if self._exact(2) != b"\r\n":
                raise AssertionError("chunk data not followed by CRLF")

    def server_closed(self, timeout: float = 3.0) -> bool:
        """True if the server ends the connection (FIN or reset) with nothing more
        to read; False if it stays open for `timeout`. Extra bytes fail the test."""
        if self.buffer:
            raise AssertionError(f"unexpected extra bytes from the server: {bytes(self.buffer)!r}")
        self.sock.settimeout(timeout)
        try:
            more = self.fill()
        except TimeoutError:
            return False
        if more:
            raise AssertionError(f"unexpected extra bytes from the server: {bytes(self.buffer)!r}")
        return True


def get(port: int, path: str, timeout: float = 5.0) -> Response:
    with Conn.open(port, timeout) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode("latin-1"))
        return conn.read_response()


@dataclass
class Served:
    """One forkd serving a test app, with its port and marker folder."""

    proc: Forkd
    port: int
    markers: Path

    def pid(self) -> int:
        response = get(self.port, "/pid")
        assert response.status == 200, response
        return int(response.json()["pid"])

    def marker(self, name: str, timeout: float = 10.0) -> str:
        path = self.markers / name
        wait_until(path.exists, timeout, message=lambda: f"marker {name}\n{self.proc.describe()}")
        return path.read_text()
