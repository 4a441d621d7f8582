"""The sample app under forkd: two real workers, one cookie, every request on a new connection.

Each test runs ``python -m forkd start sample_app.asgi:app`` (or the WSGI app with
``--interface wsgi``) with two workers, against the SQLite default or a real redis-server,
and checks what a user would see: a session that continues whichever worker answers, a
counter that loses no visit, a write that no worker contradicts afterwards, and a Redis
outage that is a quick 503 and heals by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sample_harness import Forkd, RedisServer, Reply, http_request, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INTERFACES = {
    "asgi": ("sample_app.asgi:app", []),
    "wsgi": ("sample_app.wsgi:app", ["--interface", "wsgi"]),
}
# How long to keep asking on new connections until both workers (sharing one listening
# socket, so the kernel picks) have answered.
TWO_PIDS_WITHIN_S = 20.0

StartForkd = Callable[..., Forkd]


@pytest.fixture(params=sorted(INTERFACES))
def interface(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start(run_forkd: StartForkd, interface: str, env: dict[str, str], *extra: str) -> Forkd:
    app, args = INTERFACES[interface]
    return run_forkd(app, env, workers=2, extra_args=[*args, *extra])


def visit(server: Forkd, cookie: str | None = None) -> Reply:
    reply = server.request("GET", "/session", headers={"Cookie": cookie} if cookie else None)
    assert reply.status == 200, (reply, server.output())
    return reply


def new_session(server: Forkd) -> str:
    cookie = visit(server).cookie()
    assert cookie is not None and cookie.startswith("sid=")
    return cookie


def served_by(reply: Reply) -> int:
    return int(reply.header("x-served-by") or 0)


def until_two_pids(server: Forkd, ask: Callable[[], Reply]) -> list[Reply]:
    """Ask on new connections until two different workers have answered."""
    replies: list[Reply] = []
    pids: set[int] = set()
    deadline = time.monotonic() + TWO_PIDS_WITHIN_S
    while time.monotonic() < deadline:
        reply = ask()
        replies.append(reply)
        pids.add(served_by(reply))
        if len(pids) >= 2:
            return replies
    raise AssertionError(f"only pid {pids} answered {len(replies)} requests\n{server.output()}")


def get_item(server: Forkd, item_id: str) -> Reply:
    reply = server.request("GET", f"/items/{item_id}")
    assert reply.status == 200, (reply, server.output())
    return reply


def test_a_session_continues_across_workers(
    run_forkd: StartForkd, interface: str, store_env: dict[str, str]
) -> None:
    server = start(run_forkd, interface, store_env)
    cookie = new_session(server)
    replies = until_two_pids(server, lambda: visit(server, cookie))
    counts = [reply.json()["count"] for reply in replies]
    assert counts == list(range(2, 2 + len(counts))), counts  # strictly increasing, none lost
    assert all(reply.header("set-cookie") is None for reply in replies)


def test_one_hundred_concurrent_visits_count_exactly_one_hundred(
    run_forkd: StartForkd, interface: str, store_env: dict[str, str]
) -> None:
    server = start(run_forkd, interface, store_env)
    cookie = new_session(server)  # the session's first visit: count 1
    start_together = threading.Barrier(100)

    def one_visit(_: int) -> Reply:
        start_together.wait(timeout=30)
        return http_request(server.port, "GET", "/session", headers={"Cookie": cookie})

    with ThreadPoolExecutor(max_workers=100) as pool:
        replies = list(pool.map(one_visit, range(100)))
    assert [reply.status for reply in replies] == [200] * 100, server.output()
    counts = sorted(reply.json()["count"] for reply in replies)
    # Each of the 100 saw a different count and together they added exactly 100.
    assert counts == list(range(2, 102))
    assert visit(server, cookie).json()["count"] == 102


def test_a_put_is_seen_by_every_worker(
    run_forkd: StartForkd, interface: str, store_env: dict[str, str]
) -> None:
    server = start(run_forkd, interface, store_env)

    def read() -> Reply:
        item = server.request("GET", "/items/greeting")
        assert item.status == 200, (item, server.output())
        return item

    assert server.request("PUT", "/items/greeting", body=b'"hello 0"').status == 201
    for version in range(1, 6):
        # Both workers have read (and cached) the current value ...
        before = until_two_pids(server, read)
        assert {reply.body for reply in before} == {f'"hello {version - 1}"'.encode()}
        put = server.request("PUT", "/items/greeting", body=f'"hello {version}"'.encode())
        assert put.status == 200, (put, server.output())
        # ... and once the PUT has returned, neither serves the old value.
        after = until_two_pids(server, read)
        assert {reply.body for reply in after} == {f'"hello {version}"'.encode()}


def test_sqlite_is_the_default_without_redis(
    run_forkd: StartForkd, interface: str, forkd_home: Path
) -> None:
    server = start(run_forkd, interface, {})
    cookie = new_session(server)
    assert visit(server, cookie).json()["count"] == 2
    assert (forkd_home / "sample_app.db").exists()


def test_redis_outage_is_a_fast_503_then_heals(
    run_forkd: StartForkd, interface: str, redis_server: RedisServer
) -> None:
    server = start(run_forkd, interface, {"REDIS_URL": redis_server.url})
    cookie = new_session(server)
    redis_server.stop()

    def fails_fast() -> Reply:
        started = time.monotonic()
        reply = server.request("GET", "/session", headers={"Cookie": cookie})
        elapsed = time.monotonic() - started
        assert reply.status == 503, (reply, server.output())
        assert "Redis" in reply.json()["error"]
        assert elapsed < 1.0, f"the 503 took {elapsed:.2f}s"
        return reply

    until_two_pids(server, fails_fast)  # on every worker
    assert server.request("GET", "/health").status == 200
    assert server.request("GET", "/items/x").status == 503

    redis_server.start()
    healed: set[int] = set()

    def both_workers_serve_sessions() -> bool:
        reply = server.request("GET", "/session")
        if reply.status == 200:
            healed.add(served_by(reply))
        return len(healed) == 2

    assert wait_until(both_workers_serve_sessions, timeout=15, interval=0.05), server.output()
    # The invalidation channel is back as well: a write reaches both workers' caches.
    assert server.request("PUT", "/items/x", body=b"1").status == 201
    until_two_pids(server, lambda: get_item(server, "x"))
    assert server.request("PUT", "/items/x", body=b"2").status == 200
    for reply in until_two_pids(server, lambda: get_item(server, "x")):
        assert reply.body == b"2"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_preloaded_app_opens_its_store_after_fork(
    run_forkd: StartForkd, interface: str, store: str, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {}
    if store == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    server = start(run_forkd, interface, env, "--preload")
    cookie = new_session(server)
    counts = [
        reply.json()["count"] for reply in until_two_pids(server, lambda: visit(server, cookie))
    ]
    assert counts == list(range(2, 2 + len(counts)))
    assert server.request("PUT", "/items/p", body=b"[1]").status == 201
    until_two_pids(server, lambda: get_item(server, "p"))
    assert server.request("PUT", "/items/p", body=b"[2]").status == 200
    for reply in until_two_pids(server, lambda: get_item(server, "p")):
        assert reply.body == b"[2]"
