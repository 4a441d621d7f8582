"""A tiny ASGI app for the systemd tests (`hello_systemd:app`).

Its lifespan startup writes `started-PID` into $HELLO_MARKERS, then waits while
$HELLO_GATE names a file that does not exist yet, then writes `ready-PID`: a test
can hold every worker in start-up and know exactly when each one finished.
Every HTTP request gets JSON with the worker's pid and the systemd variables it
can see, which must be none of LISTEN_* once the primary has adopted them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Message = dict[str, Any]

SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID")


def _mark(state: str) -> None:
    markers = os.environ.get("HELLO_MARKERS")
    if markers:
        (Path(markers) / f"{state}-{os.getpid()}").write_text(str(os.getpid()))


async def _startup() -> None:
    _mark("started")
    gate = os.environ.get("HELLO_GATE")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.02)
    _mark("ready")


async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await _startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = json.dumps({
        "pid": os.getpid(),
        "systemd_env": sorted(key for key in SYSTEMD_VARIABLES if key in os.environ),
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
