"""`forkd upgrade`: a primary starts its successor and hands it the listeners and,
once the successor's workers are ready, the control endpoint. (Shell: the decisions
are policy.Upgrade's.)

The old primary starts `sys.executable -m forkd` with its own start arguments, in the
directory `forkd start` ran in as the shell named it (so a `current` symlink switched
by a deploy is followed anew, and --chdir is re-resolved by the new process), with

* its listening sockets inherited at the same descriptor numbers, named with their
  labels in FORKD_UPGRADE_LISTENERS (JSON: [[fd, label], ...]): the listen queues are
  never closed, so no connection meets a closed port;
* one end of a private stream socketpair in FORKD_UPGRADE_FD: the handshake.

The handshake is one JSON object per line. New -> old: {"state": "ready"} once every
worker of the new primary is ready, or {"state": "failed", "why": ...} (then it
exits). Old -> new: {"state": "take"} once the old primary has released the control
endpoint and its lock; the new one binds it and tells systemd it is the main process
now. An end of file means the other side is gone: a new primary whose predecessor
died takes the endpoint anyway; an old primary whose successor died reports failure.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from forkd.sockets import Listener

log = logging.getLogger("forkd.handoff")

FD_ENV = "FORKD_UPGRADE_FD"
LISTENERS_ENV = "FORKD_UPGRADE_LISTENERS"
MAX_LINE = 64 * 1024  # a failure's reason (a traceback) is cut to fit


def encode(state: str, why: str | None = None) -> bytes:
    message: dict[str, str] = {"state": state}
    if why is not None:
        message["why"] = why[-MAX_LINE // 2:]
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> tuple[str, str] | None:
    """A handshake line -> (state, why), or None when it is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("state"), str):
        return None
    why = message.get("why", "")
    return message["state"], why if isinstance(why, str) else str(why)


class _Lines:
    """Reads whole lines from a non-blocking stream socket; EOF is reported once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def read(self) -> list[bytes]:
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self.buffer += data
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
                self.buffer = b""  # not ours to read: the peer is not a forkd
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines


@dataclass
class Successor:
    """The old primary's view of the new one it started."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    lines: _Lines = field(init=False)
    said: str | None = None  # "ready" or "failed" once it said so ("gone": EOF first)
    closed: bool = False

    def __post_init__(self) -> None:
        self.lines = _Lines(self.sock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self) -> list[tuple[str, str]]:
        """What the successor said since the last call: ("ready", "") or
        ("failed", why); ("gone", "") once when it closed its end unannounced."""
        said: list[tuple[str, str]] = []
        for line in self.lines.read():
            message = decode(line)
            if message is not None and message[0] in ("ready", "failed"):
                self.said = self.said or message[0]
                said.append(message)
        if self.lines.eof and self.said is None:
            self.said = "gone"
            said.append(("gone", ""))
        return said

    def take(self) -> None:
        """The endpoint is free: tell the successor to take it; our part is done."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(encode("take"))
        except OSError as exc:  # it died meanwhile: nothing more to hand
            log.warning("could not tell the new primary (pid %s) to take over: %s",
                        self.pid, exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def start_successor(listeners: list[Listener], argv: list[str], start_dir: str,
                    environ: Mapping[str, str]) -> Successor:
    """Start the new primary; OSError when it cannot be started."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(environ)
        # The watchdog (if any) was meant for this pid; the new primary becomes the
        # unit's main process and pings it itself.
        env.pop("WATCHDOG_PID", None)
        env["PWD"] = start_dir  # (read by --chdir's default, as the shell would set it)
        env[FD_ENV] = str(theirs.fileno())
        env[LISTENERS_ENV] = json.dumps(
            [[listener.sock.fileno(), listener.label] for listener in listeners])
        fds = [theirs.fileno(), *(listener.sock.fileno() for listener in listeners)]
        proc = subprocess.Popen([sys.executable, "-m", "forkd", *argv], cwd=start_dir,
                                env=env, pass_fds=fds, stdin=subprocess.DEVNULL)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    theirs.close()
    ours.setblocking(False)
    return Successor(proc, ours)


# -- the new primary's side -----------------------------------------------------------------
def inherited_listeners(environ: MutableMapping[str, str]) -> list[tuple[int, str]] | None:
    """The (fd, label) pairs a predecessor handed over, or None when this primary was
    not started by an upgrade. The variable is removed: workers must not see it."""
    text = environ.pop(LISTENERS_ENV, None)
    if text is None:
        return None
    try:
        pairs = json.loads(text)
        return [(int(fd), str(label)) for fd, label in pairs]
    except (ValueError, TypeError):
        log.error("%s is malformed: %r", LISTENERS_ENV, text[:200])
        return []


class Predecessor:
    """The new primary's view of the old one, which waits for it."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)
        self.lines = _Lines(self.sock)
        self.closed = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str]) -> Predecessor | None:
        text = environ.pop(FD_ENV, None)
        if text is None:
            return None
        try:
            return cls(int(text))
        except (ValueError, OSError) as exc:
            log.error("%s=%r is not a usable descriptor: %s", FD_ENV, text, exc)
            return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError as exc:
            log.warning("could not reach the old primary: %s", exc)
        finally:
            self.sock.setblocking(False)

    def ready(self) -> None:
        self._send(encode("ready"))

    def failed(self, why: str) -> None:
        self._send(encode("failed", why))
        self.close()

    def told_to_take(self) -> bool:
        """True once the old primary said "take", or is gone (then nobody holds the
        endpoint either)."""
        for line in self.lines.read():
            message = decode(line)
            if message is not None and message[0] == "take":
                return True
        return self.lines.eof

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
