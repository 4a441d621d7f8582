"""Benchmark (issue 17): a ramp of load against `--autoscale 1:4` and fixed 1 and 4 workers.

The load is a CPU-bound route (2 ms of work per request) stepped up and down with `hey`
(one run per step, so each step opens new connections, as clients behind a balancer do);
a thread samples the worker count and the sum of the workers' USS every 0.5 s. Reported:
each step's req/s and p99, the worker count over time, and the mean memory.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Any

import psutil

from bench.harness import HOST, ServerSpec, log, run_load, running

APP = "bench.apps.cpu_asgi:app"
STEPS = [1, 2, 4, 8, 16, 16, 8, 2, 1]  # hey concurrency per step
WINDOW = 10  # --autoscale-window for the run (the default 60 s would outlast the ramp)


def _spec(name: str, extra: list[str]) -> ServerSpec:
    def argv(port: int, workers: int, tmp: Any) -> list[str]:
        return [sys.executable, "-m", "forkd", "start", APP, "-b", f"{HOST}:{port}",
                "--name", "bench", *extra]
    return ServerSpec(name, "asgi", argv, is_forkd=True)


SERVERS = [
    (_spec("forkd --autoscale 1:4", ["--autoscale", "1:4", "--autoscale-window",
                                     str(WINDOW)]), 1),
    (_spec("forkd -w 1", ["-w", "1"]), 1),
    (_spec("forkd -w 4", ["-w", "4"]), 4),
]


def _sampler(server: Any, stop: threading.Event, out: list[tuple[float, int, float]]) -> None:
    start = time.monotonic()
    while not stop.wait(0.5):
        pids = server.worker_pids()
        uss = 0.0
        for pid in pids:
            try:
                uss += psutil.Process(pid).memory_full_info().uss
            except psutil.Error:
                pass
        out.append((time.monotonic() - start, len(pids), uss / 2**20))


def run(quick: bool) -> dict[str, Any]:
    seconds = 3 if quick else 6
    results: dict[str, Any] = {"steps": STEPS, "seconds": seconds, "window": WINDOW,
                               "servers": {}}
    for spec, workers in SERVERS:
        log(f"autoscale ramp: {spec.name}")
        samples: list[tuple[float, int, float]] = []
        steps = []
        with running(spec, workers=workers) as server:
            stop = threading.Event()
            thread = threading.Thread(target=_sampler, args=(server, stop, samples),
                                      daemon=True)
            thread.start()
            try:
                for concurrency in STEPS:
                    argv = ["hey", "-z", f"{seconds}s", "-c", str(concurrency),
                            f"{server.url}cpu?ms=2"]
                    result = run_load(argv, seconds)
                    steps.append({"c": concurrency, "rps": result.rps,
                                  "p99_ms": result.p99_ms, "failures": result.failures})
                    log(f"  c={concurrency}: {result.rps:.0f} req/s p99 {result.p99_ms} ms")
            finally:
                stop.set()
                thread.join(5)
        results["servers"][spec.name] = {
            "steps": steps,
            "workers_over_time": [(round(t, 1), n) for t, n, _ in samples],
            "max_workers": max((n for _, n, _ in samples), default=0),
            "mean_uss_mib": statistics.mean(m for _, _, m in samples) if samples else None,
            "worst_p99_ms": max((s["p99_ms"] or 0) for s in steps),
            "failures": sum(s["failures"] for s in steps),
        }
    auto, four = (results["servers"].get(n) for n in ("forkd --autoscale 1:4", "forkd -w 4"))
    if auto and four and four["worst_p99_ms"] and four["mean_uss_mib"]:
        results["p99_ratio_vs_fixed4"] = auto["worst_p99_ms"] / four["worst_p99_ms"]
        results["memory_ratio_vs_fixed4"] = auto["mean_uss_mib"] / four["mean_uss_mib"]
    return results
