"""A WebSocket test app: echo, subprotocols and headers on accept, denial, refusal,
server-side close, and what the app last saw of a disconnect (GET /last)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

last_disconnect: dict[str, Any] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await _http(scope, receive, send)
        return
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/deny":
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"), (b"x-denied", b"yes")]})
        await send({"type": "websocket.http.response.body", "body": b"no ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"entry"})
        return
    if path == "/refuse":
        await send({"type": "websocket.close", "code": 1000})
        return
    if path == "/fail-before-accept":
        raise RuntimeError("the app failed before accepting")
    if path == "/late-accept":  # the client's first frames come before the accept
        await asyncio.sleep(0.5)
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if path == "/subprotocol":
        accept["subprotocol"] = scope["subprotocols"][-1] if scope["subprotocols"] else None
        accept["headers"] = [(b"x-ws-test", b"yes")]
    await send(accept)
    if path == "/hold":  # read nothing for a while, then count what arrives
        await asyncio.sleep(float(scope["query_string"].decode() or "2"))
        received = 0
        while (message := await receive())["type"] == "websocket.receive":
            received += len(message.get("bytes") or b"")
        last_disconnect.clear()
        last_disconnect.update(code=message["code"], received=received, path=path)
        return
    if path == "/flood":  # send 40 MiB as fast as the client takes it
        chunk = b"\xab" * (256 * 1024)
        try:
            for _ in range(160):
                await send({"type": "websocket.send", "bytes": chunk})
        except OSError as exc:  # (the client is gone: GET /last tells the test so)
            last_disconnect.clear()
            last_disconnect.update(path=path, send_raised=type(exc).__name__)
            return
        await send({"type": "websocket.close", "code": 1000, "reason": "all sent"})
        return
    if path == "/scope":
        await send({"type": "websocket.send", "text": json.dumps({
            "scheme": scope["scheme"], "path": scope["path"],
            "query": scope["query_string"].decode(), "subprotocols": scope["subprotocols"],
            "client": scope["client"][0],
            "pid": os.getpid()})})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            last_disconnect.clear()
            last_disconnect.update(code=message["code"], reason=message.get("reason", ""),
                                   path=path)
            return
        text = message.get("text")
        if text is not None and text.startswith("close "):  # "close CODE REASON"
            _, code, reason = text.split(" ", 2)
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            continue
        if text == "pid":
            await send({"type": "websocket.send", "text": str(os.getpid())})
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def _http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/last":
        body = json.dumps(last_disconnect).encode()
    elif scope["path"] == "/big":  # 16 MiB: more than loopback's socket buffers hold
        body = b"b" * (16 << 20)
    else:
        body = json.dumps({"pid": os.getpid(), "scheme": scope["scheme"],
                           "upgrade": dict(scope["headers"]).get(b"upgrade", b"").decode()
                           }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A WSGI app: an upgrade request reaches it as a plain request."""
    body = json.dumps({"upgrade": environ.get("HTTP_UPGRADE", ""),
                       "scheme": environ["wsgi.url_scheme"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
