"""The exporter's pieces without a forkd: app multiprocess files folded when
workers die (real child processes using prometheus_client), the pool collector's
output checked by promtool, and the listen queue read from TCP_INFO."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from forkd.config import parse_bind
from forkd.metrics.aggregate import Aggregator
from forkd.metrics.appmetrics import AppMetrics, fold_dead
from forkd.metrics.counters import RequestCounters
from forkd.metrics.exporter import MetricsServer, PoolCollector, PoolView, WorkerView
from forkd.metrics.listenq import listen_queue
from support import wait_until

pytestmark = pytest.mark.integration

WORKER = """
import os, sys
from prometheus_client import Counter, Gauge, Histogram
jobs = Counter("probe_jobs", "jobs", ["kind"])
jobs.labels("a").inc(int(sys.argv[1]))
Histogram("probe_seconds", "t").observe(0.3)
Gauge("probe_live", "g", multiprocess_mode="livesum").set(5)
Gauge("probe_all", "g", multiprocess_mode="all").set(1)
Gauge("probe_peak", "g", multiprocess_mode="max").set(int(sys.argv[1]))
print(os.getpid())
"""


def run_worker(directory: Path, count: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, check=True,
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout)


def families(app: AppMetrics) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    result: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for metric in app.collect():
        for sample in metric.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            result.setdefault(metric.name, {})[key] = sample.value
    return result


def test_dead_workers_files_fold_into_one_set_and_keep_counter_totals(tmp_path: Path) -> None:
    app = AppMetrics(str(tmp_path), owned=False)
    pids = [run_worker(tmp_path, n) for n in (3, 4, 5, 6, 7)]
    assert app.file_count() == 5 * 5  # one file per metric type and mode per process
    for pid in pids[:4]:
        app.worker_exited(pid)
    seen = families(app)
    assert seen["probe_jobs"][("probe_jobs_total", (("kind", "a"),))] == 25
    assert seen["probe_seconds"][("probe_seconds_count", ())] == 5
    assert seen["probe_peak"][("probe_peak", ())] == 7
    # live* and per-process gauges of the dead are gone; the living one stays
    assert list(seen["probe_live"].values()) == [5]
    assert [dict(k[1])["pid"] for k in seen["probe_all"]] == [str(pids[4])]
    # the dead fold into one file per kind: counter, histogram, gauge_max
    assert app.file_count() == 5 + 3
    for _ in range(3):  # many more deaths: still the same number of files
        pid = run_worker(tmp_path, 1)
        app.worker_exited(pid)
        families(app)
    assert app.file_count() == 5 + 3
    seen = families(app)
    assert seen["probe_jobs"][("probe_jobs_total", (("kind", "a"),))] == 28


def test_fold_of_an_unknown_pid_changes_nothing(tmp_path: Path) -> None:
    pid = run_worker(tmp_path, 2)
    assert fold_dead(str(tmp_path), pid + 1_000_000) == 0
    assert len(list(tmp_path.glob("*.db"))) == 5


def sample_view() -> PoolView:
    agg = Aggregator()
    counters = RequestCounters()
    agg.started(11, 0, 0.0)
    now = 0.0
    for status, method in ((b"200", b"GET"), (b"404", b"GET"), (b"201", b"POST")):
        counters.begin(now)
        counters.finish(method, status, now, now + 0.004)
        now += 0.004
    agg.update(11, counters.snapshot(1.0, connections=2, cpu=0.5), 1.0)
    agg.restarted("crashed: exit 1")
    totals = agg.totals()
    return PoolView(target=2, workers=(WorkerView(os.getpid(), 0, "ready", 0.25),
                                       WorkerView(2**22 + 7, 1, "starting", None)),
                    totals=totals, connections=2, cpu_by_slot=agg.cpu_by_slot(),
                    restarts=agg.restarts, reloads=agg.reloads)


def render(collector: PoolCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_pool_series_pass_promtool_and_say_what_happened() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        collector = PoolCollector([("127.0.0.1:1", listener)], "rss", None)
        collector.publish(sample_view())
        text = render(collector)
    finally:
        listener.close()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian package prometheus; scripts/test installs it)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr + text
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert values[("forkd_http_requests_total", (("code", "404"), ("method", "GET")))] == 1
    assert values[("forkd_http_request_duration_seconds_count", ())] == 3
    assert values[("forkd_http_request_duration_seconds_bucket", (("le", "0.005"),))] == 3
    assert values[("forkd_workers", (("state", "ready"),))] == 1
    assert values[("forkd_workers", (("state", "starting"),))] == 1
    assert values[("forkd_worker_restarts_total", (("reason", "crashed"),))] == 1
    assert values[("forkd_worker_utilization", (("slot", "0"),))] == 0.25
    assert values[("forkd_worker_memory_bytes", (("metric", "rss"), ("slot", "0")))] > 1 << 20
    assert values[("forkd_worker_cpu_seconds_total", (("slot", "0"),))] == 0.5
    assert values[("forkd_listen_queue", (("listener", "127.0.0.1:1"),))] == 0
    assert values[("forkd_listen_queue_max", (("listener", "127.0.0.1:1"),))] == 16


def test_listen_queue_counts_unaccepted_connections() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(7)
    clients = []
    try:
        assert listen_queue(listener) == (0, 7)
        for _ in range(3):
            clients.append(socket.create_connection(listener.getsockname(), timeout=5))
        # the handshake completes in the kernel; the queue is read as it is now
        wait_until(lambda: listen_queue(listener) == (3, 7), 5, message="3 queued")
    finally:
        for client in clients:
            client.close()
        listener.close()
    unix = socket.socket(socket.AF_UNIX)
    try:
        assert listen_queue(unix) is None
    finally:
        unix.close()


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix"])
def test_server_answers_metrics_and_404_elsewhere(address: str, tmp_path: Path) -> None:
    bind = parse_bind(f"unix:{tmp_path / 'm.sock'}" if address == "unix" else address)
    collector = PoolCollector([], "rss", None)
    collector.publish(sample_view())
    server = MetricsServer(bind, collector)
    server.start()
    try:
        if bind.kind == "tcp":
            base = f"http://{server.address}"
            with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
                body = response.read().decode()
                assert response.headers["Content-Type"].startswith("text/plain")
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(base + "/", timeout=10)
            assert missing.value.code == 404
            missing.value.close()
        else:
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(10)
            client.connect(bind.path)
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
            client.close()
            head, _, raw = b"".join(chunks).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
            body = raw.decode()
        assert 'forkd_http_requests_total{code="200",method="GET"} 1.0' in body
    finally:
        server.close()
    assert server.errors.empty()


def test_a_unix_metrics_path_that_is_a_file_is_refused_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(OSError):
        MetricsServer(parse_bind(f"unix:{path}"), PoolCollector([], "rss", None))
    assert path.read_text() == "keep me"
