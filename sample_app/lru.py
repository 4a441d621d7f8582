"""A bounded, thread-safe LRU for one worker's items; the caller passes ``now`` in.

Entries also expire after ``ttl`` seconds. That is a backstop only: correctness comes from
explicit invalidation (`evict`), the TTL merely bounds the damage of an invalidation that was
lost (say, while the pub/sub connection was being re-established).

The ``generation`` closes the classic fill race: a reader notes the generation, reads the
shared store, and inserts with ``put(..., since=generation)``; if any eviction happened in
between, the value it read may already be stale, so the insert is dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    def __init__(self, capacity: int, ttl: float) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        # The WSGI worker calls from many threads; an uncontended lock costs next to nothing.
        self._lock = threading.Lock()
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires_at, value = entry
            if now >= expires_at:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: V, now: float, since: int | None = None) -> bool:
        """Insert ``value``; False when nothing is cached (evictions since ``since``, or size 0)."""
        with self._lock:
            if self._capacity <= 0 or (since is not None and since != self._generation):
                return False
            self._entries[key] = (now + self._ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return True

    def evict(self, key: str) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
