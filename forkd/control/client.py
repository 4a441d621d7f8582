"""The CLI's side: one request, replies matched by id against an absolute
deadline; finding the primaries under FORKD_HOME."""

from __future__ import annotations

import logging
import math
import os
import stat
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from forkd.control.auth import CurveKeys, z85_key
from forkd.control.home import SOCKET_SUFFIX, endpoint_for, ipc_listening, ipc_path
from forkd.errors import ControlError, NoPrimary, ProtocolError
from forkd.protocol import (
    MAX_REPLY_FRAME,
    Code,
    OkReply,
    ProgressReply,
    Request,
    decode_reply,
    encode_request,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0  # seconds a live primary gets to answer a ping from `ls`/`resolve`



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
            sock.setsockopt(zmq.CURVE_PUBLICKEY, z85_key(curve.public))
            sock.setsockopt(zmq.CURVE_SECRETKEY, z85_key(curve.secret))
            sock.setsockopt(zmq.CURVE_SERVERKEY, z85_key(curve.server or curve.public))
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
