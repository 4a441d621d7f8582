"""The hostile-load benchmark's WSGI app: the routes of hostile_asgi."""

import time
from collections.abc import Callable, Iterable
from typing import Any

from bench.apps._marker import mark_loaded


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/slow":
        time.sleep(3)
        body = b"slow"
    elif path == "/echo":
        stream = environ["wsgi.input"]
        size = 0
        while True:
            block = stream.read(65536)
            if not block:
                break
            size += len(block)
        body = str(size).encode()
    else:
        body = b"Hello, world!"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


mark_loaded()
