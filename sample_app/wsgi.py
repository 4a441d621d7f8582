"""The WSGI shell: ``sample_app.wsgi:app``. Same routes and decisions as ASGI, via `core`.

WSGI has no startup hook, so the store opens on the first request of each process (checked
against ``os.getpid()``, so a store made before a fork is never used after it). The server
calls the app from a thread pool: the stores are thread-safe, and opening is under a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from sample_app import core, settings
from sample_app.store import StoreUnavailable, SyncStore, open_sync_store

StartResponse = Callable[..., Any]
_READ_CHUNK = 64 * 1024


class WSGIApp:
    """One instance per worker process (a fork gets a fresh store on first use)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        # None: read os.environ when opening, i.e. after fork, where forkd's variables are set.
        self._env = env
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._opened: tuple[settings.Settings, SyncStore, core.Identity] | None = None

    @property
    def store(self) -> SyncStore | None:
        opened = self._opened
        return opened[1] if opened is not None and self._pid == os.getpid() else None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        loaded, store, identity = self.open()
        limit = loaded.max_body
        body = None
        if not core.declared_too_large(environ.get("CONTENT_LENGTH"), limit):
            body = _read_body(environ, limit)
        request = core.request_from_environ(environ, body or b"")
        if body is None:
            response = core.too_large(limit)
        else:
            response = _perform(core.route(request, identity), store)
        status, headers, payload = core.render(request, response, identity)
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [payload]

    def open(self) -> tuple[settings.Settings, SyncStore, core.Identity]:
        """Settings, store and identity of this process, made on first use."""
        pid = os.getpid()
        opened = self._opened
        if opened is not None and self._pid == pid:
            return opened
        with self._lock:
            if self._opened is not None and self._pid == pid:
                return self._opened
            env = os.environ if self._env is None else self._env
            loaded = settings.load(env, Path.home())
            # A store made before a fork is the parent's: drop it without closing its sockets.
            opened = (loaded, open_sync_store(loaded), core.Identity(pid, settings.worker_id(env)))
            self._opened, self._pid = opened, pid
            return opened

    def close(self) -> None:
        with self._lock:
            if self._opened is not None and self._pid == os.getpid():
                self._opened[1].close()
            self._opened, self._pid = None, None


def _perform(step: core.Response | core.Step, store: SyncStore) -> core.Response:
    try:
        match step:
            case core.Response():
                return step
            case core.Sleep():
                time.sleep(step.ms / 1000)
                return step.done()
            case core.CountVisit():
                return step.done(store.count_visit(step.sid))
            case core.ReadItem():
                return step.done(store.get_item(step.item_id))
            case core.WriteItem():
                return step.done(store.put_item(step.item_id, step.value))
    except StoreUnavailable as exc:
        return core.unavailable(str(exc))
    raise TypeError(f"unknown step {step!r}")


def _read_body(environ: Mapping[str, Any], limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (reading stops there)."""
    stream = environ["wsgi.input"]
    length_text = str(environ.get("CONTENT_LENGTH") or "").strip()
    if length_text.isdigit():
        length = int(length_text)
        return stream.read(length) if length else b""
    # PEP 3333: without CONTENT_LENGTH the body is empty, unless the server promises that
    # the stream ends by itself (chunked uploads).
    if not environ.get("wsgi.input_terminated"):
        return b""
    chunks: list[bytes] = []
    size = 0
    while chunk := stream.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# Fail at start-up, with the install command, rather than on every request.
settings.check_dependencies(os.environ)
app = WSGIApp()
