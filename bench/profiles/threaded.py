"""CPU per threaded WSGI hello request, in process, every thread counted:

    .venv/bin/python -m bench.profiles.threaded 5000 5   # N requests per batch, batches

As drive.py with `--inline never` (a real ServerState, HttpProtocol, WSGICycle and
WSGIPool; the hello app; a transport that counts), but one request at a time whose answer
the loop awaits as a future resolved by the transport's write: the loop sleeps in epoll
until the pool's thread wakes it, where drive.py runs passes of the loop without end while
the thread works. So the process's CPU time (getrusage: the loop's and the pool's threads)
and, under cachegrind, its instruction count are the threaded path's own, with no spinning
driver whose share moves with the threads' timing: two runs of
`valgrind --tool=cachegrind` at 1,000 and 4,000 requests, differenced, give the
instructions per request within 1% from run to run (bench/profiles/README.md).
"""

from __future__ import annotations

import asyncio
import resource
import sys
from typing import Any

import uvloop

from bench.apps.hello_wsgi import app
from bench.profiles.drive import REQUEST, CountingTransport
from forkd.config import Config
from forkd.http.protocol import ServerState, make_protocol_factory
from forkd.http.wsgi import WSGICycle
from forkd.http.wsgipool import WSGIPool

WARM_UP = 2000


class AwaitedTransport(CountingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)


async def drive(n: int, batches: int) -> None:
    loop = asyncio.get_running_loop()
    config = Config(app="x", wsgi_inline="never")
    state = ServerState(config, loop)
    pool = WSGIPool(loop, config.threads, config.wsgi_inline)
    state.cycle_factory = WSGICycle.bind(app, pool, config.root_path)
    proto: Any = make_protocol_factory(state)()
    transport = AwaitedTransport()
    proto.connection_made(transport)
    request = REQUEST % b"/"

    async def run(count: int) -> None:
        for _ in range(count):
            transport.answered = loop.create_future()
            proto.data_received(request)
            await transport.answered

    await run(WARM_UP)
    per: list[float] = []
    for _ in range(batches):
        before = resource.getrusage(resource.RUSAGE_SELF)
        await run(n)
        after = resource.getrusage(resource.RUSAGE_SELF)
        per.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                   / n * 1e6)
    per.sort()
    print(f"forkd wsgi / threaded: {batches} x {n} requests, CPU per request (all threads) "
          f"min {per[0]:.2f} us, median {per[len(per) // 2]:.2f} us")
    pool.shutdown()


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    batches = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    uvloop.run(drive(n, batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
