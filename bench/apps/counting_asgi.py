"""The ASGI hello app, counting the requests each worker process served: at its
lifespan shutdown (a graceful exit: a recycle, a reload, a stop) a worker writes
its count to `$BENCH_MARKER_DIR/count-PID`. One integer increment per request."""

from typing import Any

from bench.apps import hello_asgi
from bench.apps._lifespan import lifespan
from bench.apps._marker import mark_loaded

served = 0


def _write_count() -> None:
    import os

    marker_dir = os.environ.get("BENCH_MARKER_DIR")
    if not marker_dir:
        return
    path = os.path.join(marker_dir, f"count-{os.getpid()}")
    with open(path + ".tmp", "w") as f:
        f.write(str(served))
    os.replace(path + ".tmp", path)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global served
    if scope["type"] == "http":
        served += 1
        await hello_asgi.app(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send, on_shutdown=_write_count)


mark_loaded()
