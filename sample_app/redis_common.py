"""What the sync and async Redis stores share: keys, messages, the script, the cache gate.

No I/O here: the two stores run the same decisions, each with its own client (the only
difference between them is ``await``).

How a write reaches every worker's cache, given that pub/sub delivery is asynchronous:

1. the writer ``SET``s the item, drops it from its own LRU, and ``PUBLISH``es an invalidation
   carrying a fresh token; Redis answers with the number of subscribers it delivered to;
2. every worker's listener drops the item from its LRU, then ``RPUSH``es to the token's ack
   list;
3. the writer ``BLPOP``s that many acks (bounded by `ACK_TIMEOUT_S`) before answering.

So when a PUT returns, every subscribed worker has already forgotten the old value. A worker
whose subscription is down does not count and does not cache: it clears its LRU when the
subscription drops and serves from its LRU again only after re-subscribing.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sample_app.lru import LRUCache
from sample_app.settings import Settings, redis_location
from sample_app.store import StoreUnavailable

log = logging.getLogger("sample_app")

PREFIX = "sample_app:"
INVALIDATION_CHANNEL = PREFIX + "invalidate"
# How long a writer waits for every worker's acknowledgement. A worker that is alive and
# subscribed answers in about a millisecond; one that is not has cleared its own cache.
ACK_TIMEOUT_S = 1.0
# Each BLPOP must end well within the socket timeout, or the client would call it a failure.
ACK_POLL_S = 0.1
# An ack list nobody collects (the writer gave up) disappears by itself.
ACK_LIST_TTL_S = 30
# Between two attempts to subscribe, a delay that doubles up to this.
RESUBSCRIBE_FIRST_DELAY_S = 0.05
RESUBSCRIBE_MAX_DELAY_S = 1.0
# What a request turns into a 503: Redis is down, slow or unreachable.
UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# Add one to an existing session and slide its expiry; an unknown sid answers 0 so that the
# caller mints a fresh id instead of adopting one the client made up.
COUNT_VISIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
"""


def pool_options(settings: Settings, retry_class: Callable[..., object]) -> dict[str, Any]:
    """Keyword arguments for either client's ``BlockingConnectionPool.from_url``.

    The pool blocks: under a burst, a request waits briefly for a free connection instead of
    failing at once, bounded by the same short timeout. One immediate retry (``retry_class``
    is the sync or the asyncio ``Retry``) replaces a pooled connection that died with a Redis
    restart; redis-py's default (many retries with backoff) would hold a request for seconds.
    """
    return {
        "max_connections": settings.redis_pool_size,
        "timeout": settings.redis_timeout,
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        "retry": retry_class(NoBackoff(), 1),
        "health_check_interval": 10,
    }


def unavailable(location: str, exc: BaseException) -> StoreUnavailable:
    """The 503 for one of `UNAVAILABLE_ERRORS`."""
    return StoreUnavailable(f"Redis at {location} is unavailable: {exc or type(exc).__name__}")


def session_key(sid: str) -> str:
    return f"{PREFIX}session:{sid}"


def item_key(item_id: str) -> str:
    return f"{PREFIX}item:{item_id}"


def ack_key(token: str) -> str:
    return f"{PREFIX}ack:{token}"


def encode_invalidation(item_id: str, token: str) -> bytes:
    return json.dumps({"id": item_id, "ack": token}).encode()


def new_invalidation(item_id: str) -> tuple[str, bytes]:
    """(ack token, message to publish) for a write of ``item_id``."""
    token = secrets.token_hex(8)
    return token, encode_invalidation(item_id, token)


def decode_invalidation(data: bytes | str) -> tuple[str, str] | None:
    """(item id, ack token) from a message, or None when it is not one of ours."""
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    item_id, token = message.get("id"), message.get("ack")
    if isinstance(item_id, str) and isinstance(token, str):
        return item_id, token
    return None


class SubscribedCache:
    """A worker's item LRU that is trusted only while its invalidation channel is up.

    While unsubscribed, invalidations may be missed, so the cache is empty and unused; reads
    go to Redis. Both losing and regaining the subscription clear it, which also bumps the
    LRU generation so that a read begun in the gap cannot fill it with a stale value.
    """

    def __init__(self, capacity: int, ttl: float) -> None:
        self._lru: LRUCache[bytes] = LRUCache(capacity, ttl)
        self._subscribed = False

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def lookup(self, item_id: str, now: float) -> bytes | None:
        return self._lru.get(item_id, now) if self._subscribed else None

    def generation(self) -> int:
        """Note this before reading Redis; pass it to `fill` afterwards."""
        return self._lru.generation

    def fill(self, item_id: str, value: bytes, now: float, generation: int) -> None:
        if self._subscribed:
            self._lru.put(item_id, value, now, since=generation)

    def invalidate(self, item_id: str) -> None:
        self._lru.evict(item_id)

    def subscribed_now(self) -> None:
        self._lru.clear()
        self._subscribed = True

    def unsubscribed_now(self) -> None:
        self._subscribed = False
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)


class AckWait:
    """The writer's step 3: how long each BLPOP may block until every ack is in or time is up."""

    def __init__(self, item_id: str, receivers: int, now: float) -> None:
        self._item_id = item_id
        self._receivers = receivers
        self._deadline = now + ACK_TIMEOUT_S
        self.acked = 0

    def next_wait(self, now: float) -> float | None:
        """Seconds the next BLPOP may block, or None when the writer is done waiting."""
        if self.acked >= self._receivers:
            return None
        remaining = self._deadline - now
        if remaining <= 0:
            log.warning(
                "item %r: %d of %d workers confirmed the invalidation within %.1fs",
                self._item_id,
                self.acked,
                self._receivers,
                ACK_TIMEOUT_S,
            )
            return None
        # BLPOP's timeout 0 means "forever": never let the rounding reach it.
        return max(0.01, min(remaining, ACK_POLL_S))

    def popped(self, reply: object) -> None:
        """Count one BLPOP's answer (None: it timed out)."""
        if reply is not None:
            self.acked += 1


class InvalidationFeed:
    """A worker's listener side of steps 2 and 3, around its `SubscribedCache`.

    The store runs the subscription; this decides what each message means and how long to
    wait before subscribing again.
    """

    def __init__(self, cache: SubscribedCache) -> None:
        self._cache = cache
        self._delay = RESUBSCRIBE_FIRST_DELAY_S

    def on_message(self, message: Mapping[str, Any] | None) -> str | None:
        """Apply one pub/sub message; the ack list to push to, when it asks for one."""
        if message is None:
            return None
        if message["type"] == "subscribe":
            self._cache.subscribed_now()
            self._delay = RESUBSCRIBE_FIRST_DELAY_S
        elif message["type"] == "message":
            decoded = decode_invalidation(message["data"])
            if decoded is not None:
                item_id, token = decoded
                self._cache.invalidate(item_id)
                return ack_key(token)
        return None

    def lost(self, exc: BaseException) -> None:
        if self._cache.subscribed:
            log.warning("invalidation channel lost (%s); item cache off until back", exc)

    def closed(self) -> float:
        """The subscription ended: stop trusting the cache; the delay before the next try."""
        self._cache.unsubscribed_now()
        delay = self._delay
        self._delay = min(delay * 2, RESUBSCRIBE_MAX_DELAY_S)
        return delay


class RedisStoreBase:
    """What both stores hold besides their client: where Redis is, the session TTL, the cache."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError(f"{type(self).__name__} needs settings.redis_url")
        self._url = settings.redis_url
        self._location = redis_location(settings.redis_url)
        self._session_ttl = settings.session_ttl
        self._cache = SubscribedCache(settings.cache_size, settings.cache_ttl)
        self._feed = InvalidationFeed(self._cache)

    @property
    def subscribed(self) -> bool:
        return self._cache.subscribed
