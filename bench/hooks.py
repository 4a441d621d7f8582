"""Benchmark 4 (hooks for the lead's later figures; optional in `bench/run all`).

`memory`: a leaking app under load, 2 workers, a per-worker memory limit: forkd
`--max-memory` against granian `--workers-max-rss` (the one peer with such a limit).
Counted: failures seen by wrk, workers replaced, time with fewer than 2 ready workers.
Skipped (and said so) while `forkd start --help` does not offer --max-memory.

`primary-cpu`: CPU used by the primary process alone while it supervises 2, 16 and 64 idle
workers, against gunicorn (uvicorn worker) and uvicorn --workers, in the same run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    HOST,
    REPO,
    SERVERS,
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
from bench.watch import WorkerWatch, time_below

LEAKY_APP = "bench.apps.leaky_asgi:app"
MEMORY_LIMIT_MIB = 100
# Bytes kept per request: at this machine's rates a worker grows about 12 MB/s and
# crosses the limit every 6-8 s, so a 90 s run gives about twenty recycles, while the
# two 1 s samples forkd takes before replacing stay under the 1.5x hard ceiling (at
# 384 bytes, 25-30 MB/s, some workers reached it and were killed, not drained).
LEAK_BYTES = 192
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z "
                    r".*event=(worker-replacing|worker-replaced) slot=(\d+)")


def forkd_replacement_ms(log_text: str) -> list[float]:
    """From a forkd log: per memory replacement, the ms from the decision to replace
    (the second sample over the limit) to the replacement being ready and taking over."""
    started: dict[str, datetime] = {}
    spans: list[float] = []
    for line in log_text.splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        when = datetime.fromisoformat(match.group(1))
        kind, slot = match.group(2), match.group(3)
        if kind == "worker-replacing":
            started[slot] = when
        elif slot in started:
            spans.append((when - started.pop(slot)).total_seconds() * 1000)
    return spans


def forkd_has_option(option: str) -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "forkd", "start", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return option in help_text


def _forkd_leaky(port: int, workers: int, tmp: Path) -> list[str]:
    return [
        sys.executable, "-m", "forkd", "start", LEAKY_APP, "-b", f"{HOST}:{port}",
        "-w", str(workers), "--interface", "asgi", "--name", "bench",
        "--max-memory", f"{MEMORY_LIMIT_MIB}M",
    ]  # fmt: skip


def _granian_leaky(port: int, workers: int, tmp: Path) -> list[str]:
    return [
        venv_bin("granian"), "--interface", "asgi", "--host", HOST, "--port", str(port),
        "--workers", str(workers), "--log-level", "warning",
        # Granian samples RSS every 30 s by default: 1 s (its minimum) for a fair race.
        "--workers-max-rss", str(MEMORY_LIMIT_MIB), "--rss-sample-interval", "1", LEAKY_APP,
    ]  # fmt: skip


LEAKY = [
    ServerSpec("forkd-asgi --max-memory", "asgi", _forkd_leaky, is_forkd=True),
    ServerSpec("granian-asgi --workers-max-rss", "asgi", _granian_leaky),
]


def memory_recycle(quick: bool) -> dict[str, Any]:
    seconds = 8 if quick else 90
    os.environ["BENCH_LEAK_BYTES"] = str(LEAK_BYTES)  # the servers inherit it
    if not forkd_has_option("--max-memory"):
        return {"skipped": "forkd start has no --max-memory yet"}
    out: dict[str, Any] = {"seconds": seconds, "limit_mib": MEMORY_LIMIT_MIB,
                           "leak_bytes": LEAK_BYTES, "servers": {}}
    for spec in LEAKY:
        log(f"hooks/memory: {spec.name}")
        try:
            with running(spec, 2) as server, WorkerWatch(server) as watch:
                argv = wrk_command(server.url, 32, seconds)
                load = start_load(argv)
                try:
                    result = finish_load(load, argv, seconds)
                finally:
                    kill_load(load)
                watch.poll()
                spans = forkd_replacement_ms(server.log_path.read_text(errors="replace")
                                             ) if spec.is_forkd else []
                below, none = time_below(watch.intervals(), 2, load.started, load.started + seconds)
                out["servers"][spec.name] = {
                    "command": server_command(spec),
                    "load": asdict(result) | {"failures": result.failures},
                    "workers_replaced": len(watch.lives) - 2,
                    "seconds_below_n": below,
                    "seconds_none_ready": none,
                    "replace_to_ready_ms": spans,
                }
        except ServerFailed as exc:
            out["servers"][spec.name] = {"failed": str(exc)}
    return out


def primary_cpu(quick: bool, counts: tuple[int, ...] = (2, 16, 64)) -> dict[str, Any]:
    seconds = 3 if quick else 10
    names = ["forkd-asgi", "gunicorn-uvicorn", "uvicorn"]
    rows: dict[str, dict[str, Any]] = {n: {} for n in names}
    for count in counts:
        for name in names:
            log(f"hooks/primary-cpu: {name} x {count}")
            try:
                with running(SERVERS[name], count, timeout=30 + 1.5 * count) as server:
                    primary = psutil.Process(server.pid)
                    time.sleep(1)  # let start-up work settle before measuring
                    before = primary.cpu_times()
                    t0 = time.monotonic()
                    time.sleep(seconds)
                    after = primary.cpu_times()
                    elapsed = time.monotonic() - t0
                    used = (after.user - before.user) + (after.system - before.system)
                    rows[name][str(count)] = 100.0 * used / elapsed
            except (ServerFailed, psutil.Error) as exc:
                rows[name][str(count)] = None
                log(f"  failed: {str(exc).splitlines()[0]}")
    return {"seconds": seconds, "counts": list(counts), "percent_of_one_core": rows}


def markdown(memory: dict[str, Any], cpu: dict[str, Any]) -> str:
    lines = []
    if "skipped" in memory:
        lines.append(f"Memory recycle: skipped ({memory['skipped']}).")
    else:
        lines += [
            f"Memory recycle: app `{LEAKY_APP}` (keeps {memory.get('leak_bytes', 128)} bytes "
            "per request), 2 workers, "
            f"limit {memory['limit_mib']} MiB per worker, `wrk -t1 -c32 -d{memory['seconds']}s`.",
            "",
            "| server | failures (socket + non-2xx) | req/s | workers replaced | "
            "failures per replacement | s < 2 ready |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in memory["servers"].items():
            if "failed" in e:
                lines.append(f"| {name} | did not start | | | | |")
                continue
            replaced = e["workers_replaced"]
            per = f"{e['load']['failures'] / replaced:.1f}" if replaced else "–"
            lines.append(
                f"| {name} | {e['load']['failures']} | {e['load']['rps']:,.0f} | "
                f"{replaced} | {per} | {e['seconds_below_n']:.2f} |"
            )
        for name, e in memory["servers"].items():
            spans = sorted(e.get("replace_to_ready_ms") or [])
            if spans:
                lines += ["", f"{name}: from the decision to replace (the second sample over "
                          f"the limit, so at most 1 s after the crossing) to the replacement "
                          f"ready and taking over: median {spans[len(spans) // 2]:.0f} ms, "
                          f"max {spans[-1]:.0f} ms over {len(spans)} replacements."]
        lines += ["", *(f"    {n}: {e.get('command', '')}" for n, e in memory["servers"].items())]
        lines += [
            "",
            "Both sample memory once a second (granian: `--rss-sample-interval 1`; its default "
            "is 30 s). The leak is per request, so the faster server leaks faster and is "
            "replaced more often: compare failures per replacement. With a much faster leak "
            "(384 bytes per request, 25-30 MB/s per worker) forkd's second over-limit sample "
            "sometimes exceeded its hard limit (1.5x) and that worker was SIGKILLed instead of "
            "drained, failing the requests it held.",
        ]
    counts = cpu["counts"]
    lines += [
        "",
        f"Primary CPU while supervising idle workers (% of one core, over {cpu['seconds']} s, "
        "psutil cpu_times of the primary process only; the servers are started with the "
        "throughput commands above, `-w N` / `--workers N`):",
        "",
        "| server | " + " | ".join(f"{c} workers" for c in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for name, per in cpu["percent_of_one_core"].items():
        cells = ["–" if per.get(str(c)) is None else f"{per[str(c)]:.2f}%" for c in counts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool) -> dict[str, Any]:
    memory = memory_recycle(quick)
    cpu = primary_cpu(quick, (2, 16) if quick else (2, 16, 64))
    return {"memory": memory, "primary_cpu": cpu, "markdown": markdown(memory, cpu)}
