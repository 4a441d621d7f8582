"""Helpers for the tests that start real forkd processes: start one in its own
session with its output in a file, wait for conditions against a deadline, and
tear down by process group (SIGTERM, wait, SIGKILL)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str | Callable[[], str] = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


class Forkd:
    """One `python -m forkd start ...` under test."""

    def __init__(self, args: list[str], home: Path, log_path: Path, cwd: Path = APPS,
                 env: dict[str, str] | None = None, command: str = "start",
                 wrap: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 launcher: list[str] | None = None) -> None:
        self.args = args
        self.home = home
        self.log_path = log_path
        self.env = dict(os.environ)
        self.env.update({"FORKD_HOME": str(home), "PYTHONPATH": f"{REPO}:{APPS}",
                         "PYTHONUNBUFFERED": "1"})
        for key in list(self.env):
            if key.startswith("FORKD_") and key != "FORKD_HOME":
                del self.env[key]
        self.env.update(env or {})
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [*(launcher or [sys.executable, "-m", "forkd"]), command, *args]
        self.proc = subprocess.Popen((wrap or []) + argv, cwd=cwd, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=pass_fds)
        self.pid = self.proc.pid

    # -- reading -------------------------------------------------------------
    def output(self) -> str:
        if not self.log.closed:  # (it is after stop(); the file stays readable)
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"forkd output:\n{self.output()[-6000:]}"

    def port(self, timeout: float = 15.0) -> int:
        """The real port of the first TCP listener (tests bind port 0)."""
        def found() -> int | None:
            match = re.search(r"event=primary-started .*?listen=\"?([^ \",]+)", self.output())
            if not match or match.group(1).startswith("unix:"):
                return None
            return int(match.group(1).rpartition(":")[2])
        return int(wait_until(found, timeout, message=self.describe))

    def wait_ready(self, workers: int, timeout: float = 20.0) -> None:
        wait_until(lambda: self.output().count("event=worker-ready") >= workers
                   or self.proc.poll() is not None, timeout, message=self.describe)
        assert self.proc.poll() is None, self.describe()

    def worker_pids(self) -> list[int]:
        try:
            return sorted(child.pid for child in psutil.Process(self.pid).children()
                          if child.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return []

    # -- ending ------------------------------------------------------------------
    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Tear down everything in the process group: SIGTERM, wait, SIGKILL."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.log.close()


def at_once(call: Callable[[], Any], count: int, timeout: float = 10.0
            ) -> tuple[list[Any], float]:
    """Run `call` on `count` threads at once: what they returned (in the order they
    finished; a call that raised or did not finish within `timeout` is missing) and
    the seconds until the last one finished."""
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results, time.monotonic() - started


def request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict[str, str] | None = None, host: str = "127.0.0.1",
            timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def forkd_cli(env: dict[str, str], *args: str, timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
    """`forkd ARGS...` as an operator runs it with `env` (a primary's: Forkd.env), its
    output captured as text."""
    return subprocess.run([sys.executable, "-m", "forkd", *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1",
                 family: int = socket.AF_INET) -> bytes:
    """Send raw bytes, read until the server closes (or timeout); return what came."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        except ConnectionResetError:
            chunks.append(b"<reset>")
        return b"".join(chunks)


def responds(port: int, path: str = "/") -> bool:
    try:
        return request(port, path=path, timeout=2)[0] == 200
    except OSError:
        return False
