"""Figures for issue 12 (--metrics). Run: python -m bench.metrics [hotpath|onoff|idle|scale]...

hotpath  the per-request work the worker's counters add, timed in-process (ns/request)
onoff    forkd ASGI hello, 2 workers, --metrics off vs on (scraped once a second), rounds
         interleaved, `wrk -t1 -c64 -d5s`; median req/s and the on/off ratio
idle     the primary's own CPU with 64 idle workers, --metrics on (scraped every 5 s) and off
scale    64 workers, an app registering 50 series (tests/apps/metrics_probe.py with
         PROBE_SERIES=50), after N worker deaths: scrape time and files in the
         multiprocess directory; the same app under gunicorn (uvicorn worker, --max-requests 1,
         plain prometheus_client multiprocess mode with mark_process_dead in child_exit)

The machine is a shared 2-core VM: read ratios within one run, never absolutes."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    HOST,
    REPO,
    ServerSpec,
    free_port,
    log,
    run_load,
    running,
    venv_bin,
    wrk_command,
)

TEST_APPS = REPO / "tests" / "apps"
BASE = os.environ.get("FORKD_BENCH_BASE", "main")  # what `main` runs: a git ref
PROBE_APP = "metrics_probe:app"


def hotpath(n: int = 200_000) -> dict[str, Any]:
    """Time what HttpProtocol adds per request: a deque append/popleft, one
    loop.time(), begin/finish on the counters."""
    from collections import deque

    import uvloop

    from forkd.metrics.counters import RequestCounters

    loop = uvloop.new_event_loop()
    counters = RequestCounters()
    heads: deque[tuple[float, bytes]] = deque()
    clock = loop.time
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            started = clock()  # (on_message_begin reads the clock already; counted anyway)
            heads.append((started, b"GET"))
            counters.begin(started)
            started, method = heads.popleft()
            counters.finish(method, b"200", started, clock())
        best = min(best, (time.perf_counter() - t0) / n)
    t0 = time.perf_counter()
    for _ in range(1000):
        counters.snapshot(clock(), 10, time.process_time())
    snapshot_us = (time.perf_counter() - t0) / 1000 * 1e6
    loop.close()
    return {"ns_per_request": round(best * 1e9), "snapshot_us": round(snapshot_us, 1)}


def _forkd_spec(name: str, app: str, extra: list[str], metrics_port: int | None,
                code: Path | None = None) -> ServerSpec:
    """forkd from this tree, or (code=) from another checkout of forkd's source."""
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        run = ["-m", "forkd"] if code is None else [
            "-c", f"import sys; sys.path.insert(0, {str(code)!r}); "
                  "from forkd.cli import main; main()"]
        args = [sys.executable, *run, "start", app, "-b", f"{HOST}:{port}",
                "-w", str(workers), "--name", "bench", *extra]
        if metrics_port is not None:
            args += ["--metrics", f"{HOST}:{metrics_port}"]
        return args

    return ServerSpec(name, "asgi", argv, is_forkd=True)


def _scrape(port: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as response:
        body = response.read()
    return time.perf_counter() - t0, body


class _Scraper(threading.Thread):
    def __init__(self, port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.port, self.every = port, every
        self.stop = threading.Event()
        self.times: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.times.append(_scrape(self.port)[0])
            except OSError:
                pass


def _main_code() -> Path:
    """The main branch's forkd/ (without this branch's metrics), via git archive."""
    main_code = Path(tempfile.mkdtemp(prefix="forkd-bench-main-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASE, "forkd"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(main_code)], input=archive, check=True)
    return main_code


def onoff(rounds: int = 5, seconds: int = 5) -> dict[str, Any]:
    """`main` is the forkd this branch started from (no counters at all)."""
    main_code = _main_code()
    results: dict[str, list[float]] = {"main": [], "off": [], "on": []}
    cpu_us: dict[str, list[float]] = {"main": [], "off": [], "on": []}
    scrape_ms: list[float] = []
    for rnd in range(rounds):
        for mode in ("main", "off", "on"):
            mport = free_port() if mode == "on" else None
            spec = _forkd_spec(f"forkd-metrics-{mode}", "bench.apps.hello_asgi:app", [], mport,
                               main_code if mode == "main" else None)
            log(f"onoff round {rnd + 1}/{rounds}: metrics {mode}")
            with running(spec, 2) as server:
                scraper = _Scraper(mport, 1.0) if mport else None
                if scraper:
                    scraper.start()
                run_load(wrk_command(server.url, 64, 1), 1)
                workers = [psutil.Process(pid) for pid in server.worker_pids()]
                before = sum(sum(p.cpu_times()[:2]) for p in workers)
                result = run_load(wrk_command(server.url, 64, seconds), seconds)
                used = sum(sum(p.cpu_times()[:2]) for p in workers) - before
                if result.requests:
                    cpu_us[mode].append(round(used / result.requests * 1e6, 2))
                if scraper:
                    scraper.stop.set()
                    scraper.join()
                    scrape_ms += [t * 1000 for t in scraper.times]
            log(f"  {result.rps:.0f} req/s, failures {result.failures}, "
                f"worker CPU {cpu_us[mode][-1] if cpu_us[mode] else '?'} us/request")
            results[mode].append(result.rps)
    subprocess.run(["rm", "-rf", str(main_code)], check=False)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    main = statistics.median(results["main"])
    cpu = {mode: statistics.median(values) for mode, values in cpu_us.items() if values}
    return {"rounds": results, "worker_cpu_us_per_request": cpu_us,
            "median_worker_cpu_us_per_request": cpu, "median_main": main,
            "median_off": off, "median_on": on,
            "ratio_on_off": round(on / off, 3), "ratio_on_main": round(on / main, 3),
            "ratio_off_main": round(off / main, 3),
            "scrape_ms_median_under_load": round(statistics.median(scrape_ms), 1)
            if scrape_ms else None,
            "load": f"wrk -t1 -c64 -d{seconds}s, 2 workers, hello ASGI"}


def _primary_cpu(pid: int, seconds: float) -> float:
    process = psutil.Process(pid)
    before = process.cpu_times()
    t0 = time.monotonic()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / (time.monotonic() - t0)


def idle(workers: int = 64, seconds: float = 20.0) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": workers, "seconds": seconds}
    main_code = _main_code()
    for mode in ("main", "off", "on"):
        mport = free_port() if mode == "on" else None
        spec = _forkd_spec(f"forkd-idle-{mode}", "bench.apps.hello_asgi:app", [], mport,
                           main_code if mode == "main" else None)
        log(f"idle: {workers} workers, metrics {mode}")
        with running(spec, workers, timeout=30 + 1.5 * workers) as server:
            time.sleep(3)  # start-up settles
            scraper = _Scraper(mport, 5.0) if mport else None
            if scraper:
                scraper.start()
            out[f"primary_cpu_percent_{mode}"] = round(_primary_cpu(server.pid, seconds), 2)
            if scraper:
                scraper.stop.set()
                scraper.join()
                out["scrape_ms"] = [round(t * 1000, 1) for t in scraper.times]
        log(f"  primary {out[f'primary_cpu_percent_{mode}']}% of a core")
    subprocess.run(["rm", "-rf", str(main_code)], check=False)
    return out


def _deaths(log_path: Path) -> int:
    return len(re.findall(r"event=worker-exited", log_path.read_text(errors="replace")))


def _crash_loop(url: str, count_deaths: Any, target: int, budget: float) -> int:
    """Kill workers through the app's /crash until `target` deaths or the time budget."""
    deadline = time.monotonic() + budget
    while count_deaths() < target and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "crash", timeout=5).read()
        except OSError:
            pass
        time.sleep(0.01)
    return int(count_deaths())


class _Proc:
    """A server started in its own session, output to a file, stopped by group."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp: Path) -> None:
        self.log_path = tmp / "server.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server not ready:\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for signum, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _children(pid: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).children()
                   if c.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def scale(workers: int = 64, deaths: int = 1000, budget: float = 240.0) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": workers, "series": 50}
    tmp = Path(tempfile.mkdtemp(prefix="forkd-bench-scale-"))
    env = {**os.environ, "PROBE_SERIES": "50", "PYTHONPATH": f"{REPO}:{TEST_APPS}",
           "FORKD_HOME": str(tmp / "home")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port, mport = free_port(), free_port()
    log(f"scale: forkd, {workers} workers, up to {deaths} deaths in {budget:.0f}s")
    server = _Proc([sys.executable, "-m", "forkd", "start", PROBE_APP, "-b", f"{HOST}:{port}",
                    "-w", str(workers), "--preload", "--metrics", f"{HOST}:{mport}"], env, tmp)
    try:
        server.wait_for(lambda: "event=all-ready" in server.text(), 60 + workers)
        url = f"http://{HOST}:{port}/"
        t0 = time.monotonic()
        done = _crash_loop(url, lambda: _deaths(server.log_path), deaths, budget)
        elapsed = time.monotonic() - t0
        server.wait_for(lambda: _children(server.proc.pid) >= workers, 60)
        for _ in range(200):  # live workers write their own files too, as in production
            _http_ok(url)
        time.sleep(2)  # the last folds run
        app_dir = Path(re.findall(r"app_dir=(\S+)", server.text())[0])
        times = []
        body = b""
        for _ in range(5):
            took, body = _scrape(mport)
            times.append(took)
        text = body.decode()
        out["forkd"] = {
            "deaths": done, "seconds": round(elapsed, 1),
            "scrape_ms_median": round(statistics.median(times) * 1000, 1),
            "files": len(list(app_dir.glob("*.db"))), "bytes": len(body),
            "probe_hits_total": _value(text, "probe_hits_total"),
            "restarts_crashed": _value(text, 'forkd_worker_restarts_total{reason="crashed"}')}
        log(f"  {out['forkd']}")
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    out["gunicorn"] = _gunicorn_scale(workers, out["forkd"]["deaths"], budget)
    return out


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


GUNICORN_CONF = """
from prometheus_client import multiprocess
def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""
COLLECT = """
import sys, time, glob, os
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
times = []
for _ in range(5):
    t0 = time.perf_counter()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    body = generate_latest(registry)
    times.append(time.perf_counter() - t0)
times.sort()
print(times[2] * 1000, len(glob.glob(os.path.join(sys.argv[1], "*.db"))), len(body))
"""


def _gunicorn_scale(workers: int, recycles: int, budget: float) -> dict[str, Any]:
    python = venv_bin("python")
    if subprocess.run([python, "-c", "import prometheus_client"],
                      capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "prometheus_client"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="forkd-bench-gunicorn-prom-"))
    mpdir = tmp / "mp"
    mpdir.mkdir()
    conf = tmp / "gunicorn_conf.py"
    conf.write_text(GUNICORN_CONF)
    env = {**os.environ, "PROBE_SERIES": "50", "PYTHONPATH": f"{TEST_APPS}",
           "PROMETHEUS_MULTIPROC_DIR": str(mpdir)}
    port = free_port()
    log(f"scale: gunicorn, {workers} workers, {recycles} recycles (--max-requests 1)")
    server = _Proc([venv_bin("gunicorn"), "-k", "uvicorn_worker.UvicornWorker",
                    "-w", str(workers), "-c", str(conf), "--max-requests", "1", "--preload",
                    "-b", f"{HOST}:{port}", "--log-level", "info", PROBE_APP], env, tmp)
    url = f"http://{HOST}:{port}/"
    try:
        server.wait_for(lambda: _children(server.proc.pid) >= workers and _http_ok(url),
                        60 + workers)
        def booted() -> int:  # workers that ever started, less the first generation
            return server.text().count("Booting worker with pid") - workers

        t0 = time.monotonic()
        while booted() < recycles and time.monotonic() - t0 < budget:
            if not _http_ok(url):  # each answered request ends its worker soon after
                time.sleep(0.01)
        elapsed = time.monotonic() - t0
        done = booted()
        time.sleep(3)
        result = subprocess.run([python, "-c", COLLECT, str(mpdir)], capture_output=True,
                                text=True, timeout=300, env=env)
        ms, files, size = result.stdout.split()
        return {"recycles": done, "seconds": round(elapsed, 1),
                "scrape_ms_median": round(float(ms), 1), "files": int(files),
                "bytes": int(size)}
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def main() -> int:
    which = sys.argv[1:] or ["hotpath", "onoff", "idle", "scale"]
    results: dict[str, Any] = {}
    for name in which:
        results[name] = globals()[name]()
        print(json.dumps({name: results[name]}), flush=True)
    path = REPO / "bench" / "results" / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(results)
    old["date"] = time.strftime("%Y-%m-%d %H:%M")
    path.write_text(json.dumps(old, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
