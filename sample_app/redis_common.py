"""What the sync and async Redis stores share: keys, messages, the script, the cache gate.

No I/O here.

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

from sample_app.lru import LRUCache

PREFIX = "sample_app:"
INVALIDATION_CHANNEL = PREFIX + "invalidate"
# How long a writer waits for every worker's acknowledgement. A worker that is alive and
# subscribed answers in about a millisecond; one that is not has cleared its own cache.
ACK_TIMEOUT_S = 1.0
# Each BLPOP must end well within the socket timeout, or the client would call it a failure.
ACK_POLL_S = 0.1
# An ack list nobody collects (the writer gave up) disappears by itself.
ACK_LIST_TTL_S = 30

# Add one to an existing session and slide its expiry; an unknown sid answers 0 so that the
# caller mints a fresh id instead of adopting one the client made up.
COUNT_VISIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
"""


def session_key(sid: str) -> str:
    return f"{PREFIX}session:{sid}"


def item_key(item_id: str) -> str:
    return f"{PREFIX}item:{item_id}"


def ack_key(token: str) -> str:
    return f"{PREFIX}ack:{token}"


def encode_invalidation(item_id: str, token: str) -> bytes:
    return json.dumps({"id": item_id, "ack": token}).encode()


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
