from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import Forkd


@pytest.fixture
def forkd_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def run_forkd(tmp_path: Path, forkd_home: Path) -> Iterator[Callable[..., Forkd]]:
    """Start `forkd start ARGS...`; everything started is torn down afterwards and
    its output is attached to a failing test's report."""
    started: list[Forkd] = []

    def start(*args: str, **kwargs: object) -> Forkd:
        log_path = tmp_path / f"forkd-{len(started)}.log"
        proc = Forkd(list(args), forkd_home, log_path, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    if os.environ.get("FORKD_TEST_SHOW_LOGS"):
        for proc in started:
            print(proc.output())
