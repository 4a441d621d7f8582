"""The primary's side: a ROUTER polled in the primary's own loop, with ZAP
answered in that same loop (no thread), the endpoint's lock and stale-socket rules."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from forkd.control.auth import Peer, z85_key, zap_verdict
from forkd.control.client import PROBE_TIMEOUT, call
from forkd.control.home import SOCKET_SUFFIX, ipc_listening, ipc_path
from forkd.errors import ControlError, NoPrimary, ProtocolError
from forkd.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Code,
    ErrorReply,
    OkReply,
    ProgressReply,
    Reply,
    Request,
    decode_request,
    encode_reply,
    peek_id,
)

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP RFC (27/ZAP)
ZAP_DOMAIN = b"forkd"
SEND_HWM = 1000  # replies queued per client before further ones to it are dropped
DRAIN_BATCH = 256  # messages read per handle_ready(), so a flood cannot starve the loop
HANDSHAKE_MS = 10_000  # a connection that never finishes the ZMTP handshake is dropped



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
            self._curve_clients = frozenset(z85_key(k) for k in clients)
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
        z85_key(secret_key), z85_key(public_key)
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


class Poller:
    """The primary's one wait, for readability: its pipes, the workers' sockets and the
    control sockets together (a ZeroMQ socket can only be waited on by zmq's poll)."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()

    def register(self, target: Any) -> None:
        self._poller.register(target, zmq.POLLIN)

    def unregister(self, target: Any) -> None:
        self._poller.unregister(target)

    def poll(self, timeout_ms: int) -> dict[Any, int]:
        """What is readable: file descriptors by number, ZeroMQ sockets as themselves."""
        return dict(self._poller.poll(timeout_ms))
