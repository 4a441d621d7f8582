"""--drain-delay for real: after SIGTERM the host goes on serving new connections while
its --health-path answers 503, for the delay; then it drains and exits 0."""

from __future__ import annotations

import signal
import time

import pytest

from support import request, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_sigterm_keeps_serving_through_the_delay_then_drains(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--drain-delay", "1.5",
                     "--health-path", "/healthz")
    port = proc.port()
    proc.wait_ready(2)
    status, _, body = request(port, path="/healthz")
    assert (status, body) == (200, b"ready\n")
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
        status, _, body = request(port, path="/healthz")
        assert (status, body) == (503, b"draining\n"), proc.describe()
    assert served > 0
    assert proc.wait(20) == 0, proc.describe()
    assert time.monotonic() - signaled >= 1.5
    out = proc.output()
    assert out.index("event=drain-delay-over") < out.index("event=stopped code=0")
