"""The lifespan protocol as the benchmark's ASGI apps answer it: startup and shutdown
complete, so that no server logs a lifespan failure or skips its startup."""

from collections.abc import Awaitable, Callable
from typing import Any


async def lifespan(receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]],
                   on_shutdown: Callable[[], None] | None = None) -> None:
    """Answer lifespan messages until shutdown (`on_shutdown` runs before it completes)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
