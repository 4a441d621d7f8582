"""The sample app's ``/ws/notes`` under forkd with two workers: a client connected to either
worker is told of every write, made through either worker, with SQLite (the shared file's
change log) and with a real redis-server (the invalidation pub/sub)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack

import pytest
from sample_harness import Forkd
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def subscribers_on_both_workers(server: Forkd, stack: ExitStack) -> list[ClientConnection]:
    """Connect until two clients are subscribed on two different workers."""
    by_pid: dict[int, ClientConnection] = {}
    deadline = time.monotonic() + 20
    while len(by_pid) < 2:
        assert time.monotonic() < deadline, server.output()
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{server.port}/ws/notes",
                                         open_timeout=10))
        hello = json.loads(ws.recv(timeout=5))
        assert hello["event"] == "subscribed"
        by_pid.setdefault(hello["pid"], ws)
    return list(by_pid.values())


def test_every_subscriber_hears_of_every_write(run_forkd: Callable[..., Forkd],
                                               store_env: dict[str, str]) -> None:
    server = run_forkd("sample_app.asgi:app", store_env, workers=2)
    with ExitStack() as stack:
        clients = subscribers_on_both_workers(server, stack)
        for n in range(4):  # new connections: the writes land on either worker
            reply = server.request("PUT", f"/items/note{n}", body=f'"v{n}"'.encode())
            assert reply.status == 201, (reply, server.output())
        for ws in clients:
            heard = [json.loads(ws.recv(timeout=5)) for _ in range(4)]
            assert heard == [{"event": "item-changed", "id": f"note{n}"} for n in range(4)]


def test_unknown_websocket_path_is_refused_with_404(run_forkd: Callable[..., Forkd]) -> None:
    server = run_forkd("sample_app.asgi:app", {}, workers=1)
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/ws/elsewhere", open_timeout=10)
    assert refused.value.response.status_code == 404
