"""The sample app's settings, read from an environment mapping. Pure: no I/O.

| variable | default | meaning |
|---|---|---|
| ``REDIS_URL`` | unset | use Redis for sessions and items (else SQLite) |
| ``SAMPLE_APP_DB`` | ``$FORKD_HOME/sample_app.db`` | the SQLite file shared by the host's workers |
| ``SAMPLE_APP_REDIS_CONNECTIONS`` | 100 | this host's Redis connection budget, split over workers |
| ``SAMPLE_APP_REDIS_TIMEOUT`` | 0.25 | seconds to connect or to wait for a reply |
| ``SAMPLE_APP_MAX_BODY`` | 1048576 | largest request body in bytes (413 above) |
| ``SAMPLE_APP_CACHE_SIZE`` | 1024 | items kept in each worker's LRU |
| ``SAMPLE_APP_CACHE_TTL`` | 60 | seconds an LRU entry lives at most (a backstop only) |
| ``SAMPLE_APP_SESSION_TTL`` | 86400 | seconds of inactivity after which a session ends |

``FORKD_WORKERS`` (set by forkd in every worker) divides the connection budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None
    db_path: Path
    redis_connections: int
    workers: int
    redis_timeout: float
    max_body: int
    cache_size: int
    cache_ttl: float
    session_ttl: int

    @property
    def redis_pool_size(self) -> int:
        """This worker's share of the budget; its pub/sub listener holds one of them."""
        return max(2, self.redis_connections // self.workers)


def forkd_home(env: Mapping[str, str], user_home: Path) -> Path:
    """FORKD_HOME as forkd resolves it: the variable, else $XDG_RUNTIME_DIR/forkd, else ~/.forkd."""
    if env.get("FORKD_HOME"):
        return Path(env["FORKD_HOME"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "forkd"
    return user_home / ".forkd"


def load(env: Mapping[str, str], user_home: Path) -> Settings:
    """Settings from ``env``; raise ValueError naming the variable when a value is bad."""
    db = env.get("SAMPLE_APP_DB") or str(forkd_home(env, user_home) / "sample_app.db")
    return Settings(
        redis_url=env.get("REDIS_URL") or None,
        db_path=Path(db),
        redis_connections=_int(env, "SAMPLE_APP_REDIS_CONNECTIONS", 100, minimum=2),
        workers=_int(env, "FORKD_WORKERS", 1, minimum=1),
        redis_timeout=_float(env, "SAMPLE_APP_REDIS_TIMEOUT", 0.25, minimum=0.01),
        max_body=_int(env, "SAMPLE_APP_MAX_BODY", 1 << 20, minimum=0),
        cache_size=_int(env, "SAMPLE_APP_CACHE_SIZE", 1024, minimum=0),
        cache_ttl=_float(env, "SAMPLE_APP_CACHE_TTL", 60.0, minimum=0),
        session_ttl=_int(env, "SAMPLE_APP_SESSION_TTL", 86_400, minimum=1),
    )


class MissingDependency(ImportError):
    """The configured store's client library is not installed (raised at import, so the
    app fails to load and forkd stops with this message instead of serving 500s)."""


INSTALL_HINT = "pip install 'forkd[sample]'"


def check_dependencies(env: Mapping[str, str]) -> None:
    """At start-up: REDIS_URL selects the Redis store, which needs redis-py."""
    if env.get("REDIS_URL"):
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            raise MissingDependency(
                "REDIS_URL is set, so the sample app keeps its sessions and items in Redis, "
                f"but redis-py is not installed: {INSTALL_HINT} (or unset REDIS_URL to use "
                "the embedded SQLite store)") from exc


def worker_id(env: Mapping[str, str]) -> int | None:
    """forkd's slot number of this worker (FORKD_WORKER_ID), None outside forkd."""
    text = env.get("FORKD_WORKER_ID", "").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def redis_location(url: str) -> str:
    """``host:port`` of a Redis URL for messages: never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    return int(_number(env, name, default, int, minimum))


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    return _number(env, name, default, float, minimum)


def _number(
    env: Mapping[str, str],
    name: str,
    default: float,
    kind: type[int] | type[float],
    minimum: float,
) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise ValueError(f"{name}={text!r} is below the minimum of {minimum}")
    return value
