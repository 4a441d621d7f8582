"""WSGI probe of where calls run: GET /where answers the name of the thread that ran it;
GET /nap?ms=N sleeps N ms first (0: no sleep) and answers the same; ?us=N computes for N
microseconds first (a quick app's own work, on the CPU); ?asyncio=1 runs a coroutine
with asyncio.run() first, as a sync view calling async code does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    ms = int(query.get("ms", ["0"])[0])
    if ms:
        time.sleep(ms / 1000)
    us = int(query.get("us", ["0"])[0])
    if us:
        until = time.perf_counter() + us / 1e6
        while time.perf_counter() < until:
            pass
    body = threading.current_thread().name.encode()
    if query.get("asyncio"):
        body = asyncio.run(_echo(body))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def _echo(value: bytes) -> bytes:
    await asyncio.sleep(0)
    return value
