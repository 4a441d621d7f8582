"""The default store: one SQLite file shared by every worker on the host.

WAL lets readers run while one writer commits; the busy timeout makes a writer wait for the
lock instead of failing. Every write is a single statement, so it is atomic on its own: the
session counter is ``count = count + 1 ... RETURNING count``, never read-then-write.

Invalidation is a version check: each item row carries a version that every write bumps, and
each worker's LRU holds (version, value). A read first asks SQLite for the version alone (a
primary-key lookup that never touches the value) and serves the cached value only when the
versions match. A write commits before it returns, so the next read anywhere sees the new
version: no worker can serve the old value afterwards, and no messages need to be sent.

Connections are per thread (the WSGI thread pool, the ASGI worker's `asyncio.to_thread`
threads) and per process: one made before a fork is never used after it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sample_app.core import Visit
from sample_app.lru import LRUCache
from sample_app.notes import ChangeHub
from sample_app.settings import Settings
from sample_app.store import StoreUnavailable, new_sid

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, version INTEGER NOT NULL, value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS item_inserted AFTER INSERT ON items BEGIN
    INSERT INTO item_changes (id) VALUES (new.id);
    DELETE FROM item_changes WHERE seq <= (SELECT max(seq) FROM item_changes) - 1000;
END;
CREATE TRIGGER IF NOT EXISTS item_updated AFTER UPDATE ON items BEGIN
    INSERT INTO item_changes (id) VALUES (new.id);
    DELETE FROM item_changes WHERE seq <= (SELECT max(seq) FROM item_changes) - 1000;
END;
"""
# item_changes is the log /ws/notes reads (sample_app.notes): the triggers write it in the
# writing statement's own transaction and keep its last 1000 rows.
_BUSY_TIMEOUT_S = 5.0


class SqliteStore:
    """Thread-safe; open lazily (the first call in each thread of each process connects)."""

    def __init__(
        self,
        path: Path,
        *,
        cache_size: int = 1024,
        cache_ttl: float = 60.0,
        session_ttl: int = 86_400,
        busy_timeout: float = _BUSY_TIMEOUT_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._session_ttl = session_ttl
        self._busy_timeout = busy_timeout
        # Session expiry is wall-clock time: it is compared across processes and restarts.
        self._wall_clock = wall_clock
        self._cache: LRUCache[tuple[int, bytes]] = LRUCache(cache_size, cache_ttl)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._schema_ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SqliteStore:
        return cls(
            settings.db_path,
            cache_size=settings.cache_size,
            cache_ttl=settings.cache_ttl,
            session_ttl=settings.session_ttl,
        )

    @property
    def path(self) -> Path:
        return self._path

    def count_visit(self, sid: str | None) -> Visit:
        now = self._wall_clock()
        expires_at = now + self._session_ttl
        with self._errors():
            conn = self._connection()
            if sid is not None:
                row = conn.execute(
                    "UPDATE sessions SET count = count + 1, expires_at = ?"
                    " WHERE sid = ? AND expires_at > ? RETURNING count",
                    (expires_at, sid, now),
                ).fetchone()
                if row is not None:
                    return Visit(sid, int(row[0]), new=False)
            fresh = new_sid()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # New sessions are rare next to visits: a good moment to drop expired ones.
                conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                conn.execute("INSERT INTO sessions VALUES (?, 1, ?)", (fresh, expires_at))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return Visit(fresh, 1, new=True)

    def get_item(self, item_id: str) -> bytes | None:
        with self._errors():
            conn = self._connection()
            row = conn.execute("SELECT version FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            now = time.monotonic()
            cached = self._cache.get(item_id, now)
            if cached is not None and cached[0] == row[0]:
                return cached[1]
            row = conn.execute(
                "SELECT version, value FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                return None
            version, value = int(row[0]), bytes(row[1])
            self._cache.put(item_id, (version, value), now)
            return value

    def put_item(self, item_id: str, value: bytes) -> bool:
        with self._errors():
            row = (
                self._connection()
                .execute(
                    "INSERT INTO items (id, version, value) VALUES (?, 1, ?)"
                    " ON CONFLICT (id) DO UPDATE"
                    " SET version = version + 1, value = excluded.value RETURNING version",
                    (item_id, value),
                )
                .fetchone()
            )
            self._cache.evict(item_id)
            return int(row[0]) == 1

    def changes_since(self, last: int | None) -> tuple[list[str], int]:
        """Items written after change `last` (None: none, only where the log ends now),
        oldest first, and the new `last`."""
        with self._errors():
            conn = self._connection()
            if last is None:
                row = conn.execute("SELECT coalesce(max(seq), 0) FROM item_changes").fetchone()
                return [], int(row[0])
            rows = conn.execute(
                "SELECT seq, id FROM item_changes WHERE seq > ? ORDER BY seq", (last,)
            ).fetchall()
            return [str(row[1]) for row in rows], (int(rows[-1][0]) if rows else last)

    def close(self) -> None:
        """Close this process's connections (call when no request is running)."""
        with self._lock:
            if self._pid == os.getpid():
                for conn in self._connections:
                    conn.close()
            self._connections.clear()
            self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            # Forked since these connections were made: they belong to the parent. Forget
            # them unclosed; closing here could disturb the parent's use of the file.
            with self._lock:
                self._pid = os.getpid()
                self._connections = []
                self._local = threading.local()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): each statement is its own transaction unless a
        # BEGIN says otherwise. check_same_thread is off only so close() can run elsewhere.
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            # NORMAL is safe with WAL (no corruption); a power cut may lose the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            with self._lock:  # one thread of this process sets the file up
                if not self._schema_ready:
                    self._set_up(conn)
                    self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.append(conn)
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema. Switching the journal mode does not wait on the busy
        handler, so workers starting together on a new file retry until the deadline."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)  # another process holds the lock for a moment

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn "database is locked" and I/O failures into StoreUnavailable (a 503)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the SQLite store {self._path} failed: {exc}") from exc


class AsyncSqliteStore:
    """The SQLite store for an ASGI worker: each call runs in a worker thread.

    SQLite calls usually take microseconds, but a write may wait up to the busy timeout for
    another worker's lock; run on the event loop, that wait would stall every connection
    this worker serves. `asyncio.to_thread` costs a few tens of microseconds per call.
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.changes = ChangeHub(self._poll_changes)

    async def _poll_changes(self, last: int | None) -> tuple[list[str], int]:
        return await asyncio.to_thread(self._store.changes_since, last)

    @property
    def sync(self) -> SqliteStore:
        return self._store

    async def count_visit(self, sid: str | None) -> Visit:
        return await asyncio.to_thread(self._store.count_visit, sid)

    async def get_item(self, item_id: str) -> bytes | None:
        return await asyncio.to_thread(self._store.get_item, item_id)

    async def put_item(self, item_id: str, value: bytes) -> bool:
        return await asyncio.to_thread(self._store.put_item, item_id, value)

    async def aclose(self) -> None:
        await self.changes.aclose()
        self._store.close()
