"""Worker health: memory limits, hung workers, max-requests recycling, back-off."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import request, wait_until

pytestmark = pytest.mark.integration


def status(env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-m", "forkd", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def serve_until(port: int, done, timeout: float = 30.0) -> list[int]:
    """GET / on new connections until done() is true; every status seen."""
    statuses: list[int] = []

    def step() -> bool:
        statuses.append(request(port)[0])
        return bool(done())

    wait_until(step, timeout, interval=0.01, message="the health action")
    return statuses


@pytest.mark.timeout(90)
@pytest.mark.parametrize("extra", [[], ["--memory-metric", "uss", "--preload"],
                                   ["--memory-metric", "pss", "--preload"]],
                         ids=["rss", "uss-preload", "pss-preload"])
def test_worker_over_the_memory_limit_is_replaced_without_failing_a_request(
        run_forkd, extra: list[str]) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--max-memory", "150M",
                     "--memory-interval", "0.2", *extra)
    port = proc.port()
    proc.wait_ready(1)
    (old,) = proc.worker_pids()
    for _ in range(4):  # 4 x 40 MB: over 150M, under the 225M hard ceiling
        assert request(port, path="/leak?mb=40")[0] == 200
    statuses = serve_until(port, lambda: "event=worker-replaced" in proc.output())
    statuses += serve_until(port, lambda: old not in proc.worker_pids())
    assert set(statuses) == {200}
    worker = status(proc.env)["workers"][0]
    assert worker["pid"] != old and worker["restarts"] == 1
    assert worker["last_exit"].startswith("memory: ") and worker["last_exit"].endswith("> 150M")
    assert "event=worker-replacing slot=0" in proc.output()
    assert status(proc.env)["health"]["memory"] == 1


@pytest.mark.timeout(90)
def test_memory_over_the_hard_ceiling_is_killed(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--max-memory", "100M",
                     "--memory-hard-limit", "120M", "--memory-interval", "0.2")
    port = proc.port()
    proc.wait_ready(1)
    (old,) = proc.worker_pids()
    try:
        request(port, path="/leak?mb=120")
    except OSError:
        pass  # the kill may land before the answer: that is what a hard ceiling means
    wait_until(lambda: "event=worker-memory-kill" in proc.output(), 15, message=proc.describe)
    wait_until(lambda: proc.worker_pids() and old not in proc.worker_pids(), 15)
    # (the exit's line may reach the output a moment after the replacement shows)
    wait_until(lambda: "status=SIGKILL" in proc.output(), 5, message=proc.describe)


@pytest.mark.timeout(90)
def test_hung_worker_is_aborted_with_a_traceback_and_replaced(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--timeout", "2")
    port = proc.port()
    proc.wait_ready(1)
    (old,) = proc.worker_pids()
    with pytest.raises(OSError):
        request(port, path="/block?ms=30000", timeout=20)
    wait_until(lambda: proc.worker_pids() and old not in proc.worker_pids(), 20,
               message=proc.describe)
    out = proc.output()
    assert "event=worker-timeout slot=0" in out
    assert "testapp.py" in out and "in app" in out  # where it hung, from faulthandler
    wait_until(lambda: status(proc.env)["workers"][0]["state"] == "ready", 15)
    worker = status(proc.env)["workers"][0]
    assert worker["last_exit"] == "timeout" and worker["restarts"] == 1
    assert request(port)[0] == 200


@pytest.mark.timeout(90)
def test_max_requests_recycles_workers_without_failing_requests(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--max-requests", "50",
                     "--max-requests-jitter", "10")
    port = proc.port()
    proc.wait_ready(2)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: request(port)[0], range(400)))
    assert set(statuses) == {200}
    wait_until(lambda: proc.output().count("reason=max-requests") >= 2, 20,
               message=proc.describe)
    exits = {w["last_exit"] for w in status(proc.env)["workers"]}
    assert "max-requests" in exits


@pytest.mark.timeout(90)
def test_crash_loop_back_off_is_visible_in_status(run_forkd) -> None:
    proc = run_forkd("crashloop:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "loop")
    proc.port()

    def backing_off() -> bool:
        result = subprocess.run([sys.executable, "-m", "forkd", "status"], env=proc.env,
                                capture_output=True, text=True, timeout=15)
        return "backoff" in result.stdout

    wait_until(backing_off, 30, interval=0.1, message=proc.describe)
    doc = status(proc.env)
    assert doc["workers"][0]["restarts"] >= 2
    assert doc["workers"][0]["last_exit"] == "crashed: exit 1"
