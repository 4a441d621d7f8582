"""Benchmark 5 (issue 18): WebSocket echo and HTTPS hello, 2 workers per server.

- WebSocket echo: `bench/wsload.py` with 64 connections, each sending a 16-byte text
  message and waiting for its echo (ping-pong), against forkd, uvicorn (`--ws websockets`)
  and granian. No compression is offered by the client, so none is negotiated.
- HTTPS hello: `wrk -t1 -c64` over TLS (keep-alive: steady-state encryption, not
  handshakes) against forkd, uvicorn and gunicorn (ASGI and gthread WSGI), all with one
  ECDSA P-256 certificate made for the run by `openssl req`.

Two interleaved rounds (one with --quick), the median shown; read ratios, never absolutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import (
    BENCH,
    HOST,
    SERVERS,
    ServerFailed,
    ServerSpec,
    log,
    run_load,
    running,
    server_command,
    wrk_command,
)

CONNECTIONS = 64
PAYLOAD = 16
CERT_DIR = Path(tempfile.gettempdir()) / "forkd-bench-tls"
CERT = CERT_DIR / "cert.pem"
KEY = CERT_DIR / "key.pem"


def _with(base: str, *extra: str) -> Any:
    build = SERVERS[base].argv

    def argv(port: int, workers: int, tmp: Path) -> list[str]:
        words = build(port, workers, tmp)
        if base.startswith("gunicorn") or base.startswith("granian"):
            return words[:-1] + list(extra) + words[-1:]  # the app stays last
        return words + list(extra)

    return argv


WS_SERVERS = [
    ServerSpec("forkd-asgi", "asgi", SERVERS["forkd-asgi"].argv, is_forkd=True),
    ServerSpec("uvicorn-websockets", "asgi", _with("uvicorn", "--ws", "websockets"),
               note="--ws websockets"),
    ServerSpec("granian-asgi", "asgi", SERVERS["granian-asgi"].argv),
]
TLS_SERVERS = [
    ServerSpec("forkd-asgi-tls", "asgi",
               _with("forkd-asgi", "--certfile", str(CERT), "--keyfile", str(KEY)),
               is_forkd=True),
    ServerSpec("uvicorn-tls", "asgi",
               _with("uvicorn", "--ssl-certfile", str(CERT), "--ssl-keyfile", str(KEY))),
    ServerSpec("gunicorn-uvicorn-tls", "asgi",
               _with("gunicorn-uvicorn", "--certfile", str(CERT), "--keyfile", str(KEY))),
    ServerSpec("forkd-wsgi-tls", "wsgi",
               _with("forkd-wsgi", "--certfile", str(CERT), "--keyfile", str(KEY)),
               is_forkd=True),
    ServerSpec("gunicorn-gthread-tls", "wsgi",
               _with("gunicorn-gthread", "--certfile", str(CERT), "--keyfile", str(KEY))),
]
RATIO_PAIRS = [
    ("websocket", "forkd-asgi", "uvicorn-websockets", 1.0),
    ("websocket", "forkd-asgi", "granian-asgi", 1.0),
    ("https", "forkd-asgi-tls", "uvicorn-tls", 1.0),
    ("https", "forkd-asgi-tls", "gunicorn-uvicorn-tls", 1.0),
    ("https", "forkd-wsgi-tls", "gunicorn-gthread-tls", 1.0),
]


def make_certificate() -> None:
    CERT_DIR.mkdir(exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(KEY), "-out", str(CERT), "-days", "2", "-subj",
         f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
        check=True, capture_output=True, timeout=30)


def ws_load(port: int, seconds: int) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "wsload.py"), HOST, str(port), "/ws",
            str(CONNECTIONS), str(seconds), str(PAYLOAD)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          start_new_session=True)
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    return dict(json.loads(done.stdout))


def run(quick: bool, only: list[str] | None, rounds: int | None = None) -> dict[str, Any]:
    harness.http_ok = _http_or_https_ok  # the TLS servers' readiness probe speaks HTTPS
    try:
        return _run(quick, only, rounds)
    finally:
        harness.http_ok = _plain_ok


def _run(quick: bool, only: list[str] | None, rounds: int | None) -> dict[str, Any]:
    seconds = 3 if quick else 5
    n_rounds = rounds or (1 if quick else 2)
    make_certificate()
    specs = [(spec, "websocket") for spec in WS_SERVERS] + [(s, "https") for s in TLS_SERVERS]
    specs = [(spec, kind) for spec, kind in specs if not only or spec.name in only]
    servers: dict[str, dict[str, Any]] = {
        spec.name: {"command": server_command(spec), "kind": kind, "rounds": []}
        for spec, kind in specs}
    # rounds interleaved (every server once, then again) so drift in the shared
    # machine's load hits every server alike; the table shows the median round
    for rnd in range(n_rounds):
        for spec, kind in specs:
            entry = servers[spec.name]
            if entry.get("failed"):
                continue
            log(f"{kind} round {rnd + 1}/{n_rounds}: {spec.name}")
            try:
                with running(spec, timeout=30) as server:
                    if kind == "websocket":
                        ws_load(server.port, 1)  # warm-up, discarded
                        result = ws_load(server.port, seconds)
                    else:
                        url = f"https://{HOST}:{server.port}/"
                        run_load(wrk_command(url, CONNECTIONS, 1), 1)
                        load = run_load(wrk_command(url, CONNECTIONS, seconds), seconds)
                        result = asdict(load) | {"failures": load.failures,
                                                 "errors": load.failures}
            except ServerFailed as exc:
                entry["failed"] = str(exc)
                continue
            if result.get("failed"):
                entry["failed"] = result["failed"]
                continue
            rate = result.get("rate") or result.get("rps")
            log(f"  {rate:.0f}/s p99 {result.get('p99_ms')} ms errors {result.get('errors')}")
            entry["rounds"].append(result)
    for entry in servers.values():
        if entry["rounds"]:
            ordered = sorted(entry["rounds"], key=lambda r: r.get("rate") or r.get("rps") or 0)
            entry["result"] = ordered[(len(ordered) - 1) // 2]  # the median (lower) round
    return {"seconds": seconds, "rounds": n_rounds, "connections": CONNECTIONS,
            "payload_bytes": PAYLOAD, "servers": servers, "ratios": ratios(servers)}


def _rate(entry: dict[str, Any] | None) -> float | None:
    result = (entry or {}).get("result") or {}
    return result.get("rate") or result.get("rps")


def ratios(servers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind, ours, peer, target in RATIO_PAIRS:
        a, b = _rate(servers.get(ours)), _rate(servers.get(peer))
        rows.append({"kind": kind, "forkd": ours, "peer": peer, "target": target,
                     "ratio": a / b if a and b else None})
    return rows


_plain_ok = harness.http_ok


def _http_or_https_ok(url: str, timeout: float = 1.0) -> bool:
    if _plain_ok(url, timeout):
        return True
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url.replace("http://", "https://"), timeout=timeout,
                                    context=context) as response:
            return bool(response.status == 200)
    except OSError:
        return False
