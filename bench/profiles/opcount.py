"""Bytecodes executed per ASGI hello request, by function (and by line with --lines).

    .venv/bin/python -m bench.profiles.opcount                 # forkd
    .venv/bin/python -m bench.profiles.opcount --server floor  # bench/floor.py
    .venv/bin/python -m bench.profiles.opcount --lines 40      # the 40 busiest lines too

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
from types import FrameType
from typing import Any

from bench.profiles.drive import REQUEST, CountingTransport

Key = tuple[str, str, int]


def count(server: str, n: int) -> collections.Counter[Key]:
    counts: collections.Counter[Key] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
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
        if server == "floor":
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
            for _ in range(requests):
                before = transport.writes
                if traced:
                    sys.settrace(tracer)
                proto.data_received(request)
                await asyncio.sleep(0)
                while transport.writes == before:
                    await asyncio.sleep(0)
                if traced:
                    sys.settrace(None)

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
    args = parser.parse_args()
    counts = count(args.server, args.n)
    functions: collections.Counter[tuple[str, str]] = collections.Counter()
    for (filename, name, _), value in counts.items():
        functions[filename, name] += value
    print(f"{args.server}: {sum(counts.values()) / args.n:.0f} bytecodes per request "
          "(the driver's run() and sleep() included)")
    for (filename, name), value in functions.most_common(25):
        print(f"{value / args.n:8.1f}  {name}  ({filename.rsplit('/', 1)[-1]})")
    if args.lines:
        print()
        for (filename, _, line), value in counts.most_common(args.lines):
            text = linecache.getline(filename, line).strip()
            print(f"{value / args.n:8.1f}  {filename.rsplit('/', 1)[-1]}:{line}  {text[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
