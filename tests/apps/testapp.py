"""An ASGI app for the integration tests. Routes:
/            200 hello
/pid         the worker's pid and FORKD_WORKER_ID
/slow?ms=N   answers after N ms (asyncio.sleep)
/block?ms=N  blocks the event loop for N ms (time.sleep): a hang
/leak?mb=N   keeps N MB more in this process
/exit?code=N the worker exits at once
/version     the VERSION module-level constant (edited by reload tests)
With env TESTAPP_MARKERS=DIR it writes DIR/start-PID and DIR/stop-PID from lifespan."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs

VERSION = os.environ.get("TESTAPP_VERSION", "1")
_leak: list[bytes] = []


def _marker(kind: str) -> None:
    folder = os.environ.get("TESTAPP_MARKERS")
    if folder:
        Path(folder, f"{kind}-{os.getpid()}").write_text(str(time.time()))


async def _reply(send, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype)]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _marker("start")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                _marker("stop")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if path == "/":
        await _reply(send, 200, b"Hello, world!")
    elif path == "/pid":
        body = json.dumps({"pid": os.getpid(), "worker_id": os.environ.get("FORKD_WORKER_ID"),
                           "workers": os.environ.get("FORKD_WORKERS")})
        await _reply(send, 200, body.encode(), b"application/json")
    elif path == "/slow":
        await asyncio.sleep(int(query.get("ms", "100")) / 1000)
        await _reply(send, 200, b"slow done")
    elif path == "/block":
        time.sleep(int(query.get("ms", "100")) / 1000)
        await _reply(send, 200, b"unblocked")
    elif path == "/leak":
        # filled in one memset (milliseconds), not drawn from os.urandom (most of a second
        # on a loaded machine): the memory sampler must not see it half-grown
        _leak.append(b"\xa5" * (int(query.get("mb", "10")) << 20))
        await _reply(send, 200, f"{len(_leak)}".encode())
    elif path == "/exit":
        os._exit(int(query.get("code", "1")))
    elif path == "/version":
        await _reply(send, 200, VERSION.encode())
    elif path == "/echo":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await _reply(send, 200, body)
    else:
        await _reply(send, 404, b"not found")
