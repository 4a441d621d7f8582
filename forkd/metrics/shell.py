"""The primary's side of metrics: one object the primary's loop calls at a handful
of points (a worker spawned, a snapshot arrived, a worker exited, a reload ended,
housekeeping, a status request). It owns the pure Aggregator, and with `--metrics`
the exporter thread and the app's multiprocess directory. prometheus_client is
imported only when --metrics is on."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

from forkd.metrics.aggregate import Aggregator, PoolLoad, quantile
from forkd.metrics.listenq import listen_queue
from forkd.metrics.snapshot import Snapshot, SnapshotError, from_wire

PUBLISH_EVERY = 0.5  # seconds between views handed to the exporter thread


def prepare_app_dir(metrics: str | None, name: str, env: MutableMapping[str, str]
                    ) -> tuple[str, bool] | None:
    """With --metrics: the app's PROMETHEUS_MULTIPROC_DIR (made private unless set).
    Call it before the primary imports prometheus_client or the app (--preload)."""
    if not metrics:
        return None
    from forkd.metrics.appmetrics import prepare_dir

    return prepare_dir(env, name)


class PoolMetrics:
    def __init__(self) -> None:
        self.aggregator = Aggregator()
        self.server: Any = None  # an exporter.MetricsServer with --metrics
        self.app: Any = None  # an appmetrics.AppMetrics with --metrics
        self.next_publish = 0.0
        self.bad_snapshots = 0

    def serve(self, address: str, listeners: Sequence[tuple[str, socket.socket]],
              memory_metric: str, app_dir: tuple[str, bool] | None,
              block_signals: Iterable[signal.Signals] = ()) -> str:
        """Bind and start the exporter; returns the address it serves on. Raises
        OSError (address in use, say) or ValueError (an address it cannot serve)."""
        from forkd.config import parse_bind
        from forkd.metrics.appmetrics import AppMetrics
        from forkd.metrics.exporter import MetricsServer, PoolCollector

        if app_dir is not None:
            self.app = AppMetrics(*app_dir)
        collector = PoolCollector(listeners, memory_metric, self.app)
        self.server = MetricsServer(parse_bind(address), collector, tuple(block_signals))
        self.server.start()
        return str(self.server.address)

    # -- events from the loop ---------------------------------------------------------
    def spawned(self, pid: int, slot: int, now: float) -> None:
        self.aggregator.started(pid, slot, now)

    def snapshot(self, pid: int, data: Any, now: float) -> bool:
        """A beat's `metrics` object; False (and counted) when it cannot be read."""
        try:
            snapshot = from_wire(data)
        except SnapshotError:
            self.bad_snapshots += 1
            return False
        self.update(pid, snapshot, now)
        return True

    def update(self, pid: int, snapshot: Snapshot, now: float) -> None:
        self.aggregator.update(pid, snapshot, now)

    def exited(self, pid: int, reason: str | None = None) -> None:
        """A worker is gone (reaped); `reason` as in last_exit when it was replaced
        or removed (None for a stop)."""
        self.aggregator.exited(pid)
        if reason:
            self.aggregator.restarted(reason)
        if self.app is not None:
            self.app.worker_exited(pid)

    def reloaded(self, result: str) -> None:
        self.aggregator.reloaded(result)

    # -- reading ------------------------------------------------------------------------
    def publish(self, workers: Iterable[tuple[int, int, str]], target: int, now: float,
                force: bool = False) -> None:
        """Hand the exporter a fresh view (at most every PUBLISH_EVERY seconds)."""
        if self.server is None or (now < self.next_publish and not force):
            return
        from forkd.metrics.exporter import PoolView, WorkerView

        self.next_publish = now + PUBLISH_EVERY
        agg = self.aggregator
        in_flight, connections, websockets = agg.gauges()
        views = tuple(WorkerView(pid, slot, state, agg.rates(pid).utilization)
                      for pid, slot, state in workers)
        self.server.collector.publish(PoolView(
            target=target, workers=views, totals=agg.totals(), in_flight=in_flight,
            connections=connections, websockets=websockets, cpu_by_slot=agg.cpu_by_slot(),
            restarts=dict(agg.restarts), reloads=dict(agg.reloads)))

    def load(self, ready: list[int], listeners: Iterable[socket.socket]) -> PoolLoad:
        """The numbers autoscaling decides on, read in the primary's loop: `ready` are
        the pids of the ready workers; the accept queues are read now (one getsockopt
        per listener)."""
        agg = self.aggregator
        queued = 0
        for sock in listeners:
            found = listen_queue(sock)
            if found is not None:
                queued += found[0]
        return PoolLoad(utilization=agg.pool_utilization(ready) if ready else None,
                        rps=agg.pool_rps(), in_flight=agg.gauges()[0], listen_queue=queued,
                        ready=len(ready))

    def errors(self) -> list[str]:
        """What the exporter thread could not do since the last call (to log)."""
        return self.server.drain_errors() if self.server is not None else []

    def add_status_fields(self, document: dict[str, Any]) -> None:
        """SPEC's added `forkd status --json` fields, and what `forkd monit` shows."""
        agg = self.aggregator
        ready: list[int] = []
        for row in document.get("workers", []):
            pid = row.get("pid")
            rates = agg.rates(pid) if pid is not None else None
            row["rps"] = _round(rates.rps, 1) if rates else None
            row["utilization"] = _round(rates.utilization, 3) if rates else None
            row["p50_ms"] = _ms(rates.p50) if rates else None
            row["p99_ms"] = _ms(rates.p99) if rates else None
            if pid is not None and row.get("state") == "ready":
                ready.append(pid)
        document["utilization"] = _round(agg.pool_utilization(ready) if ready else None, 3)
        document["rps"] = round(agg.pool_rps(), 1)
        window = agg.pool_window()
        document["p50_ms"] = _ms(quantile(0.5, window))
        document["p99_ms"] = _ms(quantile(0.99, window))
        document["requests_total"] = sum(agg.totals().requests.values())

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.app is not None:
            self.app.close()
            self.app = None

    def hand_over(self) -> None:
        """An upgrade's new primary takes over: free the metrics address for it, and
        leave the app's directory (its files: the app's counters go on) to it."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.app is not None:
            self.app.owned = False


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)

