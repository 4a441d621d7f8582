"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop event loop (the workers'), the current one while the test runs; it runs
    only when the test runs it. Each test ends what it started: a task still pending at
    the end is a leak (a worker's graceful stop would wait for it), cancelled only so the
    loop closes cleanly, and fails the test."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    asyncio.set_event_loop(None)
    assert not pending, f"tasks left pending: {pending}"
