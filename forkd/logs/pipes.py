"""Each worker's three pipes to the primary, and the worker's end of them.

stdout and stderr: the worker's descriptors 1 and 2 become pipes, so whatever writes to
them (print, logging's StreamHandler, a traceback, faulthandler, C code, a subprocess)
reaches the primary, which tags each line with slot and pid. `records`: forkd's own lines
from the worker (the access log among them), one JSON object per line.

In the worker, sys.stdout and sys.stderr are replaced by LineStream: a line is written
the moment it is complete, whatever the descriptor is (a pipe would otherwise make
Python buffer 8 KB, so a print showed up only when the worker exited), and each thread
assembles its own lines, so two threads of a WSGI pool printing at once cannot
interleave their halves (print writes the text and the newline separately).
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STREAMS = ("stdout", "stderr", "records")
PIPE_SIZE = 128 * 1024  # per pipe: room for a burst while the primary is busy
MAX_PENDING = 64 * 1024  # characters of an unfinished line a thread may hold


@dataclass
class WorkerPipes:
    """Both ends of one worker's pipes, by stream name."""

    read: dict[str, int] = field(default_factory=dict)  # the primary's ends (non-blocking)
    write: dict[str, int] = field(default_factory=dict)  # the worker's ends

    def close_write(self) -> None:
        """In the primary after the fork: only the worker may hold the writing ends,
        or the primary would never see end-of-file when it dies."""
        for fd in self.write.values():
            _close(fd)
        self.write.clear()

    def close_all(self) -> None:
        self.close_write()
        for fd in self.read.values():
            _close(fd)
        self.read.clear()


def open_pipes() -> WorkerPipes:
    pipes = WorkerPipes()
    try:
        for name in STREAMS:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            pipes.read[name], pipes.write[name] = read_end, write_end
            os.set_blocking(read_end, False)
            _size_pipe(write_end, (RECORDS_PIPE_SIZE, PIPE_SIZE) if name == "records"
                       else (PIPE_SIZE,))
    except OSError:
        pipes.close_all()
        raise
    return pipes


def _size_pipe(fd: int, sizes: tuple[int, ...]) -> None:
    """The first of `sizes` the kernel grants. A user over the pipe-buffer quota
    (/proc/sys/fs/pipe-user-pages-soft) is refused any growth, and Linux then makes
    their new pipes of two pages: RecordWriter sizes its batches to what the pipe
    holds (F_GETPIPE_SZ), whatever it is."""
    for size in sizes:
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


# ----------------------------------------------------------------------- worker side


def attach_worker(pipes: WorkerPipes) -> int:
    """In the worker right after fork: descriptors 1 and 2 become the pipes (inherited
    by any subprocess), sys.stdout/sys.stderr write whole lines at once; returns the
    records descriptor (close-on-exec: a subprocess has no business there)."""
    for name, target in (("stdout", 1), ("stderr", 2)):
        os.dup2(pipes.write[name], target)  # (dup2's copy is inheritable)
        os.close(pipes.write[name])
    for fd in pipes.read.values():
        _close(fd)
    sys.stdout = LineStream(1, "<stdout>")
    sys.stderr = LineStream(2, "<stderr>")
    return pipes.write["records"]


class LineStream(io.TextIOBase):
    """A text stream on a descriptor that writes each complete line at once, in one
    locked write, assembling each thread's lines separately."""

    def __init__(self, fd: int, name: str, encoding: str = "utf-8",
                 errors: str = "backslashreplace") -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        self._encoding = encoding
        self._errors = errors
        self._local = threading.local()
        self._lock = threading.Lock()
        # Bytes written here go straight to the descriptor, unbuffered.
        self.buffer = open(fd, "wb", buffering=0, closefd=False)  # noqa: SIM115

    @property
    def encoding(self) -> str:  # type: ignore[override]  # (read-only in io.TextIOBase)
        return self._encoding

    @property
    def errors(self) -> str:  # type: ignore[override]
        return self._errors

    @property
    def name(self) -> str:
        return self._name

    @property
    def line_buffering(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def reconfigure(self, **kwargs: object) -> None:
        """TextIOWrapper's, for apps that call it: the encoding may change; lines are
        always written when complete."""
        encoding = kwargs.get("encoding")
        if isinstance(encoding, str):
            self._encoding = encoding
        errors = kwargs.get("errors")
        if isinstance(errors, str):
            self._errors = errors

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        pending = getattr(self._local, "pending", "")
        joined = pending + text if pending else text
        cut = joined.rfind("\n")
        if cut < 0:
            if len(joined) > MAX_PENDING:
                self._local.pending = ""
                self._emit(joined)
            else:
                self._local.pending = joined
            return len(text)
        self._local.pending = joined[cut + 1:]
        self._emit(joined[:cut + 1])
        return len(text)

    def flush(self) -> None:
        """An explicit flush (a prompt, a progress dot) sends this thread's unfinished
        line too; the primary holds it until its newline comes."""
        pending = getattr(self._local, "pending", "")
        if pending:
            self._local.pending = ""
            self._emit(pending)

    def _emit(self, text: str) -> None:
        data = memoryview(text.encode(self._encoding, self._errors))
        with self._lock:
            while data:
                try:
                    written = os.write(self._fd, data)
                except InterruptedError:
                    continue
                except OSError:
                    return  # the primary is gone; PDEATHSIG ends us
                data = data[written:]


class RecordWriter:
    """The worker's end of the records pipe: whole JSON lines, batched, never blocking
    the event loop.

    The access log writes a line per request; one write (and one wake-up of the primary,
    which shares the cores with the workers) per line would cost about as much as the
    request. So lines wait in a buffer for up to DELAY seconds (or a full batch) and go
    out in one write. When the primary is slow to read (a loaded machine) and the pipe is
    full, the rest waits here for the next try instead of stalling the worker's requests;
    past MAX_HELD bytes, new lines are dropped and counted, and the count goes out as a
    warning record once the pipe takes lines again. Without a loop (start-up, shutdown)
    and for warnings and errors, which may precede a crash, a line is written at once,
    waiting for room up to URGENT_WAIT seconds.

    `defer` holds an item to be rendered later instead of a line: the access log hands
    over a request's fields, and `render` turns the batch's items into lines in one
    loop just before its write (in their place, so lines keep their order)."""

    # Under load a batch fills before its DELAY: then BATCH sets how often the primary
    # wakes. Each wake-up costs it a pass of its loop besides the bytes (live, wrk -c64,
    # 2 workers, JSON: from 64 to 128 KiB its user CPU per request went from about 1.4
    # to 1.0 us, its wake-ups per request halved; 3 runs each on a loaded machine).
    # A batch is at most half what the pipe holds (one write, while the primary reads the
    # last), which open_pipes makes two batches (RECORDS_PIPE_SIZE) when the kernel lets
    # it: a bigger batch into a smaller pipe would be many partial writes, each copying
    # the rest of the batch again.
    BATCH = 128 * 1024
    DELAY = 0.02  # seconds a line may wait for its batch to fill (an idle worker's pace)
    MAX_HELD = 4 << 20
    URGENT_WAIT = 2.0
    DEFERRED_SIZE = 400  # bytes counted for an item not rendered yet (an access line's)

    def __init__(self, fd: int, render: Callable[[list[Any]], list[bytes]] | None = None
                 ) -> None:
        self.fd = fd
        self.render = render
        os.set_blocking(fd, False)  # (the worker's own descriptor: no one else shares it)
        try:
            room = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:  # (not a pipe)
            room = RECORDS_PIPE_SIZE
        self.batch = min(self.BATCH, room // 2)  # bytes that make a batch (see BATCH)
        self.lock = threading.Lock()
        self.pending: list[Any] = []  # lines (bytes) and items for `render`, in order
        self.held = 0  # bytes of the lines in `pending`
        self.lines = 0  # how many of `pending` are lines; the rest are items
        # defer's quick way: while `pending` is shorter, an item only joins it (a flush
        # is scheduled and the batch is not full); 0 sends the next one the long way
        self.limit = 0
        self.loop: Any = None
        self.loop_thread: int | None = None
        self.scheduled = False
        self.dropped = 0  # lines dropped since the last report
        self.on_dropped: Any = None  # callback(count) that logs the drop, set by the worker

    @property
    def deferred(self) -> int:
        """Items in `pending` that `render` has yet to make lines of."""
        return len(self.pending) - self.lines

    @property
    def size(self) -> int:
        """Bytes held, an item counted as DEFERRED_SIZE."""
        return self.held + self.deferred * self.DEFERRED_SIZE

    def attach_loop(self, loop: Any) -> None:
        """From now on, batch lines for up to DELAY seconds on this loop."""
        self.loop = loop
        self.loop_thread = threading.get_ident()

    def detach_loop(self) -> None:
        self.loop = None
        with self.lock:
            self.limit = 0
            self._write_locked(wait=self.URGENT_WAIT)

    def __call__(self, line: bytes, urgent: bool = False) -> None:
        with self.lock:
            if self.size + len(line) > self.MAX_HELD and not urgent:
                self.dropped += 1
                return
            self.pending.append(line)
            self.held += len(line)
            self.lines += 1
            self.limit = 0
            if urgent or self.loop is None:
                self._write_locked(wait=self.URGENT_WAIT)
                return
            if not self._batched_locked():
                return
        self._schedule()

    def defer(self, item: Any) -> None:
        """Hold `item` for `render` (see the class): as __call__, for a line not made yet.
        Once per request, so most calls only append (see `limit`), and the lock is taken
        without a `with`, which costs twice as much."""
        lock = self.lock
        lock.acquire()
        pending = self.pending
        if len(pending) < self.limit:
            pending.append(item)
            lock.release()
            return
        try:
            if self.size + self.DEFERRED_SIZE > self.MAX_HELD:
                self.dropped += 1
                return
            pending.append(item)
            if self.loop is None:
                self._write_locked(wait=self.URGENT_WAIT)
                return
            schedule = self._batched_locked()
            if self.scheduled:  # items that fit in the batch may now just join it
                self.limit = len(self.pending) + max(
                    0, (min(self.batch, self.MAX_HELD + 1) - 1 - self.size)
                    // self.DEFERRED_SIZE)
        finally:
            lock.release()
        if schedule:
            self._schedule()

    def _batched_locked(self) -> bool:
        """Write a full batch; True when a flush is now to be scheduled."""
        if self.size >= self.batch:
            self._write_locked()
            if not self.pending:
                return False
        if self.scheduled:
            return False
        self.scheduled = True
        return True

    def _schedule(self) -> None:
        loop = self.loop  # (read once: a detach may clear it meanwhile, from the loop)
        try:
            if loop is None:
                self.flush()
            elif threading.get_ident() == self.loop_thread:
                self._flush_later()
            else:  # a WSGI thread: wakes the loop, once per batch
                loop.call_soon_threadsafe(self._flush_later)
        except RuntimeError:  # the loop is closed
            self.flush()

    def _flush_later(self) -> None:
        loop = self.loop
        if loop is None:  # detached meanwhile
            self.flush()
        else:
            loop.call_later(self.DELAY, self.flush)

    def flush(self) -> None:
        with self.lock:
            self.scheduled = False
            self._write_locked()
            retry = bool(self.pending) and self.loop is not None
            if retry:
                self.scheduled = True
            dropped = 0
            if self.dropped and not self.pending:
                dropped, self.dropped = self.dropped, 0
        if retry:
            self._flush_later()  # the pipe was full: try again in DELAY
        if dropped and self.on_dropped is not None:
            self.on_dropped(dropped)

    def _render_each(self, pending: list[Any]) -> list[bytes]:
        """A batch whose rendering failed, item by item: an item that cannot be
        rendered (a value of the wrong type) is dropped and counted, alone; the lines
        of the others go out in their place."""
        assert self.render is not None
        out: list[bytes] = []
        for item in pending:
            if item.__class__ is bytes:
                out.append(item)
                continue
            try:
                out += self.render([item])
            except Exception:
                self.dropped += 1
        return out

    def _write_locked(self, wait: float = 0.0) -> None:
        """Write what is held; with `wait`, block for room up to that many seconds."""
        self.limit = 0  # (`pending` changes: defer's next call takes the long way)
        if not self.pending:
            return
        deferred = self.deferred
        if deferred:
            assert self.render is not None
            try:
                self.pending = self.render(self.pending)
            except Exception:  # (a bug: lose only the items that fail, counted)
                self.pending = self._render_each(self.pending)
            if not self.pending:
                self.held = self.lines = 0
                return
        data = memoryview(b"".join(self.pending) if len(self.pending) > 1 else self.pending[0])
        deadline = None
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except BlockingIOError:
                if not wait:
                    break
                if deadline is None:
                    deadline = time.monotonic() + wait
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                select.select([], [self.fd], [], remaining)
                continue
            except OSError:
                data = data[len(data):]  # the primary is gone; PDEATHSIG ends us
                break
            data = data[written:]
        self.pending = [bytes(data)] if data else []
        self.held = len(data)
        self.lines = len(self.pending)


RECORDS_PIPE_SIZE = 2 * RecordWriter.BATCH  # the records pipe: two batches


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
