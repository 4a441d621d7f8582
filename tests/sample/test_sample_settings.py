"""Settings from the environment: where the SQLite file goes, and the per-worker pool share."""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_app import settings

HOME = Path("/home/ann")


def test_default_store_is_sqlite_under_forkd_home() -> None:
    loaded = settings.load({}, HOME)
    assert loaded.redis_url is None
    assert loaded.db_path == HOME / ".forkd" / "sample_app.db"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, Path("/run/user/1000/forkd/sample_app.db")),
        ({"FORKD_HOME": "/srv/fk", "XDG_RUNTIME_DIR": "/run/u"}, Path("/srv/fk/sample_app.db")),
        ({"SAMPLE_APP_DB": "/data/s.db", "FORKD_HOME": "/srv/fk"}, Path("/data/s.db")),
    ],
)
def test_db_path_follows_forkd_home_rules(env: dict[str, str], expected: Path) -> None:
    assert settings.load(env, HOME).db_path == expected


@pytest.mark.parametrize(
    ("total", "workers", "share"),
    [(None, None, 100), (None, "4", 25), ("1000", "8", 125), ("100", "3", 33), ("10", "64", 2)],
)
def test_redis_budget_is_split_over_workers(
    total: str | None, workers: str | None, share: int
) -> None:
    env = {"REDIS_URL": "redis://r:6379/0"}
    if total is not None:
        env["SAMPLE_APP_REDIS_CONNECTIONS"] = total
    if workers is not None:
        env["FORKD_WORKERS"] = workers
    assert settings.load(env, HOME).redis_pool_size == share


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FORKD_WORKERS", "0"),
        ("FORKD_WORKERS", "two"),
        ("SAMPLE_APP_REDIS_CONNECTIONS", "1.5"),
        ("SAMPLE_APP_MAX_BODY", "-1"),
        ("SAMPLE_APP_REDIS_TIMEOUT", "soon"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        settings.load({name: value}, HOME)


def test_worker_id_and_redis_location() -> None:
    assert settings.worker_id({"FORKD_WORKER_ID": "3"}) == 3
    assert settings.worker_id({}) is None and settings.worker_id({"FORKD_WORKER_ID": "x"}) is None
    assert settings.redis_location("redis://:s3cret@cache.local:6380/1") == "cache.local:6380"
    assert settings.redis_location("redis://localhost") == "localhost:6379"
