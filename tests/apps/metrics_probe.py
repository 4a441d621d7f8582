"""An ASGI app that keeps its own prometheus_client metrics (the probe of forkd's
multiprocess support). Every request increments `probe_hits_total` and observes
`probe_work_seconds`; PROBE_SERIES=N also registers N more labelled series at start.
/crash exits the worker at once without any clean-up."""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

HITS = Counter("probe_hits", "requests the app saw")
WORK = Histogram("probe_work_seconds", "pretend work")
INFLIGHT = Gauge("probe_inflight", "requests in the app now", multiprocess_mode="livesum")
EXTRA = Counter("probe_extra", "padding series", ["n"])
for _n in range(int(os.environ.get("PROBE_SERIES", "0"))):
    EXTRA.labels(str(_n)).inc(0)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/crash":
        HITS.inc()
        os._exit(1)
    with INFLIGHT.track_inprogress():
        HITS.inc()
        WORK.observe(0.002)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"probe\n"})
