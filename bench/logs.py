"""Benchmark: what logging costs (issue 13).

1. Throughput with the access log on (forkd: JSON lines to --log-file) against the same
   server with it off, and against uvicorn and gunicorn with their access logs on, written
   to a file, in the same run (wrk, 64 connections, 2 workers each, servers interleaved).
   Every access log is counted afterwards: a server that wrote fewer lines than it
   answered requests would look faster than it is.
2. The primary's CPU while its 2 workers print 20,000 lines a second in total (80 bytes
   each) into --log-file: every line crosses a pipe, is tagged and written by the primary.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    ASGI_APP,
    HOST,
    WSGI_APP,
    ServerFailed,
    ServerSpec,
    log,
    run_load,
    running,
    server_command,
    venv_bin,
    wrk_command,
)

CONNECTIONS = 64
PRINT_RATE = 20_000  # lines a second, all workers together


def _forkd(app: str, interface: str, access: bool, extra: list[str] | None = None):
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        args = [sys.executable, "-m", "forkd", "start", app, "-b", f"{HOST}:{port}",
                "-w", str(workers), "--interface", interface, "--name", "bench",
                "--log-file", str(tmp / "forkd.log"), *(extra or [])]
        if access:
            args += ["--access-log", "--log-format", "json"]
        return args

    return argv


def _uvicorn_access(port: int, workers: int, tmp: Path) -> list[str]:
    config = tmp / "log.json"  # uvicorn's own access format, into a file
    if tmp.is_dir():  # (not when only the command is being shown)
            config.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"access": {
                "()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                "fmt": '%(client_addr)s - "%(request_line)s" %(status_code)s'}},
            "handlers": {"access": {"class": "logging.FileHandler", "formatter": "access",
                                    "filename": str(tmp / "access.log")}},
            "loggers": {"uvicorn.access": {"handlers": ["access"], "level": "INFO",
                                           "propagate": False}},
        }))
    return [venv_bin("uvicorn"), ASGI_APP, "--host", HOST, "--port", str(port),
            "--workers", str(workers), "--http", "httptools", "--loop", "uvloop",
            "--log-config", str(config)]


def _gunicorn_access(worker_class: str, app: str, extra: list[str]):
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [venv_bin("gunicorn"), "-k", worker_class, "-w", str(workers), *extra,
                "-b", f"{HOST}:{port}", "--access-logfile", str(tmp / "access.log"), app]

    return argv


# In this order: each pair with and without the access log runs back to back.
SPECS = {s.name: s for s in [
    ServerSpec("forkd-asgi", "asgi", _forkd(ASGI_APP, "asgi", False), is_forkd=True),
    ServerSpec("forkd-asgi+access", "asgi", _forkd(ASGI_APP, "asgi", True), is_forkd=True),
    ServerSpec("forkd-wsgi", "wsgi", _forkd(WSGI_APP, "wsgi", False), is_forkd=True),
    ServerSpec("forkd-wsgi+access", "wsgi", _forkd(WSGI_APP, "wsgi", True), is_forkd=True),
    ServerSpec("uvicorn+access", "asgi", _uvicorn_access),
    ServerSpec("gunicorn-uvicorn+access", "asgi",
               _gunicorn_access("uvicorn_worker.UvicornWorker", ASGI_APP, [])),
    ServerSpec("gunicorn-gthread+access", "wsgi",
               _gunicorn_access("gthread", WSGI_APP, ["--threads", "4"])),
]}
RATIOS = [
    ("forkd-asgi+access", "forkd-asgi", 0.8),
    ("forkd-wsgi+access", "forkd-wsgi", 0.8),
    ("forkd-asgi+access", "uvicorn+access", None),
    ("forkd-asgi+access", "gunicorn-uvicorn+access", None),
    ("forkd-wsgi+access", "gunicorn-gthread+access", None),
]


def _access_lines(tmp: Path, name: str) -> int:
    if name.startswith("forkd"):
        path = tmp / "forkd.log"
        return sum(1 for line in path.open("rb") if b'"event":"access"' in line) \
            if path.exists() else 0
    path = tmp / "access.log"
    return sum(1 for _ in path.open("rb")) if path.exists() else 0


def _tree_cpu(pid: int) -> float:
    """CPU seconds used so far by the server: its primary and every worker."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def throughput(quick: bool, only: list[str] | None, rounds: int) -> dict[str, Any]:
    seconds = 3 if quick else 4
    names = [n for n in SPECS if not only or n in only]
    servers: dict[str, Any] = {n: {"rounds": [], "failed": None,
                                   "command": server_command(SPECS[n])} for n in names}
    for rnd in range(rounds):
        # (every other round in the reverse order, as bench/speed.py's rounds)
        for name in names if rnd % 2 == 0 else names[::-1]:
            entry = servers[name]
            if entry["failed"]:
                continue
            log(f"logs throughput round {rnd + 1}/{rounds}: {name}")
            try:
                with running(SPECS[name]) as server:
                    run_load(wrk_command(server.url, CONNECTIONS, 1), 1)  # warm-up
                    before = _access_lines(server.tmp, name)
                    cpu_before = _tree_cpu(server.pid)
                    result = run_load(wrk_command(server.url, CONNECTIONS, seconds), seconds)
                    cpu = _tree_cpu(server.pid) - cpu_before
                    time.sleep(0.5)  # let the last lines reach the file
                    logged = _access_lines(server.tmp, name) - before
            except ServerFailed as exc:
                entry["failed"] = str(exc)
                continue
            log(f"  {result.rps:.0f} req/s p99 {result.p99_ms} ms, {logged} access lines "
                f"for {result.requests} requests")
            entry["rounds"].append(asdict(result) | {
                "access_lines": logged,
                "cpu_us_per_request": round(cpu / result.requests * 1e6, 2)
                if result.requests else None})
    for entry in servers.values():
        rps = [r["rps"] for r in entry["rounds"]]
        entry["rps"] = statistics.median(rps) if rps else None
        entry["p99_ms"] = statistics.median([r["p99_ms"] for r in entry["rounds"]
                                             if r["p99_ms"] is not None] or [0]) or None
    ratios = []
    for ours, other, target in RATIOS:
        # Per round: the two ran minutes apart at most; the shared machine's load drifts
        # more between rounds than within one, so the median of the rounds' ratios.
        a_rounds = servers.get(ours, {}).get("rounds", [])
        b_rounds = servers.get(other, {}).get("rounds", [])
        each = [a["rps"] / b["rps"] for a, b in zip(a_rounds, b_rounds, strict=False)
                if a["rps"] and b["rps"]]
        # CPU per request: what the feature costs, much less at the mercy of other load
        cpu = [b["cpu_us_per_request"] / a["cpu_us_per_request"]
               for a, b in zip(a_rounds, b_rounds, strict=False)
               if a.get("cpu_us_per_request") and b.get("cpu_us_per_request")]
        ratios.append({"forkd": ours, "other": other, "target": target,
                       "ratio": statistics.median(each) if each else None,
                       "each": [round(r, 2) for r in each],
                       "cpu_ratio": statistics.median(cpu) if cpu else None})
    return {"seconds": seconds, "rounds": rounds, "servers": servers, "ratios": ratios}


def primary_cpu(quick: bool) -> dict[str, Any]:
    seconds = 3 if quick else 6
    spec = ServerSpec("forkd-printing", "asgi",
                      _forkd("bench.apps.printer:app", "asgi", False), is_forkd=True)
    import os

    os.environ["BENCH_PRINT_RATE"] = str(PRINT_RATE // 2)
    try:
        with running(spec) as server:
            primary = psutil.Process(server.pid)
            log_file = server.tmp / "forkd.log"
            time.sleep(1.0)  # the printers are running
            cpu0 = sum(primary.cpu_times()[:2])
            lines0 = sum(1 for _ in log_file.open("rb"))
            start = time.monotonic()
            time.sleep(seconds)
            cpu1 = sum(primary.cpu_times()[:2])
            elapsed = time.monotonic() - start
            lines1 = sum(1 for _ in log_file.open("rb"))
    finally:
        os.environ.pop("BENCH_PRINT_RATE", None)
    return {"seconds": round(elapsed, 2), "lines_per_s": round((lines1 - lines0) / elapsed),
            "primary_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
            "command": server_command(spec)}


def run(quick: bool, only: list[str] | None, rounds: int | None) -> dict[str, Any]:
    data = throughput(quick, only, rounds or 1)
    data["primary_cpu"] = primary_cpu(quick)
    log(f"primary CPU {data['primary_cpu']}")
    data["markdown"] = markdown(data)
    return data


def markdown(data: dict[str, Any]) -> str:
    rows = ["| server | req/s | p99 ms | CPU µs per request (all processes) | "
            "access lines / requests |", "|---|---:|---:|---:|---:|"]
    for name, entry in data["servers"].items():
        if entry["failed"]:
            rows.append(f"| {name} | failed | | | |")
            continue
        last = entry["rounds"][-1] if entry["rounds"] else {}
        cpus = [r["cpu_us_per_request"] for r in entry["rounds"] if r.get("cpu_us_per_request")]
        cpu = f"{statistics.median(cpus):.1f}" if cpus else "-"
        rows.append(f"| {name} | {entry['rps'] or 0:.0f} | {entry['p99_ms'] or '-'} | {cpu} | "
                    f"{last.get('access_lines', 0)} / {last.get('requests', 0)} |")
    ratio_rows = ["| forkd | against | req/s ratio: median of the rounds (each) | "
                  "CPU per request: inverse ratio | target |", "|---|---|---:|---:|---:|"]
    for row in data["ratios"]:
        value = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        target = f"≥ {row['target']}x" if row["target"] else "shown"
        each = ", ".join(f"{r:.2f}" for r in row.get("each", []))
        cpu = f"{row['cpu_ratio']:.2f}x" if row.get("cpu_ratio") else "-"
        ratio_rows.append(f"| {row['forkd']} | {row['other']} | {value} ({each}) | {cpu} | "
                          f"{target} |")
    cpu = data["primary_cpu"]
    return "\n".join([
        f"wrk -t1 -c{CONNECTIONS} -d{data['seconds']}s, {data['rounds']} round(s), "
        "2 workers each; every access log written to a file (forkd: JSON lines).",
        "", *rows, "", *ratio_rows, "",
        f"Primary CPU while 2 workers print {cpu['lines_per_s']} lines/s in total into "
        f"--log-file: **{cpu['primary_cpu_percent']}%** of one core over {cpu['seconds']} s.",
        "", "Commands:", "", *[f"    {n}: {e['command']}" for n, e in data["servers"].items()],
    ])
