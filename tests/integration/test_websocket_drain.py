"""A reload or stop with an open WebSocket: the old worker keeps it running while it
drains, closes it with 1012 within --graceful-timeout, the reload is not held longer, and
a reconnect reaches the new worker. And open WebSockets in the pool's metrics."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from support import wait_until

pytestmark = pytest.mark.integration

GRACEFUL = 3.0


@pytest.mark.timeout(60)
def test_reload_closes_open_websockets_1012_within_graceful_timeout(run_forkd) -> None:
    proc = run_forkd("ws_app:app", "-b", "127.0.0.1:0", "-w", "1",
                     "--graceful-timeout", str(GRACEFUL), "--ws-ping-interval", "0")
    port = proc.port()
    proc.wait_ready(1)
    with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
        ws.send("pid")
        old_pid = ws.recv(timeout=5)
        started = time.monotonic()
        reload = subprocess.Popen([sys.executable, "-m", "forkd", "reload"], env=proc.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True)
        try:
            wait_until(lambda: proc.output().count("event=worker-ready") >= 2, 20,
                       message=proc.describe)
            # the old worker drains, and the WebSocket it holds still works meanwhile
            ws.send("pid")
            assert ws.recv(timeout=5) == old_pid
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=GRACEFUL + 5)
            closed_after = time.monotonic() - started
            output, _ = reload.communicate(timeout=30)
            reload_took = time.monotonic() - started
        finally:
            if reload.poll() is None:
                reload.kill()
                reload.wait(5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "service restart")
    assert closed_after <= GRACEFUL + 1.0, closed_after
    assert reload.returncode == 0, output + proc.describe()
    assert reload_took <= GRACEFUL + 3.0, (reload_took, output)
    with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
        ws.send("pid")
        assert ws.recv(timeout=5) != old_pid


@pytest.mark.timeout(60)
def test_stop_closes_open_websockets_1012_then_the_primary_exits(run_forkd) -> None:
    proc = run_forkd("ws_app:app", "-b", "127.0.0.1:0", "-w", "1",
                     "--graceful-timeout", str(GRACEFUL), "--ws-ping-interval", "0")
    port = proc.port()
    proc.wait_ready(1)
    with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        wait_until(lambda: "event=stopping" in proc.output(), 10,
                   message=proc.describe)
        ws.send("while draining")  # still served until the graceful time is nearly up
        assert ws.recv(timeout=5) == "while draining"
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=GRACEFUL + 5)
        closed_after = time.monotonic() - started
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert closed_after <= GRACEFUL + 1.0, closed_after
    assert proc.wait(timeout=GRACEFUL + 10) == 0, proc.describe()


@pytest.mark.timeout(60)
def test_open_websockets_show_in_the_metrics(run_forkd) -> None:
    proc = run_forkd("ws_app:app", "-b", "127.0.0.1:0", "-w", "1", "--metrics", "127.0.0.1:0")
    port = proc.port()
    proc.wait_ready(1)
    scrape_port = int(wait_until(
        lambda: (m := re.search(r"event=metrics address=127\.0\.0\.1:(\d+)", proc.output()))
        and m.group(1), 15, message=proc.describe))

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return str(answer.read().decode())

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def gauge(name: str) -> float:
        return samples(scrape(scrape_port)).get((name, ()), -1.0)

    with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10), \
            connect(f"ws://127.0.0.1:{port}/echo", open_timeout=10):
        wait_until(lambda: gauge("forkd_websockets") == 2, 10,
                   message=lambda: scrape(scrape_port))
        assert gauge("forkd_http_connections") == 2
        handshakes = samples(scrape(scrape_port)).get(
            ("forkd_http_requests_total", (("code", "101"), ("method", "GET"))))
        assert handshakes == 2, scrape(scrape_port)
    wait_until(lambda: gauge("forkd_websockets") == 0, 10, message=lambda: scrape(scrape_port))
