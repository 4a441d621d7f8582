"""The Redis store for the ASGI app (redis.asyncio): sessions, items, the invalidation listener.

Made after fork (at lifespan startup or on the first request), never at import. Timeouts are
short and retries immediate, so a dead Redis costs a request well under a second and turns
into a 503; the pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import cast

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.exceptions import RedisError

from sample_app import redis_common as rc
from sample_app.core import Visit
from sample_app.notes import ChangeHub
from sample_app.settings import Settings
from sample_app.store import new_sid

log = logging.getLogger("sample_app")


class AsyncRedisStore(rc.RedisStoreBase):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._pool = aredis.BlockingConnectionPool.from_url(
            self._url, **rc.pool_options(settings, Retry)
        )
        self._client = aredis.Redis(connection_pool=self._pool)
        self._count_visit = self._client.register_script(rc.COUNT_VISIT_LUA)
        self._listener: asyncio.Task[None] | None = None
        self.changes = ChangeHub()  # fed by the invalidation listener
        self._stopping = False

    @property
    def pool_size(self) -> int:
        return int(self._pool.max_connections)

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
        await self.changes.aclose()
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
            token, message = rc.new_invalidation(item_id)
            receivers = int(await self._client.publish(rc.INVALIDATION_CHANNEL, message))
            await self._collect_acks(token, receivers, item_id)
        return previous is None

    async def _collect_acks(self, token: str, receivers: int, item_id: str) -> None:
        key = rc.ack_key(token)
        acks = rc.AckWait(item_id, receivers, time.monotonic())
        while (wait := acks.next_wait(time.monotonic())) is not None:
            acks.popped(await self._client.blpop([key], timeout=wait))
        await self._client.delete(key)

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(rc.INVALIDATION_CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    ack_list = self._feed.on_message(message)
                    if ack_list is not None:  # an item changed (on any worker of any host)
                        decoded = rc.decode_invalidation(message["data"]) if message else None
                        if decoded is not None:
                            self.changes.publish(decoded[0])
                    if ack_list is not None:
                        await self._acknowledge(ack_list)
            except (RedisError, OSError) as exc:
                self._feed.lost(exc)
            finally:
                delay = self._feed.closed()
                with suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)

    async def _acknowledge(self, ack_list: str) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(ack_list, os.getpid())
            pipe.expire(ack_list, rc.ACK_LIST_TTL_S)
            await pipe.execute()

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except rc.UNAVAILABLE_ERRORS as exc:
            raise rc.unavailable(self._location, exc) from exc
