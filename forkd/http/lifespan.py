"""The ASGI lifespan protocol: startup once per worker before it counts as ready,
shutdown when it stops."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any

from forkd.http.asgi import ASGI_VERSION

log = logging.getLogger("forkd.lifespan")


class LifespanFailed(Exception):
    """The app answered lifespan.startup.failed or raised during startup."""


class Lifespan:
    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.state: dict[str, Any] = {}
        self.supported = True
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received_startup = False
        self.startup_done: asyncio.Future[str | None] = loop.create_future()
        self.shutdown_done: asyncio.Future[str | None] = loop.create_future()
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Run the app's startup; raise LifespanFailed with its message on failure.
        An app that does not speak lifespan (raises before receiving) is served anyway."""
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        self.task = self.loop.create_task(self._run(scope))
        await self.events.put({"type": "lifespan.startup"})
        error = await self.startup_done
        if error is not None:
            raise LifespanFailed(error)

    async def shutdown(self) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        await self.events.put({"type": "lifespan.shutdown"})
        error = await self.shutdown_done
        if error:
            log.error("lifespan shutdown failed: %s", error)

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the app's code: anything can come out
            if self.startup_done.done() and self.startup_done.result() is None:
                log.error("the app's lifespan task failed after startup", exc_info=exc)
            if not self.received_startup:
                self.supported = False
                log.info("the app does not support the ASGI lifespan protocol (%r)", exc)
                self._settle(self.startup_done, None)
            else:
                text = "".join(traceback.format_exception(exc))
                self._settle(self.startup_done, f"exception in lifespan startup:\n{text}")
                self._settle(self.shutdown_done, f"exception in lifespan:\n{text}")
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        finally:
            self._settle(self.startup_done, None)
            self._settle(self.shutdown_done, None)

    @staticmethod
    def _settle(future: asyncio.Future[str | None], value: str | None) -> None:
        if not future.done():
            future.set_result(value)

    async def _receive(self) -> dict[str, Any]:
        event = await self.events.get()
        if event["type"] == "lifespan.startup":
            self.received_startup = True
        return event

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._settle(self.startup_done, None)
        elif kind == "lifespan.startup.failed":
            self._settle(self.startup_done, message.get("message") or "lifespan startup failed")
        elif kind == "lifespan.shutdown.complete":
            self._settle(self.shutdown_done, None)
        elif kind == "lifespan.shutdown.failed":
            self._settle(self.shutdown_done, message.get("message") or "lifespan shutdown failed")
        else:
            raise RuntimeError(f"unexpected lifespan message type {kind!r}")
