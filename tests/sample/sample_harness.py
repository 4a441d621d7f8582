"""Helpers for the sample app's tests: call the apps in-process, run forkd, talk HTTP.

In-process: `AsgiClient` drives an ASGI app through scope/receive/send on its own event loop
(lifespan included); `WsgiClient` calls a WSGI app through wsgiref's validator. Both return a
`Reply`, so one test body covers both interfaces.

`RedisServer` runs a real redis-server on a free loopback port (no persistence); tests may
stop, start (same port), pause and resume it.

Out of process: `Forkd` runs ``python -m forkd start`` in its own session with its output in
a file, waits for GET /health, and stops the whole process group on exit.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def cookie(self) -> str | None:
        """``sid=...`` from Set-Cookie, ready to send back as a Cookie header."""
        set_cookie = self.header("set-cookie")
        return set_cookie.split(";", 1)[0] if set_cookie else None


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def spawn(
    args: list[str], log_path: Path, mode: str = "ab", **popen: Any
) -> subprocess.Popen[bytes]:
    """Start a process in its own session, its output (both streams) appended to a file."""
    with open(log_path, mode) as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- in-process clients ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request for an in-process client; ``chunks`` sends the body in parts, unsized."""

    method: str
    path: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    chunks: list[bytes] | None = None
    scheme: str = "http"


class InProcessClient:
    """What both in-process clients offer: `request` builds a `Call` and `send`s it."""

    def start(self) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def send(self, call: Call) -> Reply:
        raise NotImplementedError

    def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        chunks: list[bytes] | None = None,
        scheme: str = "http",
    ) -> Reply:
        return self.send(Call(method, path, query, tuple(headers), body, chunks, scheme))


class AsgiClient(InProcessClient):
    """Calls an ASGI app on an event loop; `start`/`stop` run the lifespan protocol.

    Apps that must run side by side (two "workers" whose background tasks talk to each
    other) share one loop: pass the first client's ``runner`` to the second.
    """

    def __init__(self, app: Any, runner: asyncio.Runner | None = None) -> None:
        self.app = app
        self._owns_runner = runner is None
        self.runner = runner or asyncio.Runner()
        self._lifespan_task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[dict[str, Any]] | None = None
        self._from_app: asyncio.Queue[dict[str, Any]] | None = None

    def start(self) -> dict[str, Any]:
        """Send lifespan.startup; return the app's answer message."""
        return self.runner.run(self._lifespan_start())

    def stop(self) -> None:
        if self._lifespan_task is not None:
            self.runner.run(self._lifespan_stop())
        if self._owns_runner:
            self.runner.close()

    def send(self, call: Call) -> Reply:
        return self.runner.run(self.asend(call))

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def asend(self, call: Call) -> Reply:
        parts = call.chunks if call.chunks is not None else [call.body]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": call.method,
            "scheme": call.scheme,
            "path": call.path,
            "raw_path": call.path.encode(),
            "query_string": call.query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in call.headers],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        incoming = [
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
            for i, part in enumerate(parts)
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await asyncio.Event().wait()  # like a server: nothing more until disconnect
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]]
        return Reply(start["status"], decoded, body_out)

    async def _lifespan_start(self) -> dict[str, Any]:
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan_task = asyncio.create_task(
            self.app(scope, self._to_app.get, self._from_app.put)
        )
        await self._to_app.put({"type": "lifespan.startup"})
        return await asyncio.wait_for(self._from_app.get(), timeout=10)

    async def _lifespan_stop(self) -> None:
        assert self._to_app is not None and self._from_app is not None
        assert self._lifespan_task is not None
        if not self._lifespan_task.done():
            await self._to_app.put({"type": "lifespan.shutdown"})
            answer = await asyncio.wait_for(self._from_app.get(), timeout=10)
            assert answer["type"] == "lifespan.shutdown.complete", answer
        await asyncio.wait_for(self._lifespan_task, timeout=10)


class WsgiClient(InProcessClient):
    """Calls a WSGI app through wsgiref.validate, which checks both sides of PEP 3333."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def start(self) -> dict[str, Any]:
        return {"type": "lifespan.startup.complete"}

    def stop(self) -> None:
        self.app.close()

    def send(self, call: Call) -> Reply:
        data = b"".join(call.chunks) if call.chunks is not None else call.body
        environ: dict[str, Any] = {
            "REQUEST_METHOD": call.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": call.path.encode().decode("latin-1"),
            "QUERY_STRING": call.query,
            "wsgi.input": io.BytesIO(data),
            "wsgi.url_scheme": call.scheme,
        }
        if call.chunks is not None:
            environ["wsgi.input_terminated"] = True
        else:
            environ["CONTENT_LENGTH"] = str(len(data))
        for name, value in call.headers:
            key = name.upper().replace("-", "_")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            elif key == "CONTENT_LENGTH":
                environ["CONTENT_LENGTH"] = value
            else:
                environ["HTTP_" + key] = value
        setup_testing_defaults(environ)
        captured: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            captured.append((status, headers))
            return lambda _data: None

        result = validator(self.app)(environ, start_response)
        try:
            body_out = b"".join(result)
        finally:
            result.close()  # type: ignore[attr-defined]  # the validator's iterator has one
        status, response_headers = captured[-1]
        return Reply(int(status.split()[0]), list(response_headers), body_out)


# --- HTTP against a running server ----------------------------------------------------------


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a new connection, closed afterwards (so the kernel may pick any worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


# --- redis-server --------------------------------------------------------------------------


class RedisServer:
    """One redis-server process on 127.0.0.1:port; `stop` and `start` keep the port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        self.proc = spawn(args, self.log_path)
        if not wait_until(self.ping, timeout):
            self.stop()
            log_text = self.log_path.read_text(errors="replace")
            raise RuntimeError(f"redis-server did not answer PING in {timeout}s:\n{log_text}")

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_path.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- forkd ----------------------------------------------------------------------------------


class Forkd:
    """``python -m forkd start APP`` in its own session; stop() ends its process group."""

    def __init__(
        self,
        app: str,
        env: Mapping[str, str],
        log_path: Path,
        *,
        workers: int = 2,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "forkd", "start", app,
            "-b", f"127.0.0.1:{self.port}", "-w", str(workers), *extra_args,
        ]  # fmt: skip
        self.env = {**env, "PYTHONPATH": str(REPO)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30.0) -> Forkd:
        self.proc = spawn(self.args, self.log_path, "wb", cwd=REPO, env=self.env)
        # /health proves one worker serves; `forkd status --json` says when all of them do.
        deadline = time.monotonic() + ready_timeout
        if not wait_until(self._healthy, ready_timeout, interval=0.05) or not wait_until(
            self._all_ready, max(0.0, deadline - time.monotonic()), interval=0.1
        ):
            self.stop()
            raise AssertionError(f"forkd was not ready in {ready_timeout}s\n{self.output()}")
        return self

    def _all_ready(self) -> bool:
        status = subprocess.run(
            [sys.executable, "-m", "forkd", "status", "--json"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            timeout=10,
        )
        if status.returncode != 0:
            return False
        workers = json.loads(status.stdout)["workers"]
        return len(workers) == self.workers and all(w["state"] == "ready" for w in workers)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"forkd exited with {self.proc.returncode}\n{self.output()}")
        try:
            return http_request(self.port, "GET", "/health", timeout=1.0).status == 200
        except OSError:
            return False

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        return http_request(self.port, method, path, **kwargs)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers left behind by a crashed primary are still in the group.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
