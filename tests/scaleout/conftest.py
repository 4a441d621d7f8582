from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psutil
import pytest

from lab import Lab, missing_requirements


def _lab(tmp_path_factory: pytest.TempPathFactory, balancer: str, **kwargs: object) -> Lab:
    reason = missing_requirements(balancer)
    if reason:
        pytest.skip(f"scale-out lab: {reason}")
    workdir = tmp_path_factory.mktemp(f"lab-{balancer}")
    return Lab(workdir, balancer=balancer, **kwargs).up()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def haproxy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three hosts (two workers each) behind HAProxy, one Redis; stopped hosts use
    --drain-delay 2."""
    lab = _lab(tmp_path_factory, "haproxy", drain_delay=2.0)
    try:
        yield lab
    finally:
        netns, links = list(lab.netns), list(lab.links)
        pids = [proc.pid for proc in lab.procs.values()]
        lab.down()
        assert_gone(netns, links, pids)


@pytest.fixture
def lab(haproxy_lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The module's HAProxy lab, put back whole after a test that broke a host; a failing
    test's report carries the hosts' and the balancer's output."""
    yield haproxy_lab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for host in haproxy_lab.hosts:
            print(f"--- {host.name} ---\n{host.output()[-3000:]}")
        print(f"--- balancer ---\n{haproxy_lab.balancer_output()}")
    for host in haproxy_lab.hosts:
        haproxy_lab.write_release(host, "1")
        if host.proc is None or host.proc.poll() is not None:
            haproxy_lab.restart_host(host)
    haproxy_lab.wait_pool(len(haproxy_lab.hosts))



@pytest.fixture(scope="module")
def nginx_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three hosts (two workers each) behind nginx, one Redis. Torn down the way
    `deploy/lab down` does it from another process: from lab.json alone."""
    lab = _lab(tmp_path_factory, "nginx")
    netns, links, procs = list(lab.netns), list(lab.links), list(lab.procs.values())
    try:
        yield lab
    finally:
        Lab.down_from(lab.workdir)
        for proc in procs:  # ended by pid above; reap what was our child
            proc.wait(10)
        lab.procs.clear()
        assert_gone(netns, links, [proc.pid for proc in procs])


def assert_gone(netns: list[str], links: list[str], pids: list[int]) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in netns if n in listed.split()], listed
    for link in links:
        shown = subprocess.run(["ip", "link", "show", link], capture_output=True, text=True)
        assert shown.returncode != 0, f"{link} is still there"
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
