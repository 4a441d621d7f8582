"""The ZeroMQ control channel: the primary's server and the CLI's client.

This is the only module that imports zmq. The server is a ROUTER the primary polls in its
own loop next to its pipes; authentication is a ZAP handler answered in that same loop,
so there is no thread. Who may talk to a primary:

* over ipc (the default), the peer's uid, which libzmq reads with SO_PEERCRED and passes
  to ZAP as the address "localhost:UID:GID:PID": only the primary's own euid and root;
* over tcp, which is refused without CURVE keys, a client whose CURVE public key is
  authorised (by default: the holder of the primary's own key pair).

Before any of that, the socket file is 0600 in a 0700 FORKD_HOME, so other users
normally cannot even connect; ZAP is the second wall, and the one that holds when an
operator loosens the file modes.

A primary owns its endpoint through an flock on "<socket>.lock" held for its whole life:
a second primary with the same name fails to take the lock and says who holds it, and a
socket file left by a dead primary (whose lock died with it) is removed and re-bound.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from forkd.errors import ConfigError, ControlError, NoPrimary, ProtocolError
from forkd.protocol import (
    MAX_FRAME,
    MAX_REPLY_FRAME,
    PROTOCOL_VERSION,
    Code,
    ErrorReply,
    OkReply,
    ProgressReply,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    peek_id,
)

log = logging.getLogger(__name__)

SOCKET_SUFFIX = ".sock"
LOCK_SUFFIX = ".lock"
PROBE_TIMEOUT = 1.0  # seconds a live primary gets to answer a ping from `ls`/`resolve`
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP RFC (27/ZAP)
ZAP_DOMAIN = b"forkd"
SEND_HWM = 1000  # replies queued per client before further ones to it are dropped
DRAIN_BATCH = 256  # messages read per handle_ready(), so a flood cannot starve the loop
HANDSHAKE_MS = 10_000  # a connection that never finishes the ZMTP handshake is dropped

# sun_path is 108 bytes including the terminating NUL.
_IPC_PATH_MAX = 107
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


# ---------------------------------------------------------------------- FORKD_HOME


def default_home(env: Mapping[str, str]) -> Path:
    """$FORKD_HOME, else $XDG_RUNTIME_DIR/forkd, else ~/.forkd (absolute)."""
    if env.get("FORKD_HOME"):
        home = Path(env["FORKD_HOME"])
    elif env.get("XDG_RUNTIME_DIR"):
        home = Path(env["XDG_RUNTIME_DIR"]) / "forkd"
    else:
        home = Path(env.get("HOME") or Path.home()) / ".forkd"
    # Absolute: the endpoint derived from it must mean the same file from any directory.
    return home.expanduser().absolute()


def ensure_home(path: Path) -> Path:
    """Create FORKD_HOME owner-only (0700), or check that an existing one is.

    An existing directory is never chmod-ed: FORKD_HOME may point at a directory shared
    with others (/tmp, a project dir), and tightening it would break them. One that is
    not ours or that other users can enter is refused with the command that fixes it,
    because whoever can write there could replace a primary's socket with their own."""
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask
        return path
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"FORKD_HOME {path} exists and is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise ConfigError(
            f"FORKD_HOME {path} belongs to uid {st.st_uid}, not to uid {euid}; "
            "point FORKD_HOME at a directory of your own"
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"FORKD_HOME {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 700 {path}` or point FORKD_HOME at a private directory"
        )
    return path


def endpoint_for(home: Path, name: str) -> str:
    """The default control endpoint of primary NAME: ipc://HOME/NAME.sock."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"name {name!r} cannot name a control socket: use letters, digits, '_', '.', "
            "'-' (at most 64, not starting with '.' or '-')"
        )
    path = f"{home}/{name}{SOCKET_SUFFIX}"
    if len(path.encode()) > _IPC_PATH_MAX:
        raise ConfigError(
            f"control socket path {path} is longer than {_IPC_PATH_MAX} bytes (a unix socket "
            "limit); use a shorter FORKD_HOME or --name"
        )
    return f"ipc://{path}"


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ipc:// endpoint ("@name" for the abstract namespace);
    None for other transports."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def ipc_listening(path: str) -> bool:
    """Whether a process accepts connections on this unix socket right now.

    A refused connect means the socket file outlived its primary. The probe does not
    speak ZMTP, so it works even when that primary's loop is too busy to answer a ping.
    Raises PermissionError when we may not connect (another user's socket)."""
    address = "\0" + path[1:] if path.startswith("@") else path
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except BlockingIOError:
        return True  # the accept backlog is full: alive, just busy
    finally:
        probe.close()
    return True


# ---------------------------------------------------------------------- authorisation


@dataclass(frozen=True)
class Peer:
    """A connected client: where to send replies, and who it was authenticated as."""

    routing_id: bytes
    user: str  # "uid:1000" on ipc, "curve:<first 8 chars of the z85 key>" on tcp


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    user: str  # the ZAP User-Id when allowed
    reason: str  # why not, when refused


def zap_verdict(
    mechanism: bytes,
    address: str,
    credentials: list[bytes],
    *,
    ipc: bool,
    euid: int,
    curve_clients: frozenset[bytes] | None,
) -> Verdict:
    """Decide one ZAP request. Pure: the caller passes what libzmq sent and who we are.

    On ipc the address is "HOST:UID:GID:PID" (libzmq appends SO_PEERCRED to it); only
    `euid` and root pass. With CURVE configured, the client's key must be authorised.
    Anything unexpected (no credentials, another mechanism) is refused."""
    user = ""
    if curve_clients is not None:
        if mechanism != b"CURVE" or not credentials:
            return Verdict(False, "", f"mechanism {mechanism.decode(errors='replace')} refused")
        key = z85.encode(credentials[0]) if len(credentials[0]) == 32 else credentials[0]
        if key not in curve_clients:
            return Verdict(False, "", "CURVE client key not authorised")
        user = "curve:" + key[:8].decode()
    elif mechanism != b"NULL":
        return Verdict(False, "", f"mechanism {mechanism.decode(errors='replace')} refused")
    if ipc:
        parts = address.rsplit(":", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return Verdict(False, "", "peer credentials unavailable")
        uid, pid = int(parts[1]), parts[3]
        if uid not in (euid, 0):
            return Verdict(
                False, "", f"uid {uid} (pid {pid}) is neither the owner (uid {euid}) nor root"
            )
        user = user or f"uid:{uid}"
    elif curve_clients is None:
        return Verdict(False, "", "no authentication configured for this transport")
    return Verdict(True, user, "")


def _z85_key(key: bytes) -> bytes:
    if len(key) == 32:
        return z85.encode(key)
    if len(key) == 40:
        return key
    raise ControlError(f"a CURVE key is 32 raw or 40 z85 bytes, not {len(key)}", Code.BAD_ARGS)


def create_curve_keys(directory: Path) -> Path:
    """Write a new CURVE key pair as DIRECTORY/forkd.key_secret (0600, with its public
    half in forkd.key); the primary and every client of a tcp:// endpoint use that file."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        _, secret_file = zmq.auth.create_certificates(str(directory), "forkd")
    finally:
        os.umask(old_umask)
    return Path(secret_file)


def load_curve_keys(path: str) -> CurveKeys:
    """The key pair in a secret certificate file (from create_curve_keys)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"control keys {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"control keys {path}: no secret key (use the .key_secret file)")
    return CurveKeys(public=public, secret=secret)


def curve_from_env(env: Mapping[str, str]) -> CurveKeys | None:
    """A client's keys: FORKD_CONTROL_KEYS names the primary's secret certificate."""
    path = env.get("FORKD_CONTROL_KEYS")
    return load_curve_keys(path) if path else None


# ----------------------------------------------------------------------------- server


class ControlServer:
    """The primary's end: a ROUTER plus its ZAP handler, both polled by the primary.

    Usage in the primary's loop::

        server = ControlServer(endpoint)
        for s in server.sockets(): poller.register(s, zmq.POLLIN)
        ...
        for peer, request in server.handle_ready():   # when any of them is readable
            ... server.progress(peer, request.id, "slot 1/4: ...")
            ... server.reply_ok(peer, request.id, {...})

    `ping` is answered here and never returned. Every send is non-blocking: replies to a
    client that went away, or that stopped reading, are dropped."""

    def __init__(
        self,
        endpoint: str,
        *,
        curve_secret_key: bytes | None = None,
        curve_public_key: bytes | None = None,
        curve_client_keys: Iterable[bytes] | None = None,
    ) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._lock_fd: int | None = None
        self._lock_path: str | None = None
        self._socket_file: tuple[str, int, int] | None = None  # path, st_dev, st_ino
        self._warned_users: set[str] = set()
        self.refused = 0  # connections refused by ZAP since start
        path = ipc_path(endpoint)
        curve = _check_transport(endpoint, curve_secret_key, curve_public_key)
        self._ipc = path is not None
        self._curve_clients: frozenset[bytes] | None = None
        if curve is not None:
            clients = curve_client_keys if curve_client_keys is not None else [curve[1]]
            self._curve_clients = frozenset(_z85_key(k) for k in clients)
        self._ctx = zmq.Context()  # our own: the ZAP endpoint is per context
        self._zap: zmq.Socket[bytes] | None = None
        self._router: zmq.Socket[bytes] | None = None
        try:
            if path is not None and not path.startswith("@"):
                self._lock_path = path + LOCK_SUFFIX
                self._lock_fd = _acquire_lock(self._lock_path, endpoint)
                _remove_stale_socket(path, endpoint)
            self._zap = self._ctx.socket(zmq.ROUTER)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(ZAP_ENDPOINT)
            self._router = self._make_router(curve)
            self._bind(endpoint, path)
        except BaseException:
            self._teardown(linger_ms=0)
            raise
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def _make_router(self, curve: tuple[bytes, bytes] | None) -> zmq.Socket[bytes]:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, SEND_HWM)
        router.setsockopt(zmq.RCVHWM, SEND_HWM)
        # libzmq drops the connection of a peer that sends a bigger message, before any of
        # it reaches us: a 10 MB frame costs the primary nothing.
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        # Off (the default, said out loud): a reply to a vanished client is dropped
        # instead of raising EHOSTUNREACH in the primary's loop.
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        # Without this, a missing ZAP handler would let every connection through.
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        if curve is not None:
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, curve[0])
            router.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
        return router

    def _bind(self, endpoint: str, path: str | None) -> None:
        assert self._router is not None
        # The umask makes libzmq create the socket file 0600, so there is no moment in
        # which it is open to others; the chmod below is the same promise, stated again.
        previous = os.umask(0o177)
        try:
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ControlError(
                    f"control endpoint {endpoint} is already in use (is another primary "
                    "running with this name?)"
                ) from None
            raise ControlError(f"cannot bind control endpoint {endpoint}: {exc}") from None
        finally:
            os.umask(previous)
        if path is not None and not path.startswith("@"):
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._socket_file = (path, st.st_dev, st.st_ino)

    def sockets(self) -> list[zmq.Socket[bytes]]:
        """The sockets to poll for POLLIN; call handle_ready() when any is readable."""
        assert self._router is not None and self._zap is not None
        return [self._router, self._zap]

    def handle_ready(self) -> list[tuple[Peer, Request]]:
        """Answer pending ZAP requests and read pending requests, without blocking.

        Malformed, oversized-by-protocol and unknown requests are answered with an error
        here; pings are answered here; the valid rest is returned for the primary."""
        self._answer_zap()
        requests: list[tuple[Peer, Request]] = []
        assert self._router is not None
        for _ in range(DRAIN_BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            item = self._accept(frames)
            if item is not None:
                requests.append(item)
        return requests

    def reply_ok(self, peer: Peer, request_id: str, result: dict[str, Any]) -> bool:
        """Send the final, successful reply. False if it could not be sent."""
        return self._send(peer, OkReply(request_id, result))

    def reply_error(self, peer: Peer, request_id: str | None, code: str, message: str) -> bool:
        """Send the final, failed reply (code: a protocol.Code such as "busy")."""
        return self._send(peer, ErrorReply(request_id, code, message))

    def progress(self, peer: Peer, request_id: str, message: str) -> bool:
        """Send an intermediate reply; the final reply_ok/reply_error must follow."""
        return self._send(peer, ProgressReply(request_id, message))

    def close(self, linger: float = 0.5) -> None:
        """Close the sockets, remove the socket and lock files. Idempotent.

        `linger` seconds let already-queued replies (stop's final "ok") reach clients
        that are still connected; replies to vanished clients are not waited for.
        In a forked child this only lets go of the inherited lock: the sockets and files
        are the primary's."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            self.forget_after_fork()
            return
        self._teardown(linger_ms=int(linger * 1000))

    def child_close_fds(self) -> list[int]:
        """Descriptors a forked worker should close: the endpoint lock, so that the lock
        dies with the primary instead of with its last worker. (forget_after_fork() in
        the child does the same.)"""
        return [] if self._lock_fd is None else [self._lock_fd]

    def forget_after_fork(self) -> None:
        """For a forked worker: drop the inherited lock descriptor so the lock dies with
        the primary, and never touch the primary's ZeroMQ context or files."""
        self._closed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals

    def _teardown(self, linger_ms: int) -> None:
        self._closed = True
        for sock, ms in ((self._router, linger_ms), (self._zap, 0)):
            if sock is not None:
                sock.close(linger=ms)
        self._ctx.term()  # waits at most `linger_ms` for queued replies
        if self._socket_file is not None:
            path, dev, ino = self._socket_file
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
            except FileNotFoundError:
                pass  # libzmq may have removed it already when the listener closed
        if self._lock_fd is not None and self._lock_path is not None:
            # Unlink before unlocking: whoever locks next checks that the file it locked
            # is still the one on disk (see _acquire_lock).
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _answer_zap(self) -> None:
        assert self._zap is not None
        for _ in range(DRAIN_BATCH):
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [routing id, b"", version, request id, domain, address, identity,
            #  mechanism, credentials...] (RFC 27/ZAP, behind libzmq's REQ-style envelope)
            if len(frames) < 8 or frames[2] != b"1.0":
                continue
            address = frames[5].decode(errors="replace")
            verdict = zap_verdict(
                frames[7], address, frames[8:], ipc=self._ipc, euid=os.geteuid(),
                curve_clients=self._curve_clients,
            )
            if verdict.allowed:
                status, text, user = b"200", b"OK", verdict.user.encode()
            else:
                status, text, user = b"400", verdict.reason.encode(), b""
                self._note_refusal(verdict.reason)
            try:
                self._zap.send_multipart(
                    [frames[0], b"", b"1.0", frames[3], status, text, user, b""], zmq.NOBLOCK
                )
            except zmq.ZMQError as exc:  # libzmq's side went away: the handshake ends
                log.debug("ZAP reply not sent: %s", exc)

    def _note_refusal(self, reason: str) -> None:
        self.refused += 1
        # A refused client's socket reconnects every 100 ms: one warning per cause.
        key = reason.split(" (pid")[0]
        level = logging.DEBUG if key in self._warned_users else logging.WARNING
        self._warned_users.add(key)
        log.log(level, "control connection refused: %s", reason)

    def _accept(self, frames: list[zmq.Frame]) -> tuple[Peer, Request] | None:
        if len(frames) < 2:
            return None
        try:
            user = frames[1].get("User-Id")
        except zmq.ZMQError:
            user = ""
        if not user:
            # Cannot happen while ZAP is enforced; if it ever does, strangers get nothing.
            log.warning("control message without an authenticated user dropped")
            return None
        peer = Peer(frames[0].bytes, str(user))
        if len(frames) != 2:
            self._send(peer, ErrorReply(None, Code.BAD_REQUEST, "a request is one frame"))
            return None
        payload = frames[1].bytes
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            self._send(peer, ErrorReply(peek_id(payload), exc.code, exc.message))
            return None
        if request.command == "ping":
            pong = {"pid": os.getpid(), "protocol": PROTOCOL_VERSION}
            self._send(peer, OkReply(request.id, pong))
            return None
        return peer, request

    def _send(self, peer: Peer, reply: Reply) -> bool:
        if self._closed or self._router is None:
            return False
        try:
            data = encode_reply(reply)
        except (TypeError, ValueError) as exc:
            # A result JSON cannot carry (NaN, a set...) is the primary's bug; the client
            # hears about it instead of the primary's loop dying of it.
            log.error("control reply to %s not encodable: %s", reply.id, exc)
            data = encode_reply(
                ErrorReply(reply.id, Code.INTERNAL, f"the primary could not encode its answer: "
                           f"{type(exc).__name__}: {exc}".encode("ascii", "replace").decode())
            )
        try:
            self._router.send_multipart([peer.routing_id, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EAGAIN (client not reading), EHOSTUNREACH (gone)
            log.debug("control reply to %s dropped: %s", peer.user, exc)
            return False
        return True


def _check_transport(
    endpoint: str, secret_key: bytes | None, public_key: bytes | None
) -> tuple[bytes, bytes] | None:
    """The CURVE (secret, public) pair to serve with, or None; refuses what is unsafe."""
    if (secret_key is None) != (public_key is None):
        raise ControlError("CURVE needs both the secret and the public key", Code.BAD_ARGS)
    curve = None if secret_key is None or public_key is None else (
        _z85_key(secret_key), _z85_key(public_key)
    )
    if endpoint.startswith("tcp://"):
        if curve is None:
            raise ControlError(
                f"refusing control endpoint {endpoint}: tcp:// is open to the network and "
                "needs CURVE keys; use the default ipc:// endpoint or configure CURVE keys",
                Code.BAD_ARGS,
            )
    elif not endpoint.startswith("ipc://") or endpoint == "ipc://":
        raise ControlError(
            f"unsupported control endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT",
            Code.BAD_ARGS,
        )
    return curve


def _acquire_lock(lock_path: str, endpoint: str) -> int:
    """Take the endpoint's lock, or raise ControlError naming the primary that holds it."""
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControlError(_already_running(lock_path, endpoint)) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have unlinked the file between our open and our flock;
        # a lock on an unlinked inode guards nothing, so start again with the current one.
        try:
            on_disk = os.stat(lock_path)
            mine = os.fstat(fd)
            current = (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise ControlError(f"could not lock {lock_path}: it keeps being replaced")


def _already_running(lock_path: str, endpoint: str) -> str:
    try:
        with open(lock_path, encoding="ascii", errors="replace") as f:
            pid = f.read(32).strip()
    except OSError:
        pid = ""
    name = Path(lock_path).name.removesuffix(LOCK_SUFFIX).removesuffix(SOCKET_SUFFIX)
    who = f" (pid {pid})" if pid.isdigit() else ""
    return (
        f"a primary named {name!r} is already running{who} on {endpoint}; "
        f"stop it first (forkd stop {name}) or start this one with another --name"
    )


def _remove_stale_socket(path: str, endpoint: str) -> None:
    """Remove a socket file no primary serves; refuse to touch anything else.

    We hold the endpoint's lock, so no live primary that locked it exists. Something may
    still listen: a forked worker inherits its primary's listening socket, so the workers
    of a primary killed with SIGKILL keep the file "listening" until they exit, but never
    answer. So a listener is judged by a ping: one that answers is never taken over."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    if ipc_listening(path):
        try:
            pong = call(endpoint, "ping", timeout=PROBE_TIMEOUT)
        except NoPrimary:
            pong = None  # it went away meanwhile
        except ControlError as exc:
            if exc.code not in (Code.TIMEOUT, Code.DISCONNECTED):
                raise ControlError(
                    f"a process that is not ours to replace serves {endpoint} "
                    f"({exc.message}); refusing to take it over"
                ) from None
            pong = None
        if pong is not None:
            raise ControlError(
                f"a primary (pid {pong.get('pid', '?')}) already answers on {endpoint}; "
                "refusing to take it over"
            )
        log.warning("control socket %s is held open but not served (by the workers of a "
                    "dead primary?); replacing it", path)
    else:
        log.info("removing stale control socket %s", path)
    os.unlink(path)


# ----------------------------------------------------------------------------- client


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE keys (z85). `server` defaults to `public`: the shared key pair
    model, where holding the primary's secret key is what authorises a client."""

    public: bytes
    secret: bytes
    server: bytes | None = None


_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


def call(
    endpoint: str,
    command: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float,
    on_progress: Callable[[str], None] | None = None,
    curve: CurveKeys | None = None,
) -> dict[str, Any]:
    """Send one request and return the result of its final "ok" reply.

    Waits until `timeout` seconds after the call at most (an absolute deadline: stray
    messages do not extend it); progress replies go to `on_progress`. Raises NoPrimary
    when nothing listens on an ipc endpoint, and ControlError(message, code) for an error
    reply (code from the primary), for no answer in time ("timeout"), for a refusal by
    the primary's authentication ("unauthorized") and for a primary that closed the
    connection before answering ("disconnected")."""
    deadline = time.monotonic() + timeout
    request = Request(uuid.uuid4().hex, command, dict(args or {}))
    try:
        frame = encode_request(request)
    except ProtocolError as exc:
        raise ControlError(exc.message, exc.code) from None
    _check_reachable(endpoint)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_FRAME)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_PUBLICKEY, _z85_key(curve.public))
            sock.setsockopt(zmq.CURVE_SECRETKEY, _z85_key(curve.secret))
            sock.setsockopt(zmq.CURVE_SERVERKEY, _z85_key(curve.server or curve.public))
        sock.connect(endpoint)
        sock.send(frame, zmq.NOBLOCK)  # queued until the connection is up
        return _await_reply(sock, monitor, request.id, endpoint, deadline, timeout, on_progress)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def _await_reply(
    sock: zmq.Socket[bytes],
    monitor: zmq.Socket[bytes],
    request_id: str,
    endpoint: str,
    deadline: float,
    timeout: float,
    on_progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError(
                f"no answer from the primary at {endpoint} within {timeout:g}s", Code.TIMEOUT
            )
        ready = dict(poller.poll(max(1, math.ceil(remaining * 1000))))
        event = recv_monitor_message(monitor) if monitor in ready else None
        # Replies before events: a primary that answers "stopped" and exits also
        # disconnects, and its answer is queued before the disconnection is reported.
        result = _read_replies(sock, request_id, on_progress)
        if result is not None:
            return result
        if event is not None:
            _raise_for_event(event, endpoint)


def _read_replies(
    sock: zmq.Socket[bytes], request_id: str, on_progress: Callable[[str], None] | None
) -> dict[str, Any] | None:
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) != 1:
            continue
        try:
            reply = decode_reply(frames[0])
        except ProtocolError:
            continue  # not ours to understand; the deadline still stands
        # A null id is an error about a request the primary could not read; this socket
        # carries only our request, so it is about ours.
        if reply.id is not None and reply.id != request_id:
            continue
        if isinstance(reply, ProgressReply):
            if on_progress is not None:
                on_progress(reply.message)
        elif isinstance(reply, OkReply):
            return reply.result
        else:
            raise ControlError(reply.message, reply.code)


def _raise_for_event(event: Mapping[str, Any], endpoint: str) -> None:
    kind = event["event"]
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        raise ControlError(
            f"the primary at {endpoint} refused this user (uid {os.geteuid()}): only its "
            "owner and root may control it",
            Code.UNAUTHORIZED,
        )
    if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        raise ControlError(
            f"the handshake with {endpoint} failed (wrong CURVE keys, or not a forkd "
            "primary?)",
            Code.UNAUTHORIZED,
        )
    if kind == zmq.EVENT_DISCONNECTED:
        raise ControlError(
            f"the primary at {endpoint} closed the connection before answering",
            Code.DISCONNECTED,
        )


def _check_reachable(endpoint: str) -> None:
    """Fail fast, without ZeroMQ's silent reconnect loop, when nothing can answer."""
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        if path.startswith("@"):
            listening = ipc_listening(path)
        else:
            st = os.stat(path)
            listening = stat.S_ISSOCK(st.st_mode) and ipc_listening(path)
    except FileNotFoundError:
        raise NoPrimary(f"no primary at {endpoint}") from None
    except PermissionError:
        raise ControlError(
            f"cannot reach {endpoint}: permission denied (it belongs to another user)",
            Code.UNAUTHORIZED,
        ) from None
    except OSError as exc:
        raise NoPrimary(f"no primary at {endpoint}: {exc.strerror}") from None
    if not listening:
        stale = "" if path.startswith("@") else " (its socket file is stale)"
        raise NoPrimary(f"no primary at {endpoint}{stale}")


def list_primaries(home: Path) -> list[tuple[str, str]]:
    """(name, endpoint) of every primary under `home` that answers a ping, by name."""
    found = []
    try:
        paths = sorted(home.glob("*" + SOCKET_SUFFIX))
    except OSError:
        return []
    for path in paths:
        endpoint = f"ipc://{path}"
        try:
            call(endpoint, "ping", timeout=PROBE_TIMEOUT)
        except ControlError:
            continue  # stale, another user's, or not a forkd primary
        found.append((path.name.removesuffix(SOCKET_SUFFIX), endpoint))
    return found


def resolve(home: Path, name: str | None) -> str:
    """The endpoint of primary `name`, or of the only primary when name is None.

    Raises NoPrimary (the CLI exits 2) when there is none, or several and no name."""
    if name is not None:
        endpoint = endpoint_for(home, name)
        try:
            _check_reachable(endpoint)
        except NoPrimary:
            raise NoPrimary(f"no primary named {name!r} running under FORKD_HOME {home}") from None
        return endpoint
    primaries = list_primaries(home)
    if not primaries:
        raise NoPrimary(f"no primary running under FORKD_HOME {home}")
    if len(primaries) > 1:
        names = ", ".join(n for n, _ in primaries)
        raise NoPrimary(f"several primaries run: {names}; name one")
    return primaries[0][1]
