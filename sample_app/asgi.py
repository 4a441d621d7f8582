"""The ASGI shell: ``sample_app.asgi:app``. Reads the request, lets `core` decide, waits.

The store is opened at lifespan startup, or on the first request when the server runs no
lifespan, and always in the process that uses it: importing this module opens nothing, so
forkd may import it in the primary (``--preload``) and fork afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from sample_app import core, notes, settings
from sample_app.store import AsyncStore, StoreUnavailable, open_async_store

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ASGIApp:
    """One instance per worker process (a fork gets a fresh store on first use)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        # None: read os.environ when opening, i.e. after fork, where forkd's variables are set.
        self._env = env
        self._pid: int | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_pid: int | None = None
        self._store: AsyncStore | None = None
        self._settings: settings.Settings | None = None
        self._identity = core.Identity(pid=0, worker_id=None)

    @property
    def store(self) -> AsyncStore | None:
        return self._store if self._pid == os.getpid() else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def open(self) -> None:
        """Read the settings and open the store, once per process."""
        pid = os.getpid()
        if self._pid == pid:
            return
        if self._lock is None or self._lock_pid != pid:
            self._lock, self._lock_pid = asyncio.Lock(), pid
        async with self._lock:
            if self._pid == pid:
                return
            env = os.environ if self._env is None else self._env
            loaded = settings.load(env, Path.home())
            # A store made before a fork is the parent's: drop it without closing its sockets.
            self._store = await open_async_store(loaded)
            self._settings = loaded
            self._identity = core.Identity(pid=pid, worker_id=settings.worker_id(env))
            self._pid = pid

    async def aclose(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            await self._store.aclose()
        self._store, self._pid = None, None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.open()
                except Exception as exc:  # the server shows this message; forkd reports it
                    failure = f"sample_app could not start: {type(exc).__name__}: {exc}"
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.open()
        assert self._settings is not None and self._store is not None
        limit = self._settings.max_body
        request = core.request_from_scope(scope, b"")
        body = None
        if not core.declared_too_large(_header(scope, b"content-length"), limit):
            body = await _read_body(receive, limit)
        if body is None:
            response = core.too_large(limit)
        else:
            request = core.request_from_scope(scope, body)
            response = await self._perform(core.route(request, self._identity), self._store)
        status, headers, payload = core.render(request, response, self._identity)
        raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/ws/notes``: a text frame for every item written from now on, by any worker."""
        if scope["path"] != "/ws/notes":
            await _refuse(scope, send, 404, b"no WebSocket here; try /ws/notes\n")
            return
        try:
            await self.open()
        except (StoreUnavailable, OSError) as exc:
            await _refuse(scope, send, 503, f"{exc}\n".encode())
            return
        assert self._store is not None
        hub = self._store.changes
        queue = await hub.subscribe()
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            hello = {"event": "subscribed", "pid": self._identity.pid,
                     "worker_id": self._identity.worker_id}
            await send({"type": "websocket.send", "text": json.dumps(hello)})
            await _push_notes(queue, receive, send)
        finally:
            hub.unsubscribe(queue)

    @staticmethod
    async def _perform(step: core.Response | core.Step, store: AsyncStore) -> core.Response:
        try:
            match step:
                case core.Response():
                    return step
                case core.Sleep():
                    await asyncio.sleep(step.ms / 1000)
                    return step.done()
                case core.CountVisit():
                    return step.done(await store.count_visit(step.sid))
                case core.ReadItem():
                    return step.done(await store.get_item(step.item_id))
                case core.WriteItem():
                    return step.done(await store.put_item(step.item_id, step.value))
        except StoreUnavailable as exc:
            return core.unavailable(str(exc))
        raise TypeError(f"unknown step {step!r}")


async def _push_notes(queue: asyncio.Queue[str], receive: Receive, send: Send) -> None:
    """Send each queued change until the client goes (what it sends is read and dropped)."""
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        while True:
            item = asyncio.ensure_future(queue.get())
            await asyncio.wait({gone, item}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                item.cancel()
                return
            item_id = item.result()
            if item_id == notes.LAGGING:
                await send({"type": "websocket.close", "code": 1013,
                            "reason": "too far behind; reconnect"})
                return
            await send({"type": "websocket.send", "text": notes.note(item_id)})
    finally:
        gone.cancel()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def _refuse(scope: Scope, send: Send, status: int, body: bytes) -> None:
    """Refuse a handshake with an HTTP answer where the server can send one, else 403."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


# Fail at start-up, with the install command, rather than on every request.
settings.check_dependencies(os.environ)
app = ASGIApp()
