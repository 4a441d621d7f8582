"""A WSGI app for the flow-control tests. Routes:
/drip?n=N&ms=M   N blocks, M ms apart (a generator: each block must go out as it comes)
/overlong        declares content-length 5, then sends 10 bytes
/length          reads the whole body, answers its length
/closing?ms=M    a body whose close() takes M ms and then writes $WSGI_FLOW_MARKERS/closed
/blocks?n=N&size=S&id=X  a generator of N blocks of S bytes (`block(i, S)`; N=0: endless);
                 closed before its end, it writes $HTTP_PROBE_MARKERS/closed-X (with the
                 number of blocks it yielded)"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs


class _Closing:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __iter__(self):
        yield b"closing"

    def close(self) -> None:
        time.sleep(self.ms / 1000)
        folder = os.environ.get("WSGI_FLOW_MARKERS")
        if folder:
            Path(folder, "closed").write_text("yes")


def _drip(n: int, ms: int):
    for i in range(n):
        if i:
            time.sleep(ms / 1000)
        yield b"block %d\n" % i


def block(i: int, size: int) -> bytes:
    """Block i of /blocks: its number, then filler (tests recompute the whole body)."""
    head = b"%d:" % i
    return head + bytes([97 + i % 26]) * (size - len(head))


def _blocks(n: int, size: int, name: str):
    i = 0
    try:
        while not n or i < n:
            yield block(i, size)
            i += 1
    except GeneratorExit:
        folder = os.environ.get("HTTP_PROBE_MARKERS")
        if folder:
            Path(folder, f".closed-{name}").write_text(str(i))
            Path(folder, f".closed-{name}").rename(Path(folder, f"closed-{name}"))
        raise


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    if path == "/drip":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _drip(int(query.get("n", "3")), int(query.get("ms", "300")))
    if path == "/blocks":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _blocks(int(query.get("n", "0")), int(query.get("size", "65536")),
                       query.get("id", "x"))
    if path == "/overlong":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"01234", b"56789"]
    if path == "/length":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(body)).encode()]
    if path == "/closing":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Closing(int(query.get("ms", "500")))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, world!"]
