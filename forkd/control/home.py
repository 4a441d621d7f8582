"""FORKD_HOME: where each primary's control socket lives (owner-only), how a
name becomes an endpoint, and whether a socket file has a live listener."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from forkd.errors import ConfigError

log = logging.getLogger(__name__)

SOCKET_SUFFIX = ".sock"
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
    except OSError as exc:  # a parent we may not enter or write: say which, not a traceback
        raise ConfigError(f"FORKD_HOME {path} cannot be created: {exc.strerror}; point "
                          "FORKD_HOME at a directory of your own") from None
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
