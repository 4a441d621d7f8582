"""A deliberately bare WebSocket client over a raw socket, for what the real client
(`websockets`) will not do: stay silent when pinged, send a malformed handshake."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\n{key}\r\n"
)


def handshake(port: int, path: str = "/echo", key: bool = True,
              timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Open a connection and send a handshake (without Sec-WebSocket-Key when `key`
    is False); returns the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    line = f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n" if key else ""
    sock.sendall(HANDSHAKE.format(path=path, key=line).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def read_frames(sock: socket.socket, deadline: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Server frames (opcode, payload) until the server closes or `deadline`;
    returns them and whether the connection ended."""
    data = b""
    ended = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            ended = True
            break
        if not chunk:
            ended = True
            break
        data += chunk
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames, ended
