"""ASGI app that leaks on purpose: every GET / keeps $BENCH_LEAK_BYTES (default 128) more
bytes alive, so a worker's memory grows with the requests it serves. For the memory
recycle figure (bench/hooks.py): a manager with a per-worker memory limit must replace
its workers gracefully, without failing requests."""

import os

from bench.apps._marker import mark_loaded
from bench.apps.hello_asgi import OK_BODY, OK_START, Receive, Scope, Send
from bench.apps.hello_asgi import app as hello

LEAK_BYTES = int(os.environ.get("BENCH_LEAK_BYTES", "128"))
_kept: list[bytes] = []


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" and scope["path"] == "/":
        # b"x" * n touches every page, so the growth shows in RSS, USS and PSS alike.
        _kept.append(b"x" * LEAK_BYTES)
        await send(OK_START)
        await send(OK_BODY)
        return
    await hello(scope, receive, send)


mark_loaded()
