"""In-process driver: one worker's HTTP protocol and WSGI (or ASGI) path, no sockets.

    .venv/bin/python -m bench.profiles.drive wsgi 200000          # CPU us per request
    .venv/bin/python -m bench.profiles.drive wsgi 100000 --profile out.prof
    .venv/bin/python -m bench.profiles.drive asgi 100000 --server uvicorn

A real ServerState and HttpProtocol (as a worker makes them) get GET requests as wrk sends
them through a transport that only counts what is written; the app is bench/apps' hello.
The figure is the CPU time of the whole loop per request: forkd's own Python, without
the kernel's socket work, so it moves only with forkd's code (and the machine's speed).

`--server uvicorn` (ASGI only) drives uvicorn's httptools protocol instead, configured as
bench/harness.py starts uvicorn (`--http httptools --no-access-log`, so its default
proxy-headers middleware too, and the date and server headers its main loop keeps), with
the same transport, requests and app: the same measurement for both servers. uvicorn is
no dependency of forkd: `pip install uvicorn` into the venv that runs this.
`--server floor` drives bench/floor.py's protocol (ASGI, or WSGI with every call on the
loop's thread, as the floor runs the hello route): the thinnest pure-Python server on the
same libraries, the ceiling of any pure-Python design.
`--server null` answers each request with fixed bytes from data_received: what the
driver itself costs per request, to subtract from the others.

Each request is handed over, then the loop runs at least one pass (a real worker gets
each read from a pass of the loop too), more until the response was written.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import time
from typing import Any

from forkd import log
from forkd.config import Config
from forkd.http import accesslog
from forkd.http.protocol import ServerState, make_protocol_factory
from forkd.logs.pipes import RecordWriter

BATCH = 5000
WARM_UP = 2000
REQUEST = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


class CountingTransport:
    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return False
    def close(self) -> None: ...
    def get_write_buffer_size(self) -> int:
        return 0


class NullProtocol(asyncio.Protocol):
    """--server null: every read answered at once with the same bytes, no parsing."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n"
                b"\r\nHello, world!")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.RESPONSE)


def uvicorn_protocol(loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
    """uvicorn's httptools protocol as `uvicorn --http httptools --no-access-log` makes it."""
    from email.utils import formatdate

    from uvicorn.config import Config as UvicornConfig
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState as UvicornState

    from bench.apps.hello_asgi import app as asgi_app

    config = UvicornConfig(app=asgi_app, http="httptools", loop="uvloop", access_log=False,
                           log_level="warning")
    config.load()
    state = UvicornState()
    # what uvicorn's Server.on_tick keeps there (once a second)
    state.default_headers = ([(b"date", formatdate(usegmt=True).encode("latin-1"))]
                             + config.encoded_headers)
    return HttpToolsProtocol(config, state, {}, loop)


async def drive(interface: str, n: int, path: bytes, profile: str | None,
                threads: int, inline: str, access_log: str | None = None,
                server: str = "forkd") -> None:
    loop = asyncio.get_running_loop()
    if access_log:  # as a worker logs: JSON records batched by a RecordWriter (to /dev/null)
        writer = RecordWriter(os.open(os.devnull, os.O_WRONLY), render=accesslog.render)
        writer.attach_loop(loop)
        # batches full by size, as under load, not by a timer that a slowed-down run
        # (valgrind) would fire every few requests
        writer.DELAY = 3600.0
        log.setup(slot=0, json_sink=writer, access_sink=writer.defer,
                  access_text=access_log == "text")
    proto: Any
    if server == "floor":
        if access_log:
            raise SystemExit("--server floor logs nothing: no --access-log")
        from bench import floor

        if interface == "asgi":
            from bench.apps.hello_asgi import app as asgi_app

            proto = floor.ASGIProtocol(asgi_app, loop)
        else:
            from bench.apps.hello_wsgi import app

            proto = floor.WSGIProtocol(app, loop)
    elif server != "forkd":
        if interface != "asgi" or access_log:
            raise SystemExit("--server uvicorn and null are for asgi, without --access-log")
        proto = uvicorn_protocol(loop) if server == "uvicorn" else NullProtocol()
    elif interface == "wsgi":
        from bench.apps.hello_wsgi import app
        from forkd.http.wsgi import WSGICycle
        from forkd.http.wsgipool import WSGIPool

        config = Config(app="x", threads=threads, wsgi_inline=inline,
                        access_log=bool(access_log))
        state = ServerState(config, loop)
        pool = WSGIPool(loop, config.threads, config.wsgi_inline)
        state.cycle_factory = WSGICycle.bind(app, pool, config.root_path)
    else:
        from bench.apps.hello_asgi import app as asgi_app
        from forkd.http.asgi import ASGICycle

        config = Config(app="x", access_log=bool(access_log))
        state = ServerState(config, loop)
        state.cycle_factory = ASGICycle.bind(asgi_app, {}, config.root_path)
        from forkd.http.websocket import make_upgrade_factory  # (as a worker has it)

        state.upgrade_factory = make_upgrade_factory(asgi_app, {}, config.root_path)
    if server == "forkd":
        proto = make_protocol_factory(state)()
    transport = CountingTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    request = REQUEST % path

    async def run(count: int) -> None:
        for _ in range(count):
            before = transport.writes
            proto.data_received(request)
            await asyncio.sleep(0)  # (one pass: a worker's reads come from one each)
            passes = 0
            while transport.writes == before:  # answered on a thread, or by a task
                passes += 1
                if passes > 100_000:
                    raise SystemExit("no answer: the server failed (see its log above)")
                await asyncio.sleep(0)

    await run(WARM_UP)  # warm-up: the WSGI route is learnt quick and runs inline after this
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        await run(n)
        prof.disable()
        prof.dump_stats(profile)
        return
    # in batches: on a shared machine the least CPU a batch took is the figure that other
    # people's load disturbs least (it only ever adds: cache misses, preemption)
    per: list[float] = []
    batch = min(n, BATCH)
    for _ in range(max(1, n // batch)):
        cpu = time.process_time()
        await run(batch)
        per.append((time.process_time() - cpu) / batch * 1e6)
    per.sort()
    print(f"{server} {interface} {path.decode()}: {len(per)} x {batch} requests, CPU per request "
          f"min {per[0]:.2f} us, median {per[len(per) // 2]:.2f} us; "
          f"{transport.written // transport.writes} bytes per response")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("interface", choices=["wsgi", "asgi"])
    parser.add_argument("n", type=int, nargs="?", default=100_000)
    parser.add_argument("--path", default="/")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--inline", default="auto", help="--wsgi-inline (never: on threads)")
    parser.add_argument("--profile", default=None, help="write cProfile stats here")
    parser.add_argument("--access-log", choices=["json", "text"], default=None,
                        help="with --access-log, in this --log-format")
    parser.add_argument("--server", choices=["forkd", "floor", "uvicorn", "null"],
                        default="forkd", help="whose protocol is driven (uvicorn, null: asgi "
                        "only; floor: bench/floor.py; null: the driver alone)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(drive(args.interface, args.n, args.path.encode(), args.profile, args.threads,
                     args.inline, args.access_log, args.server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
