"""Who may talk to a primary: the ZAP verdict (the peer's uid over ipc, the
CURVE key over tcp) and CURVE key files."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from forkd.errors import ConfigError, ControlError
from forkd.protocol import (
    Code,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE keys (z85). `server` defaults to `public`: the shared key pair
    model, where holding the primary's secret key is what authorises a client."""

    public: bytes
    secret: bytes
    server: bytes | None = None






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


def z85_key(key: bytes) -> bytes:
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
