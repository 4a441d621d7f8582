"""The primary's view of the pool's metrics, pure (no I/O, `now` passed in).

Each live worker's latest snapshot is kept by pid. When a worker exits, its last
snapshot (the final one it sent on a clean exit, else its last heartbeat's) is
folded into the retired totals, so every counter of the pool — requests, the
latency histogram, CPU seconds per slot, restarts, reloads — only ever grows while
the primary lives. Rates (req/s, utilisation, p50/p99) come from the difference
between a worker's recent snapshots."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from forkd.metrics.snapshot import BOUNDS, EMPTY, METHODS, Snapshot

HISTORY = 6  # snapshots kept per worker (about 5 s of heartbeats) for rates
RESTART_REASONS = ("crashed", "killed", "memory", "timeout", "max-requests", "reload",
                   "scale", "autoscale")
RELOAD_RESULTS = ("done", "aborted")


@dataclass
class Totals:
    """Counters summed over the pool (live and exited workers)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (method, code)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    duration_sum: float = 0.0

    def add(self, snapshot: Snapshot) -> None:
        for (method, code), count in snapshot.requests.items():
            key = (METHODS[method], code)
            self.requests[key] = self.requests.get(key, 0) + count
        for index, count in enumerate(snapshot.buckets):
            self.buckets[index] += count
        self.duration_sum += snapshot.duration_sum

    def copy(self) -> Totals:
        return Totals(dict(self.requests), list(self.buckets), self.duration_sum)

    @property
    def count(self) -> int:
        return sum(self.buckets)


@dataclass(frozen=True)
class Rates:
    """One worker over its recent past (None where there is no interval yet)."""

    rps: float | None
    utilization: float | None
    p50: float | None  # seconds
    p99: float | None


NO_RATES = Rates(None, None, None, None)


@dataclass(frozen=True)
class PoolLoad:
    """The pool's load as autoscaling reads it (see PoolMetrics.load)."""

    utilization: float | None  # busy/wall over the last interval, averaged over ready workers
    rps: float  # requests per second, whole pool, last interval
    in_flight: int  # requests being served now (as of the last heartbeats)
    listen_queue: int  # connections waiting in the TCP listeners' accept queues, summed
    ready: int  # ready workers the utilisation is averaged over


@dataclass
class _Live:
    slot: int
    latest: Snapshot
    history: deque[tuple[float, Snapshot]]


def quantile(q: float, buckets: list[int] | tuple[int, ...]) -> float | None:
    """The q-quantile of a (non-cumulative) histogram over BOUNDS, interpolated
    linearly inside its bucket as Prometheus's histogram_quantile does."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == len(BOUNDS):  # +Inf: the best we can say is "above the top"
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            upper = BOUNDS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


class Aggregator:
    def __init__(self) -> None:
        self.live: dict[int, _Live] = {}
        self.retired = Totals()
        self.retired_cpu: dict[int, float] = {}  # slot -> CPU seconds of its past occupants
        self.restarts: dict[str, int] = dict.fromkeys(RESTART_REASONS, 0)
        self.reloads: dict[str, int] = dict.fromkeys(RELOAD_RESULTS, 0)

    # -- events ----------------------------------------------------------------------
    def started(self, pid: int, slot: int, now: float) -> None:
        self.live[pid] = _Live(slot, EMPTY, deque([(now, EMPTY)], maxlen=HISTORY))

    def update(self, pid: int, snapshot: Snapshot, now: float) -> None:
        """A heartbeat's (or the final) snapshot of a live worker."""
        live = self.live.get(pid)
        if live is None:
            return  # not ours (already exited): its totals were folded in once
        live.latest = snapshot
        live.history.append((now, snapshot))

    def exited(self, pid: int) -> None:
        """Fold the worker's last known counts into the retired totals."""
        live = self.live.pop(pid, None)
        if live is None:
            return
        self.retired.add(live.latest)
        self.retired_cpu[live.slot] = self.retired_cpu.get(live.slot, 0.0) + live.latest.cpu

    def restarted(self, reason: str) -> None:
        """A worker was replaced or removed; `reason` as in last_exit (`crashed: exit 1`)."""
        kind = reason.split(":", 1)[0].strip()
        if kind in self.restarts:
            self.restarts[kind] += 1

    def reloaded(self, result: str) -> None:
        if result in self.reloads:
            self.reloads[result] += 1

    # -- reading ------------------------------------------------------------------------
    def totals(self) -> Totals:
        totals = self.retired.copy()
        for live in self.live.values():
            totals.add(live.latest)
        return totals

    def cpu_by_slot(self) -> dict[int, float]:
        cpu = dict(self.retired_cpu)
        for live in self.live.values():
            cpu[live.slot] = cpu.get(live.slot, 0.0) + live.latest.cpu
        return cpu

    def gauges(self) -> tuple[int, int, int]:
        """(requests in flight, connections, websockets) over the live workers."""
        in_flight = connections = websockets = 0
        for live in self.live.values():
            in_flight += live.latest.in_flight
            connections += live.latest.connections
            websockets += live.latest.websockets
        return in_flight, connections, websockets

    def slot_of(self, pid: int) -> int | None:
        live = self.live.get(pid)
        return live.slot if live is not None else None

    def rates(self, pid: int) -> Rates:
        """req/s and utilisation over the last heartbeat interval; p50/p99 over the
        whole kept history (a few seconds), which holds enough requests to mean much."""
        live = self.live.get(pid)
        if live is None or len(live.history) < 2:
            return NO_RATES
        (_, first), (t1, before), (t2, last) = (live.history[0], live.history[-2],
                                                  live.history[-1])
        span = t2 - t1
        if span <= 0:
            return NO_RATES
        rps = max(0, last.answered - before.answered) / span
        utilization = min(1.0, max(0.0, (last.busy - before.busy) / span))
        delta = [max(0, b - a) for a, b in zip(first.buckets, last.buckets, strict=True)]
        return Rates(rps, utilization, quantile(0.5, delta), quantile(0.99, delta))

    def pool_utilization(self, pids: list[int] | None = None) -> float | None:
        """Utilisation averaged over the given workers (default: every live one)."""
        values = [rate.utilization for rate in map(self.rates, pids or list(self.live))
                  if rate.utilization is not None]
        return sum(values) / len(values) if values else None

    def pool_window(self) -> list[int]:
        """The pool's latency histogram over the kept history (for pool p50/p99)."""
        total = [0] * (len(BOUNDS) + 1)
        for live in self.live.values():
            if len(live.history) >= 2:
                first, last = live.history[0][1], live.history[-1][1]
                for index, (a, b) in enumerate(zip(first.buckets, last.buckets, strict=True)):
                    total[index] += max(0, b - a)
        return total

    def pool_rps(self) -> float:
        return sum(rate.rps or 0.0 for rate in map(self.rates, list(self.live)))
