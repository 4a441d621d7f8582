"""--health-path: answered by forkd itself, never by the app.

200 `ready` while the worker serves; 503 `draining` once it drains, or as soon as the
primary raises the shared `HealthFlag` (during --drain-delay, before the worker itself
is told to drain, so that a load balancer takes the host out first)."""

from __future__ import annotations

import mmap


class HealthFlag:
    """One byte of anonymous shared memory. The primary makes it before its first fork;
    every worker then sees the same page, so raising it reaches all of them at once
    without a message. Reading it is one memory load."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: survives fork shared

    def fail(self) -> None:
        self.page[0] = 1

    def clear(self) -> None:
        self.page[0] = 0

    @property
    def failing(self) -> bool:
        return self.page[0] != 0


READY = b"ready\n"
DRAINING = b"draining\n"
