"""Shared machinery of the benchmarks: the peer venv, ports, servers, load generators.

Every server is started in its own session (so its whole process group can be signalled)
with its output in a log file, and is always torn down by process group: SIGTERM, a grace
period, then SIGKILL to the group and to any descendant that escaped it. Traffic goes to
127.0.0.1 only, and every load generator runs with a fixed duration and a hard timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV = Path(os.environ.get("FORKD_BENCH_VENV", "/tmp/forkd-bench-venv"))
PEER_PACKAGES = ["uvicorn[standard]", "gunicorn", "granian", "uvicorn-worker"]
HOST = "127.0.0.1"
ASGI_APP = "bench.apps.hello_asgi:app"
WSGI_APP = "bench.apps.hello_wsgi:app"
# gthread threads per worker: 4 is the usual "2-4 x cores" advice for a 2-core box, and
# it was the best of 2/4/8 in a trial on this machine (see README.md).
GTHREAD_THREADS = int(os.environ.get("FORKD_BENCH_GTHREAD_THREADS", "4"))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- venv


def venv_bin(name: str) -> str:
    return str(VENV / "bin" / name)


def ensure_venv() -> None:
    """Create the throwaway peer venv when missing; install the peers when absent."""
    python = VENV / "bin" / "python"
    if not python.exists():
        log(f"creating peer venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = "import uvicorn, gunicorn, granian, uvicorn_worker, uvloop, httptools"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        log("installing peers into the venv: " + " ".join(PEER_PACKAGES))
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES],
            check=True,
        )


def compile_forkd() -> None:
    """Write forkd's (and the bench apps') bytecode before anything is timed. The peers
    were installed by pip, which compiles them; forkd runs from the repository, and
    with PYTHONDONTWRITEBYTECODE set (as on the team's machines) it would otherwise be
    compiled from source at every start: about 0.2 s of each start-up measured here,
    which no installed forkd pays."""
    import compileall

    for folder in ("forkd", "bench"):
        compileall.compile_dir(str(REPO / folder), quiet=1)


def pip_versions() -> dict[str, str]:
    out = subprocess.run(
        [venv_bin("python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
    ).stdout
    wanted = {"uvicorn", "gunicorn", "granian", "uvicorn-worker", "uvloop", "httptools"}
    versions = {}
    for line in out.splitlines():
        name, _, version = line.partition("==")
        if name.lower() in wanted:
            versions[name.lower()] = version
    return versions


def machine_info() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    forkd_v = subprocess.run(
        [sys.executable, "-c", "import forkd; print(forkd.__version__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "loadavg_at_start": os.getloadavg(),
        "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "forkd": forkd_v.stdout.strip() or "not importable",
        "git": git.stdout.strip() or "uncommitted tree",
        "peers": pip_versions(),
        "wrk": (wrk_v.stdout + wrk_v.stderr).split("Copyright")[0].strip(),
        "hey": "Debian hey (no version flag)",
        "nginx": nginx_v.stderr.strip().removeprefix("nginx version: "),
    }


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A loopback port the kernel just handed out (bind port 0, read it back, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: a label for the tables and an argv builder."""

    name: str
    interface: str  # "asgi", "wsgi" or "static"
    argv: Callable[[int, int, Path], list[str]]  # (port, workers, tmpdir) -> argv
    is_forkd: bool = False
    # Children of the primary that are not workers are recognised by these cmdline words.
    helper_words: tuple[str, ...] = ("resource_tracker", "semaphore_tracker")
    note: str = ""


def _forkd(app: str, interface: str) -> Callable[[int, int, Path], list[str]]:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [
            sys.executable, "-m", "forkd", "start", app,
            "-b", f"{HOST}:{port}", "-w", str(workers),
            "--interface", interface, "--name", "bench",
        ]  # fmt: skip

    return argv


def _uvicorn(port: int, workers: int, tmp: Path) -> list[str]:
    return [
        venv_bin("uvicorn"), ASGI_APP, "--host", HOST, "--port", str(port),
        "--workers", str(workers), "--http", "httptools", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def _gunicorn(worker_class: str, app: str, extra: list[str]) -> Callable[..., list[str]]:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [
            venv_bin("gunicorn"), "-k", worker_class, "-w", str(workers), *extra,
            "-b", f"{HOST}:{port}", "--log-level", "warning", app,
        ]  # fmt: skip

    return argv


def _granian(interface: str, app: str, extra: list[str]) -> Callable[..., list[str]]:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [
            venv_bin("granian"), "--interface", interface, "--host", HOST,
            "--port", str(port), "--workers", str(workers), "--log-level", "warning",
            *extra, app,
        ]  # fmt: skip

    return argv


def _floor(app: str, interface: str, extra: list[str]) -> Callable[..., list[str]]:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [sys.executable, "-m", "bench.floor", app, "-b", f"{HOST}:{port}",
                "-w", str(workers), "--interface", interface, *extra]

    return argv


def _nginx(port: int, workers: int, tmp: Path) -> list[str]:
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {HOST}:{port};
        location / {{ default_type text/plain; return 200 "Hello, world!"; }}
    }}
}}
"""
    )
    return ["nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf),
            "-g", "daemon off;"]  # fmt: skip


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in [
        ServerSpec("forkd-asgi", "asgi", _forkd(ASGI_APP, "asgi"), is_forkd=True),
        ServerSpec("forkd-wsgi", "wsgi", _forkd(WSGI_APP, "wsgi"), is_forkd=True),
        ServerSpec("uvicorn", "asgi", _uvicorn, note="--http httptools --loop uvloop"),
        ServerSpec(
            "gunicorn-uvicorn",
            "asgi",
            _gunicorn("uvicorn_worker.UvicornWorker", ASGI_APP, []),
            note="worker class from package uvicorn-worker",
        ),
        ServerSpec(
            "gunicorn-gthread",
            "wsgi",
            _gunicorn("gthread", WSGI_APP, ["--threads", str(GTHREAD_THREADS)]),
            note=f"--threads {GTHREAD_THREADS}",
        ),
        ServerSpec("granian-asgi", "asgi", _granian("asgi", ASGI_APP, [])),
        ServerSpec("granian-wsgi", "wsgi", _granian("wsgi", WSGI_APP, [])),
        ServerSpec(
            "granian-asgi-respawn",
            "asgi",
            _granian("asgi", ASGI_APP, ["--respawn-failed-workers"]),
            note="--respawn-failed-workers (off by default)",
        ),
        ServerSpec("nginx", "static", _nginx, helper_words=(), note="return 200 (ceiling)"),
        # the pure-Python floor (bench/floor.py): a measuring stick, not a peer
        ServerSpec("floor-asgi", "asgi", _floor(ASGI_APP, "asgi", []),
                   note="bench/floor.py: the thinnest pure-Python server, uvloop + httptools"),
        ServerSpec("floor-wsgi", "wsgi",
                   _floor(WSGI_APP, "wsgi", ["--threads", "32", "--blocking", "/io"]),
                   note="bench/floor.py; /io on 32 threads, the other paths on the loop"),
    ]
}


class ServerFailed(RuntimeError):
    """The server did not come up; the message carries its log tail."""


@dataclass
class RunningServer:
    spec: ServerSpec
    port: int
    workers: int
    proc: subprocess.Popen[bytes]
    tmp: Path
    log_path: Path
    marker_dir: Path
    started_at: float
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def worker_pids(self) -> list[int]:
        """Live children of the primary that are workers (helpers and zombies left out)."""
        try:
            children = psutil.Process(self.pid).children(recursive=False)
        except psutil.Error:
            return []
        pids = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if self.spec.helper_words:
                    cmd = " ".join(child.cmdline())
                    if any(w in cmd for w in self.spec.helper_words):
                        continue
            except psutil.Error:
                continue
            pids.append(child.pid)
        self.seen_pids.update(pids)
        return pids

    def loaded_at(self, pid: int) -> float | None:
        """When worker `pid` finished importing the app (its marker file), if it has."""
        with contextlib.suppress(OSError, ValueError):
            return float((self.marker_dir / str(pid)).read_text())
        return None

    def ready_worker_pids(self) -> list[int]:
        return [p for p in self.worker_pids() if self.loaded_at(p) is not None]

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.pid).children(recursive=True)
        return []


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200 and resp.read() == b"Hello, world!")
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_until(predicate: Callable[[], bool], deadline: float, interval: float = 0.05) -> bool:
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def start_server(spec: ServerSpec, workers: int = 2, timeout: float = 30.0) -> RunningServer:
    """Start `spec` on a fresh loopback port; return once every worker has loaded the app
    and the port answers "Hello, world!". Raises ServerFailed (after cleaning up) if not."""
    tmp = Path(tempfile.mkdtemp(prefix=f"forkd-bench-{spec.name}-"))
    marker_dir = tmp / "markers"
    marker_dir.mkdir()
    port = free_port()
    env = dict(os.environ)
    env["BENCH_MARKER_DIR"] = str(marker_dir)
    # forkd's control sockets go to a private home, away from any primary the lead runs.
    env["FORKD_HOME"] = str(tmp / "forkd-home")
    env["PYTHONPATH"] = str(REPO)
    env.pop("FORKD_BENCH_VENV", None)
    log_path = tmp / "server.log"
    argv = spec.argv(port, workers, tmp)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(
        spec, port, workers, proc, tmp, log_path, marker_dir, started_at=time.time()
    )

    def ready() -> bool:
        if not server.alive():
            return True  # stop waiting; reported below
        if spec.interface != "static" and len(server.ready_worker_pids()) < workers:
            return False
        return http_ok(server.url, timeout=0.5)

    ok = wait_until(ready, time.monotonic() + timeout, interval=0.1)
    if not ok or not server.alive():
        tail = server.log_tail()
        why = "exited" if not server.alive() else f"not ready within {timeout:.0f}s"
        stop_server(server)
        raise ServerFailed(f"{spec.name} {why}: {' '.join(argv)}\n{tail}")
    return server


def stop_server(server: RunningServer, grace: float = 10.0) -> None:
    """Tear the server down by process group; nothing it started may outlive this."""
    known = {p.pid: p for p in server.descendants()}
    with contextlib.suppress(psutil.Error):
        known[server.pid] = psutil.Process(server.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=5)
    # A descendant that changed its session would escape killpg: end it by pid.
    for proc in known.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
    shutil.rmtree(server.tmp, ignore_errors=True)


@contextlib.contextmanager
def running(spec: ServerSpec, workers: int = 2, timeout: float = 30.0) -> Iterator[RunningServer]:
    server = start_server(spec, workers, timeout)
    try:
        yield server
    finally:
        stop_server(server)


# --------------------------------------------------------------------------- load generators


@dataclass
class LoadResult:
    tool: str
    command: str
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeout_errors: int = 0
    other_errors: int = 0
    error_detail: dict[str, int] = field(default_factory=dict)
    raw_tail: str = ""

    @property
    def socket_errors(self) -> int:
        return (
            self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeout_errors
            + self.other_errors
        )

    @property
    def failures(self) -> int:
        return self.socket_errors + self.non_2xx


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def wrk_command(url: str, connections: int, seconds: int, threads: int = 1) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]


def hey_command(url: str, connections: int, seconds: int, keepalive: bool) -> list[str]:
    argv = ["hey", "-z", f"{seconds}s", "-c", str(connections)]
    if not keepalive:
        argv.append("-disable-keepalive")
    return [*argv, url]


def parse_wrk(out: str, command: str) -> LoadResult:
    res = LoadResult("wrk", command, raw_tail=out[-1500:])
    if m := re.search(r"(\d+) requests in", out):
        res.requests = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res.rps = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        res.p50_ms = _to_ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        res.p99_ms = _to_ms(m.group(1))
    if "pipeline.lua" in command:
        # bench/scripts/pipeline.lua: wrk's own percentiles are wrong for pipelined
        # batches (see there); the script's are the batches' as measured, or none.
        res.p50_ms = res.p99_ms = None
        if m := re.search(r"^pipelined batches: .* p50 ([\d.]+)ms p99 ([\d.]+)ms$", out, re.M):
            res.p50_ms, res.p99_ms = float(m.group(1)), float(m.group(2))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res.connect_errors, res.read_errors, res.write_errors, res.timeout_errors = map(
            int, m.groups()
        )
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res.non_2xx = int(m.group(1))
    return res


def parse_hey(out: str, command: str) -> LoadResult:
    res = LoadResult("hey", command, raw_tail=out[-1500:])
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res.rps = float(m.group(1))
    if m := re.search(r"50%+ in ([\d.]+) secs", out):
        res.p50_ms = float(m.group(1)) * 1000
    if m := re.search(r"99%+ in ([\d.]+) secs", out):
        res.p99_ms = float(m.group(1)) * 1000
    if "Status code distribution:" in out:
        block = out.split("Status code distribution:", 1)[1].split("Error distribution:")[0]
        for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", block):
            res.requests += int(count)
            if not code.startswith("2"):
                res.non_2xx += int(count)
    if "Error distribution:" in out:
        block = out.split("Error distribution:", 1)[1]
        for count, message in re.findall(r"^\s*\[(\d+)\]\s+(.*)$", block, re.M):
            n = int(count)
            key = _classify_hey_error(message)
            # Keep the message itself (ports and addresses vary run to run: masked).
            shown = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:*", message.strip())[:120]
            res.error_detail[shown] = res.error_detail.get(shown, 0) + n
            if key == "connect":
                res.connect_errors += n
            elif key == "read":
                res.read_errors += n
            elif key == "write":
                res.write_errors += n
            elif key == "timeout":
                res.timeout_errors += n
            else:
                res.other_errors += n
    return res


def _classify_hey_error(message: str) -> str:
    low = message.lower()
    if "connection refused" in low or "dial tcp" in low:
        return "connect"
    if "timeout" in low or "deadline exceeded" in low:
        return "timeout"
    if "broken pipe" in low or "write:" in low:
        return "write"
    if "eof" in low or "connection reset" in low or "read:" in low or "closed" in low:
        return "read"
    return "other: " + message[:80]


def run_load(argv: list[str], seconds: int) -> LoadResult:
    """Run a load generator to completion (hard timeout: duration + 30 s)."""
    proc = start_load(argv)
    return finish_load(proc, argv, seconds)


@dataclass
class LoadProc:
    proc: subprocess.Popen[bytes]
    out_path: Path
    started: float


def start_load(argv: list[str]) -> LoadProc:
    fd, name = tempfile.mkstemp(prefix="forkd-bench-load-", suffix=".txt")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LoadProc(proc, Path(name), time.time())


def finish_load(load: LoadProc, argv: list[str], seconds: int) -> LoadResult:
    try:
        load.proc.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(load.proc.pid, signal.SIGKILL)
        load.proc.wait(timeout=5)
    out = load.out_path.read_text(errors="replace")
    load.out_path.unlink(missing_ok=True)
    command = " ".join(argv)
    return parse_wrk(out, command) if argv[0] == "wrk" else parse_hey(out, command)


def kill_load(load: LoadProc) -> None:
    if load.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(load.proc.pid, signal.SIGKILL)
        load.proc.wait(timeout=5)
    load.out_path.unlink(missing_ok=True)


def server_command(spec: ServerSpec, workers: int = 2) -> str:
    """The command line as a reader would type it (port shown as PORT)."""
    if spec.name == "nginx":
        return (
            "nginx -p $TMP -e $TMP/error.log -c $TMP/nginx.conf -g 'daemon off;'"
            f'  (worker_processes {workers}; location / {{ return 200 "Hello, world!"; }})'
        )
    argv = spec.argv(0, workers, Path("$TMP"))
    shown = []
    for a in argv:
        a = a.replace(f"{HOST}:0", f"{HOST}:PORT")
        if a == sys.executable:
            a = "python"
        elif a.startswith(str(VENV / "bin") + "/"):
            a = a.removeprefix(str(VENV / "bin") + "/")
        shown.append(a)
    return " ".join(shown).replace("--port 0", "--port PORT")
