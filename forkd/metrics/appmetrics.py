"""The app's own prometheus_client metrics, in multiprocess mode.

Each worker writes its metrics to mmap files named after its pid in one directory
(prometheus_client's multiprocess mode). Left alone, a directory collects one file
set per dead worker, scrapes grow slower with every recycle, and gauges of dead
workers linger. So when a worker exits, the primary (in the exporter's thread, never
its loop) marks it dead and folds its files into one `*_dead.db` file per type:
counters, histograms and summaries are summed, sum/min/max/mostrecent gauges kept by
their own rule, and per-process gauges (`all`, `live*`) of the dead are dropped. The
app's counters then keep their totals across recycles, reloads and crashes, and the
directory holds the live workers' files plus a handful, however many have died.

The file format is prometheus_client's own, read and written with its MmapedDict."""

from __future__ import annotations

import glob
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
# gauges whose dead processes' values still mean something, and how to combine them
_KEPT_GAUGE_MODES = ("sum", "max", "min", "mostrecent")


def prepare_dir(env: MutableMapping[str, str], name: str) -> tuple[str, bool]:
    """The multiprocess directory (and whether forkd owns it): the operator's
    PROMETHEUS_MULTIPROC_DIR when set, else a private one made now. Must run before
    anything imports prometheus_client in the primary, which reads the variable at
    import time (and the forked workers inherit what it decided)."""
    given = env.get(ENV) or env.get(ENV.lower())
    if given:
        os.makedirs(given, exist_ok=True)
        env[ENV] = given
        return given, False
    path = tempfile.mkdtemp(prefix=f"forkd-{name}-prometheus-")
    env[ENV] = path
    return path, True


def _combine(mode: str, old: tuple[float, float] | None, value: float, timestamp: float
             ) -> tuple[float, float]:
    if old is None:
        return value, timestamp
    if mode == "max":
        return max(old[0], value), timestamp
    if mode == "min":
        return min(old[0], value), timestamp
    if mode == "mostrecent":
        return (value, timestamp) if timestamp >= old[1] else old
    return old[0] + value, timestamp  # counters, histograms, summaries, sum gauges


def fold_dead(path: str, pid: int) -> int:
    """Fold a dead process's files into the `*_dead.db` files; returns files removed."""
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, path)  # drops its live* gauges
    removed = 0
    for name in glob.glob(os.path.join(path, f"*_{pid}.db")):
        parts = os.path.basename(name)[:-3].split("_")
        kind = parts[0]
        mode = parts[1] if kind == "gauge" and len(parts) == 3 else "sum"
        if kind == "gauge" and mode not in _KEPT_GAUGE_MODES:
            os.remove(name)  # a per-process gauge of a process that is gone
            removed += 1
            continue
        target = os.path.join(path, f"gauge_{mode}_dead.db" if kind == "gauge"
                              else f"{kind}_dead.db")
        values: dict[str, tuple[float, float]] = {}
        sources = [target, name] if os.path.exists(target) else [name]
        for source in sources:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(source):
                values[key] = _combine(mode, values.get(key), value, timestamp)
        scratch = target + ".tmp"  # not *.db: a collector never reads it half-written
        if os.path.exists(scratch):
            os.remove(scratch)
        merged = MmapedDict(scratch)
        try:
            for key, (value, timestamp) in values.items():
                merged.write_value(key, value, timestamp)
        finally:
            merged.close()
        os.replace(scratch, target)
        os.remove(name)
        removed += 1
    return removed


class AppMetrics:
    """The multiprocess directory of one primary. `worker_exited` is called by the
    primary's loop (it only queues the pid); folding and collecting happen in the
    exporter's thread, under one lock so that a scrape never sees a half-done fold."""

    def __init__(self, path: str, owned: bool) -> None:
        self.path = path
        self.owned = owned
        self.dead: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.errors: queue.SimpleQueue[str] = queue.SimpleQueue()

    def worker_exited(self, pid: int) -> None:
        self.dead.put(pid)

    def fold_pending(self) -> None:
        with self.lock:
            self._fold_pending()

    def _fold_pending(self) -> None:
        while True:
            try:
                pid = self.dead.get_nowait()
            except queue.Empty:
                return
            try:
                fold_dead(self.path, pid)
            except Exception as exc:  # a damaged file must not stop the exporter
                self.errors.put(f"could not fold the metrics files of pid {pid}: {exc}")

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with self.lock:
            self._fold_pending()
            files = glob.glob(os.path.join(self.path, "*.db"))
            return list(MultiProcessCollector.merge(files, accumulate=True))

    def file_count(self) -> int:
        return len(glob.glob(os.path.join(self.path, "*.db")))

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
