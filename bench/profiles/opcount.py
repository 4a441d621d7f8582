"""Bytecodes executed per ASGI hello request, by function (and by line with --lines).

    .venv/bin/python -m bench.profiles.opcount                 # forkd
    .venv/bin/python -m bench.profiles.opcount --server floor  # bench/floor.py
    .venv/bin/python -m bench.profiles.opcount --lines 40      # the 40 busiest lines too
    .venv/bin/python -m bench.profiles.opcount --wsgi never     # WSGI, each call threaded

`--wsgi MODE` counts a WSGI hello request instead, with `--wsgi-inline MODE` (`never`: every
call on a pool thread, whose bytecodes are counted too, so that the loop's and the
thread's parts of a threaded request add up; `auto`: the route is learnt quick in the
warm-up and runs inline).

The same requests, app and counting transport as drive.py; after a warm-up, N requests
run under a tracer that counts every bytecode the interpreter executes (f_trace_opcodes).
Instruction counts (cachegrind, drive.py) say how much a request costs; this says which
Python lines execute the most bytecodes for it, which is where a pure-Python server's
cost mostly is (about 20 machine instructions per bytecode, before any C work it calls).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import linecache
import sys
import threading
from types import FrameType
from typing import Any

from bench.profiles.drive import REQUEST, CountingTransport

Key = tuple[str, str, int]


def count(server: str, n: int, wsgi: str | None = None) -> collections.Counter[Key]:
    counts: collections.Counter[Key] = collections.Counter()
    tracing = False  # (the pool's threads trace from their start, and count while set)

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and tracing:
            code = frame.f_code
            counts[code.co_filename, code.co_name, frame.f_lineno or 0] += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    async def main() -> None:
        loop = asyncio.get_running_loop()
        from bench.apps.hello_asgi import app

        proto: Any
        if wsgi is not None:
            from bench.apps.hello_wsgi import app as wsgi_app
            from forkd.config import Config
            from forkd.http.protocol import ServerState, make_protocol_factory
            from forkd.http.wsgi import WSGICycle
            from forkd.http.wsgipool import WSGIPool

            config = Config(app="x", wsgi_inline=wsgi)
            state = ServerState(config, loop)
            pool = WSGIPool(loop, config.threads, config.wsgi_inline)
            state.cycle_factory = WSGICycle.bind(wsgi_app, pool, config.root_path)
            proto = make_protocol_factory(state)()
            threading.settrace(tracer)  # (before the pool's first thread starts)
        elif server == "floor":
            from bench import floor

            proto = floor.ASGIProtocol(app, loop)
        else:
            from forkd.config import Config
            from forkd.http.asgi import ASGICycle
            from forkd.http.protocol import ServerState, make_protocol_factory
            from forkd.http.websocket import make_upgrade_factory

            config = Config(app="x")
            state = ServerState(config, loop)
            state.cycle_factory = ASGICycle.bind(app, {}, config.root_path)
            state.upgrade_factory = make_upgrade_factory(app, {}, config.root_path)
            proto = make_protocol_factory(state)()
        transport = CountingTransport()
        proto.connection_made(transport)
        request = REQUEST % b"/"

        async def run(requests: int, traced: bool) -> None:
            nonlocal tracing
            for _ in range(requests):
                before = transport.writes
                if traced:
                    tracing = True
                    sys.settrace(tracer)
                proto.data_received(request)
                await asyncio.sleep(0)
                while transport.writes == before:  # (a threaded call: many passes)
                    await asyncio.sleep(0)
                if traced:
                    sys.settrace(None)
                    tracing = False

        await run(2000, False)
        await run(n, True)

    import uvloop

    uvloop.run(main())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=["forkd", "floor"], default="forkd")
    parser.add_argument("-n", type=int, default=100, help="requests counted")
    parser.add_argument("--lines", type=int, default=0, help="also the N busiest lines")
    parser.add_argument("--top", type=int, default=25, help="the N busiest functions")
    parser.add_argument("--wsgi", choices=["never", "auto"], default=None,
                        help="a WSGI request instead, with this --wsgi-inline")
    args = parser.parse_args()
    counts = count(args.server, args.n, args.wsgi)
    functions: collections.Counter[tuple[str, str]] = collections.Counter()
    for (filename, name, _), value in counts.items():
        functions[filename, name] += value
    # (the driver's passes: one per request inline, many while a thread runs the call)
    driver = sum(value for (filename, name), value in functions.items()
                 if filename == __file__ or name in ("sleep", "__sleep0", "wrapper"))
    print(f"{args.server}: {sum(counts.values()) / args.n:.0f} bytecodes per request "
          f"(the driver's run() and sleep() included), "
          f"{(sum(counts.values()) - driver) / args.n:.0f} without them")
    for (filename, name), value in functions.most_common(args.top):
        print(f"{value / args.n:8.1f}  {name}  ({filename.rsplit('/', 1)[-1]})")
    if args.lines:
        print()
        for (filename, _, line), value in counts.most_common(args.lines):
            text = linecache.getline(filename, line).strip()
            print(f"{value / args.n:8.1f}  {filename.rsplit('/', 1)[-1]}:{line}  {text[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
