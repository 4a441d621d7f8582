"""Both apps in-process against a real redis-server (started by the ``redis_server`` fixture).

Two app instances in one test stand for two workers: each has its own pool, LRU and
invalidation listener (an asyncio task for ASGI, a thread for WSGI), as forked workers would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from sample_harness import AsgiClient, Call, RedisServer, Reply, WsgiClient, wait_until

from sample_app.asgi import ASGIApp
from sample_app.wsgi import WSGIApp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Client = AsgiClient | WsgiClient


class Pair:
    """Two workers of one interface on the same Redis."""

    def __init__(self, kind: str, env: dict[str, str]) -> None:
        self.kind = kind
        if kind == "asgi":
            first = AsgiClient(ASGIApp(env))
            self.a: Client = first
            self.b: Client = AsgiClient(ASGIApp(env), runner=first.runner)
        else:
            self.a, self.b = WsgiClient(WSGIApp(env)), WsgiClient(WSGIApp(env))
        for client in (self.a, self.b):
            assert client.start()["type"] == "lifespan.startup.complete"
            client.request("GET", "/health")  # WSGI opens on the first request

    def store(self, client: Client) -> Any:
        return client.app.store

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        def both() -> bool:
            self.tick()
            return all(self.store(c).subscribed for c in (self.a, self.b))

        assert wait_until(both, timeout), "the invalidation listeners did not subscribe"

    def tick(self) -> None:
        """Let the ASGI background tasks run for a moment (their loop runs only when asked)."""
        if isinstance(self.a, AsgiClient):
            self.a.run(asyncio.sleep(0.01))

    def concurrently(self, count: int, method: str, path: str, **kwargs: Any) -> list[Reply]:
        if isinstance(self.a, AsgiClient) and isinstance(self.b, AsgiClient):
            clients = [self.a, self.b]

            async def burst() -> list[Reply]:
                calls = [clients[i % 2].asend(Call(method, path, **kwargs)) for i in range(count)]
                return list(await asyncio.gather(*calls))

            return self.a.run(burst())  # type: ignore[no-any-return]
        with ThreadPoolExecutor(max_workers=count) as pool:
            both = [self.a, self.b]
            futures = [
                pool.submit(both[i % 2].request, method, path, **kwargs) for i in range(count)
            ]
            return [f.result() for f in futures]

    def close(self) -> None:
        self.b.stop()
        self.a.stop()


@pytest.fixture(params=["asgi", "wsgi"])
def pair(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Pair]:
    env = {
        "REDIS_URL": redis_server.url,
        "SAMPLE_APP_REDIS_CONNECTIONS": "16",
        "FORKD_WORKERS": "2",
    }
    workers = Pair(request.param, env)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_a_session_continues_on_the_other_worker(pair: Pair) -> None:
    first = pair.a.request("GET", "/session")
    cookie = first.cookie()
    assert first.json()["count"] == 1 and cookie is not None
    counts = [
        client.request("GET", "/session", headers=[("cookie", cookie)]).json()["count"]
        for client in [pair.b, pair.a, pair.b]
    ]
    assert counts == [2, 3, 4]


def test_concurrent_visits_are_counted_exactly(pair: Pair, raw: redis.Redis) -> None:
    cookie = pair.a.request("GET", "/session").cookie()
    assert cookie is not None
    replies = pair.concurrently(100, "GET", "/session", headers=[("cookie", cookie)])
    assert [r.status for r in replies] == [200] * 100
    assert sorted(r.json()["count"] for r in replies) == list(range(2, 102))
    # The pools kept to the budget: 16 connections over 2 workers, 8 each (listener included).
    assert int(raw.info("clients")["connected_clients"]) - 1 <= 16


def test_pool_share_follows_the_worker_count(pair: Pair) -> None:
    assert pair.store(pair.a).pool_size == 8


def test_a_put_reaches_every_workers_cache_before_it_returns(pair: Pair, raw: redis.Redis) -> None:
    pair.wait_subscribed()
    assert pair.a.request("PUT", "/items/k", body=b'"v1"').status == 201
    assert pair.b.request("GET", "/items/k").body == b'"v1"'
    # Show that worker b really serves from its LRU: a change behind the app's back is unseen.
    raw.set("sample_app:item:k", b'"behind"')
    assert pair.b.request("GET", "/items/k").body == b'"v1"'
    # A PUT through worker a drops the entry in b before the PUT returns.
    assert pair.a.request("PUT", "/items/k", body=b'"v2"').status == 200
    assert pair.b.request("GET", "/items/k").body == b'"v2"'
    assert pair.a.request("GET", "/items/k").body == b'"v2"'


def test_redis_outage_is_a_fast_503_and_heals_itself(pair: Pair, redis_server: RedisServer) -> None:
    cookie = pair.a.request("GET", "/session").cookie()
    assert cookie is not None
    pair.wait_subscribed()
    redis_server.stop()
    for path in ["/session", "/items/k"]:
        started = time.monotonic()
        reply = pair.b.request("GET", path, headers=[("cookie", cookie)])
        elapsed = time.monotonic() - started
        assert reply.status == 503, reply
        assert "Redis" in reply.json()["error"] and reply.header("retry-after") == "1"
        assert elapsed < 1.0, f"{path} took {elapsed:.2f}s to fail"
    assert pair.b.request("GET", "/health").status == 200  # liveness does not need Redis
    redis_server.start()

    def session_works() -> bool:
        pair.tick()
        return pair.a.request("GET", "/session").status == 200

    assert wait_until(session_works, 10), "the app did not recover after Redis came back"
    # The invalidation channel came back as well: writes still reach the other worker.
    pair.wait_subscribed()
    assert pair.b.request("PUT", "/items/k", body=b"1").status == 201
    assert pair.a.request("GET", "/items/k").body == b"1"
    assert pair.b.request("PUT", "/items/k", body=b"2").status == 200
    assert pair.a.request("GET", "/items/k").body == b"2"


def test_a_frozen_redis_is_a_503_within_a_second(pair: Pair, redis_server: RedisServer) -> None:
    cookie = pair.a.request("GET", "/session").cookie()
    assert cookie is not None
    redis_server.pause()
    try:
        for method, path in [("GET", "/session"), ("GET", "/items/k"), ("PUT", "/items/k")]:
            started = time.monotonic()
            reply = pair.a.request(method, path, headers=[("cookie", cookie)], body=b"1")
            elapsed = time.monotonic() - started
            assert reply.status == 503 and "Redis" in reply.json()["error"], reply
            assert elapsed < 1.0, f"{method} {path} took {elapsed:.2f}s to fail"
    finally:
        redis_server.resume()
    # Back at once. (Commands the client gave up on may still run once Redis thaws, so the
    # count itself is not checked here.)
    assert pair.a.request("GET", "/session", headers=[("cookie", cookie)]).status == 200
