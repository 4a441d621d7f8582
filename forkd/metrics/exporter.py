"""`--metrics ADDR`: the primary serves /metrics for the whole pool.

Why a thread: a scrape renders every worker's series and reads the app's
multiprocess files (milliseconds to tens of milliseconds with 64 workers), and a
scraper may be slow or stall mid-request. None of that may hold up the primary's
loop, which reaps, heartbeats and reloads. So a small socketserver thread answers
scrapes, and the loop only publishes, about once a second, an immutable PoolView
(one reference swap) and queues the pids of exited workers. The thread never
touches the loop's objects; it blocks the primary's signals so they keep going to
the loop's wakeup fd; it never writes to stdio or logging (a fork taken while it
held such a lock would leave it held in the child): its errors go back through
a queue that the loop drains and logs.

The exposition format is prometheus_client's (text or OpenMetrics, by Accept)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import socketserver
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from forkd.config import Bind
from forkd.metrics.aggregate import RELOAD_RESULTS, RESTART_REASONS, Totals
from forkd.metrics.appmetrics import AppMetrics
from forkd.metrics.listenq import listen_queue
from forkd.metrics.snapshot import BOUNDS
from forkd.monitor import Monitor

STATES = ("starting", "ready", "draining")
REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request


@dataclass(frozen=True)
class WorkerView:
    pid: int
    slot: int
    state: str
    utilization: float | None


@dataclass(frozen=True)
class PoolView:
    """What the primary's loop publishes for the exporter thread; never mutated."""

    target: int = 0
    workers: tuple[WorkerView, ...] = ()
    totals: Totals = field(default_factory=Totals)
    in_flight: int = 0
    connections: int = 0
    websockets: int = 0
    cpu_by_slot: dict[int, float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)


class PoolCollector:
    """A prometheus_client custom collector over the latest PoolView."""

    def __init__(self, listeners: Sequence[tuple[str, socket.socket]], memory_metric: str,
                 app: AppMetrics | None) -> None:
        self.view = PoolView()
        self.listeners = list(listeners)
        self.memory_metrics = ("rss",) if memory_metric == "rss" else ("rss", memory_metric)
        self.monitor = Monitor(memory_metric)  # this thread's own: psutil at scrape time
        self.app = app

    def publish(self, view: PoolView) -> None:
        self.view = view  # one reference swap: atomic for the reading thread

    def collect(self) -> Iterable[Metric]:
        view = self.view
        yield from self._pool(view)
        yield from self._http(view.totals, view)
        yield from self._workers(view)
        yield from self._listeners()
        if self.app is not None:
            yield from self.app.collect()

    def _pool(self, view: PoolView) -> Iterable[Metric]:
        states = GaugeMetricFamily("forkd_workers", "Workers in each state", labels=["state"])
        for state in STATES:
            states.add_metric([state], sum(1 for w in view.workers if w.state == state))
        yield states
        yield GaugeMetricFamily("forkd_workers_target", "The worker count forkd aims at",
                                value=view.target)
        restarts = CounterMetricFamily("forkd_worker_restarts_total",
                                       "Workers replaced or removed, by cause",
                                       labels=["reason"])
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], view.restarts.get(reason, 0))
        yield restarts
        reloads = CounterMetricFamily("forkd_reloads_total", "Rolling reloads, by result",
                                      labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], view.reloads.get(result, 0))
        yield reloads

    def _http(self, totals: Totals, view: PoolView) -> Iterable[Metric]:
        requests = CounterMetricFamily("forkd_http_requests_total", "Requests answered",
                                       labels=["method", "code"])
        for (method, code), count in sorted(totals.requests.items()):
            requests.add_metric([method, str(code)], count)
        yield requests
        cumulative = 0
        buckets = []
        for bound, count in zip((*BOUNDS, float("inf")), totals.buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            "forkd_http_request_duration_seconds",
            "Time from the request's head to its last byte written",
            buckets=buckets, sum_value=totals.duration_sum)
        yield GaugeMetricFamily("forkd_http_requests_in_flight", "Requests being served now",
                                value=view.in_flight)
        yield GaugeMetricFamily("forkd_http_connections", "Open client connections",
                                value=view.connections)
        yield GaugeMetricFamily("forkd_websockets", "Open WebSocket connections",
                                value=view.websockets)

    def _workers(self, view: PoolView) -> Iterable[Metric]:
        memory = GaugeMetricFamily("forkd_worker_memory_bytes", "Per-worker memory",
                                   labels=["slot", "metric"])
        samples = self.monitor.sample([w.pid for w in view.workers], cpu=False)
        by_slot: dict[tuple[int, str], int] = {}
        for worker in view.workers:
            sample = samples.get(worker.pid)
            if sample is None:
                continue
            # a slot holds two processes while one replaces the other: their sum
            for metric, value in zip(self.memory_metrics, (sample.rss, sample.memory),
                                     strict=False):
                key = (worker.slot, metric)
                by_slot[key] = by_slot.get(key, 0) + value
        for (slot, metric), value in sorted(by_slot.items()):
            memory.add_metric([str(slot), metric], value)
        yield memory
        cpu = CounterMetricFamily("forkd_worker_cpu_seconds_total", "Per-worker CPU time",
                                  labels=["slot"])
        for slot, seconds in sorted(view.cpu_by_slot.items()):
            cpu.add_metric([str(slot)], seconds)
        yield cpu
        utilization = GaugeMetricFamily(
            "forkd_worker_utilization",
            "Fraction of the last interval the worker spent serving requests",
            labels=["slot"])
        chosen: dict[int, WorkerView] = {}
        for worker in view.workers:  # per slot, the serving one: ready over the others
            if worker.utilization is None:
                continue
            held = chosen.get(worker.slot)
            if held is None or (worker.state == "ready" and held.state != "ready"):
                chosen[worker.slot] = worker
        for slot, worker in sorted(chosen.items()):
            utilization.add_metric([str(slot)], worker.utilization or 0.0)
        yield utilization

    def _listeners(self) -> Iterable[Metric]:
        waiting = GaugeMetricFamily("forkd_listen_queue",
                                    "Connections waiting in the accept queue",
                                    labels=["listener"])
        limit = GaugeMetricFamily("forkd_listen_queue_max",
                                  "The accept queue's limit (the listen backlog)",
                                  labels=["listener"])
        for address, sock in self.listeners:
            queue_now = listen_queue(sock)
            if queue_now is not None:
                waiting.add_metric([address], queue_now[0])
                limit.add_metric([address], queue_now[1])
        yield waiting
        yield limit


class _Handler(BaseHTTPRequestHandler):
    server: Any
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"
    server_version = "forkd"

    def do_GET(self) -> None:  # noqa: N802 (the http.server convention)
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._answer(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception as exc:  # answered and reported, never raised into the thread
            self.server.errors.put(f"/metrics failed: {exc!r}")
            self._answer(500, "text/plain; charset=utf-8", b"metrics collection failed\n")
            return
        self._answer(200, content_type, body)

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # no stdio from this thread (see the module docstring)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """Binds at once (so a taken address fails `forkd start`), serves in a thread."""

    def __init__(self, bind: Bind, collector: PoolCollector, block_signals: Sequence[int] = ()
                 ) -> None:
        self.bind = bind
        self.collector = collector
        self.block_signals = tuple(block_signals)
        self.errors: queue.SimpleQueue[str] = queue.SimpleQueue()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)  # type: ignore[arg-type]
        server: Any
        if bind.kind == "unix":
            try:
                if stat.S_ISSOCK(os.stat(bind.path).st_mode):
                    os.unlink(bind.path)  # a stale socket of an earlier run; never a file
            except FileNotFoundError:
                pass
            server = _UnixServer(bind.path, _Handler)
        elif bind.kind == "tcp":
            cls = _TCP6Server if ":" in bind.host else _TCPServer
            server = cls((bind.host, bind.port), _Handler)
        else:
            raise ValueError(f"--metrics {bind}: give HOST:PORT or unix:PATH")
        server.registry = registry
        server.errors = self.errors
        self.server: Any = server
        self.thread = threading.Thread(target=self._serve, name="forkd-metrics", daemon=True)

    @property
    def address(self) -> str:
        if self.bind.kind == "unix":
            return f"unix:{self.bind.path}"
        host, port = self.server.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        if self.block_signals:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.block_signals)
        self.server.service_actions = self._service
        self.server.serve_forever(poll_interval=0.5)

    def _service(self) -> None:
        """Between requests: fold dead workers' app files even when nobody scrapes."""
        app = self.collector.app
        if app is not None:
            app.fold_pending()

    def drain_errors(self) -> list[str]:
        errors = []
        for source in (self.errors, self.collector.app.errors if self.collector.app else None):
            while source is not None and not source.empty():
                errors.append(source.get_nowait())
        return errors

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5.0)
        self.server.server_close()
        if self.bind.kind == "unix":
            try:
                os.unlink(self.bind.path)
            except OSError:
                pass
