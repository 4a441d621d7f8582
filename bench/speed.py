"""Benchmark 5 (issue 20): speed cases beyond hello world, and memory and start-up.

- ``hello``: the throughput case again, but at least five alternating rounds per server,
  so the spread (min … max) shows whether a margin is real or one lucky round.
- ``pipelined``: the TechEmpower "plaintext" shape: 256 connections, 16 requests pipelined
  on each before reading (wrk with bench/scripts/pipeline.lua).
- ``io``: a WSGI route that blocks its thread for 1 ms (a database call): shows that a
  server still serves concurrently while the app blocks.
- ``memory``: RSS and USS of each worker after start and after 100,000 requests.
- ``startup``: time from launching the command to every worker ready and answering.

Every server runs with 2 workers and its defaults otherwise; rounds alternate servers.
Each round also records the server's CPU time per request (primary and workers, user +
system, over the measured load): on a shared machine it moves far less than req/s does.
`bench/run speed --cases pipelined` runs some cases only (memory/start-up is the case
`memory`). With FORKD_BENCH_BEFORE naming a directory that holds an older `forkd/`
(`git archive main forkd | tar -x -C DIR`), that version runs too, as "forkd-asgi (before)"
and "forkd-wsgi (before)", alternating with the others in the hello and pipelined cases.

The pure-Python floor (bench/floor.py: the thinnest server on uvloop + httptools, the
ceiling of any pure-Python design) runs only when asked for, by FORKD_BENCH_FLOOR=1 or
by naming floor-asgi / floor-wsgi in --only. It adds rows forkd / floor, floor / granian
and floor / uvicorn, without a target; forkd's own target rows are computed as before.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    ASGI_APP,
    BENCH,
    HOST,
    SERVERS,
    WSGI_APP,
    ServerFailed,
    ServerSpec,
    log,
    run_load,
    running,
    server_command,
    wrk_command,
)
from bench.logs import _tree_cpu as tree_cpu

HELLO_ASGI = ["forkd-asgi", "uvicorn", "granian-asgi"]
HELLO_WSGI = ["forkd-wsgi", "gunicorn-gthread", "granian-wsgi"]
PIPELINE_SCRIPT = BENCH / "scripts" / "pipeline.lua"
PIPELINE_DEPTH = 16
PIPELINE_CONNECTIONS = 256
MEMORY_REQUESTS = 100_000

# (forkd server, peer, target ratio of req/s)
TARGETS = {
    "hello": [
        ("forkd-asgi", "uvicorn", 1.3),
        ("forkd-asgi", "granian-asgi", 1.5),
        ("forkd-wsgi", "granian-wsgi", 1.0),
        ("forkd-wsgi", "gunicorn-gthread", 4.0),
    ],
    "pipelined": [
        ("forkd-asgi", "granian-asgi", 1.0),
        ("forkd-wsgi", "granian-wsgi", 1.0),
        ("forkd-asgi", "uvicorn", None),
        ("forkd-wsgi", "gunicorn-gthread", None),
    ],
    "io": [
        ("forkd-wsgi", "granian-wsgi", 1.0),
        ("forkd-wsgi", "gunicorn-gthread", None),
    ],
}


def pipeline_command(url: str, seconds: int) -> list[str]:
    return [
        "wrk", "-t1", f"-c{PIPELINE_CONNECTIONS}", f"-d{seconds}s", "--latency",
        "-s", str(PIPELINE_SCRIPT), url, "--", str(PIPELINE_DEPTH), str(PIPELINE_CONNECTIONS),
    ]  # fmt: skip


def _before(app: str, interface: str, before: str) -> Any:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {before!r}); "
                "import runpy; runpy.run_module('forkd', run_name='__main__')",
                "start", app, "-b", f"{HOST}:{port}", "-w", str(workers),
                "--interface", interface, "--name", "bench"]

    return argv


BEFORE = os.environ.get("FORKD_BENCH_BEFORE")
if BEFORE:
    for _name, _app, _iface in (("forkd-asgi", ASGI_APP, "asgi"), ("forkd-wsgi", WSGI_APP, "wsgi")):
        SERVERS[f"{_name} (before)"] = ServerSpec(f"{_name} (before)", _iface,
                                                  _before(_app, _iface, BEFORE), is_forkd=True)
        for _case in ("hello", "pipelined"):
            TARGETS[_case].append((_name, f"{_name} (before)", None))
    HELLO_ASGI.insert(1, "forkd-asgi (before)")
    HELLO_WSGI.insert(1, "forkd-wsgi (before)")

FLOOR = {"floor-asgi", "floor-wsgi"}  # (run only when asked for: see the docstring)
FLOOR_ALWAYS = os.environ.get("FORKD_BENCH_FLOOR") == "1"
HELLO_ASGI.append("floor-asgi")
HELLO_WSGI.append("floor-wsgi")
for _case in ("hello", "pipelined"):
    TARGETS[_case] += [("forkd-asgi", "floor-asgi", None), ("floor-asgi", "uvicorn", None),
                       ("floor-asgi", "granian-asgi", None), ("forkd-wsgi", "floor-wsgi", None),
                       ("floor-wsgi", "granian-wsgi", None)]
TARGETS["io"] += [("forkd-wsgi", "floor-wsgi", None), ("floor-wsgi", "granian-wsgi", None)]

CASES = {
    # name: (servers, argv builder (url, seconds) -> argv, path)
    "hello": (HELLO_ASGI + HELLO_WSGI, lambda url, s: wrk_command(url, 64, s), ""),
    "pipelined": (HELLO_ASGI + HELLO_WSGI, pipeline_command, ""),
    "io": (HELLO_WSGI, lambda url, s: wrk_command(url, 64, s), "io"),
}


def _selected(name: str, only: list[str] | None) -> bool:
    if name in FLOOR:
        return FLOOR_ALWAYS or bool(only and name in only)
    return not only or name.removesuffix(" (before)") in only


def run(quick: bool, only: list[str] | None, rounds: int | None,
        cases: list[str] | None = None) -> dict[str, Any]:
    seconds = 3 if quick else 8
    n_rounds = rounds or (2 if quick else 5)
    out: dict[str, Any] = {"seconds": seconds, "rounds": n_rounds, "cases": {}}
    for case, (servers, argv_for, path) in CASES.items():
        if cases and case not in cases:
            continue
        names = [n for n in servers if _selected(n, only)]
        out["cases"][case] = _alternate(case, names, argv_for, path, seconds, n_rounds)
    if not cases or "memory" in cases:
        out["memory"] = _memory([n for n in HELLO_ASGI + HELLO_WSGI
                                 if _selected(n, only) and not n.endswith(" (before)")], quick)
    return out


def _alternate(case: str, names: list[str], argv_for: Any, path: str, seconds: int,
               n_rounds: int) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {
        n: {"rounds": [], "failed": None, "command": server_command(SERVERS[n])} for n in names
    }
    command = " ".join(argv_for(f"http://127.0.0.1:PORT/{path}", seconds))
    for rnd in range(n_rounds):
        # (every other round in the reverse order: a server's place in the round, say
        # first after another's teardown, must not weigh on one side of a ratio)
        for name in names if rnd % 2 == 0 else names[::-1]:
            entry = per[name]
            if entry["failed"]:
                continue
            log(f"{case} round {rnd + 1}/{n_rounds}: {name}")
            try:
                with running(SERVERS[name]) as server:
                    url = server.url + path
                    run_load(argv_for(url, 1), 1)  # warm-up, discarded
                    cpu = tree_cpu(server.pid)
                    result = run_load(argv_for(url, seconds), seconds)
                    cpu = tree_cpu(server.pid) - cpu
            except ServerFailed as exc:
                entry["failed"] = str(exc)
                continue
            cpu_us = round(cpu / result.requests * 1e6, 2) if result.requests else None
            log(f"  {result.rps:.0f} req/s p99 {result.p99_ms} ms errors {result.failures} "
                f"CPU {cpu_us} us/request")
            entry["rounds"].append(
                {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                 "failures": result.failures, "cpu_us_per_request": cpu_us}
            )  # fmt: skip
    for entry in per.values():
        entry["summary"] = _spread(entry["rounds"])
    return {"command": command, "servers": per, "ratios": _ratios(case, per)}


def _spread(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rounds:
        return None
    rps = [r["rps"] for r in rounds]
    p99 = [r["p99_ms"] for r in rounds if r["p99_ms"] is not None]
    cpu = [r["cpu_us_per_request"] for r in rounds if r.get("cpu_us_per_request")]
    return {
        "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
        "cpu_us_per_request": statistics.median(cpu) if cpu else None,
        "p99_ms": statistics.median(p99) if p99 else None,
        "errors": sum(r["failures"] for r in rounds), "rps_each": rps,
    }  # fmt: skip


def _ratios(case: str, per: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ours, peer, target in TARGETS.get(case, []):
        a, b = per.get(ours), per.get(peer)
        if not a or not b or not a["rounds"] or not b["rounds"]:
            continue
        # Round by round (they ran side by side), so the spread of the ratio is honest.
        each = [x["rps"] / y["rps"] for x, y in zip(a["rounds"], b["rounds"], strict=False)
                if y["rps"]]
        cpu = [x["cpu_us_per_request"] / y["cpu_us_per_request"]
               for x, y in zip(a["rounds"], b["rounds"], strict=False)
               if x.get("cpu_us_per_request") and y.get("cpu_us_per_request")]
        rows.append({
            "forkd": ours, "peer": peer, "target": target,
            "cpu_ratio": statistics.median(cpu) if cpu else None,
            "ratio": statistics.median(each) if each else None,
            "ratio_min": min(each) if each else None, "ratio_max": max(each) if each else None,
            "p99_ratio": (a["summary"]["p99_ms"] / b["summary"]["p99_ms"]
                          if a["summary"]["p99_ms"] and b["summary"]["p99_ms"] else None),
        })  # fmt: skip
    return rows


def _worker_memory(server: Any) -> dict[str, float]:
    rss, uss = [], []
    for pid in server.worker_pids():
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss.append(info.rss)
        uss.append(info.uss)
    mib = 1024 * 1024
    return {
        "rss_mib": statistics.mean(rss) / mib if rss else 0.0,
        "uss_mib": statistics.mean(uss) / mib if uss else 0.0,
    }


def _memory(names: list[str], quick: bool) -> dict[str, Any]:
    """Per-worker RSS and USS after start and after MEMORY_REQUESTS requests, and the
    time from launch to every worker ready (start-up)."""
    requests = MEMORY_REQUESTS // 10 if quick else MEMORY_REQUESTS
    out: dict[str, Any] = {"requests": requests, "servers": {}}
    for name in names:
        log(f"memory and start-up: {name}")
        launched = time.time()
        try:
            with running(SERVERS[name]) as server:
                ready_after = time.time() - launched
                start = _worker_memory(server)
                argv = ["hey", "-n", str(requests), "-c", "64", server.url]
                result = run_load(argv, 120)
                after = _worker_memory(server)
        except ServerFailed as exc:
            out["servers"][name] = {"failed": str(exc)}
            continue
        out["servers"][name] = {
            "startup_s": ready_after, "start": start, "after": after,
            "served": result.requests, "failures": result.failures,
        }  # fmt: skip
    return out
