"""Fixtures of the sample app's tests: a real redis-server, a clean environment, forkd.

``redis_server`` starts Debian's ``redis-server`` on a free loopback port (no persistence,
data in a temporary directory) in its own session, and stops it by its pid; tests may stop
and restart it on the same port to simulate an outage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sample_harness import Forkd, RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="sample-redis-") as workdir:
        server = RedisServer(binary, Path(workdir))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """No settings at all for SQLite (the default file under FORKD_HOME); REDIS_URL for Redis."""
    if request.param == "sqlite":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"REDIS_URL": server.url}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """os.environ without anything that steers the sample app or forkd."""
    for name in list(os.environ):
        if name.startswith(("SAMPLE_APP_", "FORKD_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    return dict(os.environ)


@pytest.fixture
def forkd_home() -> Iterator[Path]:
    """A short FORKD_HOME: forkd's control socket path must fit a unix socket address."""
    with tempfile.TemporaryDirectory(prefix="fk-") as home:
        os.chmod(home, 0o700)
        yield Path(home)


@pytest.fixture
def run_forkd(
    clean_env: dict[str, str], forkd_home: Path, tmp_path: Path
) -> Iterator[Callable[..., Forkd]]:
    """Start forkd with ``run_forkd(app, env_overrides, ...)``; everything is stopped after."""
    started: list[Forkd] = []

    def run(app: str, env: dict[str, str] | None = None, **kwargs: object) -> Forkd:
        full_env = {**clean_env, "FORKD_HOME": str(forkd_home), **(env or {})}
        log_path = tmp_path / f"forkd-{len(started)}.log"
        server = Forkd(app, full_env, log_path, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    try:
        yield run
    finally:
        for server in started:
            server.stop()
