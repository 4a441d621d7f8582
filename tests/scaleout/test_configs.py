"""The shipped balancer configs are valid for the HAProxy and nginx that Debian ships, and
the lab's rewrite of them keeps what they promise."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from lab import HAPROXY_CFG, NGINX_CONF, render_haproxy, render_nginx

pytestmark = pytest.mark.integration  # runs haproxy, nginx or hey

HOSTS = [("web1", "10.9.0.11:8000"), ("web2", "10.9.0.12:8000")]


def free_port() -> int:
    """A loopback port free right now: nginx -t binds its listeners to test them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_shipped_haproxy_cfg_passes_haproxy_c() -> None:
    done = check(["haproxy", "-c", "-f", str(HAPROXY_CFG)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


def test_shipped_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    # Only the pid and log paths and the listening port move (nginx -t opens the log
    # files and binds); every upstream and location is the shipped one.
    text = NGINX_CONF.read_text()
    text = re.sub(r"listen 80;", f"listen 127.0.0.1:{free_port()};", text)
    text = re.sub(r"^pid .*$", f"pid {tmp_path}/nginx.pid;", text, flags=re.M)
    text = re.sub(r"^error_log \S+", f"error_log {tmp_path}/error.log", text, flags=re.M)
    text = re.sub(r"access_log \S+;", f"access_log {tmp_path}/access.log;", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    done = check(["nginx", "-t", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                  "-c", str(conf)])
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_an_invalid_haproxy_cfg_is_caught(tmp_path: Path) -> None:
    # The check above can fail: a misspelt keyword in the same file is rejected.
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.read_text().replace("balance leastconn", "balance leastcon"))
    assert check(["haproxy", "-c", "-f", str(cfg)]).returncode != 0


def test_lab_haproxy_cfg_has_one_server_per_host_in_every_backend(tmp_path: Path) -> None:
    text = render_haproxy(HAPROXY_CFG.read_text(), HOSTS, listen="10.9.0.1:80",
                          stats="10.9.0.1:8404", stats_socket=str(tmp_path / "s.sock"),
                          health_path="/healthz", proxy_protocol=True)
    servers = re.findall(r"^\s*server (\S+) (\S+) (.*)$", text, flags=re.M)
    assert [(n, a) for n, a, _ in servers] == HOSTS * 3
    assert all("send-proxy-v2" in rest for _, _, rest in servers)
    assert "track forkd/web2" in servers[3][2]  # forkd_leastconn follows forkd
    assert "bind :80" not in text and "chroot" not in text
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    done = check(["haproxy", "-c", "-f", str(cfg)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_lab_haproxy_cfg_without_proxy_protocol_sends_none(tmp_path: Path) -> None:
    text = render_haproxy(HAPROXY_CFG.read_text(), HOSTS, listen="10.9.0.1:80",
                          stats="10.9.0.1:8404", stats_socket=str(tmp_path / "s.sock"),
                          health_path=None, proxy_protocol=False)
    assert "send-proxy" not in text
    assert "uri /health ver" in text


def test_lab_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    text = render_nginx(NGINX_CONF.read_text(), HOSTS, listen=f"127.0.0.1:{free_port()}",
                        prefix=tmp_path)
    assert re.findall(r"^\s*server (\S+) max_fails", text, flags=re.M) == [a for _, a in HOSTS] * 3
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    done = check(["nginx", "-t", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                  "-c", str(conf)])
    assert done.returncode == 0, done.stderr
