"""The server's own CPU per pipelined request, without sockets or a load generator.

One HttpProtocol is driven in-process on a uvloop loop: each batch is DEPTH requests
(wrk's pipeline.lua shape) handed to data_received in one read, and the batch is done
when every response has reached the fake transport. CPU time of this process divided by
the requests served is the figure: the protocol, the cycle, the app, and nothing of the
kernel's or a client's, so it is far steadier on a shared machine than req/s.

    python -m bench.pipeprof asgi             # CPU µs per request, pipelined 16 deep
    python -m bench.pipeprof wsgi --depth 1   # one request per read (the hello shape)
    python -m bench.pipeprof asgi --profile bench/profiles/pipelined-asgi.txt
    python -m bench.pipeprof asgi --server floor   # bench/floor.py's protocol instead

The transport counts write() calls too: the number of writes (so of send() system calls
on a real socket) per request is printed with the CPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from forkd.config import Config
from forkd.http.protocol import HttpProtocol, ServerState

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends, byte for byte
MARK = b"Hello, world!"


class FakeTransport:
    """What HttpProtocol uses of a transport; it keeps nothing but counts."""

    def __init__(self) -> None:
        self.writes = 0
        self.responses = 0
        self.done: asyncio.Future[None] | None = None
        self.want = 0
        self.pauses = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.responses += data.count(MARK)
        if self.responses >= self.want and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise AssertionError("the connection was closed")

    def close(self) -> None:
        raise AssertionError("the connection was closed")

    def abort(self) -> None:
        raise AssertionError("the connection was aborted")


def _client(sock: socket.socket, batch: bytes, depth: int, n: int) -> None:
    """A blocking client on its own thread: send a batch, read until all its answers came."""
    seen = 0
    for _ in range(n):
        sock.sendall(batch)
        want = seen + depth
        while seen < want:
            seen += sock.recv(1 << 20).count(MARK)


async def _timed(run: Callable[[int], Awaitable[None]], batches: int,
                 profile: cProfile.Profile | None, cpu_clock: Callable[[], float]
                 ) -> tuple[float, float]:
    """CPU seconds (by `cpu_clock`) and wall seconds of `run(batches)`, profiled if asked."""
    if profile is not None:
        profile.enable()
    cpu0, wall0 = cpu_clock(), time.perf_counter()
    await run(batches)
    cpu, wall = cpu_clock() - cpu0, time.perf_counter() - wall0
    if profile is not None:
        profile.disable()
    return cpu, wall


async def _drive_socket(proto: Any, depth: int, batches: int,
                        profile: cProfile.Profile | None) -> dict[str, float]:
    """Over a real socket pair (uvloop's transport, so send() system calls count); the
    CPU figure is the loop thread's own, the client runs on another thread."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(lambda: proto, ours)
    batch = REQUEST * depth

    async def run(n: int) -> None:
        thread = threading.Thread(target=_client, args=(theirs, batch, depth, n))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.002)

    await run(max(200, 2000 // depth))  # warm-up
    cpu, wall = await _timed(run, batches, profile, time.thread_time)
    transport.abort()
    theirs.close()
    requests = batches * depth
    return {"requests": requests, "cpu_us_per_request": cpu / requests * 1e6,
            "wall_us_per_request": wall / requests * 1e6, "writes_per_request": float("nan"),
            "read_pauses_per_request": float("nan")}


async def _drive(interface: str, depth: int, batches: int, profile: cProfile.Profile | None,
                 real_socket: bool = False, inline: bool = False,
                 server: str = "forkd") -> dict[str, float]:
    loop = asyncio.get_running_loop()
    if server == "floor":  # bench/floor.py (WSGI: every call on the loop's thread)
        from bench import floor

        if interface == "asgi":
            from bench.apps.hello_asgi import app as floor_app
        else:
            from bench.apps.hello_wsgi import app as floor_app
        gc.freeze()
        proto: Any = (floor.ASGIProtocol if interface == "asgi" else floor.WSGIProtocol)(
            floor_app, loop)
        return await _run(proto, loop, depth, batches, profile, real_socket, None)
    config = Config(app="bench", interface=interface)
    state = ServerState(config, loop)
    pool = None
    if interface == "asgi":
        from bench.apps.hello_asgi import app
        from forkd.http.asgi import ASGICycle

        factory: Any = ASGICycle.bind(app, {}, "")
    else:
        from bench.apps.hello_wsgi import app as wsgi_app
        from forkd.http.wsgi import WSGICycle
        from forkd.http.wsgipool import WSGIPool

        # (--inline: every call on the loop's thread, as `auto` does for a route it learnt
        # is quick; under profilers or a loaded machine `auto` may keep it on the threads)
        pool = WSGIPool(loop, config.threads, "always" if inline else config.wsgi_inline)

        def factory(proto: Any, method: str, target: bytes, headers: Any, version: str,
                    keep_alive: bool) -> Any:
            return WSGICycle(wsgi_app, pool, "", proto, method, target, headers, version,
                             keep_alive)
    state.cycle_factory = factory
    gc.freeze()  # as the worker does once the app is loaded
    return await _run(HttpProtocol(state), loop, depth, batches, profile, real_socket, pool)


async def _run(proto: Any, loop: asyncio.AbstractEventLoop, depth: int, batches: int,
               profile: cProfile.Profile | None, real_socket: bool, pool: Any
               ) -> dict[str, float]:
    if real_socket:
        return await _drive_socket(proto, depth, batches, profile)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    batch = REQUEST * depth

    async def run(n: int) -> None:
        for _ in range(n):
            transport.want = transport.responses + depth
            transport.done = loop.create_future()
            proto.data_received(batch)
            await transport.done

    await run(max(200, 2000 // depth))  # warm-up: WSGI routes learn to run inline
    writes0, pauses0 = transport.writes, transport.pauses
    cpu, wall = await _timed(run, batches, profile, time.process_time)
    if pool is not None:
        pool.shutdown()
    requests = batches * depth
    return {
        "requests": requests,
        "cpu_us_per_request": cpu / requests * 1e6,
        "wall_us_per_request": wall / requests * 1e6,
        "writes_per_request": (transport.writes - writes0) / requests,
        "read_pauses_per_request": (transport.pauses - pauses0) / requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("interface", choices=["asgi", "wsgi"])
    parser.add_argument("--depth", type=int, default=16, help="requests per read (16)")
    parser.add_argument("--batches", type=int, default=4000, help="reads measured (4000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is shown (5)")
    parser.add_argument("--socket", action="store_true",
                        help="a real socket pair and a client thread: send() counts too")
    parser.add_argument("--inline", action="store_true",
                        help="WSGI: run every call inline (--wsgi-inline always)")
    parser.add_argument("--server", choices=["forkd", "floor"], default="forkd",
                        help="floor: bench/floor.py's protocol (the pure-Python floor)")
    parser.add_argument("--profile", help="write cProfile's cumulative and tottime tables here")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        profile = cProfile.Profile() if args.profile else None
        loop = uvloop.new_event_loop()
        try:
            results.append(loop.run_until_complete(
                _drive(args.interface, args.depth, args.batches, profile, args.socket,
                       args.inline, args.server)))
        finally:
            loop.close()
        if profile is not None and args.profile:
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
            with open(args.profile, "w") as fh:
                fh.write(f"# python -m bench.pipeprof {args.interface} --depth {args.depth} "
                         f"--batches {args.batches} --repeat 1"
                         f"{' --inline' if args.inline else ''} --profile {args.profile}\n")
                fh.write(out.getvalue())
            break
    cpus = sorted(r["cpu_us_per_request"] for r in results)
    best = min(results, key=lambda r: r["cpu_us_per_request"])
    print(f"{args.interface} depth {args.depth}: CPU {best['cpu_us_per_request']:.2f} µs/request "
          f"(best of {len(results)}; all: {', '.join(f'{c:.2f}' for c in cpus)}), "
          f"{best['writes_per_request']:.3f} writes/request, "
          f"{best['read_pauses_per_request']:.3f} read pauses/request")


if __name__ == "__main__":
    main()
