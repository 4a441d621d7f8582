"""The Redis store for the WSGI app (redis-py, thread-safe): the sync twin of `redis_async`.

The WSGI server calls the app from a thread pool; redis-py's pool hands each thread its own
connection. The invalidation listener is a daemon thread with its own pub/sub connection
(taken from the same pool, so the budget holds). Made on the first request of each process.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sample_app import redis_common as rc
from sample_app.core import Visit
from sample_app.settings import Settings, redis_location
from sample_app.store import StoreUnavailable, new_sid

log = logging.getLogger("sample_app")
_RESUBSCRIBE_MAX_DELAY_S = 1.0


class RedisStore:
    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("RedisStore needs settings.redis_url")
        self._location = redis_location(settings.redis_url)
        self._session_ttl = settings.session_ttl
        # See redis_async for why the pool blocks briefly and retries only once, at once.
        self._pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=settings.redis_timeout,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=10,
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._count_visit = self._client.register_script(rc.COUNT_VISIT_LUA)
        self._cache = rc.SubscribedCache(settings.cache_size, settings.cache_ttl)
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    @property
    def pool_size(self) -> int:
        return int(self._pool.max_connections)

    @property
    def subscribed(self) -> bool:
        return self._cache.subscribed

    def start(self) -> None:
        """Start the invalidation listener thread. Redis may be down: it keeps retrying."""
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, name="sample_app-invalidations", daemon=True
            )
            self._listener.start()

    def close(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.join(timeout=10)
            self._listener = None
        self._client.close()
        self._pool.disconnect()

    def count_visit(self, sid: str | None) -> Visit:
        with self._errors():
            if sid is not None:
                count = self._count_visit(keys=[rc.session_key(sid)], args=[self._session_ttl])
                if count:
                    return Visit(sid, int(count), new=False)
            fresh = new_sid()
            self._client.set(rc.session_key(fresh), 1, ex=self._session_ttl)
            return Visit(fresh, 1, new=True)

    def get_item(self, item_id: str) -> bytes | None:
        now = time.monotonic()
        cached = self._cache.lookup(item_id, now)
        if cached is not None:
            return cached
        generation = self._cache.generation()
        with self._errors():
            # decode_responses is off: Redis hands back bytes.
            value = cast(bytes | None, self._client.get(rc.item_key(item_id)))
        if value is not None:
            self._cache.fill(item_id, value, now, generation)
        return value

    def put_item(self, item_id: str, value: bytes) -> bool:
        with self._errors():
            previous = self._client.set(rc.item_key(item_id), value, get=True)
            self._cache.invalidate(item_id)
            token = secrets.token_hex(8)
            message = rc.encode_invalidation(item_id, token)
            receivers = int(self._client.publish(rc.INVALIDATION_CHANNEL, message))
            self._collect_acks(token, receivers, item_id)
        return previous is None

    def _collect_acks(self, token: str, receivers: int, item_id: str) -> None:
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
            wait = max(0.01, min(remaining, rc.ACK_POLL_S))
            if self._client.blpop([key], timeout=wait) is not None:
                acked += 1
        self._client.delete(key)

    def _listen(self) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(rc.INVALIDATION_CHANNEL)
                while not self._stopping.is_set():
                    # A short wait so that close() is noticed quickly.
                    message = pubsub.get_message(timeout=0.25)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._cache.subscribed_now()
                        delay = 0.05
                    elif message["type"] == "message":
                        self._invalidate(message["data"])
            except (RedisError, OSError) as exc:
                if self._cache.subscribed:
                    log.warning("invalidation channel lost (%s); item cache off until back", exc)
            finally:
                self._cache.unsubscribed_now()
                with suppress(RedisError, OSError):
                    pubsub.close()
            self._stopping.wait(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX_DELAY_S)

    def _invalidate(self, data: bytes) -> None:
        decoded = rc.decode_invalidation(data)
        if decoded is None:
            return
        item_id, token = decoded
        self._cache.invalidate(item_id)
        key = rc.ack_key(token)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, os.getpid())
            pipe.expire(key, rc.ACK_LIST_TTL_S)
            pipe.execute()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"Redis at {self._location} is unavailable: {exc or type(exc).__name__}"
            ) from exc
