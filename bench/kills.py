"""Benchmark 2 (issue 2): SIGKILL a random ready worker every second under load.

Per server: 2 workers, `wrk -t1 -c32 -d15s`; from t = 2 s, one SIGKILL per second to a
worker chosen at random (fixed seed) among those that have loaded the app, 10 kills.
Measured: wrk's socket errors and non-2xx answers, and, from the worker timeline (see
bench/watch.py), the time with fewer than 2 ready workers, the time with none, and per
kill the time until 2 workers were ready again.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from dataclasses import asdict
from typing import Any

from bench.harness import (
    SERVERS,
    ServerFailed,
    finish_load,
    kill_load,
    log,
    running,
    server_command,
    start_load,
    wrk_command,
)
from bench.watch import WorkerWatch, time_below

SERVER_NAMES = [
    "forkd-asgi",
    "forkd-wsgi",
    "uvicorn",
    "gunicorn-uvicorn",
    "gunicorn-gthread",
    "granian-asgi",
    "granian-asgi-respawn",
]
WORKERS = 2
CONNECTIONS = 32
FIRST_KILL_AT = 2.0
SEED = 20240603


def run(quick: bool, only: list[str] | None) -> dict[str, Any]:
    seconds, kills = (8, 4) if quick else (15, 10)
    names = [n for n in SERVER_NAMES if not only or n in only]
    results: dict[str, Any] = {}
    for name in names:
        log(f"kills: {name}")
        try:
            results[name] = run_one(name, seconds, kills)
        except ServerFailed as exc:
            results[name] = {"failed": str(exc), "command": server_command(SERVERS[name])}
            log(f"  {name} failed to start")
            continue
        r = results[name]
        log(
            f"  errors {r['load']['failures']} below-N {r['seconds_below_n']:.2f}s "
            f"none {r['seconds_none_ready']:.2f}s exited {r['primary_exited_after_s']}"
        )
    return {
        "seconds": seconds,
        "kills": kills,
        "workers": WORKERS,
        "seed": SEED,
        "load_command": " ".join(wrk_command("http://127.0.0.1:PORT/", CONNECTIONS, seconds)),
        "servers": results,
    }


def run_one(name: str, seconds: int, kills: int) -> dict[str, Any]:
    rng = random.Random(f"{SEED}-{name}")
    spec = SERVERS[name]
    kill_log: list[dict[str, Any]] = []
    with running(spec, WORKERS) as server, WorkerWatch(server) as watch:
        argv = wrk_command(server.url, CONNECTIONS, seconds)
        load = start_load(argv)
        try:
            for i in range(kills):
                _sleep_until(load.started + FIRST_KILL_AT + i)
                watch.poll()
                if not server.alive():
                    break
                candidates = sorted(set(watch.ready_now()) & set(server.worker_pids()))
                if not candidates:
                    kill_log.append({"at_s": time.time() - load.started, "pid": None})
                    continue
                victim = rng.choice(candidates)
                at = time.time()
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                watch.record_kill(victim, at)
                kill_log.append({"at_s": at - load.started, "pid": victim, "at": at})
            result = finish_load(load, argv, seconds)
        finally:
            kill_load(load)
        load_end = load.started + seconds
        watch.poll()
        alive_at_end = server.alive()
        intervals = watch.intervals()
        pids_seen = len(watch.lives)
        exit_at = watch.primary_exit_at
        # forkd's own account of each death and respawn is kept; a peer's only if it died.
        log_tail = server.log_tail(60) if spec.is_forkd or not server.alive() else ""
    below, none = time_below(intervals, WORKERS, load.started, load_end)
    recoveries = []
    for k in kill_log:
        if k.get("pid") is None:
            continue
        back = _back_to_full(intervals, WORKERS, k["at"], load_end)
        k["recovered_after_s"] = back
        if back is not None:
            recoveries.append(back)
    return {
        "command": server_command(spec),
        "load": asdict(result) | {"failures": result.failures},
        "kills_done": sum(1 for k in kill_log if k.get("pid")),
        "kill_log": [{k2: v for k2, v in k.items() if k2 != "at"} for k in kill_log],
        "seconds_below_n": below,
        "seconds_none_ready": none,
        "recovery_median_s": statistics.median(recoveries) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "unrecovered_kills": sum(
            1 for k in kill_log if k.get("pid") and k.get("recovered_after_s") is None
        ),
        "worker_pids_seen": pids_seen,
        "primary_alive_at_end": alive_at_end,
        "primary_exited_after_s": None if exit_at is None else round(exit_at - load.started, 2),
        "log_tail": log_tail,
    }


def _back_to_full(
    intervals: list[tuple[float, float]], wanted: int, since: float, until: float
) -> float | None:
    """Seconds after `since` until `wanted` intervals overlap again (None: not by `until`)."""
    instants = sorted({since} | {lo for lo, _ in intervals if since <= lo <= until})
    for t in instants:
        if sum(1 for lo, hi in intervals if lo <= t < hi) >= wanted:
            return t - since
    return None


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)
