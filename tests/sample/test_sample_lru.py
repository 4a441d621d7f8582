"""The per-worker LRU: bounded, recency-ordered, TTL backstop, and the fill-race guard."""

from __future__ import annotations

from sample_app.lru import LRUCache


def test_keeps_the_most_recently_used() -> None:
    cache: LRUCache[int] = LRUCache(capacity=2, ttl=60)
    cache.put("a", 1, now=0)
    cache.put("b", 2, now=0)
    assert cache.get("a", now=1) == 1  # "a" is now the most recent
    cache.put("c", 3, now=2)
    assert (cache.get("a", 3), cache.get("b", 3), cache.get("c", 3)) == (1, None, 3)
    assert len(cache) == 2


def test_entries_expire_after_ttl() -> None:
    cache: LRUCache[int] = LRUCache(capacity=10, ttl=5)
    cache.put("a", 1, now=100)
    assert cache.get("a", now=104.9) == 1
    assert cache.get("a", now=105) is None
    assert len(cache) == 0


def test_a_fill_that_raced_an_eviction_is_dropped() -> None:
    cache: LRUCache[str] = LRUCache(capacity=10, ttl=60)
    before_read = cache.generation
    cache.evict("a")  # a write landed while the reader was fetching "a"
    assert not cache.put("a", "old", now=0, since=before_read)
    assert cache.get("a", now=0) is None
    assert cache.put("a", "new", now=0, since=cache.generation)
    cache.clear()
    assert cache.get("a", now=0) is None


def test_capacity_zero_caches_nothing() -> None:
    cache: LRUCache[int] = LRUCache(capacity=0, ttl=60)
    assert not cache.put("a", 1, now=0)
    assert cache.get("a", now=0) is None
