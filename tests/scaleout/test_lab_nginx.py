"""The same playbook behind nginx: sessions across hosts, a fleet reload under load, the
client's address from X-Forwarded-For. Root only (namespaces)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lab import get

from lab import Lab, interrupt_hey, start_hey

pytestmark = [pytest.mark.integration, pytest.mark.timeout(100)]


def test_sessions_and_a_fleet_reload_under_load_through_nginx(nginx_lab: Lab) -> None:
    lab = nginx_lab
    pids = {host.name: lab.worker_pids(host) for host in lab.hosts}
    cookie, served_by = None, set()
    for expected in range(1, 10):
        status, headers, body = get(lab, "/session", {"cookie": cookie} if cookie else None)
        assert status == 200, body
        cookie = cookie or headers["set-cookie"].split(";")[0]
        assert json.loads(body)["count"] == expected
        served_by |= {n for n, ps in pids.items() if int(headers["x-served-by"]) in ps}
    assert served_by == {"web1", "web2", "web3"}

    hey = start_hey(lab.url + "/", 60, 32, keepalive=True)
    args = [sys.executable, "-m", "forkd", "reload"]
    for endpoint in lab.controls:
        args += ["--control", endpoint]
    done = subprocess.run(args, capture_output=True, text=True, env=lab.client_env(),
                          timeout=60, cwd=Path(os.sep))
    result = interrupt_hey(hey)
    assert done.returncode == 0, done.stdout + done.stderr
    for host in lab.hosts:
        assert not lab.worker_pids(host) & pids[host.name]
    print(f"\nfleet reload through nginx: {result.total} requests, {result.failed} failed")
    assert result.total > 200, result.output
    assert result.failed == 0, result.output


def test_the_app_sees_the_client_address_nginx_forwarded(nginx_lab: Lab) -> None:
    # From an address other than nginx's own; nginx overwrites the client's claim.
    status, _, body = get(nginx_lab, "/lab/client", {"x-forwarded-for": "203.0.113.9"},
                          source=nginx_lab.client_address)
    assert status == 200
    assert json.loads(body) == {"client": nginx_lab.client_address}
