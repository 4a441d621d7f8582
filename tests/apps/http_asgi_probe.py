"""An ASGI probe for the HTTP server tests (tests/http). Routes:

/pid                   {"pid": ...}
/echo?ms=N             the request body back, with `x-events`: how many http.request events it took;
                       with ms, N ms after reading it (as an app that works on the body does)
/sized?n=N             N bytes of "x"; the server frames it (content-length)
/stream?n=N&chunk=M    N deterministic bytes (see `pattern`) sent in M-byte pieces, no length
/slow?ms=N             "slow N" after N ms
/endless?id=X&chunk=M  M-byte pieces, no length, until send() raises (a download or SSE to a
                       client that may never read); then writes MARKERS/cut-X: the error's
                       class, whether it is an OSError, and the next receive()'s event type
/duplex                reads a streamed body and answers each http.request event at once with a
                       JSON line {"len": .., "more": ..}, so a client can prove the events arrive
                       while the body is still being sent
/wait-disconnect?id=X  reads events until http.disconnect; writes MARKERS/started-X after the
                       first event and MARKERS/disconnect-X (the event list, JSON) at the end
/raise                 raises before any response
/raise-after-start     sends http.response.start, then raises before any body
/noresponse            returns without answering
/partial?mode=cl|chunked  sends part of a body, then raises
/bad-header            a response header value with a newline (the server must refuse it)
anything else          the scope as JSON (bytes tagged as {"bytes": latin-1 text}) plus
                       "body_len" and "body_sha256"; `?set-state=1` writes into scope["state"]

Lifespan: waits HTTP_PROBE_STARTUP_DELAY seconds, writes MARKERS/startup-PID, puts
{"token": "from-lifespan", "startup_pid": PID} in the state; writes MARKERS/shutdown-PID on
shutdown. MARKERS is the folder in env HTTP_PROBE_MARKERS (markers are skipped without it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes the tests can recompute."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d" % block).digest()
        block += 1
    return bytes(out[:size])


def _marker(name: str, text: str) -> None:
    folder = os.environ.get("HTTP_PROBE_MARKERS")
    if folder:
        tmp = Path(folder, f".{name}.tmp")
        tmp.write_text(text)
        tmp.rename(Path(folder, name))  # a poller never sees a half-written marker


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


async def _read_body(receive) -> tuple[bytes, int]:
    body = b""
    events = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise RuntimeError(f"unexpected {message['type']} while reading the body")
        events += 1
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body, events


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/octet-stream"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await asyncio.sleep(float(os.environ.get("HTTP_PROBE_STARTUP_DELAY", "0")))
            scope["state"]["token"] = "from-lifespan"
            scope["state"]["startup_pid"] = os.getpid()
            _marker(f"startup-{os.getpid()}", str(time.time()))
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            _marker(f"shutdown-{os.getpid()}", str(time.time()))
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(scope, receive, send)
        return
    assert scope["type"] == "http"
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
    if path == "/pid":
        await _reply(send, 200, json.dumps({"pid": os.getpid()}).encode())
    elif path == "/echo":
        body, events = await _read_body(receive)
        if "ms" in query:
            await asyncio.sleep(int(query["ms"]) / 1000)
        await _reply(send, 200, body, [(b"x-events", b"%d" % events)])
    elif path == "/sized":
        await _reply(send, 200, b"x" * int(query.get("n", "0")))
    elif path == "/stream":
        data = pattern(int(query.get("n", "0")))
        step = max(1, int(query.get("chunk", "65536")))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        for start in range(0, len(data), step):
            await send({"type": "http.response.body", "body": data[start:start + step],
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/endless":
        await _endless(query.get("id", "x"), int(query.get("chunk", "65536")), receive, send)
    elif path == "/slow":
        ms = int(query.get("ms", "100"))
        await asyncio.sleep(ms / 1000)
        await _reply(send, 200, b"slow %d" % ms)
    elif path == "/duplex":
        await _duplex(receive, send)
    elif path == "/wait-disconnect":
        await _wait_disconnect(query.get("id", "x"), receive)
    elif path == "/raise":
        raise RuntimeError("probe: failure before the response")
    elif path == "/raise-after-start":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("probe: failure after http.response.start")
    elif path == "/noresponse":
        return
    elif path == "/partial":
        chunked = query.get("mode") == "chunked"
        headers = [] if chunked else [(b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
        raise RuntimeError("probe: failure in the middle of the body")
    elif path == "/bad-header":
        await _reply(send, 200, b"never", [(b"x-evil", b"a\r\nx-injected: 1")])
    else:
        await _scope_reply(scope, query, receive, send)


async def _scope_reply(scope, query: dict[str, str], receive, send) -> None:
    body, events = await _read_body(receive)
    document = _jsonable(scope)
    document["body_len"] = len(body)
    document["body_sha256"] = hashlib.sha256(body).hexdigest()
    document["events"] = events
    if query.get("set-state"):
        scope["state"]["written_by_a_request"] = True
    await _reply(send, 200, json.dumps(document).encode(),
                 [(b"content-type", b"application/json")])


async def _duplex(receive, send) -> None:
    started = False
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        if not started:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/x-ndjson")]})
            started = True
        more = bool(message.get("more_body", False))
        line = json.dumps({"len": len(message.get("body", b"")), "more": more}) + "\n"
        await send({"type": "http.response.body", "body": line.encode(), "more_body": more})
        if not more:
            return


async def _endless(name: str, chunk: int, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    piece = b"e" * chunk
    try:
        while True:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    except Exception as exc:  # (what the app is told: recorded, then the cycle goes on)
        event = await receive()
        _marker(f"cut-{name}", json.dumps({"error": type(exc).__name__,
                                           "oserror": isinstance(exc, OSError),
                                           "receive": event["type"]}))
        raise


async def _wait_disconnect(name: str, receive) -> None:
    events = []
    while True:
        message = await receive()
        events.append({"type": message["type"], "len": len(message.get("body", b"")),
                       "more": message.get("more_body", False)})
        if len(events) == 1:
            _marker(f"started-{name}", json.dumps(events))
        if message["type"] == "http.disconnect":
            _marker(f"disconnect-{name}", json.dumps(events))
            return
