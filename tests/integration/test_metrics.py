"""--metrics against a real primary: the pool's series on one endpoint (promtool
checks them), counters that survive recycling and crashes, the app's own
prometheus_client counters across a reload, a real Prometheus server scraping,
`forkd status --json` fields, and `forkd monit` (--once, and live in tmux)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import forkd_cli, request, wait_until

pytestmark = pytest.mark.integration


def metrics_port(proc) -> int:
    def found() -> int | None:
        match = re.search(r"event=metrics address=127\.0\.0\.1:(\d+)", proc.output())
        return int(match.group(1)) if match else None
    return int(wait_until(found, 15, message=proc.describe))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scraped_when(port: int, predicate) -> str | None:
    text = scrape(port)
    return text if predicate(text) else None


def total(text: str, name: str) -> float:
    return sum(v for (n, _), v in samples(text).items() if n == name)


def hit(port: int, n: int, path: str = "/") -> None:
    for _ in range(n):
        assert request(port, path=path)[0] == 200


@pytest.mark.timeout(90)
def test_pool_metrics_pass_promtool_and_survive_recycles_and_crashes(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--max-requests", "7",
                     "--metrics", "127.0.0.1:0")
    port, mport = proc.port(), metrics_port(proc)
    proc.wait_ready(2)
    hit(port, 40)  # at 7 requests per life: clean recycles on the way
    assert request(port, path="/missing")[0] == 404
    text = wait_until(lambda: scraped_when(mport, lambda t: total(
        t, "forkd_http_requests_total") == 41), 15,
        message=lambda: f"41 requests counted; last scrape:\n{scrape(mport)}\n{proc.describe()}")
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/test installs Debian's prometheus"
    check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    seen = samples(text)
    assert seen[("forkd_http_requests_total", (("code", "404"), ("method", "GET")))] == 1
    assert seen[("forkd_http_request_duration_seconds_count", ())] == 41
    # recycles (one at a time, noticed at heartbeats) are counted as the log tells them
    def recycled() -> int:
        return len(re.findall(r"event=worker-exited .*reason=max-requests", proc.output()))

    assert recycled() >= 1
    wait_until(lambda: samples(scrape(mport))[
        ("forkd_worker_restarts_total", (("reason", "max-requests"),))] == recycled(), 10,
        message=proc.describe)
    assert seen[("forkd_workers_target", ())] == 2
    assert {labels for (name, labels) in seen if name == "forkd_worker_cpu_seconds_total"} \
        == {(("slot", "0"),), (("slot", "1"),)}
    # a crash: the dead worker's reported requests stay counted, the restart is counted
    before = total(text, "forkd_http_requests_total")
    wait_until(lambda: proc.output().count("event=worker-ready") >= 2, 10)
    with pytest.raises(OSError):
        request(port, path="/exit?code=1", timeout=5)
    wait_until(lambda: samples(scrape(mport)).get(
        ("forkd_worker_restarts_total", (("reason", "crashed"),))) == 1, 15,
        message=proc.describe)
    assert total(scrape(mport), "forkd_http_requests_total") >= before
    status = json.loads(forkd_cli(proc.env, "status", "--json").stdout)
    assert 0.0 <= status["utilization"] <= 1.0
    assert all("rps" in w and "utilization" in w for w in status["workers"])


@pytest.mark.timeout(90)
def test_app_counter_survives_reload_and_crash_and_files_stay_few(run_forkd) -> None:
    proc = run_forkd("metrics_probe:app", "-b", "127.0.0.1:0", "-w", "2",
                     "--metrics", "127.0.0.1:0")
    port, mport = proc.port(), metrics_port(proc)
    proc.wait_ready(2)
    app_dir = Path(re.search(r"app_dir=(\S+)", proc.output()).group(1))  # type: ignore[union-attr]
    hit(port, 10)
    reload = forkd_cli(proc.env, "reload")
    assert reload.returncode == 0, reload.stderr + proc.describe()
    hit(port, 5)
    with pytest.raises(OSError):  # counted by the app, then the worker dies uncleanly
        request(port, path="/crash", timeout=5)
    proc.wait_ready(5)
    hit(port, 3)

    def app_hits() -> float:
        return samples(scrape(mport)).get(("probe_hits_total", ()), -1)

    wait_until(lambda: app_hits() == 19, 15,
               message=lambda: f"probe_hits_total == 19, got {app_hits()}\n{proc.describe()}")
    # (forkd's own series are at most a heartbeat and a housekeeping pass old)
    seen = wait_until(lambda: scraped_when(mport, lambda t: samples(t).get(
        ("forkd_worker_restarts_total", (("reason", "crashed"),))) == 1), 10,
        message=lambda: scrape(mport))
    seen = samples(seen)
    assert seen[("probe_work_seconds_count", ())] == 18
    assert seen[("forkd_reloads_total", (("result", "done"),))] == 1
    assert seen[("forkd_worker_restarts_total", (("reason", "reload"),))] == 2
    assert seen[("probe_inflight", ())] == 0  # livesum: the dead ones' values are gone
    # 5 workers have lived; only the 2 live ones keep files (counter, histogram,
    # livesum gauge), the dead are folded into one counter and one histogram file
    wait_until(lambda: len(list(app_dir.glob("*.db"))) == 2 * 3 + 2, 10,
               message=lambda: f"8 files, got {sorted(p.name for p in app_dir.glob('*.db'))}")
    proc.stop()
    assert not app_dir.exists()  # the private directory goes with the primary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_a_real_prometheus_scrapes_the_pool(run_forkd, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: scripts/test installs Debian's prometheus"
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--metrics", "127.0.0.1:0")
    port, mport = proc.port(), metrics_port(proc)
    proc.wait_ready(2)
    hit(port, 25)
    wait_until(lambda: total(scrape(mport), "forkd_http_requests_total") == 25, 10)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: forkd\n    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n")
    # port 0 is not accepted by Prometheus: take a free one and retry on a race
    web = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def query() -> float | None:
        url = (f"http://127.0.0.1:{web}/api/v1/query?"
               + urllib.parse.urlencode({"query": "sum(forkd_http_requests_total)"}))
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                result = json.load(response)["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        value = wait_until(lambda: query() == 25, 40, interval=0.5,
                           message=lambda: (tmp_path / "prometheus.log").read_text()[-3000:])
        assert value
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
        log.close()


@pytest.mark.timeout(90)
def test_monit_once_and_live_in_tmux(run_forkd, tmp_path: Path) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--name", "monitme")
    port = proc.port()
    proc.wait_ready(2)
    hit(port, 10)
    once = forkd_cli(proc.env, "monit", "--once")
    assert once.returncode == 0, once.stderr
    pids = proc.worker_pids()
    rows = [line for line in once.stdout.splitlines() if any(str(p) in line for p in pids)]
    assert len(rows) == 2 and all("ready" in row for row in rows), once.stdout
    assert "monitme" in once.stdout
    tmux = shutil.which("tmux")
    assert tmux, "tmux missing: scripts/test installs it"
    socket_path = tmp_path / "tmux.sock"
    env_args = [f"{k}={v}" for k, v in proc.env.items()
                if k in ("FORKD_HOME", "PYTHONPATH", "PATH")]
    base = [tmux, "-S", str(socket_path), "-f", os.devnull]  # not the host's tmux.conf
    subprocess.run([*base, "new-session", "-d", "-x", "140", "-y", "30", "-s", "monit",
                    "env", *env_args, "TERM=xterm-256color", sys.executable, "-m", "forkd",
                    "monit"], check=True, timeout=20)
    try:
        def pane() -> str:
            return subprocess.run([*base, "capture-pane", "-p", "-t", "monit"],
                                  capture_output=True, text=True, timeout=10).stdout

        def rows_shown() -> str | None:
            screen = pane()
            return screen if all(str(p) in screen for p in pids) else None

        screen = wait_until(rows_shown, 20, message=lambda: f"worker rows on the screen:\n{pane()}")
        assert "q quits" in screen and "req/s" in screen
        subprocess.run([*base, "send-keys", "-t", "monit", "q"], check=True, timeout=10)

        def ended() -> bool:
            listing = subprocess.run([*base, "list-sessions"], capture_output=True,
                                     text=True, timeout=10)
            return listing.returncode != 0  # the session ended with monit
        wait_until(ended, 15, message=lambda: f"monit to quit on q:\n{pane()}")
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.timeout(60)
def test_in_flight_connections_and_refusals_are_counted_as_a_client_sees_them(run_forkd
                                                                             ) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--metrics", "127.0.0.1:0")
    port, mport = proc.port(), metrics_port(proc)
    proc.wait_ready(1)

    def gauge(name: str) -> float:
        return samples(scrape(mport))[(name, ())]

    slow = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # long enough that the two kept requests are still in flight when the closed one has
        # left, however long a loaded machine takes to report the worker as busy
        sock.sendall(b"GET /slow?ms=9000 HTTP/1.1\r\nHost: x\r\n\r\n")
        slow.append(sock)
    try:
        wait_until(lambda: gauge("forkd_http_requests_in_flight") == 3
                   and gauge("forkd_http_connections") == 3, 10, message=proc.describe)
        wait_until(lambda: samples(scrape(mport))[
            ("forkd_worker_utilization", (("slot", "0"),))] > 0.9, 10,
            message=lambda: scrape(mport))
        slow.pop().close()  # a client gives up: its request leaves the in-flight set
        wait_until(lambda: gauge("forkd_http_requests_in_flight") == 2, 10,
                   message=lambda: scrape(mport))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
            bad.sendall(b"NOT A REQUEST\r\n\r\n")
            assert bad.recv(100).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as piped:
            piped.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2
                          + b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := piped.recv(65536):
                data += chunk
            assert data.count(b"HTTP/1.1 200") == 2 and data.count(b"HTTP/1.1 404") == 1
        for sock in slow:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: gauge("forkd_http_requests_in_flight") == 0
               and gauge("forkd_http_connections") == 0, 10, message=lambda: scrape(mport))
    seen = samples(scrape(mport))
    assert seen[("forkd_http_requests_total", (("code", "400"), ("method", "other")))] == 1
    assert seen[("forkd_http_requests_total", (("code", "200"), ("method", "GET")))] == 4
    assert seen[("forkd_http_requests_total", (("code", "404"), ("method", "GET")))] == 1
    assert seen[("forkd_http_request_duration_seconds_bucket", (("le", "10.0"),))] == 6
    assert seen[("forkd_http_request_duration_seconds_bucket", (("le", "5.0"),))] == 4


@pytest.mark.timeout(60)
def test_a_taken_metrics_address_fails_the_start_and_a_bad_one_names_the_flag(run_forkd
                                                                               ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--metrics", busy)
        assert proc.wait(30) == 1, proc.describe()
    assert "event=metrics-failed" in proc.output() and busy in proc.output()
    assert "event=worker-started" not in proc.output()  # nothing was forked
    bad = run_forkd("testapp:app", "-b", "127.0.0.1:0", "--metrics", "fd://3")
    assert bad.wait(30) == 2, bad.describe()
    assert "--metrics" in bad.output()
