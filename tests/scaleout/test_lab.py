"""The scale-out playbook, for real: three forkd hosts in their own network namespaces
behind HAProxy, sessions in one redis-server, `hey` as the clients, `forkd reload
--control ...` over CURVE tcp:// as the operator. Root only (namespaces); about a minute.

Figures the tests measure are printed (run with -s to see them)."""

from __future__ import annotations

import csv
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import Host, Lab, interrupt_hey, start_hey
from support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(100)]

CONCURRENCY = 32


def forkd_cli(lab: Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`forkd ARGS...` as an operator on the balancer's machine runs it."""
    return subprocess.run([sys.executable, "-m", "forkd", *args], capture_output=True,
                          text=True, env=lab.client_env(), timeout=timeout, cwd=Path(os.sep))


def fleet_reload(lab: Lab) -> subprocess.CompletedProcess[str]:
    args = ["reload"]
    for endpoint in lab.controls:
        args += ["--control", endpoint]
    return forkd_cli(lab, *args)


def get(lab: Lab, path: str, headers: dict[str, str] | None = None,
        source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET `path` through the lab's balancer (from `source`, an address of the client's
    namespace side, when given): status, headers by lower-cased name, body."""
    conn = http.client.HTTPConnection(lab.gateway, 80, timeout=5,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def host_of(lab: Lab, pids: dict[Host, set[int]], pid: int) -> str:
    return next(h.name for h, ps in pids.items() if pid in ps)


def test_sessions_continue_across_hosts(lab: Lab) -> None:
    pids = {host: lab.worker_pids(host) for host in lab.hosts}
    cookie = None
    served_by = set()
    for expected in range(1, 13):  # round robin: four rounds over three hosts
        status, headers, body = get(lab, "/session", {"cookie": cookie} if cookie else None)
        assert status == 200, body
        cookie = cookie or headers["set-cookie"].split(";")[0]
        assert f'"count":{expected},' in body.decode(), body
        served_by.add(host_of(lab, pids, int(headers["x-served-by"])))
    assert served_by == {"web1", "web2", "web3"}


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "no-keepalive"])
def test_fleet_reload_under_load_fails_no_request(lab: Lab, keepalive: bool) -> None:
    before = {host: lab.worker_pids(host) for host in lab.hosts}
    hey = start_hey(lab.url + "/", 60, CONCURRENCY, keepalive)
    started = time.monotonic()
    done = fleet_reload(lab)
    took = time.monotonic() - started
    result = interrupt_hey(hey)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "fleet reload complete: 3 hosts"
    for number, endpoint in enumerate(lab.controls, 1):
        assert f"[{number}/3] {endpoint}: reloading" in done.stdout
    for host in lab.hosts:
        after = lab.worker_pids(host)
        assert len(after) == 2 and not after & before[host], (host.name, done.stdout)
    print(f"\nfleet reload ({'keep-alive' if keepalive else 'no keep-alive'}): "
          f"{took:.1f}s, {result.total} requests, {result.failed} failed, "
          f"{result.rps:.0f} req/s")
    assert result.total > 200, result.output  # the reload really ran under load
    assert result.failed == 0, result.output


def test_fleet_reload_stops_at_a_host_whose_release_does_not_import(lab: Lab) -> None:
    web1, web2, web3 = lab.hosts
    before = {host: lab.worker_pids(host) for host in lab.hosts}
    lab.write_release(web2, "2", broken=True)
    hey = start_hey(lab.url + "/", 60, CONCURRENCY, keepalive=True)
    done = fleet_reload(lab)
    result = interrupt_hey(hey)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"forkd reload: {web2.control}: failed:" in done.stderr
    assert "release 2 is broken on purpose" in done.stderr
    assert (f"stopped at {web2.control} (host 2 of 3); reloaded: {web1.control}; "
            f"not reloaded: {web3.control}") in done.stderr
    assert not lab.worker_pids(web1) & before[web1]  # reloaded
    assert lab.worker_pids(web2) == before[web2]  # kept its old workers
    assert lab.worker_pids(web3) == before[web3]  # never asked
    assert f"[3/3] {web3.control}" not in done.stdout
    assert result.total > 100, result.output
    assert result.failed == 0, result.output


def test_drained_host_stop_fails_no_request(lab: Lab) -> None:
    web3 = lab.hosts[2]
    hey = start_hey(lab.url + "/", 60, CONCURRENCY, keepalive=True)
    signaled = time.monotonic()
    lab.signal_host(web3, signal.SIGTERM)
    wait_until(lambda: not lab.server_states()["web3"].startswith("UP"), 10,
               message=lambda: f"web3 still in the pool: {lab.server_states()}")
    out_after = time.monotonic() - signaled
    assert web3.proc is not None
    assert web3.proc.wait(20) == 0, web3.output()
    exited_after = time.monotonic() - signaled
    result = interrupt_hey(hey)
    print(f"\ndrained stop (--drain-delay 2): out of the pool after {out_after:.2f}s, "
          f"exited after {exited_after:.2f}s; {result.total} requests, {result.failed} failed")
    assert out_after < 2.0  # HAProxy saw the 503s before the listeners closed
    assert exited_after >= 2.0
    assert result.failed == 0, result.output


def test_sigkilled_host_costs_only_its_connections(lab: Lab) -> None:
    web1 = lab.hosts[0]
    hey = start_hey(lab.url + "/", 60, CONCURRENCY, keepalive=True)
    wait_until(lambda: lab.worker_pids(web1), 5)
    killed = time.monotonic()
    lab.signal_host(web1, signal.SIGKILL)
    wait_until(lambda: not lab.server_states()["web1"].startswith("UP"), 10,
               message=lambda: f"web1 still in the pool: {lab.server_states()}")
    routed_around = time.monotonic() - killed
    result = interrupt_hey(hey)
    print(f"\nSIGKILLed host: out of the pool after {routed_around:.2f}s; "
          f"{result.total} requests, {result.failed} failed ({result.errors})")
    # at most the requests in flight on its connections; HAProxy retries idempotent ones
    assert result.failed <= CONCURRENCY, result.output
    assert routed_around < 3.0  # inter 1s + fastinter 250ms (fall 2) + probe timeouts
    status, _, _ = get(lab, "/")
    assert status == 200


def test_the_app_sees_the_client_address_from_proxy_v2(lab: Lab) -> None:
    # From an address other than HAProxy's own; a client's X-Forwarded-For claim is dropped.
    status, _, body = get(lab, "/lab/client", {"x-forwarded-for": "203.0.113.9"},
                          source=lab.client_address)
    assert status == 200
    assert json.loads(body) == {"client": lab.client_address}


def test_locust_through_the_balancer_with_a_fleet_reload_in_the_middle(
        lab: Lab, tmp_path: Path) -> None:
    """The realistic client mix of loadtest/ (sessions, cached reads, writes, slow calls)
    through HAProxy while every host is reloaded one after another: no request fails."""
    repo = Path(__file__).resolve().parents[2]
    prefix = tmp_path / "lab"
    env = {**os.environ, "LOADTEST_THINK_MIN": "0.05", "LOADTEST_THINK_MAX": "0.2",
           "LOADTEST_ITEMS": "50", "LOADTEST_SLOW_MAX_MS": "200"}
    before = {host: lab.worker_pids(host) for host in lab.hosts}
    with open(tmp_path / "locust.txt", "wb") as sink:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(repo / "loadtest" / "locustfile.py"),
             "--headless", "-u", "20", "-r", "20", "-t", "14s", "--stop-timeout", "3",
             "--host", lab.url, "--csv", str(prefix), "--only-summary",
             "--loglevel", "WARNING"],
            cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        def served() -> int:  # requests the pool's workers have counted so far
            total = 0
            for endpoint in lab.controls:
                shown = forkd_cli(lab, "status", "--json", "--control", endpoint)
                if shown.returncode == 0:
                    total += sum(w["requests"] for w in json.loads(shown.stdout)["workers"])
            return total

        wait_until(lambda: served() > 100, 20, message="locust's load did not arrive")
        done = fleet_reload(lab)
        assert locust.wait(60) == 0, (tmp_path / "locust.txt").read_text()[-3000:]
    finally:
        if locust.poll() is None:
            os.killpg(locust.pid, signal.SIGKILL)
            locust.wait(10)
    assert done.returncode == 0, done.stdout + done.stderr
    for host in lab.hosts:  # every host really was reloaded while locust ran
        assert not lab.worker_pids(host) & before[host], host.name
    with open(f"{prefix}_stats.csv", newline="") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    print(f"\nlocust through HAProxy with a fleet reload: {total['Request Count']} requests, "
          f"{float(total['Requests/s']):.0f} req/s, {total['Failure Count']} failed, "
          f"p50 {total['50%']} ms, p95 {total['95%']} ms, p99 {total['99%']} ms")
    assert int(total["Request Count"]) > 200
    assert int(total["Failure Count"]) == 0, (tmp_path / "locust.txt").read_text()[-3000:]
