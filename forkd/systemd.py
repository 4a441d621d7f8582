"""The systemd side of the primary: the notify protocol and socket activation.

No libsystemd: the notify protocol is one AF_UNIX datagram of newline-separated
`KEY=VALUE` fields sent to `$NOTIFY_SOCKET`, and socket activation is three
environment variables describing file descriptors that start at 3. Both are
small enough to speak directly, and a forkd installed from a wheel must not need
a C library that containers often lack.

Everything here degrades to doing nothing when systemd is absent: a Notifier
without a socket returns False from every call, and the parsers return None or
an empty list. A failed send is logged and reported, never raised: a primary
must not die because its supervisor went away or its queue was full.
"""

from __future__ import annotations

import array
import logging
import math
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("forkd.systemd")

# sd_listen_fds(3): the first passed descriptor is always 3 (after stdio).
LISTEN_FDS_START = 3
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# A send blocks only when systemd's receive queue is full. The first send of such
# an episode waits this long (better late than a lost READY=1); the following ones
# do not wait at all until one gets through, so a wedged systemd cannot keep
# stalling the primary's loop.
_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET -> an AF_UNIX address, or None for what we cannot speak.

    `@name` is the abstract namespace (a leading NUL byte on the wire); a path
    must be absolute, as libsystemd requires, so a stray relative value is not
    resolved against whatever directory the primary happens to run in."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify(3) datagrams from the primary; inert without a socket."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r is not an absolute path or @abstract name; "
                        "not notifying systemd", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str, fds: list[int] | None = None) -> bool:
        """Send the fields as one datagram (with `fds` attached); True when it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(0.0 if self._failing else _SEND_TIMEOUT)
            if fds:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                self._sock.sendmsg([payload], [rights], 0, self._address)
            else:
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            # One warning per run of failures, not one per status tick.
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "could not notify systemd at %s: %s", _printable(self._address), exc)
            self._failing = True
            return False
        if self._failing:
            log.info("notifying systemd at %s again", _printable(self._address))
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete."""
        return self.notify("READY=1", *_status_field(status))

    def reloading(self, now_monotonic_usec: int | None = None) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC time the reload began.

        systemd (Type=notify-reload, v253+) compares MONOTONIC_USEC with the time
        it asked for a reload, to know this RELOADING=1 answers it; a READY=1
        must follow when the reload ends."""
        if now_monotonic_usec is None:
            now_monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_monotonic_usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status_field(text))

    def store_fds(self, named: list[tuple[int, str]]) -> bool:
        """FDSTORE=1: systemd keeps a copy of each listener (with FileDescriptorStoreMax=
        set) and hands them back in LISTEN_FDS/LISTEN_FDNAMES to the next start of the
        service, so even `systemctl restart` keeps the sockets and their queued
        connections. One datagram per descriptor, as FDNAME= names all in its datagram;
        storing the same socket twice keeps one copy."""
        sent = True
        for fd, name in named:
            sent = self.notify("FDSTORE=1", f"FDNAME={fd_name(name)}", fds=[fd]) and sent
        return sent

    def mainpid(self, pid: int, status: str | None = None) -> bool:
        """This process is now the service's main process (NotifyAccess=all) and ready."""
        return self.notify(f"MAINPID={pid}", "READY=1", *_status_field(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more from now before the current start, reload or
        stop timeout fires; resend before it runs out to keep extending."""
        usec = max(1, math.ceil(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def child_close_fds(self) -> list[int]:
        """The descriptor a forked worker must not keep: only the primary notifies."""
        return [] if self._sock is None else [self._sock.fileno()]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _status_field(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # The protocol is line-based: a newline inside STATUS= would start a new field.
    return ("STATUS=" + " ".join(text.splitlines()),)


def fd_name(label: str) -> str:
    """A listener's label as an FDNAME= (sd_pid_notify_with_fds(3): at most 255 printable
    ASCII characters, no colon): "127.0.0.1:8000" -> "127.0.0.1_8000"."""
    return re.sub(r"[^A-Za-z0-9._@/+-]", "_", label)[:255] or "listener"


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises, when the watchdog is meant for `pid`; None when there is no watchdog."""
    usec = _positive_int(env.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid and _positive_int(watchdog_pid) != pid:  # empty counts as unset
        return None
    return usec / 2 / 1_000_000


def listen_fds(env: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The (fd, name) pairs systemd passed to `pid`, fd 3 upwards; [] when none.

    LISTEN_PID guards against a child that inherited the variables but not the
    descriptors. Missing names are "unknown", as sd_listen_fds_with_names(3) says."""
    if _positive_int(env.get("LISTEN_PID")) != pid:
        return []
    count = _positive_int(env.get("LISTEN_FDS"))
    if count is None:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    names = [name or "unknown" for name in names[:count]]
    names += ["unknown"] * (count - len(names))
    return [(LISTEN_FDS_START + index, name) for index, name in enumerate(names)]


def clear_listen_env(environ: MutableMapping[str, str]) -> None:
    """Forget socket activation, so workers and anything they spawn do not try
    to adopt descriptors meant for the primary."""
    for key in LISTEN_ENV:
        environ.pop(key, None)


def clear_notify_env(environ: MutableMapping[str, str]) -> None:
    """Forget the notify socket and watchdog once read, so an app inside a worker
    cannot report readiness or feed the watchdog on the primary's behalf."""
    for key in NOTIFY_ENV:
        environ.pop(key, None)


_RATE_UNITS = ("", "k", "M", "G")


def format_rate(per_second: float) -> str:
    """1234.0 -> "1.2k"; below a thousand, whole numbers."""
    if not 0 < per_second < math.inf:  # also catches NaN
        return "0"
    value, unit = per_second, 0
    text = f"{value:.0f}"
    # Decide on the rounded text: 999.96 must become "1.0k", not "1000".
    while float(text) >= 1000 and unit < len(_RATE_UNITS) - 1:
        value, unit = value / 1000, unit + 1
        text = f"{value:.1f}"
    return text + _RATE_UNITS[unit]


def format_status(ready: int, total: int, req_per_s: float) -> str:
    """The STATUS= line: "8/8 workers ready, 1.2k req/s"."""
    noun = "worker" if total == 1 else "workers"
    return f"{ready}/{total} {noun} ready, {format_rate(req_per_s)} req/s"
