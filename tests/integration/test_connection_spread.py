"""Connections spread over the workers (forkd.http.balance): a pool of keep-alive
connections (a load balancer's, opened one after another) does not all land on the
worker that happened to wake first."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest

pytestmark = pytest.mark.integration

CONNECTIONS = 48


def _served_by(sock: socket.socket) -> int:
    sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return int(json.loads(data.split(b"\r\n\r\n", 1)[1])["pid"])


@pytest.mark.timeout(60)
def test_keep_alive_connections_spread_evenly_over_the_workers(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "3")
    port = proc.port()
    proc.wait_ready(3)
    socks: list[socket.socket] = []
    try:
        pids: list[int] = []
        for _ in range(CONNECTIONS):  # each held open, with a request answered, as a
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)  # pool does
            socks.append(sock)
            pids.append(_served_by(sock))
        held = Counter(pids)
        assert set(held) == set(proc.worker_pids()), held
        fewest, most = min(held.values()), max(held.values())
        # each worker stops accepting past 2 + 1/8 above the least-loaded one
        assert most - fewest <= 3 + fewest // 8, held
    finally:
        for sock in socks:
            sock.close()
