"""forkd.systemd: the notify protocol against a real datagram socket, and the
parsing of the watchdog and socket-activation environment."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd.systemd import (
    Notifier,
    clear_listen_env,
    clear_notify_env,
    format_rate,
    format_status,
    listen_fds,
    watchdog_interval,
)


def _receive(listener: socket.socket) -> list[str]:
    """The fields of the next datagram (one notify() is exactly one datagram)."""
    listener.settimeout(5)
    return listener.recv(65536).decode().split("\n")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"forkd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    with Notifier.from_env({}) as notifier:
        assert not notifier.enabled
        assert notifier.ready("2/2 workers ready") is False
        assert notifier.watchdog() is False


def test_ready_reaches_a_path_socket_as_one_datagram(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.ready("8/8 workers ready, 1.2k req/s") is True
    assert _receive(sock) == ["READY=1", "STATUS=8/8 workers ready, 1.2k req/s"]


def test_abstract_socket_name_is_used(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, name = abstract_listener
    with Notifier.from_env({"NOTIFY_SOCKET": name}) as notifier:
        assert notifier.stopping() is True
        assert notifier.watchdog() is True
    assert _receive(sock) == ["STOPPING=1"]
    assert _receive(sock) == ["WATCHDOG=1"]


def test_reloading_carries_the_monotonic_clock(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.reloading()
        notifier.reloading(now_monotonic_usec=123456789)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first = _receive(sock)
    assert first[0] == "RELOADING=1"
    key, _, value = first[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    assert _receive(sock) == ["RELOADING=1", "MONOTONIC_USEC=123456789"]


def test_status_extend_timeout_and_raw_fields(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("draining 3 workers\nsecond line")
        notifier.extend_timeout(2.5)
        notifier.notify("READY=1", "STATUS=custom")
    # A newline would start a new protocol field: the status stays on one line.
    assert _receive(sock) == ["STATUS=draining 3 workers second line"]
    assert _receive(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    assert _receive(sock) == ["READY=1", "STATUS=custom"]


def test_send_error_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="forkd.systemd")
    with Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) as notifier:
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert any("gone.sock" in record.getMessage() for record in caplog.records)


def test_listener_that_goes_away_later_is_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    with Notifier.from_env({"NOTIFY_SOCKET": str(path)}) as notifier:
        assert notifier.ready() is True
        sock.close()
        path.unlink()
        assert notifier.watchdog() is False


def test_relative_notify_socket_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="forkd.systemd")
    with Notifier.from_env({"NOTIFY_SOCKET": "relative/notify.sock"}) as notifier:
        assert not notifier.enabled
        assert notifier.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 4242) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LISTEN_PID": "77", "LISTEN_FDS": "1"}, [(3, "unknown")]),
        (
            {"LISTEN_PID": "77", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:admin"},
            [(3, "http"), (4, "admin")],
        ),
        (
            {"LISTEN_PID": "77", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "http"},
            [(3, "http"), (4, "unknown"), (5, "unknown")],
        ),
        ({"LISTEN_PID": "77", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, [(3, "a")]),
        ({"LISTEN_PID": "78", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "77"}, []),
        ({"LISTEN_PID": "77", "LISTEN_FDS": "0"}, []),
        ({"LISTEN_PID": "77", "LISTEN_FDS": "x"}, []),
    ],
)
def test_listen_fds(env: dict[str, str], expected: list[tuple[int, str]]) -> None:
    assert listen_fds(env, 77) == expected


def test_clear_env_removes_only_the_systemd_variables() -> None:
    environ = {
        "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web",
        "NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1",
        "PATH": "/usr/bin",
    }
    clear_listen_env(environ)
    assert set(environ) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PATH"}
    clear_notify_env(environ)
    assert environ == {"PATH": "/usr/bin"}
    clear_listen_env(environ)  # twice is harmless


@pytest.mark.parametrize(
    ("ready", "total", "rate", "expected"),
    [
        (8, 8, 1234.0, "8/8 workers ready, 1.2k req/s"),
        (3, 8, 999.4, "3/8 workers ready, 999 req/s"),
        (1, 1, 0.0, "1/1 worker ready, 0 req/s"),
        (2, 2, 999.96, "2/2 workers ready, 1.0k req/s"),
        (4, 4, 2_500_000.0, "4/4 workers ready, 2.5M req/s"),
        (0, 4, float("nan"), "0/4 workers ready, 0 req/s"),
    ],
)
def test_format_status(ready: int, total: int, rate: float, expected: str) -> None:
    assert format_status(ready, total, rate) == expected


_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


@given(st.floats(min_value=0.5, max_value=1e11, allow_nan=False))
def test_format_rate_is_short_and_close(rate: float) -> None:
    text = format_rate(rate)
    match = re.fullmatch(r"(\d+(?:\.\d)?)([kMG]?)", text)
    assert match, text
    shown = float(match.group(1)) * _SCALE[match.group(2)]
    assert abs(shown - rate) <= max(0.5, 0.05 * rate)
    assert len(text) <= 6


def test_full_queue_does_not_stall_the_caller(listener: tuple[socket.socket, str]) -> None:
    """systemd not reading its socket costs one bounded wait, not a hung primary;
    once the queue drains, notifications flow again."""
    sock, path = listener
    started = time.monotonic()
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        results = [notifier.status(f"tick {n}") for n in range(2000)]
        assert time.monotonic() - started < 5
        assert results[0] is True
        assert False in results
        sock.setblocking(False)
        while True:
            try:
                sock.recv(65536)
            except BlockingIOError:
                break
        assert notifier.ready() is True
        assert notifier.watchdog() is True
    assert _receive(sock) == ["READY=1"]
    assert _receive(sock) == ["WATCHDOG=1"]
