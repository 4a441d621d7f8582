"""psutil sampling of the workers: memory by the chosen metric, RSS and CPU. The
only module that imports psutil."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Sample:
    rss: int
    memory: int  # by the configured metric (rss, uss or pss)
    cpu_percent: float


class Monitor:
    def __init__(self, metric: str = "rss") -> None:
        self.metric = metric
        self.processes: dict[int, psutil.Process] = {}

    def sample(self, pids: list[int], metric: str | None = None, cpu: bool = True
               ) -> dict[int, Sample]:
        """One pass over `pids`; `cpu` also reads CPU use (since the last such read)."""
        metric = metric or self.metric
        samples: dict[int, Sample] = {}
        for pid in pids:
            process = self.processes.get(pid)
            try:
                if process is None:
                    process = self.processes[pid] = psutil.Process(pid)
                    process.cpu_percent()  # the first read only starts the measure
                if metric == "rss":
                    rss = used = process.memory_info().rss
                else:
                    full = process.memory_full_info()  # reads smaps: costlier, so only here
                    rss = full.rss
                    used = getattr(full, metric)
                samples[pid] = Sample(rss, used, process.cpu_percent() if cpu else 0.0)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self.processes.pop(pid, None)
        return samples

    def forget(self, pid: int) -> None:
        self.processes.pop(pid, None)

