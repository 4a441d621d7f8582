"""The Redis store for the WSGI app (redis-py, thread-safe): the sync twin of `redis_async`.

The WSGI server calls the app from a thread pool; redis-py's pool hands each thread its own
connection. The invalidation listener is a daemon thread with its own pub/sub connection
(taken from the same pool, so the budget holds). Made on the first request of each process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import cast

import redis
from redis.exceptions import RedisError
from redis.retry import Retry

from sample_app import redis_common as rc
from sample_app.core import Visit
from sample_app.settings import Settings
from sample_app.store import new_sid


class RedisStore(rc.RedisStoreBase):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._pool = redis.BlockingConnectionPool.from_url(
            self._url, **rc.pool_options(settings, Retry)
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._count_visit = self._client.register_script(rc.COUNT_VISIT_LUA)
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    @property
    def pool_size(self) -> int:
        return int(self._pool.max_connections)

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
            token, message = rc.new_invalidation(item_id)
            receivers = int(self._client.publish(rc.INVALIDATION_CHANNEL, message))
            self._collect_acks(token, receivers, item_id)
        return previous is None

    def _collect_acks(self, token: str, receivers: int, item_id: str) -> None:
        key = rc.ack_key(token)
        acks = rc.AckWait(item_id, receivers, time.monotonic())
        while (wait := acks.next_wait(time.monotonic())) is not None:
            acks.popped(self._client.blpop([key], timeout=wait))
        self._client.delete(key)

    def _listen(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(rc.INVALIDATION_CHANNEL)
                while not self._stopping.is_set():
                    # A short wait so that close() is noticed quickly.
                    message = pubsub.get_message(timeout=0.25)
                    ack_list = self._feed.on_message(message)
                    if ack_list is not None:
                        self._acknowledge(ack_list)
            except (RedisError, OSError) as exc:
                self._feed.lost(exc)
            finally:
                delay = self._feed.closed()
                with suppress(RedisError, OSError):
                    pubsub.close()
            self._stopping.wait(delay)

    def _acknowledge(self, ack_list: str) -> None:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(ack_list, os.getpid())
            pipe.expire(ack_list, rc.ACK_LIST_TTL_S)
            pipe.execute()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except rc.UNAVAILABLE_ERRORS as exc:
            raise rc.unavailable(self._location, exc) from exc
