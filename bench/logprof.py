"""The primary's cost per access line, in-process: a worker's records (rendered by
forkd.http.accesslog, 150 to a batch as the worker's 10 ms batches carry them) written
into a pipe and read by a LogHub, as the primary does, into /dev/null.

Instructions per line, which a loaded machine does not move (valgrind from Debian):

    for n in 1 101; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.logprof json $n 2>&1 | grep Collected; done

(the difference over the 15,000 lines; `text` for --log-format text). Session 3, on this
machine: JSON about 18,000 instructions a line before the block path, 4,600 after; text
12,400 after (it was about 16 us a line, rendered by the primary).
"""

from __future__ import annotations

import os
import sys

from forkd import log
from forkd.http import accesslog
from forkd.logs.hub import LogHub
from forkd.logs.pipes import WorkerPipes
from forkd.logs.writer import LogWriter

BATCH = 150


def main() -> None:
    fmt, batches = sys.argv[1], int(sys.argv[2])
    lines: list[bytes] = []
    log.setup(slot=0, json_sink=lines.append, access_text=fmt == "text")
    for _ in range(BATCH):
        accesslog.log_access(("127.0.0.1", 5555), "GET", b"/", b"", "1.1",
                             (b"0123456789abcdef0123456789abcdef", b"-", b"hey/0.0.1"),
                             200, 13, 0.0012)
    chunk = b"".join(lines)
    hub = LogHub(LogWriter(path="/dev/null"), fmt=fmt)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)  # (as open_pipes makes the primary's ends)
    writer = os.dup(write_end)  # (attach closes the worker's end it is given)
    os.set_blocking(writer, False)  # partial writes: a text batch is larger than the pipe
    hub.attach(WorkerPipes(read={"records": read_end}, write={"records": write_end}), 0,
               os.getpid())
    for _ in range(batches):
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(writer, view):]
            except BlockingIOError:
                pass
            hub.on_readable(read_end)
        hub.flush()
    assert hub.ring.lines == min(hub.ring.max_lines, batches * BATCH), hub.ring.lines
    log.setup()


if __name__ == "__main__":
    main()
