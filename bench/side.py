"""Side by side: a few server variants, rounds alternating, with the workers' CPU per request.

    .venv/bin/python -m bench.side --path io --seconds 5 --rounds 3 \\
        'forkd=forkd-wsgi' 'forkd-t64=forkd-wsgi --threads 64' 'granian=granian-wsgi'

Each variant is NAME=SERVER[@DIR] [extra args...]: a server of bench/harness.py (`bench/run
--list`) with extra arguments appended to its command line; @DIR runs forkd from the forkd/
in DIR (`git archive main forkd | tar -x -C DIR`), to compare with an older version.
Reported per variant: req/s and p99 (median of the rounds) and the CPU its worker
processes used per request (user + system, in µs, median of the rounds): on a shared
machine the CPU per request moves far less with the load other people put on it than
req/s does, so it is the figure to compare code changes with.
Nothing is written to bench/results/: this is a tool for trying changes out.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from dataclasses import replace
from typing import Any

import psutil

from bench.harness import (
    SERVERS,
    ServerSpec,
    compile_forkd,
    ensure_venv,
    log,
    run_load,
    running,
    wrk_command,
)


def _variant(text: str) -> tuple[str, ServerSpec]:
    name, _, rest = text.partition("=")
    words = shlex.split(rest)
    server, _, source = words[0].partition("@") if words else ("", "", "")
    if server not in SERVERS:
        raise SystemExit(f"{text!r}: want NAME=SERVER[@DIR] [args], SERVER one of "
                         f"{', '.join(SERVERS)}")
    base = SERVERS[server]
    extra = words[1:]

    def argv(port: int, workers: int, tmp: Any) -> list[str]:
        command = [*base.argv(port, workers, tmp), *extra]
        if source and base.is_forkd:  # forkd imported from DIR (e.g. an older forkd/)
            run = (f"import runpy, sys; sys.path.insert(0, {source!r}); "
                   "runpy.run_module('forkd', run_name='__main__', alter_sys=True)")
            command[1:3] = ["-c", run]  # in place of `-m forkd`
        return command

    return name, replace(base, name=name, argv=argv)


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=SERVER [ARGS]")
    parser.add_argument("--path", default="", help="URL path after / (e.g. io)")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    ensure_venv()
    compile_forkd()
    variants = [_variant(v) for v in args.variants]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    for rnd in range(args.rounds):
        for name, spec in variants:
            with running(spec, workers=args.workers) as server:
                url = server.url + args.path
                run_load(wrk_command(url, args.connections, 1), 1)  # warm-up
                pids = server.worker_pids()
                before = _cpu(pids)
                result = run_load(wrk_command(url, args.connections, args.seconds), args.seconds)
                used = _cpu(pids) - before
            us = used / result.requests * 1e6 if result.requests else float("nan")
            log(f"round {rnd + 1} {name}: {result.rps:,.0f} req/s p99 {result.p99_ms} ms "
                f"cpu {us:.1f} us/req errors {result.failures}")
            rows[name].append({"rps": result.rps, "p99": result.p99_ms or 0.0, "us": us})
    print(f"{'variant':24} {'req/s':>9} {'min..max':>17} {'p99 ms':>7} {'cpu us/req':>10}")
    for name, got in rows.items():
        rps = [r["rps"] for r in got]
        print(f"{name:24} {statistics.median(rps):9,.0f} {min(rps):8,.0f}..{max(rps):<8,.0f} "
              f"{statistics.median(r['p99'] for r in got):7.2f} "
              f"{statistics.median(r['us'] for r in got):10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
