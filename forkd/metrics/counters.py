"""The worker's request counters: plain ints, a list and a dict, updated by the HTTP
protocol on the request path and read once per heartbeat into a Snapshot.

Cost on the hot path: `begin` and `finish` are a few attribute updates, one
`bisect` over 15 bounds and one dict update per request; with the protocol's
deque and one clock read, about 0.5 us a request (bench/metrics.py hotpath). Nothing here imports
prometheus_client: exposition happens in the primary only."""

from __future__ import annotations

from bisect import bisect_left

from forkd.metrics.snapshot import BOUNDS, Snapshot, method_index


class RequestCounters:
    """Cumulative since the worker started, never reset: a lost heartbeat loses
    nothing, the next snapshot carries the same totals and more."""

    __slots__ = ("answered", "buckets", "duration_sum", "in_flight", "busy", "busy_since",
                 "websockets")

    def __init__(self) -> None:
        self.answered: dict[tuple[bytes, bytes], int] = {}  # (b"GET", b"200") -> count
        self.buckets = [0] * (len(BOUNDS) + 1)  # per bucket, not cumulative; last is +Inf
        self.duration_sum = 0.0
        self.in_flight = 0
        self.busy = 0.0  # seconds with at least one request in flight, closed periods
        self.busy_since = 0.0
        self.websockets = 0  # open WebSockets (the WebSocket protocol keeps it)

    def begin(self, now: float) -> None:
        """A request's head has arrived: it is in flight until `end`."""
        self.in_flight += 1
        if self.in_flight == 1:
            self.busy_since = now

    def end(self, now: float) -> None:
        """A request left the in-flight set (answered, refused, or its client went)."""
        if self.in_flight > 0:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy += now - self.busy_since

    def finish(self, method: bytes, status: bytes, started: float, now: float) -> None:
        """A response was written to its last byte (`status`: its three digits); the
        request leaves the in-flight set. One call on the hot path, so inlined."""
        duration = now - started
        self.duration_sum += duration
        self.buckets[bisect_left(BOUNDS, duration)] += 1
        key = (method, status)
        answered = self.answered
        answered[key] = answered.get(key, 0) + 1
        if self.in_flight > 0:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy += now - self.busy_since

    def record(self, method: bytes, status: bytes, duration: float) -> None:
        """An answer to a request that was never in flight (refused while parsing)."""
        self.duration_sum += duration
        self.buckets[bisect_left(BOUNDS, duration)] += 1
        key = (method, status)
        self.answered[key] = self.answered.get(key, 0) + 1

    def busy_until(self, now: float) -> float:
        """Busy seconds including the running busy period up to `now`."""
        return self.busy + (now - self.busy_since if self.in_flight else 0.0)

    def snapshot(self, now: float, connections: int, cpu: float) -> Snapshot:
        requests: dict[tuple[int, int], int] = {}
        for (method, status), count in self.answered.items():
            try:
                code = int(status)
            except ValueError:
                continue
            key = (method_index(method.decode("ascii", "replace")), code)
            requests[key] = requests.get(key, 0) + count
        return Snapshot(requests=requests, buckets=tuple(self.buckets),
                        duration_sum=self.duration_sum, in_flight=self.in_flight,
                        connections=connections, websockets=self.websockets,
                        busy=self.busy_until(now), cpu=cpu)
