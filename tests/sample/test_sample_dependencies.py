"""The sample app with REDIS_URL set but redis-py missing: both interfaces stop at
start-up with the install command, instead of answering every request 500.

redis-py is a test dependency, so "missing" is made real for the child processes only:
a folder first on their PYTHONPATH holds a `redis` module whose import fails the way
a missing package's does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from support import APPS, REPO, Forkd

pytestmark = pytest.mark.integration


@pytest.mark.timeout(40)
@pytest.mark.parametrize("app", ["sample_app.asgi:app", "sample_app.wsgi:app"])
def test_missing_redis_client_stops_the_start_with_the_install_command(
        tmp_path: Path, app: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "redis.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    started = time.monotonic()
    proc = Forkd([app, "-b", "127.0.0.1:0", "-w", "2"], home, tmp_path / "forkd.log",
                 cwd=REPO, env={"REDIS_URL": "redis://127.0.0.1:1/0",
                                "PYTHONPATH": f"{blocker}:{REPO}:{APPS}"})
    try:
        assert proc.wait(30) == 1, proc.describe()
        assert time.monotonic() - started < 20
        output = proc.output()
        assert "pip install 'forkd[sample]'" in output, output[-3000:]
        assert "REDIS_URL is set" in output
    finally:
        proc.stop()

