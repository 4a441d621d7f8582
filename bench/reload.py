"""Benchmark 3 (issue 4): rolling reloads under load must not fail a single request.

Per server and load mode: 2 workers; 15 s of load; SIGHUP to the primary at t = 2, 4, 6, 8
and 10 s (forkd can also be driven by `forkd reload NAME`: FORKD_BENCH_RELOAD=cli). Counted:
non-2xx answers and client/socket errors; from the worker timeline (bench/watch.py) how
many workers were replaced and how long each reload took to have 2 new ready workers and
no old one left.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from bench.harness import (
    REPO,
    SERVERS,
    RunningServer,
    ServerFailed,
    finish_load,
    hey_command,
    kill_load,
    log,
    running,
    server_command,
    start_load,
    wrk_command,
)
from bench.watch import WorkerLife, WorkerWatch

SERVER_NAMES = [
    "forkd-asgi",
    "forkd-wsgi",
    "uvicorn",
    "gunicorn-uvicorn",
    "gunicorn-gthread",
    "granian-asgi",
]
MODES = ["hey-keepalive", "hey-no-keepalive", "wrk"]
WORKERS = 2
CONNECTIONS = 32
FIRST_RELOAD_AT = 2.0
RELOAD_EVERY = 2.0


def load_argv(mode: str, url: str, seconds: int) -> list[str]:
    if mode == "wrk":
        return wrk_command(url, CONNECTIONS, seconds)
    return hey_command(url, CONNECTIONS, seconds, keepalive=(mode == "hey-keepalive"))


def run(quick: bool, only: list[str] | None) -> dict[str, Any]:
    seconds, reloads = (7, 2) if quick else (15, 5)
    names = [n for n in SERVER_NAMES if not only or n in only]
    results: dict[str, Any] = {}
    for name in names:
        results[name] = {"command": server_command(SERVERS[name]), "modes": {}}
        for mode in MODES:
            log(f"reload: {name} / {mode}")
            try:
                r = run_one(name, mode, seconds, reloads)
            except ServerFailed as exc:
                results[name]["failed"] = str(exc)
                log(f"  {name} failed to start")
                break
            results[name]["modes"][mode] = r
            log(
                f"  failures {r['load']['failures']} (non-2xx {r['load']['non_2xx']}) "
                f"replaced {r['workers_replaced']} done {r['reloads_completed']}/{reloads}"
            )
    return {
        "seconds": seconds,
        "reloads": reloads,
        "workers": WORKERS,
        "trigger": "forkd reload NAME" if _use_cli() else "SIGHUP to the primary",
        "load_commands": {
            m: " ".join(load_argv(m, "http://127.0.0.1:PORT/", seconds)) for m in MODES
        },
        "servers": results,
    }


def _use_cli() -> bool:
    return os.environ.get("FORKD_BENCH_RELOAD", "signal") == "cli"


def trigger_reload(server: RunningServer) -> None:
    if server.spec.is_forkd and _use_cli():
        # Fire and forget: its exit status is reported, but the schedule must not wait.
        subprocess.Popen(
            [sys.executable, "-m", "forkd", "reload", "bench"],
            cwd=REPO,
            env=dict(os.environ, FORKD_HOME=str(server.tmp / "forkd-home")),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return
    os.kill(server.pid, signal.SIGHUP)


def run_one(name: str, mode: str, seconds: int, reloads: int) -> dict[str, Any]:
    with running(SERVERS[name], WORKERS) as server, WorkerWatch(server) as watch:
        argv = load_argv(mode, server.url, seconds)
        load = start_load(argv)
        sent: list[float] = []
        try:
            for i in range(reloads):
                _sleep_until(load.started + FIRST_RELOAD_AT + i * RELOAD_EVERY)
                if not server.alive():
                    break
                sent.append(time.time())
                trigger_reload(server)
            result = finish_load(load, argv, seconds)
        finally:
            kill_load(load)
        watch.poll()
        alive = server.alive()
        lives = list(watch.lives.values())
        # Kept for forkd always (its own account of each reload), else only on a crash.
        tail = server.log_tail(30) if server.spec.is_forkd or not server.alive() else ""
    initial = [life for life in lives if life.first_seen <= load.started]
    durations = reload_durations(lives, sent, WORKERS)
    done = [d for d in durations if d is not None]
    return {
        "load": asdict(result) | {"failures": result.failures},
        "reloads_sent": len(sent),
        "reloads_completed": len(done),
        "reload_median_s": statistics.median(done) if done else None,
        "reload_max_s": max(done) if done else None,
        "reload_durations_s": durations,
        "workers_replaced": len(lives) - len(initial),
        "primary_alive_at_end": alive,
        "log_tail": tail,
    }


def reload_durations(lives: list[WorkerLife], sent: list[float], wanted: int) -> list[float | None]:
    """Per reload: seconds from the trigger until `wanted` workers started after it were
    ready and every worker that was ready before it had gone; None if that did not happen
    before the next trigger (or, for the last, before the run ended)."""
    out: list[float | None] = []
    for i, at in enumerate(sent):
        until = sent[i + 1] if i + 1 < len(sent) else float("inf")
        new_ready = sorted(
            life.ready_at
            for life in lives
            if life.ready_at is not None and at <= life.ready_at < until
        )
        old = [life for life in lives if life.ready_at is not None and life.ready_at < at]
        old_gone = [life.gone_at for life in old if life.gone_at is not None]
        if len(new_ready) < wanted or len(old_gone) < len(old):
            out.append(None)
            continue
        finished = max(new_ready[wanted - 1], max(old_gone, default=at))
        out.append(finished - at if finished < until else None)
    return out


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)
