"""A running primary speaks the systemd notify protocol and adopts inherited sockets.

A real AF_UNIX datagram socket plays systemd: it is NOTIFY_SOCKET for
`python -m forkd start`, and it records every datagram with the sender's pid
(SO_PASSCRED), because systemd with NotifyAccess=main, as our units set it,
ignores anything not sent by the primary itself.
"""

from __future__ import annotations

import array
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import APPS, REPO, Forkd, request, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HELLO_APPS = Path(__file__).resolve().parent / "apps"  # hello_systemd.py lives here
APP = "hello_systemd:app"
NAME = "hello"
START_DEADLINE = 45.0


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def free_port() -> int:
    # systemd-socket-activate takes no port 0: the kernel's pick is free now and,
    # on loopback during a test run, stays free for the moment it takes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Notification:
    received: float
    pid: int
    fields: dict[str, str]
    fds: tuple[int, ...] = ()  # passed along with it (SCM_RIGHTS); the listener owns them

    def has(self, key: str, value: str = "1") -> bool:
        return self.fields.get(key) == value


class NotifyListener:
    """Plays systemd's notify socket; a thread keeps its queue empty, as PID 1 does,
    so a sender is never slowed by a test that is busy elsewhere."""

    _CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._messages: list[Notification] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.05)
            if not readable:
                continue
            data, ancillary, _, _ = self._sock.recvmsg(
                65536, socket.CMSG_SPACE(self._CRED.size) + socket.CMSG_SPACE(16 * 4))
            pid = 0
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = self._CRED.unpack(payload[: self._CRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            with self._lock:
                self._messages.append(Notification(time.monotonic(), pid, fields, tuple(fds)))
                self._lock.notify_all()

    @property
    def messages(self) -> list[Notification]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, predicate: Callable[[Notification], bool], timeout: float,
                 start: int = 0) -> tuple[int, Notification] | None:
        """The first (index, message) at or after `start` that matches, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for index in range(start, len(self._messages)):
                    if predicate(self._messages[index]):
                        return index, self._messages[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for message in self._messages:
            for fd in message.fds:
                os.close(fd)


def get(port: int, timeout: float = 10.0) -> dict[str, object]:
    status, _, body = request(port, timeout=timeout)
    assert status == 200, body
    return dict(json.loads(body))


def is_ready(message: Notification) -> bool:
    return message.has("READY")


class Harness:
    """The notify listener, the app's start-up markers and the environment for one test."""

    def __init__(self, tmp_path: Path, run_forkd: Callable[..., Forkd]) -> None:
        self.tmp = tmp_path
        self.run_forkd = run_forkd
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.listener = NotifyListener(tmp_path / "notify.sock")
        self.env = {
            "PYTHONPATH": os.pathsep.join([str(REPO), str(APPS), str(HELLO_APPS)]),
            "HELLO_MARKERS": str(self.markers),
            "NOTIFY_SOCKET": str(self.listener.path),
            # A watchdog the test runner itself was given by systemd does not leak in.
            "WATCHDOG_USEC": "",
        }

    def pids(self, state: str) -> set[int]:
        return {int(path.name.split("-", 1)[1]) for path in self.markers.glob(f"{state}-*")}

    def start(self) -> tuple[Forkd, int]:
        proc = self.run_forkd(APP, "-b", "127.0.0.1:0", "-w", "2", "--name", NAME,
                              "--graceful-timeout", "5", env=self.env)
        return proc, proc.port(timeout=START_DEADLINE)

    def wait_ready(self, proc: Forkd, start: int = 0) -> tuple[int, Notification]:
        found = self.listener.wait_for(is_ready, START_DEADLINE, start)
        if found is None:
            pytest.fail(f"no READY=1 from the primary\n{self.listener.messages}\n"
                        f"{proc.describe()}")
        return found


@pytest.fixture
def harness(tmp_path: Path, run_forkd: Callable[..., Forkd]) -> Iterator[Harness]:
    h = Harness(tmp_path, run_forkd)
    try:
        yield h
    finally:
        h.listener.close()


def test_ready_only_after_every_worker_is_ready(harness: Harness) -> None:
    gate = harness.tmp / "gate"
    harness.env["HELLO_GATE"] = str(gate)
    proc, port = harness.start()

    # Both workers are inside their lifespan startup, held at the gate: not ready.
    wait_until(lambda: len(harness.pids("started")) >= 2, START_DEADLINE,
               message=proc.describe)
    assert harness.listener.wait_for(is_ready, timeout=1.0) is None, (
        "READY=1 while the workers were still starting up")

    gate.touch()
    _, ready = harness.wait_ready(proc)
    assert ready.pid == proc.pid, "READY=1 must come from the primary (NotifyAccess=main)"
    assert len(harness.pids("ready")) >= 2
    # Ready means serving: no retry, no grace period.
    for _ in range(4):
        assert get(port, timeout=5)["pid"] in harness.pids("ready")

    status = harness.listener.wait_for(
        lambda m: m.fields.get("STATUS", "").startswith("2/2 workers ready"), 10)
    assert status is not None, harness.listener.messages


@pytest.mark.parametrize("trigger", ["forkd-reload", "sighup"])
def test_reload_sends_reloading_then_ready(harness: Harness, trigger: str) -> None:
    proc, port = harness.start()
    harness.wait_ready(proc)
    old_workers = harness.pids("ready")
    start = len(harness.listener.messages)

    before = monotonic_usec()
    if trigger == "sighup":
        proc.signal(signal.SIGHUP)
    else:
        # As ExecReload= runs it: synchronous, exit 0 once every worker is new.
        reload = subprocess.run(
            [sys.executable, "-m", "forkd", "reload", NAME], env=proc.env,
            stdin=subprocess.DEVNULL, capture_output=True, timeout=90, check=False)
        assert reload.returncode == 0, reload.stdout + reload.stderr

    found = harness.listener.wait_for(lambda m: m.has("RELOADING"), 60, start)
    assert found is not None, f"no RELOADING=1\n{harness.listener.messages}\n{proc.describe()}"
    reloading_index, reloading = found
    assert reloading.pid == proc.pid
    # systemd tells reloads apart by this timestamp: it must be the reload's own start.
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()

    _, done = harness.wait_ready(proc, reloading_index + 1)
    assert done.pid == proc.pid
    new_workers = harness.pids("ready") - old_workers
    assert len(new_workers) >= 2, "READY=1 before every worker was replaced"
    wait_until(lambda: get(port)["pid"] in new_workers, 10, message=proc.describe)


def test_after_reload_ready_only_new_workers_answer(harness: Harness) -> None:
    """`systemctl reload` returning means the new code serves: once READY=1 ends the
    reload, no request may reach a worker of the old generation."""
    proc, port = harness.start()
    harness.wait_ready(proc)
    old_workers = harness.pids("ready")
    start = len(harness.listener.messages)
    proc.signal(signal.SIGHUP)
    found = harness.listener.wait_for(lambda m: m.has("RELOADING"), 60, start)
    assert found is not None, proc.describe()
    harness.wait_ready(proc, found[0] + 1)
    answered = [get(port)["pid"] for _ in range(10)]
    assert not set(answered) & old_workers, (answered, old_workers, proc.describe())


def test_sigterm_sends_stopping(harness: Harness) -> None:
    proc, _ = harness.start()
    harness.wait_ready(proc)
    start = len(harness.listener.messages)

    proc.signal(signal.SIGTERM)  # KillMode=mixed: the primary alone gets it
    found = harness.listener.wait_for(lambda m: m.has("STOPPING"), 30, start)
    assert found is not None, f"no STOPPING=1\n{harness.listener.messages}\n{proc.describe()}"
    assert found[1].pid == proc.pid
    assert proc.wait(30) == 0, proc.describe()


def test_watchdog_pings_at_half_the_interval(harness: Harness) -> None:
    harness.env["WATCHDOG_USEC"] = "1000000"  # systemd would kill after 1 s of silence
    proc, _ = harness.start()
    index, _ = harness.wait_ready(proc)

    def pings() -> list[Notification]:
        return [m for m in harness.listener.messages[index:]
                if m.has("WATCHDOG") and m.pid == proc.pid]

    wait_until(lambda: len(pings()) >= 8, 20, message=proc.describe)
    times = [m.received for m in pings()]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert max(gaps) < 1.0, f"a gap systemd would have punished: {gaps}"
    assert 0.3 <= statistics.median(gaps) <= 0.7, gaps


def test_watchdog_meant_for_another_pid_is_left_alone(harness: Harness) -> None:
    harness.env["WATCHDOG_USEC"] = "1000000"
    harness.env["WATCHDOG_PID"] = str(os.getpid())  # the test's pid, not the primary's
    proc, _ = harness.start()
    harness.wait_ready(proc)
    # Three of the intervals the primary would have pinged at.
    assert harness.listener.wait_for(lambda m: m.has("WATCHDOG"), 1.5) is None


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate (Debian package systemd)")
def test_serves_on_the_socket_systemd_passed(harness: Harness, forkd_home: Path) -> None:
    port = free_port()
    not_bound = harness.tmp / "not-bound.sock"
    # systemd-socket-activate hands its child only PATH, HOME, TERM and what -E names.
    passed = {"PYTHONPATH": harness.env["PYTHONPATH"], "FORKD_HOME": str(forkd_home),
              "HELLO_MARKERS": str(harness.markers), "PYTHONUNBUFFERED": "1"}
    wrap = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=web",
            *[f"-E{key}={value}" for key, value in passed.items()]]
    proc = harness.run_forkd(APP, "-w", "2", "--name", NAME, "-b", f"unix:{not_bound}",
                             env=harness.env, wrap=wrap)
    wait_until(lambda: "Listening on" in proc.output(), 15, message=proc.describe)

    # The first connection makes systemd-socket-activate start forkd; it is answered
    # once the workers serve on the inherited socket.
    first = get(port, timeout=START_DEADLINE)
    assert first["systemd_env"] == [], "workers must not see the LISTEN_* variables"
    assert {get(port)["pid"] for _ in range(6)} <= harness.pids("ready")
    assert not not_bound.exists(), "forkd bound --bind although sockets were passed in"


def stored(message: Notification) -> bool:
    return message.has("FDSTORE")


def stored_address(message: Notification) -> tuple[str, int]:
    """The address of the socket a FDSTORE=1 message carried."""
    assert len(message.fds) == 1, message
    with socket.socket(fileno=os.dup(message.fds[0])) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        return sock.getsockname()  # type: ignore[no-any-return]


def test_upgrade_hands_the_service_to_the_new_primary(harness: Harness) -> None:
    """RELOADING=1 from the old primary, then MAINPID= and READY=1 from the new one (the
    unit's NotifyAccess=all lets it); each stores the listener in the fd store, with the
    socket attached; the old one never says STOPPING=1, which would stop the service."""
    proc, port = harness.start()
    harness.wait_ready(proc)
    found = harness.listener.wait_for(lambda m: stored(m) and m.pid == proc.pid, 10)
    assert found is not None, harness.listener.messages
    assert found[1].fields["FDNAME"] == "127.0.0.1_0"  # `-b 127.0.0.1:0`, as FDNAME= allows
    assert stored_address(found[1]) == ("127.0.0.1", port)
    start = len(harness.listener.messages)

    upgrade = subprocess.run(
        [sys.executable, "-m", "forkd", "upgrade", NAME], env=proc.env,
        stdin=subprocess.DEVNULL, capture_output=True, timeout=90, check=False)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert proc.wait(30) == 0, proc.describe()
    found = harness.listener.wait_for(lambda m: m.has("RELOADING"), 10, start)
    assert found is not None and found[1].pid == proc.pid, harness.listener.messages
    found = harness.listener.wait_for(lambda m: "MAINPID" in m.fields, 10, found[0])
    assert found is not None, f"no MAINPID=\n{harness.listener.messages}"
    new_pid = int(found[1].fields["MAINPID"])
    assert found[1].pid == new_pid != proc.pid and found[1].has("READY")
    new_store = harness.listener.wait_for(lambda m: stored(m) and m.pid == new_pid, 10, start)
    assert new_store is not None and stored_address(new_store[1]) == ("127.0.0.1", port)
    assert not [m for m in harness.listener.messages[start:]
                if m.has("STOPPING") or (m.pid == proc.pid and m.has("READY"))]
    assert get(port)["pid"] in harness.pids("ready")
    os.kill(new_pid, signal.SIGTERM)
    wait_until(lambda: harness.listener.wait_for(lambda m: m.has("STOPPING"), 0, start), 30)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate (Debian package systemd)")
def test_a_start_takes_the_listeners_as_the_fd_store_hands_them_back(
        harness: Harness, forkd_home: Path) -> None:
    """After `systemctl restart`, systemd passes the stored listeners in LISTEN_FDS
    under the names forkd gave them: forkd serves on each, and stores them again
    under the same names, so the next restart finds them too."""
    ports = [free_port(), free_port()]
    names = [f"127.0.0.1_{port}" for port in ports]
    passed = {"PYTHONPATH": harness.env["PYTHONPATH"], "FORKD_HOME": str(forkd_home),
              "HELLO_MARKERS": str(harness.markers), "PYTHONUNBUFFERED": "1",
              "NOTIFY_SOCKET": str(harness.listener.path)}
    wrap = ["systemd-socket-activate", *[f"-l127.0.0.1:{port}" for port in ports],
            f"--fdname={':'.join(names)}",
            *[f"-E{key}={value}" for key, value in passed.items()]]
    proc = harness.run_forkd(APP, "-w", "1", "--name", NAME, env=harness.env, wrap=wrap)
    wait_until(lambda: "Listening on" in proc.output(), 15, message=proc.describe)
    assert get(ports[1], timeout=START_DEADLINE)["pid"] in harness.pids("ready")
    assert get(ports[0])["pid"] in harness.pids("ready")
    def stores() -> dict[str, tuple[str, int]]:
        return {m.fields["FDNAME"]: stored_address(m) for m in harness.listener.messages
                if stored(m)}

    wait_until(lambda: len(stores()) >= 2, 10, message=lambda: str(harness.listener.messages))
    assert stores() == {name: ("127.0.0.1", port) for name, port in zip(names, ports,
                                                                         strict=True)}
