"""The hostile-load benchmark's ASGI app: GET / -> "Hello, world!", GET /slow -> 200 after
3 s, POST /echo -> the body's length (the whole body is read)."""

import asyncio
from typing import Any

from bench.apps._lifespan import lifespan
from bench.apps._marker import mark_loaded


async def _reply(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(3)
        await _reply(send, b"slow")
    elif path == "/echo":
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await _reply(send, str(size).encode())
    else:
        await _reply(send, b"Hello, world!")


mark_loaded()
