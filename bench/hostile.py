"""Hostile load: each attack against a fresh server (2 workers) on loopback, while a
legitimate client probes `GET /` ten times a second. Per attack and server: the workers'
peak RSS (the largest worker), their CPU seconds during the attack, and the probe's
answered/total and p99. The attacker runs in its own process, bounded in time.

Attacks (`SECONDS` each):
- endless-header: 8 connections send `X-Endless: aaaa...` at full speed
- header-behind-response: 4 connections ask for a 3 s response, then an endless header
- pipeline-no-read: 20 connections pipeline `GET /` bursts and never read
- slow-bodies: 32 connections POST a 200 KB body at one byte per half second
- slowloris: 200 connections send one header line a second, never ending the head
- idle-flood: 3,000 connections that send nothing
- header-flood: 16 connections loop requests of 90 headers of 8 KB each
- chunk-abuse: 2 connections loop POSTs of 100,000 one-byte chunks
"""

from __future__ import annotations

import multiprocessing
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from bench import harness

SECONDS = 4.0
ASGI = "bench.apps.hostile_asgi:app"
WSGI = "bench.apps.hostile_wsgi:app"
HOST = harness.HOST


def _servers() -> list[harness.ServerSpec]:
    def uvicorn(port: int, workers: int, tmp: Any) -> list[str]:
        return [harness.venv_bin("uvicorn"), ASGI, "--host", HOST, "--port", str(port),
                "--workers", str(workers), "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning"]

    return [
        harness.ServerSpec("forkd-asgi", "asgi", harness._forkd(ASGI, "asgi"), is_forkd=True),
        harness.ServerSpec("uvicorn", "asgi", uvicorn),
        harness.ServerSpec("forkd-wsgi", "wsgi", harness._forkd(WSGI, "wsgi"), is_forkd=True),
        harness.ServerSpec("gunicorn-gthread", "wsgi",
                           harness._gunicorn("gthread", WSGI, ["--threads", "8"]),
                           note="--threads 8 (forkd's default pool)"),
    ]


# ------------------------------------------------------------------------------ attacks
def _connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection((HOST, port), timeout=2)
    except OSError:
        return None


def _pump(socks: list[socket.socket], block: bytes, until: float) -> None:
    """Write `block` to every socket as fast as each takes it; never read."""
    for sock in socks:
        sock.setblocking(False)
    live = list(socks)
    while live and time.monotonic() < until:
        _, writable, _ = select.select([], live, [], 0.05)
        for sock in writable:
            try:
                sock.send(block)
            except BlockingIOError:
                pass
            except OSError:
                live.remove(sock)


def endless_header(port: int, until: float) -> None:
    while time.monotonic() < until:  # a cut connection is replaced
        socks = [s for s in (_connect(port) for _ in range(8)) if s]
        for sock in socks:
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
            except OSError:
                pass
        _pump(socks, b"a" * 65536, min(until, time.monotonic() + 1.0))
        for sock in socks:
            sock.close()


def header_behind_response(port: int, until: float) -> None:
    socks = [s for s in (_connect(port) for _ in range(4)) if s]
    for sock in socks:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n"
                     b"X-Endless: ")
    _pump(socks, b"a" * 65536, until)


def pipeline_no_read(port: int, until: float) -> None:
    socks = [s for s in (_connect(port) for _ in range(20)) if s]
    _pump(socks, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 9000, until)


def slow_bodies(port: int, until: float) -> None:
    socks = [s for s in (_connect(port) for _ in range(32)) if s]
    for sock in socks:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n")
    _drip(socks, b"x", 0.5, until)


def slowloris(port: int, until: float) -> None:
    socks = [s for s in (_connect(port) for _ in range(200)) if s]
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    _drip(socks, b"X-a: b\r\n", 1.0, until)


def _drip(socks: list[socket.socket], data: bytes, every: float, until: float) -> None:
    while time.monotonic() < until:
        for sock in socks:
            try:
                sock.send(data)
            except OSError:
                pass
        time.sleep(every)


def idle_flood(port: int, until: float) -> None:
    socks = []
    while time.monotonic() < until and len(socks) < 3000:
        sock = _connect(port)
        if sock is None:
            break
        socks.append(sock)
    time.sleep(max(0.0, until - time.monotonic()))


ANSWERED: Any = None  # the attacker's answered requests (a shared counter), where it loops


def _loop_requests(port: int, request: bytes, until: float, count: int) -> None:
    def one() -> None:
        while time.monotonic() < until:
            sock = _connect(port)
            if sock is None:
                time.sleep(0.05)
                continue
            try:
                sock.settimeout(max(0.1, until - time.monotonic()))
                sock.sendall(request)
                if sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    with ANSWERED.get_lock():
                        ANSWERED.value += 1
            except OSError:
                pass
            finally:
                sock.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()) + 2)


def header_flood(port: int, until: float) -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (n, b"h" * 8000) for n in range(90))
    _loop_requests(port, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n", until, 16)


def chunk_abuse(port: int, until: float) -> None:
    body = b"1\r\nz\r\n" * 100_000 + b"0\r\n\r\n"
    _loop_requests(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + body, until, 2)


ATTACKS: dict[str, Callable[[int, float], None]] = {
    "endless-header": endless_header,
    "header-behind-response": header_behind_response,
    "pipeline-no-read": pipeline_no_read,
    "slow-bodies": slow_bodies,
    "slowloris": slowloris,
    "idle-flood": idle_flood,
    "header-flood": header_flood,
    "chunk-abuse": chunk_abuse,
}


# ------------------------------------------------------------------------------ measuring
def _probe(port: int, stop: threading.Event, latencies: list[float | None]) -> None:
    while not stop.wait(0.1):
        started = time.monotonic()
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.settimeout(2)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while b"Hello, world!" not in data:
                    more = sock.recv(4096)
                    if not more:
                        break
                    data += more
            ok = data.startswith(b"HTTP/1.1 200") and b"Hello, world!" in data
            latencies.append(time.monotonic() - started if ok else None)
        except OSError:
            latencies.append(None)


def _attack_entry(name: str, port: int, until: float, answered: Any) -> None:
    import resource

    global ANSWERED
    ANSWERED = answered
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ATTACKS[name](port, until)


def measure(spec: harness.ServerSpec, attack: str) -> dict[str, Any]:
    with harness.running(spec, workers=2) as server:
        workers = [psutil.Process(pid) for pid in server.worker_pids()]
        cpu0 = sum(sum(w.cpu_times()[:2]) for w in workers)
        peak = max(w.memory_info().rss for w in workers)
        base = peak
        stop = threading.Event()
        latencies: list[float | None] = []
        prober = threading.Thread(target=_probe, args=(server.port, stop, latencies))
        prober.start()
        until = time.monotonic() + SECONDS
        context = multiprocessing.get_context("fork")
        answered_attacks = context.Value("i", 0)
        child = context.Process(target=_attack_entry,
                                args=(attack, server.port, until, answered_attacks), daemon=True)
        child.start()
        while time.monotonic() < until:
            for worker in workers:
                try:
                    peak = max(peak, worker.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.1)
        child.join(5)
        if child.is_alive():
            child.kill()  # (by its pid: the attacker is ours)
            child.join(2)
        stop.set()
        prober.join(5)
        cpu = 0.0
        for worker in workers:
            try:
                cpu += sum(worker.cpu_times()[:2])
            except psutil.Error:
                pass
        answered = sorted(x for x in latencies if x is not None)
        p99 = answered[min(len(answered) - 1, int(len(answered) * 0.99))] if answered else None
        return {"peak_rss": peak, "base_rss": base, "cpu": cpu - cpu0,
                "answered": len(answered), "probes": len(latencies),
                "attacks_answered": answered_attacks.value,
                "p99_ms": None if p99 is None else p99 * 1000,
                "command": harness.server_command(spec)}


def run(quick: bool, only: list[str] | None) -> dict[str, Any]:
    specs = [s for s in _servers() if not only or s.name in only]
    results: dict[str, dict[str, Any]] = {}
    for attack in ATTACKS:
        for spec in specs:
            harness.log(f"{attack} vs {spec.name}")
            try:
                results.setdefault(attack, {})[spec.name] = measure(spec, attack)
            except harness.ServerFailed as exc:
                results.setdefault(attack, {})[spec.name] = {"failed": str(exc)}
    return {"seconds": SECONDS, "results": results, "markdown": render(results)}


def render(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for attack, servers in results.items():
        for name, entry in servers.items():
            if "failed" in entry:
                rows.append(f"| {attack} | {name} | did not start | | | | |")
                continue
            p99 = "–" if entry["p99_ms"] is None else f"{entry['p99_ms']:.0f}"
            rows.append(f"| {attack} | {name} | {entry['peak_rss'] / 2**20:.0f} "
                        f"(+{(entry['peak_rss'] - entry['base_rss']) / 2**20:.0f}) | "
                        f"{entry['cpu']:.2f} | {entry['answered']}/{entry['probes']} | {p99} | "
                        f"{entry.get('attacks_answered') or '–'} |")
    return (f"Each attack runs {SECONDS:g} s against a fresh server (2 workers) while a probe "
            "asks `GET /` every 100 ms (2 s timeout). On a shared, loaded 2-core machine: "
            "compare servers within a row group only.\n\n"
            "The last column counts the attacker's own requests answered 200 where it loops "
            "(header-flood, chunk-abuse): CPU seconds compare per request there.\n\n"
            "| attack | server | worker peak RSS MB (growth) | workers' CPU s | probes "
            "answered | probe p99 ms | attack requests answered |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    harness.ensure_venv()
    data = run(False, sys.argv[1].split(",") if len(sys.argv) > 1 else None)
    print(data["markdown"])
