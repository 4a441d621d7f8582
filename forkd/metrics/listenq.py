"""The accept queue of a listening TCP socket, from Linux TCP_INFO: for a socket in
LISTEN state the kernel reports the connections waiting to be accepted in
`tcpi_unacked` and the backlog limit in `tcpi_sacked` (see tcp_get_info in the
kernel's net/ipv4/tcp.c). Elsewhere, or for a unix socket, there is nothing to say."""

from __future__ import annotations

import socket
import struct

# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked, ...
_OFFSET = 8 + 4 * 4  # tcpi_unacked
_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(waiting, backlog) for a listening TCP socket, else None."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _OFFSET + 8:
        return None
    waiting, backlog = struct.unpack_from("<II", info, _OFFSET)
    return waiting, backlog
