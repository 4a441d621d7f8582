"""Benchmark 1 (issue 3): hello-world throughput and latency, 2 workers per server.

Rounds are interleaved (every server once, then every server again) so that slow drift
in the shared machine's load hits all servers alike; the table reports the median round.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from bench.harness import (
    SERVERS,
    ServerFailed,
    log,
    run_load,
    running,
    server_command,
    wrk_command,
)

ASGI = ["forkd-asgi", "uvicorn", "gunicorn-uvicorn", "granian-asgi"]
WSGI = ["forkd-wsgi", "gunicorn-gthread", "granian-wsgi"]
CEILING = ["nginx"]
CONNECTIONS = 64


def run(quick: bool, only: list[str] | None, rounds: int | None) -> dict[str, Any]:
    seconds = 3 if quick else 10
    n_rounds = rounds or (1 if quick else 2)
    names = [n for n in ASGI + WSGI + CEILING if not only or n in only]
    per_server: dict[str, dict[str, Any]] = {
        n: {"rounds": [], "failed": None, "command": server_command(SERVERS[n])} for n in names
    }
    for rnd in range(n_rounds):
        for name in names:
            entry = per_server[name]
            if entry["failed"]:
                continue
            log(f"throughput round {rnd + 1}/{n_rounds}: {name}")
            try:
                with running(SERVERS[name]) as server:
                    run_load(wrk_command(server.url, CONNECTIONS, 1), 1)  # warm-up, discarded
                    result = run_load(wrk_command(server.url, CONNECTIONS, seconds), seconds)
                    if not server.alive():
                        entry["failed"] = "server exited during the run"
            except ServerFailed as exc:
                entry["failed"] = str(exc)
                log(f"  {name} failed to start")
                continue
            log(f"  {result.rps:.0f} req/s p99 {result.p99_ms} ms errors {result.failures}")
            entry["rounds"].append(asdict(result) | {"failures": result.failures})
    for entry in per_server.values():
        entry["summary"] = summarise(entry["rounds"])
    return {
        "seconds": seconds,
        "rounds": n_rounds,
        "connections": CONNECTIONS,
        "load_command": " ".join(wrk_command("http://127.0.0.1:PORT/", CONNECTIONS, seconds)),
        "servers": per_server,
        "ratios": ratios(per_server),
        "best_peer_p99": {i: best_peer_p99(per_server, i) for i in ("asgi", "wsgi")},
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rounds:
        return None

    def med(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "rps": med("rps"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "errors": sum(r["failures"] for r in rounds),
        "rps_each": [r["rps"] for r in rounds],
    }


# (forkd server, peer, target ratio of req/s or None for "shown only")
RATIO_PAIRS = [
    ("forkd-asgi", "uvicorn", 1.2),
    ("forkd-asgi", "gunicorn-uvicorn", None),
    ("forkd-asgi", "granian-asgi", 1.0),
    ("forkd-wsgi", "gunicorn-gthread", 3.0),
    ("forkd-wsgi", "granian-wsgi", None),
]


def ratios(per_server: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ours, peer, target in RATIO_PAIRS:
        a = (per_server.get(ours) or {}).get("summary")
        b = (per_server.get(peer) or {}).get("summary")
        row: dict[str, Any] = {"forkd": ours, "peer": peer, "target": target}
        if a and b and a["rps"] and b["rps"]:
            row["rps_ratio"] = a["rps"] / b["rps"]
            if a["p99_ms"] is not None and b["p99_ms"] is not None:
                row["p99_ratio"] = a["p99_ms"] / b["p99_ms"]
        rows.append(row)
    return rows


def best_peer_p99(per_server: dict[str, dict[str, Any]], interface: str) -> float | None:
    peers = [n for n in (ASGI if interface == "asgi" else WSGI) if not n.startswith("forkd")]
    values = [
        per_server[n]["summary"]["p99_ms"]
        for n in peers
        if n in per_server and per_server[n].get("summary")
    ]
    return min(values) if values else None
