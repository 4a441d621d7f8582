"""--autoscale on a real pool: load on a slow route makes the worker count rise above MIN,
never past MAX; when the load stops it comes back to MIN after the stabilisation window
(--autoscale-window, shortened here)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import Forkd, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WINDOW = 4  # seconds of low load before workers are removed


def status(proc: Forkd) -> dict:
    result = subprocess.run([sys.executable, "-m", "forkd", "status", "--json"], env=proc.env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(shutil.which("hey") is None, reason="needs hey (Debian package hey)")
def test_load_adds_workers_up_to_max_and_idle_returns_to_min(run_forkd, tmp_path: Path) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "--name", "auto",
                     "--autoscale", "1:3", "--autoscale-window", str(WINDOW))
    port = proc.port()
    proc.wait_ready(1)
    assert status(proc)["autoscale"] == {"min": 1, "max": 3, "target": 0.6,
                                         "window": WINDOW, "workers": 1}
    counts: list[int] = []
    out = tmp_path / "hey.txt"
    # every request waits 50 ms: the pool is busy all the time; new connections (no
    # keep-alive) reach the workers autoscaling adds
    with open(out, "wb") as sink:
        hey = subprocess.Popen(["hey", "-z", "20s", "-c", "24", "-t", "10", "-disable-keepalive",
                                f"http://127.0.0.1:{port}/slow?ms=50"],
                               stdout=sink, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def grown() -> bool:
            counts.append(len(status(proc)["workers"]))
            return counts[-1] >= 2
        wait_until(grown, 15, message=proc.describe)
    finally:
        hey.send_signal(signal.SIGINT)
        hey.wait(15)
    assert "event=autoscale" in proc.output() and "why=up" in proc.output()
    wait_until(lambda: status(proc)["autoscale"]["workers"] == 1, WINDOW + 20,
               message=proc.describe)
    assert "why=down" in proc.output()
    counts.append(len(status(proc)["workers"]))
    assert max(counts) <= 3
    wait_until(lambda: len(status(proc)["workers"]) == 1, 15, message=proc.describe)
