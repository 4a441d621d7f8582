from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import Forkd

pytest_plugins = ["pytester"]  # (tests of this harness run a pytest inside the test)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep the call phase's report on the item: a fixture's teardown asks whether the
    test failed."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


@pytest.fixture
def forkd_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def run_forkd(tmp_path: Path, forkd_home: Path,
              request: pytest.FixtureRequest) -> Iterator[Callable[..., Forkd]]:
    """Start `forkd start ARGS...`; everything started is torn down afterwards. With
    FORKD_TEST_SHOW_LOGS=1 a failing test's report carries the output of each forkd it
    started (pytest prints it under "Captured stdout teardown")."""
    started: list[Forkd] = []

    def start(*args: str, **kwargs: object) -> Forkd:
        log_path = tmp_path / f"forkd-{len(started)}.log"
        proc = Forkd(list(args), forkd_home, log_path, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    if os.environ.get("FORKD_TEST_SHOW_LOGS") and failed(request):
        for proc in started:  # (stopped first: the output is complete, the last lines too)
            print(f"--- forkd {' '.join(proc.args)} (pid {proc.pid}) ---\n{proc.output()}")
