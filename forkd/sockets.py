"""The listeners: bound by the primary before it forks (or inherited from systemd
or a parent through fd://N), inheritable, one shared accept queue each."""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from dataclasses import dataclass

from forkd.config import Bind
from forkd.errors import BindError


@dataclass
class Listener:
    sock: socket.socket
    label: str  # what the operator wrote (or the systemd name), for logs and status

    @property
    def address(self) -> str:
        """The address really bound (port 0 resolved)."""
        name = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{name if isinstance(name, str) else name.decode()}"
        if self.sock.family == socket.AF_INET6:
            return f"[{name[0]}]:{name[1]}"
        return f"{name[0]}:{name[1]}"

    @property
    def name(self) -> str:
        """What systemd's fd store keeps it under: the name it came with from systemd
        ("fd://3 (web)" -> "web"), else what the operator wrote."""
        match = re.fullmatch(r"fd://\d+ \((.+)\)", self.label)
        return match.group(1) if match else self.label


def _finish(sock: socket.socket, backlog: int) -> socket.socket:
    sock.listen(backlog)
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


def bind_tcp(bind: Bind, backlog: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(bind.host, bind.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {bind}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        return _finish(sock, backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {bind}: {exc.strerror or exc}") from None


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()


def bind_unix(bind: Bind, backlog: int, mode: int) -> socket.socket:
    path = bind.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"cannot bind {bind}: {path} exists and is not a socket")
        if _someone_listens(path):
            raise BindError(f"cannot bind {bind}: a process is listening on it")
        os.unlink(path)  # stale: left by a process that is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # no window in which the file is looser than asked
    try:
        sock.bind(path)
        os.chmod(path, mode)
        return _finish(sock, backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {bind}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)


def adopt_fd(fd: int, backlog: int, label: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"cannot use {label}: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise BindError(f"cannot use {label}: not a stream socket")
    try:
        return _finish(sock, backlog)
    except OSError as exc:
        sock.detach()
        raise BindError(f"cannot use {label}: {exc.strerror or exc}") from None


def open_listeners(binds: tuple[Bind, ...], backlog: int, unix_mode: int,
                   inherited: list[tuple[int, str]] | None = None) -> list[Listener]:
    """Bind every address, or adopt the systemd-inherited descriptors when given.
    On any failure the ones already opened are closed and BindError is raised."""
    listeners: list[Listener] = []
    try:
        if inherited:
            seen: set[tuple[int, int]] = set()
            for fd, name in inherited:
                # a socket unit's socket and the fd store's copy of it come both:
                # serving one twice would only cost a descriptor per worker
                try:
                    st = os.fstat(fd)
                except OSError as exc:
                    raise BindError(f"cannot use fd://{fd}: {exc.strerror}") from None
                if (st.st_dev, st.st_ino) in seen:
                    os.close(fd)
                    continue
                seen.add((st.st_dev, st.st_ino))
                label = f"fd://{fd}" + (f" ({name})" if name and name != "unknown" else "")
                listeners.append(Listener(adopt_fd(fd, backlog, label), label))
            return listeners
        for bind in binds:
            if bind.kind == "unix":
                sock = bind_unix(bind, backlog, unix_mode)
            elif bind.kind == "fd":
                sock = adopt_fd(bind.fd, backlog, str(bind))
            else:
                sock = bind_tcp(bind, backlog)
            listeners.append(Listener(sock, str(bind)))
        return listeners
    except BindError:
        close_listeners(listeners, unlink=True)
        raise


def close_listeners(listeners: list[Listener], unlink: bool = False) -> None:
    for listener in listeners:
        path = None
        if unlink and listener.sock.family == socket.AF_UNIX:
            try:
                path = listener.sock.getsockname()
            except OSError:
                path = None
        listener.sock.close()
        if path and isinstance(path, str) and not listener.label.startswith("fd://"):
            try:
                os.unlink(path)
            except OSError:
                pass
