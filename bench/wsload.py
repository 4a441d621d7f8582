"""A WebSocket echo load generator: N connections, each sending one small text message
and waiting for its echo before the next (ping-pong), for a fixed time.

    python bench/wsload.py HOST PORT PATH CONNECTIONS SECONDS [PAYLOAD_BYTES]

Prints one JSON object: messages, rate, p50/p99 round trip in ms, errors. No tool in
Debian does WebSocket load, so this is ours: raw sockets on uvloop, the handshake
written by hand, every frame pre-built (masked once with a fixed key: the server cannot
tell, and the client then spends nothing per message on masking), and an echo counted
by length (a server frame of N <= 125 bytes is 2 + N bytes). No compression is offered,
so every server does the same work.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time

MASK = b"\x11\x22\x33\x44"


def text_frame(payload: bytes) -> bytes:
    assert len(payload) <= 125
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + MASK + masked


class EchoClient(asyncio.Protocol):
    def __init__(self, host: str, path: str, frame: bytes, echo_size: int,
                 stop_at: float, latencies: list[float], done: asyncio.Future[None]) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"
                        "\r\n\r\n").encode()
        self.frame = frame
        self.echo_size = echo_size
        self.stop_at = stop_at
        self.latencies = latencies
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.buffer = b""
        self.pending = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.buffer += data
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self._finish(RuntimeError(head.split(b"\r\n", 1)[0].decode()))
                return
            self.open = True
            self.buffer = b""
            self._send()
            data = rest
            if not data:
                return
        self.pending -= len(data)
        if self.pending <= 0:
            now = time.perf_counter()
            self.latencies.append(now - self.sent_at)
            if now >= self.stop_at:
                self._finish(None)
            else:
                self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.pending = self.echo_size
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("closed by the server"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def main(host: str, port: int, path: str, connections: int, seconds: float,
               size: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    payload = b"x" * size
    frame = text_frame(payload)
    latencies: list[float] = []
    start = time.perf_counter()
    stop_at = start + seconds
    waits = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda d=done: EchoClient(host, path, frame, 2 + size, stop_at, latencies, d),
            host, port)
        waits.append(done)
    results = await asyncio.gather(*waits, return_exceptions=True)
    elapsed = time.perf_counter() - start
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    latencies.sort()

    def quantile(q: float) -> float | None:
        return latencies[int(q * (len(latencies) - 1))] * 1000 if latencies else None

    return {"messages": len(latencies), "rate": len(latencies) / elapsed,
            "p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "errors": len(errors),
            "error_sample": errors[:3], "connections": connections, "seconds": seconds,
            "payload_bytes": size}


if __name__ == "__main__":
    import uvloop

    host, port, path, conns, secs = sys.argv[1:6]
    size = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    print(json.dumps(uvloop.run(main(host, int(port), path, int(conns), float(secs), size))))
