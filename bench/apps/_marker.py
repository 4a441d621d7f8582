"""Readiness marker shared by the hello apps.

The kill and reload benchmarks need to know when a *new* worker has loaded the app, for
every server alike, without asking any server's own status interface. So each worker
process that imports a hello app writes one file named by its pid, holding the wall-clock
time of the import, into ``$BENCH_MARKER_DIR`` when that variable is set. Nothing is
written (and nothing is paid per request) when it is unset.
"""

import os
import time


def mark_loaded() -> None:
    marker_dir = os.environ.get("BENCH_MARKER_DIR")
    if not marker_dir:
        return
    path = os.path.join(marker_dir, str(os.getpid()))
    # Write then rename, so a poller never reads a half-written timestamp.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(time.time()))
    os.replace(tmp, path)
