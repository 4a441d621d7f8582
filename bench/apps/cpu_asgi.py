"""ASGI app for the autoscaling ramp: GET / -> "Hello, world!"; GET /cpu?ms=N spins the
CPU for N ms before answering (a request that costs real work, not a sleep)."""

import time
from typing import Any

from bench.apps._lifespan import lifespan
from bench.apps._marker import mark_loaded

BODY = b"Hello, world!"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["path"] == "/cpu":
        ms = int(scope["query_string"].decode().partition("ms=")[2] or "2")
        until = time.perf_counter() + ms / 1000
        while time.perf_counter() < until:
            pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


mark_loaded()
