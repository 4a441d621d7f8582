"""Benchmark 6 (issue 16): replacing the primary itself under load must not fail a request.

Per server and load mode: 2 workers; 30 s of load; 5 upgrades, each started 2 s after
the previous one finished (and at least 2 s after it began):

* forkd: SIGUSR2 to the primary (what `forkd upgrade` asks for); the old primary hands
  the listeners over, waits for the new one's workers and then drains its own by itself.
* gunicorn (+ UvicornWorker): SIGUSR2 to the master, which re-executes itself as a new
  master on the same sockets; once that one's workers have loaded the app, SIGQUIT to the
  old master (as asked for the comparison), and, as gunicorn's docs advise for a graceful
  hand-over, SIGTERM in a second variant.

Counted: non-2xx answers and client/socket errors of the load generator; per upgrade, the
seconds from the trigger until the new master's 2 workers had loaded the app and the old
master had exited.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict
from typing import Any

import psutil

from bench.harness import (
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

# (row label, server, signal to the old master once the new one is ready; None: forkd
# drains its old primary itself)
VARIANTS: list[tuple[str, str, int | None]] = [
    ("forkd-asgi", "forkd-asgi", None),
    ("gunicorn-uvicorn USR2+QUIT", "gunicorn-uvicorn", signal.SIGQUIT),
    ("gunicorn-uvicorn USR2+TERM", "gunicorn-uvicorn", signal.SIGTERM),
]
MODES = ["wrk", "hey-no-keepalive"]
WORKERS = 2
CONNECTIONS = 32
FIRST_AT = 2.0
EVERY = 2.0
PAUSE = 2.0  # after an upgrade finished, before the next begins
STEP_TIMEOUT = 30.0


def load_argv(mode: str, url: str, seconds: int) -> list[str]:
    if mode == "wrk":
        return wrk_command(url, CONNECTIONS, seconds)
    return hey_command(url, CONNECTIONS, seconds, keepalive=False)


def run(quick: bool, only: list[str] | None) -> dict[str, Any]:
    seconds, upgrades = (10, 1) if quick else (30, 5)
    results: dict[str, Any] = {}
    for label, name, old_signal in VARIANTS:
        if only and name not in only:
            continue
        results[label] = {"command": server_command(SERVERS[name]), "modes": {}}
        for mode in MODES:
            log(f"upgrade: {label} / {mode}")
            try:
                r = run_one(name, old_signal, mode, seconds, upgrades)
            except ServerFailed as exc:
                results[label]["failed"] = str(exc)
                break
            results[label]["modes"][mode] = r
            log(f"  failures {r['load']['failures']} upgrades {r['upgrades_done']}/"
                f"{r['upgrades_sent']} {r['durations_s']}")
    return {
        "seconds": seconds,
        "upgrades": upgrades,
        "workers": WORKERS,
        "load_commands": {
            m: " ".join(load_argv(m, "http://127.0.0.1:PORT/", seconds)) for m in MODES
        },
        "servers": results,
    }


def run_one(name: str, old_signal: int | None, mode: str, seconds: int, upgrades: int
            ) -> dict[str, Any]:
    with running(SERVERS[name], WORKERS) as server:
        argv = load_argv(mode, server.url, seconds)
        load = start_load(argv)
        primary = server.pid
        durations: list[float | None] = []
        readies: list[float | None] = []
        pids = [primary]
        try:
            next_at = load.started + FIRST_AT
            for _ in range(upgrades):
                _sleep_until(next_at)
                if time.time() > load.started + seconds - 1:
                    break
                began = time.time()
                took, ready_after, new = upgrade_once(server, primary, old_signal)
                durations.append(took)
                readies.append(ready_after)
                if new is None:
                    break
                primary = new
                pids.append(new)
                # (gunicorn ignores a USR2 until its new master has noticed, in its ~1 s
                # loop, that the old one is gone: a pause after each upgrade is fair to it)
                next_at = max(time.time() + PAUSE, began + EVERY)
            result = finish_load(load, argv, seconds)
        finally:
            kill_load(load)
        alive = psutil.pid_exists(primary) and _running(primary)
        tail = server.log_tail(20) if server.spec.is_forkd else ""
    done = [d for d in durations if d is not None]
    return {
        "load": asdict(result) | {"failures": result.failures},
        "upgrades_sent": len(durations),
        "upgrades_done": len(done),
        "durations_s": [None if d is None else round(d, 3) for d in durations],
        "new_ready_s": [None if d is None else round(d, 3) for d in readies],
        "primary_pids": pids,
        "primary_alive_at_end": alive,
        "log_tail": tail,
    }


def upgrade_once(server: RunningServer, primary: int, old_signal: int | None
                 ) -> tuple[float | None, float | None, int | None]:
    """Upgrade the master `primary`: (seconds until the new master's workers are ready
    and the old master is gone, or None; seconds until the new workers were ready; the
    new master's pid, or None)."""
    began = time.time()
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        old_workers = {child.pid for child in psutil.Process(primary).children()}
    except psutil.Error:
        return None, None, None
    os.kill(primary, signal.SIGUSR2)
    new = _poll(lambda: _new_master(primary, old_workers), deadline)
    if new is None:
        return None, None, None
    ready = _poll(lambda: len(_ready_workers(server, new)) >= WORKERS or None, deadline)
    if ready is None:
        return None, None, new
    ready_after = time.time() - began
    if old_signal is not None:
        os.kill(primary, old_signal)
    if primary == server.pid:
        gone = _poll(lambda: server.proc.poll() is not None or None, deadline)
    else:  # (no longer our child: someone else reaps it)
        gone = _poll(lambda: not _running(primary) or None, deadline)
    return (time.time() - began if gone else None), ready_after, new


def _new_master(old: int, old_workers: set[int]) -> int | None:
    try:
        children = psutil.Process(old).children()
    except psutil.Error:
        return None
    for child in children:
        if child.pid not in old_workers and _running(child.pid):
            return child.pid
    return None


def _ready_workers(server: RunningServer, master: int) -> list[int]:
    try:
        children = psutil.Process(master).children()
    except psutil.Error:
        return []
    return [c.pid for c in children if server.loaded_at(c.pid) is not None]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _poll(predicate: Any, deadline: float) -> Any:
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return None


def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)
