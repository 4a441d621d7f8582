"""loadtest/locustfile.py, run headless for a few seconds against forkd serving the sample app
with a real redis-server: it must finish with no failed request, and its CSV must carry the
latency percentiles that the longer documented run reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sample_harness import REPO, Forkd, RedisServer

pytestmark = pytest.mark.integration

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
StartForkd = Callable[..., Forkd]
NAMES = {"/session", "/items/[id] GET", "/items/[id] PUT", "/", "/slow"}


@pytest.mark.timeout(90)
def test_a_short_locust_run_has_no_failures_and_reports_percentiles(
    run_forkd: StartForkd, redis_server: RedisServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    server = run_forkd("sample_app.asgi:app", {"REDIS_URL": redis_server.url}, workers=2)
    prefix = tmp_path / "run"
    env = {**clean_env, "LOADTEST_THINK_MIN": "0.05", "LOADTEST_THINK_MAX": "0.2",
           "LOADTEST_ITEMS": "50", "LOADTEST_SLOW_MAX_MS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
         "-u", "20", "-r", "20", "-t", "6s", "--stop-timeout", "2",
         "--host", f"http://127.0.0.1:{server.port}", "--csv", str(prefix), "--only-summary",
         "--loglevel", "WARNING"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = f"locust exited {run.returncode}\n{run.stderr[-4000:]}\n{server.output()}"
    assert run.returncode == 0, report

    with open(f"{prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert NAMES <= set(rows), (sorted(rows), report)
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100, report
    assert int(total["Failure Count"]) == 0, report
    for name in (*NAMES, "Aggregated"):
        p50, p95, p99 = (float(rows[name][column]) for column in ("50%", "95%", "99%"))
        assert 0 < p50 <= p95 <= p99, (name, rows[name])
    # The slow calls really waited (50..200 ms), the plain reads did not.
    assert float(rows["/slow"]["50%"]) >= 50
    assert float(rows["/items/[id] GET"]["50%"]) < float(rows["/slow"]["50%"])
    with open(f"{prefix}_failures.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == []
