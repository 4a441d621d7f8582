"""An app that prints, for the log tests (ASGI `app`, WSGI `wsgi_app`). Routes:
/            200 hello
/print?text=X  prints X on stdout
/boom        raises (forkd logs the traceback)
/cut         starts a 200, sends `partial`, then raises (the answer is cut)
/late-boom?ms=N  waits N ms, prints `late boom raising`, then raises (after a client
             that left: nothing was sent)
WebSocket /ws: changes its scope's headers and raw_path, then accepts and closes
/stream      a 200 of 1000-byte blocks, one each 10 ms, until the client leaves (or 30 s)
/rewrite     (ASGI) rewrites its scope's path, raw_path (to a str), query, client and
             version, as a router or middleware might, then answers 200 `rewritten`
Environment, read at import:
LOGAPP_SPAM=LINES,SIZE,THREADS  THREADS threads each print LINES lines of SIZE filler
                                bytes at once: `SPAM <pid> <thread> <i> <filler>`
LOGAPP_DJANGO=1                 configures logging as Django's LOGGING does: dictConfig with
                                disable_existing_loggers and a root handler of its own"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import threading
import time
from urllib.parse import parse_qs

if os.environ.get("LOGAPP_DJANGO"):
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": True,
        "formatters": {"plain": {"format": "APPFMT %(levelname)s %(name)s %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "root": {"handlers": ["console"], "level": "DEBUG"},
    })
    logging.getLogger("myapp").info("configured like django")


def filler(index: int, size: int) -> str:
    return chr(ord("a") + index % 26) * size


def _spam(thread: int, lines: int, size: int) -> None:
    pid = os.getpid()
    for index in range(lines):
        print(f"SPAM {pid} {thread} {index} {filler(index, size)}")


_spam_threads = []
if os.environ.get("LOGAPP_SPAM"):
    _lines, _size, _threads = (int(part) for part in os.environ["LOGAPP_SPAM"].split(","))
    for _thread in range(_threads):
        _spam_threads.append(threading.Thread(target=_spam, args=(_thread, _lines, _size),
                                              daemon=True))
    for _t in _spam_threads:
        _t.start()


def _answer(path: str, query: str) -> tuple[int, bytes]:
    args = {k: v[0] for k, v in parse_qs(query).items()}
    if path == "/print":
        print(args.get("text", ""))
        return 200, b"printed"
    if path == "/boom":
        raise RuntimeError("boom on purpose")
    if path == "/":
        return 200, b"Hello, world!"
    return 404, b"not found"


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        own_id = scope["path"] == "/ws-own-id"  # (an app that names its answer's id)
        scope["headers"].clear()  # (an app may: the access line tells what came in)
        scope["raw_path"] = b"/changed"
        await send({"type": "websocket.accept",
                    "headers": [(b"X-Request-ID", b"app-given")] if own_id else []})
        await send({"type": "websocket.close", "code": 1000})
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/cut":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("cut on purpose")
    if scope["path"] == "/late-boom":
        await asyncio.sleep(int(parse_qs(scope["query_string"].decode())["ms"][0]) / 1000)
        print("late boom raising")  # (and raises in the same step of its task)
        raise RuntimeError("late boom on purpose")
    if scope["path"] == "/rewrite":
        scope.update(path="/elsewhere", raw_path="x", query_string=b"changed=1",
                     client=("203.0.113.9", 1), http_version="2")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"rewritten"})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3000):  # (send raises once the client has left)
            await send({"type": "http.response.body", "body": b"s" * 1000, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    status, body = _answer(scope["path"], scope["query_string"].decode())
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def _cut_body():
    yield b"partial"
    raise RuntimeError("cut on purpose")


def _stream_body():
    for _ in range(3000):  # (forkd stops iterating once the client has left)
        yield b"s" * 1000
        time.sleep(0.01)


def wsgi_app(environ, start_response):
    if environ["PATH_INFO"] == "/cut":
        start_response("200 OK", [])
        return _cut_body()
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [])
        return _stream_body()
    if environ["PATH_INFO"] == "/late-boom":
        time.sleep(int(parse_qs(environ["QUERY_STRING"])["ms"][0]) / 1000)
        print("late boom raising")
        raise RuntimeError("late boom on purpose")
    status, body = _answer(environ["PATH_INFO"], environ["QUERY_STRING"])
    start_response(f"{status} X", [("Content-Type", "text/plain")])
    return [body]
