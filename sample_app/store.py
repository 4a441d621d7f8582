"""The store interface: sessions and items, with the cached read path behind ``get_item``.

Two implementations: `sample_app.sqlite_store` (the default, one file per host) and Redis
(`sample_app.redis_store` for WSGI, `sample_app.redis_async` for ASGI). Each keeps its own
per-worker LRU in front of the shared data and guarantees: once ``put_item`` has returned,
no worker's ``get_item`` returns the old value.

Which one is used is decided by `open_sync_store` / `open_async_store` from the settings;
redis-py is imported only when ``REDIS_URL`` is set, so the default needs nothing extra.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from sample_app.core import Visit
from sample_app.notes import ChangeHub
from sample_app.settings import Settings


class StoreUnavailable(Exception):
    """The store did not answer in time or refused; the message says which and why (a 503)."""


class SyncStore(Protocol):
    def count_visit(self, sid: str | None) -> Visit:
        """Add one to session ``sid``; an unknown or missing sid starts a new session at 1."""
        ...

    def get_item(self, item_id: str) -> bytes | None:
        """The item's JSON, or None when there is no such item."""
        ...

    def put_item(self, item_id: str, value: bytes) -> bool:
        """Store the item and invalidate it in every worker's cache; True when it is new."""
        ...

    def close(self) -> None: ...


class AsyncStore(Protocol):
    async def count_visit(self, sid: str | None) -> Visit: ...

    async def get_item(self, item_id: str) -> bytes | None: ...

    async def put_item(self, item_id: str, value: bytes) -> bool: ...

    @property
    def changes(self) -> ChangeHub:
        """Item changes for /ws/notes, fed the way this store keeps caches right."""
        ...

    async def aclose(self) -> None: ...


def new_sid() -> str:
    """A fresh session id: 256 random bits. Ids are only ever minted here, never taken from a
    client, so nobody can plant a session id in someone else's browser (session fixation)."""
    return secrets.token_urlsafe(32)


def open_sync_store(settings: Settings) -> SyncStore:
    """The store for a WSGI worker (Redis: listener thread started; SQLite: opens lazily)."""
    if settings.redis_url:
        from sample_app.redis_store import RedisStore

        redis_store = RedisStore(settings)
        redis_store.start()
        return redis_store
    from sample_app.sqlite_store import SqliteStore

    return SqliteStore.from_settings(settings)


async def open_async_store(settings: Settings) -> AsyncStore:
    """The store for an ASGI worker, connected (Redis: pub/sub listener started)."""
    if settings.redis_url:
        from sample_app.redis_async import AsyncRedisStore

        store = AsyncRedisStore(settings)
        await store.start()
        return store
    from sample_app.sqlite_store import AsyncSqliteStore, SqliteStore

    return AsyncSqliteStore(SqliteStore.from_settings(settings))
