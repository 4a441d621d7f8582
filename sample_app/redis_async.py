"""The Redis store for the ASGI app (redis.asyncio): sessions, items, the invalidation listener.

Made after fork (at lifespan startup or on the first request), never at import. Timeouts are
short and retries immediate, so a dead Redis costs a request well under a second and turns
into a 503; the pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import cast

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sample_app import redis_common as rc
from sample_app.core import Visit
from sample_app.settings import Settings, redis_location
from sample_app.store import StoreUnavailable, new_sid

log = logging.getLogger("sample_app")
_RESUBSCRIBE_MAX_DELAY_S = 1.0


class AsyncRedisStore:
    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("AsyncRedisStore needs settings.redis_url")
        self._location = redis_location(settings.redis_url)
        self._session_ttl = settings.session_ttl
        # Blocking pool: under a burst, a request waits briefly for a free connection instead
        # of failing at once; the wait is bounded by the same short timeout.
        self._pool = aredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=settings.redis_timeout,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            # One immediate retry replaces a pooled connection that died with a Redis restart;
            # redis-py's default (many retries with backoff) would hold a request for seconds.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=10,
        )
        self._client = aredis.Redis(connection_pool=self._pool)
        self._count_visit = self._client.register_script(rc.COUNT_VISIT_LUA)
        self._cache = rc.SubscribedCache(settings.cache_size, settings.cache_ttl)
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pool_size(self) -> int:
        return int(self._pool.max_connections)

    @property
    def subscribed(self) -> bool:
        return self._cache.subscribed

    async def start(self) -> None:
        """Start the invalidation listener. Redis may be down: it keeps retrying."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="sample_app-invalidations")

    async def aclose(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._stopping = True
            # Cancel until it takes: on Python 3.11, asyncio.wait_for inside redis-py can
            # swallow a cancellation that arrives just as the awaited call completes.
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=0.1)
            if not listener.cancelled() and listener.exception() is not None:
                log.error("the invalidation listener failed", exc_info=listener.exception())
        await self._client.aclose()
        await self._pool.aclose()

    async def count_visit(self, sid: str | None) -> Visit:
        async with self._errors():
            if sid is not None:
                count = await self._count_visit(
                    keys=[rc.session_key(sid)], args=[self._session_ttl]
                )
                if count:
                    return Visit(sid, int(count), new=False)
            fresh = new_sid()
            await self._client.set(rc.session_key(fresh), 1, ex=self._session_ttl)
            return Visit(fresh, 1, new=True)

    async def get_item(self, item_id: str) -> bytes | None:
        now = time.monotonic()
        cached = self._cache.lookup(item_id, now)
        if cached is not None:
            return cached
        generation = self._cache.generation()
        async with self._errors():
            # decode_responses is off: Redis hands back bytes.
            value = cast(bytes | None, await self._client.get(rc.item_key(item_id)))
        if value is not None:
            self._cache.fill(item_id, value, now, generation)
        return value

    async def put_item(self, item_id: str, value: bytes) -> bool:
        async with self._errors():
            previous = await self._client.set(rc.item_key(item_id), value, get=True)
            self._cache.invalidate(item_id)
            token = secrets.token_hex(8)
            message = rc.encode_invalidation(item_id, token)
            receivers = int(await self._client.publish(rc.INVALIDATION_CHANNEL, message))
            await self._collect_acks(token, receivers, item_id)
        return previous is None

    async def _collect_acks(self, token: str, receivers: int, item_id: str) -> None:
        key = rc.ack_key(token)
        deadline = time.monotonic() + rc.ACK_TIMEOUT_S
        acked = 0
        while acked < receivers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "item %r: %d of %d workers confirmed the invalidation within %.1fs",
                    item_id,
                    acked,
                    receivers,
                    rc.ACK_TIMEOUT_S,
                )
                break
            # BLPOP's timeout 0 means "forever": never let the rounding reach it.
            wait = max(0.01, min(remaining, rc.ACK_POLL_S))
            if await self._client.blpop([key], timeout=wait) is not None:
                acked += 1
        await self._client.delete(key)

    async def _listen(self) -> None:
        delay = 0.05
        while not self._stopping:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(rc.INVALIDATION_CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._cache.subscribed_now()
                        delay = 0.05
                    elif message["type"] == "message":
                        await self._invalidate(message["data"])
            except (RedisError, OSError) as exc:
                if self._cache.subscribed:
                    log.warning("invalidation channel lost (%s); item cache off until back", exc)
            finally:
                self._cache.unsubscribed_now()
                with suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX_DELAY_S)

    async def _invalidate(self, data: bytes) -> None:
        decoded = rc.decode_invalidation(data)
        if decoded is None:
            return
        item_id, token = decoded
        self._cache.invalidate(item_id)
        key = rc.ack_key(token)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, os.getpid())
            pipe.expire(key, rc.ACK_LIST_TTL_S)
            await pipe.execute()

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"Redis at {self._location} is unavailable: {exc or type(exc).__name__}"
            ) from exc
