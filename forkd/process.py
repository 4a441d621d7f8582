"""Processes: count the usable cores, fork a worker, signal, reap."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NoReturn

from forkd import worker


def cgroup_cpu_limit(proc_cgroup: str, cgroup_root: Path = Path("/sys/fs/cgroup")
                     ) -> float | None:
    """The cgroup v2 `cpu.max` quota (in cores) along our cgroup's path, if any."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            relative = line[3:].strip().lstrip("/")
            break
    else:
        return None
    limit: float | None = None
    path = cgroup_root / relative
    while True:
        try:
            quota, period = (path / "cpu.max").read_text().split()
            if quota != "max":
                cores = int(quota) / int(period)
                limit = cores if limit is None else min(limit, cores)
        except (OSError, ValueError):
            pass
        if path == cgroup_root or path == path.parent:
            return limit
        path = path.parent


def usable_cpus() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup v2 quota."""
    count = len(os.sched_getaffinity(0))
    try:
        quota = cgroup_cpu_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        quota = None
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def fork_worker(spec: worker.WorkerSpec) -> int:
    """Fork; the child runs the worker and never returns from this call."""
    pid = os.fork()
    if pid == 0:
        _child(spec)
    return pid


def _child(spec: worker.WorkerSpec) -> NoReturn:
    worker.run(spec)


def reap() -> list[tuple[int, int | None, int | None]]:
    """Every child that has exited: (pid, exit code or None, signal or None)."""
    gone: list[tuple[int, int | None, int | None]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return gone
        if pid == 0:
            return gone
        if os.WIFSIGNALED(status):
            gone.append((pid, None, os.WTERMSIG(status)))
        elif os.WIFEXITED(status):
            gone.append((pid, os.WEXITSTATUS(status), None))


def has_exited(pid: int) -> bool:
    """Whether our child `pid` has exited, without reaping it (reap() does that)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already (or never ours)
        return True


def send_signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False
