"""The SQLite store on a real file: atomic counter, shared sessions, version-checked cache.

Two `SqliteStore` objects on one file stand for two workers: each has its own connections
and its own LRU, exactly as two forked processes would.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sample_app.sqlite_store import SqliteStore
from sample_app.store import StoreUnavailable


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "sample_app.db"


@pytest.fixture
def workers(db: Path) -> Iterator[tuple[SqliteStore, SqliteStore]]:
    first, second = SqliteStore(db), SqliteStore(db)
    yield first, second
    first.close()
    second.close()


def test_creates_the_file_in_wal_mode_owner_only_dir(db: Path) -> None:
    store = SqliteStore(db)
    try:
        store.count_visit(None)
    finally:
        store.close()
    assert db.exists()
    assert (db.parent.stat().st_mode & 0o777) == 0o700
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_session_continues_on_another_worker(workers: tuple[SqliteStore, SqliteStore]) -> None:
    first, second = workers
    visit = first.count_visit(None)
    assert (visit.count, visit.new) == (1, True)
    assert second.count_visit(visit.sid).count == 2
    assert first.count_visit(visit.sid).count == 3


def test_an_unknown_sid_is_replaced_not_adopted(workers: tuple[SqliteStore, SqliteStore]) -> None:
    first, _ = workers
    planted = "P" * 43
    visit = first.count_visit(planted)
    assert visit.new and visit.sid != planted and visit.count == 1


def test_sessions_expire_after_inactivity(db: Path) -> None:
    clock = [1000.0]
    store = SqliteStore(db, session_ttl=60, wall_clock=lambda: clock[0])
    try:
        sid = store.count_visit(None).sid
        clock[0] += 59
        assert store.count_visit(sid).count == 2  # each visit slides the expiry
        clock[0] += 60
        expired = store.count_visit(sid)
        assert expired.new and expired.count == 1 and expired.sid != sid
    finally:
        store.close()


def test_the_counter_is_atomic_under_concurrency(workers: tuple[SqliteStore, SqliteStore]) -> None:
    first, second = workers
    sid = first.count_visit(None).sid
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(
            pool.map(lambda i: (first if i % 2 else second).count_visit(sid).count, range(100))
        )
    assert sorted(counts) == list(range(2, 102))


def test_a_put_is_seen_by_every_worker_at_once(workers: tuple[SqliteStore, SqliteStore]) -> None:
    first, second = workers
    assert first.put_item("k", b'"v1"') is True
    assert first.get_item("k") == b'"v1"' and second.get_item("k") == b'"v1"'  # both cache it
    assert second.put_item("k", b'"v2"') is False
    assert first.get_item("k") == b'"v2"'
    assert second.get_item("k") == b'"v2"'
    assert first.get_item("missing") is None


def test_a_locked_database_is_unavailable_not_a_hang(db: Path) -> None:
    store = SqliteStore(db, busy_timeout=0.05)
    store.put_item("k", b"1")
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.put_item("k", b"2")
        assert store.get_item("k") == b"1"  # WAL: readers are not blocked by the writer
    finally:
        blocker.close()
        store.close()


def test_threads_get_their_own_connections(db: Path) -> None:
    store = SqliteStore(db)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(20):
                store.put_item(f"t{threading.get_ident()}", str(i).encode())
                store.get_item(f"t{threading.get_ident()}")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    store.close()
    assert errors == []
