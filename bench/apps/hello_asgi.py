"""ASGI hello world: GET / -> 200 text/plain "Hello, world!" (any other path: 404);
a WebSocket on any path echoes every message."""

from collections.abc import Awaitable, Callable
from typing import Any

from bench.apps._lifespan import lifespan
from bench.apps._marker import mark_loaded

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b"Hello, world!"
# Built once: the benchmark measures the server, not header construction in the app.
OK_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
OK_BODY: Message = {"type": "http.response.body", "body": BODY}
NOT_FOUND_START: Message = {
    "type": "http.response.start",
    "status": 404,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"9")],
}
NOT_FOUND_BODY: Message = {"type": "http.response.body", "body": b"Not Found"}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        if scope["path"] == "/":
            await send(OK_START)
            await send(OK_BODY)
        else:
            await send(NOT_FOUND_START)
            await send(NOT_FOUND_BODY)
    elif scope["type"] == "websocket":
        await _echo(receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)


ACCEPT: Message = {"type": "websocket.accept"}


async def _echo(receive: Receive, send: Send) -> None:
    """WebSocket echo (bench wstls): every message straight back, until the client goes."""
    await receive()  # websocket.connect
    await send(ACCEPT)
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


mark_loaded()
