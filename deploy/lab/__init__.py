"""A scale-out lab on one Linux machine: N forkd hosts behind HAProxy or nginx, one Redis.

Each host is a network namespace joined by a veth pair to a bridge that this lab creates,
with its own address, FORKD_HOME, release directory and CURVE `tcp://` control endpoint.
The balancer and redis-server run in the calling namespace, bound to the bridge's own
address only, so nothing is reachable from outside the lab and parallel labs never meet.
The balancer's configuration is the shipped one (deploy/haproxy/haproxy.cfg or
deploy/nginx/nginx.conf) with only its addresses, paths and logging rewritten for the lab.

Needs root, `ip` (iproute2), redis-server, haproxy or nginx; hey for load. Everything made
is named after the creating process's pid and recorded in WORKDIR/lab.json, so `down`
removes exactly it: processes by pid (their process groups), then the namespaces and the
bridge by name.

    python3 deploy/lab up --hosts 3 --balancer haproxy --workdir /tmp/forkd-lab
    python3 deploy/lab down --workdir /tmp/forkd-lab
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent.parent
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
HEALTH_PATH = "/healthz"
HOST_PORT = 8000
CONTROL_PORT = 7000
BALANCER_PORT = 80
STATS_PORT = 8404
REDIS_PORT = 6379
SUBNET_PREFIX = "10.213"  # 10.213.X.0/24, X free on this machine at creation
ALLOC_LOCK = Path("/run/forkd-lab.lock")

# The lab's release of the app: the sample app, imported from the host's own directory
# (the worker's cwd), so a release can be changed on one host only.
LAB_APP = '''"""The lab's app: the sample app, as released to this host, plus /lab/client,
which answers the client address the app was given (after PROXY or X-Forwarded-For)."""

import json

from sample_app.asgi import app as sample

RELEASE = {release!r}


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/lab/client":
        client = scope.get("client")
        body = json.dumps({{"client": client[0] if client else None}}).encode()
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]}})
        await send({{"type": "http.response.body", "body": body}})
        return
    await sample(scope, receive, send)
'''
BROKEN_APP = '''"""A release that does not import."""

raise ImportError("release {release} is broken on purpose")
'''

_sequence = 0


class LabError(RuntimeError):
    """The lab could not be set up (missing tool, not root, a step failed)."""


def missing_requirements(balancer: str = "haproxy") -> str | None:
    """Why this machine cannot run the lab, or None when it can."""
    if os.geteuid() != 0:
        return "the lab creates network namespaces and needs root"
    for tool in ("ip", "redis-server", balancer):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    # Root without the right to make namespaces (a locked-down container) is caught here,
    # by making one and removing it again.
    probe = f"forkd-lab-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ---------------------------------------------------------------------------- configs


def render_haproxy(text: str, hosts: Sequence[tuple[str, str]], *, listen: str,
                   stats: str, stats_socket: str, health_path: str | None,
                   proxy_protocol: bool) -> str:
    """The shipped haproxy.cfg for the lab: its server lines for `hosts` ((name, addr:port)),
    the frontends bound to `listen` and `stats`, logging to stdout, no chroot or user switch.
    With `health_path` None the probe asks the app's /health; without `proxy_protocol` no
    PROXY header is sent. Fails if the shipped file no longer has what it rewrites."""
    out = _sub(text, r"^(\s*)log /dev/log local0.*$", r"\1log stdout format raw local0")
    out = _sub(out, r"^(\s*)maxconn \d+", r"\1maxconn 4096")  # within a test's open-file limit
    out = _sub(out, r"^\s*(chroot|user|group) .*\n", "", count=3)
    out = _sub(out, r"stats socket \S+", f"stats socket {stats_socket}")
    out = _sub(out, r"^(\s*)bind :80\b.*$", rf"\1bind {listen}")
    out = _sub(out, r"^(\s*)bind 127\.0\.0\.1:8404$", rf"\1bind {stats}")
    out = _sub(out, r"uri /healthz ", f"uri {health_path or '/health'} ")
    if not proxy_protocol:
        out = _sub(out, r" send-proxy-v2", "", count=0)
        out = _sub(out, r" check-send-proxy", "", count=0)
    return _expand_servers(out, r"^(\s*server )web1 10\.0\.0\.11:8000(.*)$", hosts,
                           r"^\s*server web[23] 10\.0\.0\.1[23]:8000.*\n")


def render_nginx(text: str, hosts: Sequence[tuple[str, str]], *, listen: str,
                 prefix: Path) -> str:
    """The shipped nginx.conf for the lab: server lines for `hosts`, listening on `listen`,
    pid and logs under `prefix`, no user switch."""
    out = _sub(text, r"^user .*\n", "")
    out = _sub(out, r"^pid .*$", f"pid {prefix / 'nginx.pid'};")
    out = _sub(out, r"^error_log .*$", f"error_log {prefix / 'error.log'} notice;")
    out = _sub(out, r"access_log \S+;", f"access_log {prefix / 'access.log'};")
    out = _sub(out, r"^(\s*)listen 80;.*$", rf"\1listen {listen};")
    # The temp paths nginx would otherwise create under /var/lib/nginx.
    temps = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    out = _sub(out, r"^http \{\n", "http {\n" + temps)
    return _expand_servers(out, r"^(\s*server )10\.0\.0\.11:8000(.*)$", hosts,
                           r"^\s*server 10\.0\.0\.1[23]:8000.*\n", named=False)


def _sub(text: str, pattern: str, repl: str, count: int = 1) -> str:
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    if n == 0:
        raise LabError(f"the shipped config no longer matches {pattern!r}; update deploy/lab")
    return new


def _expand_servers(text: str, first: str, hosts: Sequence[tuple[str, str]], others: str,
                    named: bool = True) -> str:
    def lines(match: re.Match[str]) -> str:
        head, tail = match.group(1), match.group(2)
        return "\n".join(
            head + (f"{name} {addr}" if named else addr)
            + tail.replace("/web1", f"/{name}")
            for name, addr in hosts
        )

    out = _sub(text, first, lines, count=0)  # type: ignore[arg-type]
    return _sub(out, others, "", count=0)


# ---------------------------------------------------------------------------- the lab


@dataclass(eq=False)  # a host is itself: usable as a dict key
class Host:
    name: str  # web1, web2, ...
    netns: str
    address: str
    home: Path
    release_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bind(self) -> str:
        return f"{self.address}:{HOST_PORT}"

    @property
    def control(self) -> str:
        return f"tcp://{self.address}:{CONTROL_PORT}"

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Lab:
    workdir: Path
    hosts_wanted: int = 3
    balancer: str = "haproxy"
    workers: int = 2
    drain_delay: float | None = None
    tag: str = ""
    subnet: str = ""
    hosts: list[Host] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # key -> the process's start time
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # PROXY v2 from HAProxy (forkd --proxy-protocol); False turns it off (a host that
    # expects PROXY headers cannot be reached directly, as `bench` needs)
    want_proxy_protocol: bool = True
    health_path: str | None = None
    proxy_protocol: bool = False
    forwarded: bool = False

    # -- addresses -----------------------------------------------------------
    @property
    def gateway(self) -> str:
        """The bridge's address: where the balancer, Redis and the tests' clients are."""
        return f"{self.subnet}.1"

    @property
    def client_address(self) -> str:
        """A second address on the bridge, for a client that is not the balancer."""
        return f"{self.subnet}.2"

    @property
    def url(self) -> str:
        return f"http://{self.gateway}:{BALANCER_PORT}"

    @property
    def keys(self) -> Path:
        return self.workdir / "keys" / "forkd.key_secret"

    @property
    def controls(self) -> list[str]:
        return [h.control for h in self.hosts]

    def client_env(self) -> dict[str, str]:
        """The environment `forkd reload|status --control tcp://...` needs in this lab."""
        env = _clean_env()
        env["FORKD_CONTROL_KEYS"] = str(self.keys)
        return env

    # -- up ------------------------------------------------------------------
    def up(self) -> Lab:
        reason = missing_requirements(self.balancer)
        if reason:
            raise LabError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.health_path = HEALTH_PATH
        self.proxy_protocol = self.want_proxy_protocol and self.balancer == "haproxy"
        self.forwarded = True
        try:
            self._network()
            self._start_redis()
            _run([sys.executable, "-m", "forkd", "control-keys", str(self.keys.parent)],
                 env=_clean_env())
            for host in self.hosts:
                self.write_release(host, "1")
                self.start_host(host)
            for host in self.hosts:
                self.wait_host_ready(host)
            self._start_balancer()
            self.wait_pool(len(self.hosts))
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        global _sequence
        _sequence += 1
        self.tag = f"{os.getpid()}{_sequence % 10}"
        bridge = f"fkb{self.tag}"
        ALLOC_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(ALLOC_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the subnet is chosen and taken atomically
            self.subnet = _free_subnet(os.getpid())
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            self.links.append(bridge)
            self._save()
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", bridge])
            _run(["ip", "addr", "add", f"{self.client_address}/24", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        for i in range(1, self.hosts_wanted + 1):
            name = f"web{i}"
            netns = f"forkd-lab-{self.tag}-{name}"
            outside, inside = f"fkh{self.tag}{i}", f"fkn{self.tag}{i}"
            _run(["ip", "netns", "add", netns])
            self.netns.append(netns)
            self._save()
            _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
            self.links.append(outside)
            self._save()
            _run(["ip", "link", "set", outside, "master", bridge, "up"])
            _run(["ip", "link", "set", inside, "netns", netns])
            address = f"{self.subnet}.{10 + i}"
            _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", inside])
            _run(["ip", "-n", netns, "link", "set", inside, "up"])
            _run(["ip", "-n", netns, "link", "set", "lo", "up"])
            root = self.workdir / name
            self.hosts.append(Host(name, netns, address, root / "home", root / "release",
                                   root / "forkd.log"))

    def _start_redis(self) -> None:
        log = self.workdir / "redis.log"
        self._spawn("redis", ["redis-server", "--bind", self.gateway, "--port", str(REDIS_PORT),
                              "--save", "", "--appendonly", "no", "--protected-mode", "no",
                              "--dir", str(self.workdir)], log)
        _wait_until(lambda: _connects(self.gateway, REDIS_PORT), 10,
                    lambda: f"redis-server did not listen:\n{_tail(log)}")

    def _start_balancer(self) -> None:
        hosts = [(h.name, h.bind) for h in self.hosts]
        if self.balancer == "haproxy":
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(render_haproxy(
                HAPROXY_CFG.read_text(), hosts, listen=f"{self.gateway}:{BALANCER_PORT}",
                stats=f"{self.gateway}:{STATS_PORT}",
                stats_socket=str(self.workdir / "haproxy.sock"),
                health_path=self.health_path, proxy_protocol=self.proxy_protocol))
            _run(["haproxy", "-c", "-q", "-f", str(cfg)])
            self._spawn("balancer", ["haproxy", "-db", "-f", str(cfg)],
                        self.workdir / "haproxy.log")
        else:
            prefix = self.workdir / "nginx"
            prefix.mkdir(exist_ok=True)
            conf = self.workdir / "nginx.conf"
            conf.write_text(render_nginx(NGINX_CONF.read_text(), hosts,
                                         listen=f"{self.gateway}:{BALANCER_PORT}",
                                         prefix=prefix))
            argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                    "-c", str(conf)]
            _run([*argv, "-t", "-q"])
            self._spawn("balancer", [*argv, "-g", "daemon off;"], self.workdir / "nginx.log")
        _wait_until(lambda: _connects(self.gateway, BALANCER_PORT), 10,
                    lambda: f"{self.balancer} did not listen:\n{self.balancer_output()}")

    # -- hosts ---------------------------------------------------------------
    def write_release(self, host: Host, release: str, broken: bool = False) -> None:
        """Put release `release` of the app in place on `host` (a deploy); a broken one
        does not import. Takes effect at the host's next reload."""
        host.release_dir.mkdir(parents=True, exist_ok=True)
        template = BROKEN_APP if broken else LAB_APP
        (host.release_dir / "labapp.py").write_text(template.format(release=release))

    def host_args(self, host: Host) -> list[str]:
        args = ["labapp:app", "-b", host.bind, "-w", str(self.workers), "--name", "web",
                "--control", host.control, "--control-keys", str(self.keys),
                "--graceful-timeout", "10"]
        if self.health_path:
            args += ["--health-path", self.health_path]
        if self.drain_delay is not None:
            args += ["--drain-delay", f"{self.drain_delay:g}"]
        if self.forwarded:
            args += ["--forwarded-allow-ips", self.gateway]
        if self.proxy_protocol:
            args += ["--proxy-protocol"]
        return args

    def start_host(self, host: Host) -> None:
        host.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = _clean_env()
        env.update({"FORKD_HOME": str(host.home),
                    "REDIS_URL": f"redis://{self.gateway}:{REDIS_PORT}/0"})
        argv = ["ip", "netns", "exec", host.netns, sys.executable, "-m", "forkd", "start",
                *self.host_args(host)]
        host.proc = self._spawn(host.name, argv, host.log_path, cwd=host.release_dir, env=env)

    def status(self, host: Host, timeout: float = 2.0) -> dict[str, Any] | None:
        """The host's `forkd status` document over its CURVE control, or None."""
        from forkd.control import call, load_curve_keys
        from forkd.errors import ControlError

        try:
            return call(host.control, "status", timeout=timeout,
                        curve=load_curve_keys(str(self.keys)))
        except ControlError:
            return None

    def worker_pids(self, host: Host) -> set[int]:
        doc = self.status(host) or {}
        return {w["pid"] for w in doc.get("workers", []) if w.get("state") == "ready"}

    def wait_host_ready(self, host: Host, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if host.proc is None or host.proc.poll() is not None:
                raise LabError(f"{host.name} exited:\n{_tail(host.log_path)}")
            return len(self.worker_pids(host)) == self.workers

        _wait_until(ready, timeout, lambda: f"{host.name} not ready:\n{_tail(host.log_path)}")

    def signal_host(self, host: Host, signum: int) -> None:
        assert host.proc is not None
        os.kill(host.proc.pid, signum)

    def stop_host(self, host: Host, timeout: float = 30.0) -> int | None:
        """End a host's forkd (its process group), gracefully if it will."""
        proc = host.proc
        if proc is None:
            return None
        _end_group(proc, timeout)
        self.pids.pop(host.name, None)
        self.procs.pop(host.name, None)
        self._save()
        return proc.returncode

    def restart_host(self, host: Host) -> None:
        self.stop_host(host)
        self.write_release(host, "1")
        self.start_host(host)
        self.wait_host_ready(host)

    # -- balancer ------------------------------------------------------------
    def balancer_output(self) -> str:
        return _tail(self.workdir / f"{self.balancer}.log")

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of backend `forkd`: {"web1": "UP", ...}."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.workdir / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        states = {}
        for line in data.decode().splitlines():
            cols = line.split(",")
            if len(cols) > 17 and cols[0] == "forkd" and cols[1] not in ("FRONTEND", "BACKEND"):
                states[cols[1]] = cols[17]
        return states

    def wait_pool(self, up: int, timeout: float = 20.0) -> None:
        """Until the balancer sends to `up` hosts (HAProxy: its checks say UP)."""
        if self.balancer != "haproxy":
            return
        _wait_until(lambda: sum(s.startswith("UP") for s in self.server_states().values()) == up,
                    timeout, lambda: f"pool not {up} UP: {self.server_states()}")

    # -- down ----------------------------------------------------------------
    def down(self) -> None:
        """Everything this lab made: processes by pid, then namespaces and links by name."""
        # Ours (Popen objects): gracefully, the balancer first, the hosts all at once
        # (each may wait out its --drain-delay), Redis last.
        balancer = self.procs.pop("balancer", None)
        if balancer is not None:
            _end_group(balancer, 10.0)
            self.pids.pop("balancer", None)
        hosts = {h.name: self.procs.pop(h.name) for h in self.hosts if h.name in self.procs}
        for proc in hosts.values():
            _signal_group(proc.pid, signal.SIGTERM)
        for name, proc in hosts.items():
            _end_group(proc, 15.0)
            self.pids.pop(name, None)
        redis = self.procs.pop("redis", None)
        if redis is not None:
            _end_group(redis, 10.0)
            self.pids.pop("redis", None)
        # Recorded by another process's `up` (down_from): by pid, at once, and only a
        # process that is still the one started then (a pid may have been reused since).
        for key, pid in self.pids.items():
            if _start_time(pid) == self.started.get(key):
                _kill_group(pid)
        self.pids.clear()
        for netns in self.netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        for link in reversed(self.links):  # veths vanish with their namespace; the bridge last
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.netns.clear()
        self.links.clear()
        state = self.workdir / "lab.json"
        state.unlink(missing_ok=True)

    @classmethod
    def down_from(cls, workdir: Path) -> None:
        """Tear down what an `up` recorded in WORKDIR/lab.json (from another process)."""
        state = json.loads((workdir / "lab.json").read_text())
        lab = cls(workdir)
        lab.pids, lab.netns, lab.links = state["pids"], state["netns"], state["links"]
        lab.started = state["started"]
        lab.down()

    # -- plumbing ------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str], log_path: Path, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=cwd, env=env or _clean_env())
        self.procs[key] = proc
        self.pids[key] = proc.pid
        self.started[key] = _start_time(proc.pid)
        self._save()
        return proc

    def _save(self) -> None:
        state = {"pids": self.pids, "started": self.started, "netns": self.netns,
                 "links": self.links,
                 "subnet": self.subnet, "balancer": self.balancer,
                 "hosts": [{"name": h.name, "address": h.address, "control": h.control,
                            "netns": h.netns} for h in self.hosts]}
        (self.workdir / "lab.json").write_text(json.dumps(state, indent=1))


# ---------------------------------------------------------------------------- load


@dataclass(frozen=True)
class HeyResult:
    responses: dict[int, int]  # status code -> count
    errors: dict[str, int]  # error text -> count
    rps: float
    output: str

    @property
    def total(self) -> int:
        return sum(self.responses.values()) + sum(self.errors.values())

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx: errors plus other status codes."""
        ok = sum(n for code, n in self.responses.items() if 200 <= code < 300)
        return self.total - ok


def start_hey(url: str, seconds: float, concurrency: int = 32, keepalive: bool = True,
              log_path: Path | None = None) -> subprocess.Popen[str]:
    argv = ["hey", "-z", f"{seconds:g}s", "-c", str(concurrency), "-t", "10"]
    if not keepalive:
        argv.append("-disable-keepalive")
    return subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def interrupt_hey(proc: subprocess.Popen[str], timeout: float = 30.0) -> HeyResult:
    """Stop a running hey (as Ctrl-C does: it still prints its summary) and read it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
    return finish_hey(proc, timeout)


def finish_hey(proc: subprocess.Popen[str], timeout: float = 60.0) -> HeyResult:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        raise LabError(f"hey did not finish in {timeout}s:\n{output[-3000:]}") from None
    return parse_hey(output)


def parse_hey(output: str) -> HeyResult:
    responses: dict[int, int] = {}
    errors: dict[str, int] = {}
    section = None
    for line in output.splitlines():
        if line.startswith("Status code distribution"):
            section = "codes"
        elif line.startswith("Error distribution"):
            section = "errors"
        elif section == "codes" and (m := re.match(r"\s+\[(\d+)\]\s+(\d+) responses", line)):
            responses[int(m.group(1))] = int(m.group(2))
        elif section == "errors" and (m := re.match(r"\s+\[(\d+)\]\s+(.*)", line)):
            errors[m.group(2)] = errors.get(m.group(2), 0) + int(m.group(1))
        elif line and not line.startswith(" "):
            section = None
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps is None:
        raise LabError(f"hey printed no summary:\n{output[-3000:]}")
    return HeyResult(responses, errors, float(rps.group(1)), output)


# ---------------------------------------------------------------------------- helpers


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKD_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a release rewritten within a second is read anew
    return env


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()}")


def _free_subnet(seed: int) -> str:
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                          text=True).stdout
    taken = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", used))
    for offset in range(254):
        candidate = 1 + (seed + offset) % 254
        if str(candidate) not in taken:
            return f"{SUBNET_PREFIX}.{candidate}"
    raise LabError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16")


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_until(predicate: Callable[[], Any], timeout: float,
                message: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g}s: {message()}")
        time.sleep(0.05)


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except FileNotFoundError:
        return "(no output)"


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int) -> None:
    _signal_group(pid, signal.SIGKILL)


def _end_group(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM to the process group, wait, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    if proc.poll() is None:
        proc.wait(5)
