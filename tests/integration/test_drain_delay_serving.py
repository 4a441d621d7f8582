"""--drain-delay for real: after SIGTERM the host goes on serving new connections (its
health path, when set, answers 503) for the delay, then drains and exits 0."""

from __future__ import annotations

import signal
import time

import pytest

from forkd.config import OPTION_NAMES
from support import request, wait_until

pytestmark = pytest.mark.integration
HEALTH = "health_path" in OPTION_NAMES


@pytest.mark.timeout(60)
def test_sigterm_keeps_serving_through_the_delay_then_drains(run_forkd) -> None:
    args = ["testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--drain-delay", "1.5"]
    if HEALTH:
        args += ["--health-path", "/healthz"]
    proc = run_forkd(*args)
    port = proc.port()
    proc.wait_ready(2)
    if HEALTH:
        assert request(port, path="/healthz")[0] == 200
    proc.signal(signal.SIGTERM)
    signaled = time.monotonic()
    wait_until(lambda: "event=stopping" in proc.output(), 5, message=proc.describe)
    assert "drain_delay=1.5s" in proc.output()
    # new connections during the delay are served by the app
    served = 0
    while time.monotonic() - signaled < 1.2:
        status, _, body = request(port)
        assert (status, body) == (200, b"Hello, world!"), proc.describe()
        served += 1
        if HEALTH:
            assert request(port, path="/healthz")[0] == 503
    assert served > 0
    assert proc.wait(20) == 0, proc.describe()
    assert time.monotonic() - signaled >= 1.5
    out = proc.output()
    assert out.index("event=drain-delay-over") < out.index("event=stopped code=0")
