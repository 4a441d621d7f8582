"""Fixtures of the HTTP server tests: `serve` starts a forkd for a whole test module
(the server's state between tests is part of what is tested: the same worker must
survive every hostile request)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from httpkit import Served

from support import Forkd


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Served]]:
    """serve(APP, *options, env=None, workers=1) -> Served; stopped after the module."""
    started: list[Forkd] = []

    def start(app: str, *options: str, env: dict[str, str] | None = None,
              workers: int = 1, wrap: list[str] | None = None) -> Served:
        base = tmp_path_factory.mktemp("forkd")
        home = base / "home"
        home.mkdir(mode=0o700)
        markers = base / "markers"
        markers.mkdir()
        proc = Forkd([app, "-b", "127.0.0.1:0", "-w", str(workers), "--graceful-timeout", "3",
                      *options], home, base / "forkd.log",
                     env={"HTTP_PROBE_MARKERS": str(markers), **(env or {})}, wrap=wrap)
        started.append(proc)
        port = proc.port()
        proc.wait_ready(workers)
        return Served(proc, port, markers)

    yield start
    for proc in started:
        proc.stop()
