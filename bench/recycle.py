"""Benchmark 5 (`bench/run recycle`): --max-requests under load.

Under `wrk -t1 -c32`, 2 workers recycled after 1000 requests: how many requests each
worker process actually served before it left (median and max over every worker of
the run), how many were recycled, and wrk's failures. A worker that is told about its
limit only by a once-a-second heartbeat overshoots by a second's traffic; one that
tells the primary at its Nth request overshoots by what arrives while its
replacement starts.

Counted by the app itself (bench/apps/counting_asgi.py writes each worker's count at
its lifespan shutdown), so every server is measured alike: forkd, gunicorn with
uvicorn workers and `--max-requests`, and, when FORKD_BENCH_BEFORE names a directory
holding an older `forkd` package (`git archive main forkd | tar -x -C DIR`), that one.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import (
    HOST,
    ServerFailed,
    ServerSpec,
    finish_load,
    kill_load,
    log,
    running,
    server_command,
    start_load,
    venv_bin,
    wrk_command,
)

APP = "bench.apps.counting_asgi:app"
LIMIT = 1000


def _forkd(before: str | None) -> Any:
    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        head = [sys.executable, "-m", "forkd"]
        if before:  # the older package first on sys.path
            head = [sys.executable, "-c", f"import sys; sys.path.insert(0, {before!r}); "
                    "import runpy; runpy.run_module('forkd', run_name='__main__')"]
        return [*head, "start", APP, "-b", f"{HOST}:{port}", "-w", str(workers),
                "--interface", "asgi", "--name", "bench", "--max-requests", str(LIMIT)]

    return argv


def _gunicorn(port: int, workers: int, tmp: Path) -> list[str]:
    return [venv_bin("gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
            "--max-requests", str(LIMIT), "-b", f"{HOST}:{port}", "--log-level", "warning",
            APP]


def servers() -> list[ServerSpec]:
    specs = [ServerSpec("forkd-asgi", "asgi", _forkd(None), is_forkd=True)]
    before = os.environ.get("FORKD_BENCH_BEFORE")
    if before:
        specs.append(ServerSpec("forkd-asgi (before)", "asgi", _forkd(before), is_forkd=True))
    specs.append(ServerSpec("gunicorn-uvicorn", "asgi", _gunicorn))
    return specs


def _counts(marker_dir: Path) -> list[int]:
    return sorted(int(p.read_text()) for p in marker_dir.glob("count-*"))


def run(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    seconds = 4 if quick else 10
    out: dict[str, Any] = {"seconds": seconds, "limit": LIMIT, "servers": {}}
    for spec in servers():
        if only and spec.name not in only:
            continue
        log(f"recycle: {spec.name}")
        try:
            with running(spec, 2) as server:
                argv = wrk_command(server.url, 32, seconds)
                load = start_load(argv)
                try:
                    result = finish_load(load, argv, seconds)
                finally:
                    kill_load(load)
                # a graceful stop makes the workers still serving write their counts too
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(0.2)  # (the count files are written before the workers exit)
                counts = _counts(server.marker_dir)
            out["servers"][spec.name] = {
                "command": server_command(spec),
                "load": asdict(result) | {"failures": result.failures},
                "worker_counts": counts,
                "workers": len(counts),
                "median": statistics.median(counts) if counts else None,
                "max": max(counts) if counts else None,
            }
            log(f"  {len(counts)} workers, median {out['servers'][spec.name]['median']}, "
                f"max {out['servers'][spec.name]['max']}, wrk failures {result.failures}, "
                f"{result.rps:.0f} req/s")
        except ServerFailed as exc:
            out["servers"][spec.name] = {"failed": str(exc)}
    return out
