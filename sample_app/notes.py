"""Item-change notes: what ``/ws/notes`` pushes to WebSocket clients.

Each worker fans the changes it learns of out to its own subscribers through a `ChangeHub`.
How a worker learns of a change is the store's business, and it is the mechanism the store
already has for keeping every worker's cache right:

- Redis: the invalidation message every write publishes reaches every subscribed worker on
  every host; the listener that drops the item from the LRU also tells the hub.
- SQLite: a trigger appends each write to a short change log in the same file (the same
  statement's transaction, so no write is missed); while a worker has subscribers it reads
  the log's new rows every `POLL_S`. Only this host's workers share the file.

A subscriber that falls `QUEUE_MAX` notes behind is told to reconnect (close 1013) rather
than letting its queue grow without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("sample_app")

QUEUE_MAX = 1000
POLL_S = 0.2
LAGGING = ""  # the queue's last entry when a subscriber fell too far behind


def note(item_id: str) -> str:
    """The text frame sent for one changed item."""
    return json.dumps({"event": "item-changed", "id": item_id})


class ChangeHub:
    """One per worker. `subscribe` before telling a client it is subscribed: from then on
    every change this worker learns of is queued for it."""

    def __init__(self, poll: Callable[[int | None], Awaitable[tuple[list[str], int]]] | None
                 = None) -> None:
        # poll(last) -> (item ids changed after `last`, the new last); None: changes are
        # published to the hub by someone else (the Redis listener)
        self._poll = poll
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._poller: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_MAX)
        if self._poll is not None and (self._poller is None or self._poller.done()):
            _, last = await self._poll(None)  # start from now: the log's newest row
            self._poller = asyncio.create_task(self._run_poller(last), name="sample_app-notes")
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and self._poller is not None:
            self._poller.cancel()
            self._poller = None

    def publish(self, item_id: str) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() >= QUEUE_MAX - 1:
                if queue.qsize() == QUEUE_MAX - 1:
                    queue.put_nowait(LAGGING)
                continue
            queue.put_nowait(item_id)

    async def aclose(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        self._subscribers.clear()

    async def _run_poller(self, last: int) -> None:
        assert self._poll is not None
        while True:  # until unsubscribe cancels it
            await asyncio.sleep(POLL_S)
            try:
                changed, last = await self._poll(last)
            except Exception:  # the store is down for a moment: the next poll catches up
                log.warning("reading the item change log failed", exc_info=True)
                continue
            for item_id in changed:
                self.publish(item_id)
