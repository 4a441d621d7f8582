"""WSGI hello world: GET / -> 200 text/plain "Hello, world!"; GET /io -> the same after a
1 ms blocking sleep (an app waiting on a database or a disk); any other path: 404."""

import time
from collections.abc import Callable, Iterable
from typing import Any

from bench.apps._marker import mark_loaded

BODY = b"Hello, world!"
OK_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
NOT_FOUND_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "9")]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO", "/") == "/":
        start_response("200 OK", list(OK_HEADERS))
        return [BODY]
    if environ.get("PATH_INFO") == "/io":
        time.sleep(0.001)  # blocks the calling thread, as a driver call does
        start_response("200 OK", list(OK_HEADERS))
        return [BODY]
    start_response("404 Not Found", list(NOT_FOUND_HEADERS))
    return [b"Not Found"]


mark_loaded()
