"""The primary's log output: stderr, or --log-file with reopen (SIGUSR1) and rotation.

Lines go into a bounded buffer and are written out in batches from the primary's loop,
so one write carries many lines and a line is never cut: a batch holds whole lines only,
and a rotation or reopen happens between batches. When the output is briefly slower than
the pool (a slow disk, a stalled pipe reader) the buffer absorbs it; when it is full,
further lines are dropped and counted, and the count is logged once the output catches
up (`event=log-dropped`), rather than stalling the primary that supervises the workers.

A pipe or socket on stderr is written without blocking (a pipe through a descriptor of
its own, so that the shared one of the parent or the terminal is left as it is); a
regular file is written directly, as the page cache absorbs it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

DEFAULT_BUFFER = 16 << 20  # bytes held when the output is slower than the pool


class _Output:
    """Where the bytes go; write() may write part, or nothing when it would block."""

    def __init__(self, fd: int, owned: bool, sock: socket.socket | None = None) -> None:
        self.fd = fd
        self.owned = owned
        self.sock = sock

    @classmethod
    def for_stderr(cls, fd: int = 2) -> _Output:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return cls(fd, owned=False)
        if stat.S_ISFIFO(mode):
            try:  # a description of our own: O_NONBLOCK here does not reach the others
                own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                return cls(own, owned=True)
            except OSError:
                pass
        elif stat.S_ISSOCK(mode):  # journald's stream: send(MSG_DONTWAIT) needs no flag
            try:
                sock = socket.socket(fileno=os.dup(fd))
                return cls(sock.fileno(), owned=True, sock=sock)
            except OSError:
                pass
        return cls(fd, owned=False)

    def write(self, data: bytes | memoryview) -> int:
        try:
            if self.sock is not None:
                return self.sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.owned:
            os.close(self.fd)


class LogWriter:
    def __init__(self, path: str | None = None, *, max_size: int | None = None,
                 keep: int = 5, max_buffer: int = DEFAULT_BUFFER, stderr_fd: int = 2) -> None:
        self.path = path
        self.max_size = max_size if path is not None else None
        self.keep = keep
        self.max_buffer = max_buffer
        self.stderr_fd = stderr_fd
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.dropped = 0  # lines dropped since the primary started
        self.unreported = 0  # of which not yet logged
        self.errors = 0  # failed writes (disk full, ...): their lines are dropped too
        self.last_error: str | None = None
        self.size = 0
        self.partial = False  # the buffer's head is the rest of a line partly written
        self.output = self._open()

    # -- opening --------------------------------------------------------------
    def _open(self) -> _Output:
        if self.path is None:
            return _Output.for_stderr(self.stderr_fd)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(fd).st_size
        return _Output(fd, owned=True)

    def reopen(self) -> None:
        """SIGUSR1: write out what is buffered to the old file, then open the path anew
        (logrotate has moved the old file away). Raises OSError when the path cannot be
        opened; the old file stays in use then."""
        if self.path is None:
            return
        self.flush()
        new = self._open()
        self.output.close()
        self.output = new

    def rotate(self) -> None:
        """Move FILE to FILE.1 (FILE.1 to FILE.2 ... up to --log-keep) and start FILE anew."""
        assert self.path is not None
        if self.keep <= 0:
            _unlink(self.path)
        else:
            _unlink(f"{self.path}.{self.keep}")
            for index in range(self.keep - 1, 0, -1):
                _rename(f"{self.path}.{index}", f"{self.path}.{index + 1}")
            _rename(self.path, f"{self.path}.1")
        new = self._open()
        self.output.close()
        self.output = new

    def close(self) -> None:
        self.flush()
        self.output.close()

    # -- writing ----------------------------------------------------------------
    def write(self, line: bytes, lines: int = 1) -> bool:
        """Queue one whole line (with its newline), or `lines` of them in one bytes
        object; False when it had to be dropped."""
        if self.buffered + len(line) > self.max_buffer and self.buffer:
            self.dropped += lines
            self.unreported += lines
            return False
        self.buffer.append(line)
        self.buffered += len(line)
        return True

    @property
    def pending(self) -> bool:
        return bool(self.buffer)

    def flush(self) -> None:
        """Write out as much as the output takes now: everything queued in one write,
        cut only where a rotation falls, and there between two lines."""
        if not self.buffer:
            return
        data = b"".join(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        self.buffer.clear()
        self.buffered = 0
        pos = 0
        while pos < len(data):
            end = len(data)
            if self.partial:  # first the rest of the line the output cut
                end = data.find(b"\n", pos) + 1 or end
            elif self.max_size is not None:
                room = self.max_size - self.size
                if end - pos > room:
                    cut = data.rfind(b"\n", pos, pos + max(room, 0)) + 1  # last whole line
                    if cut <= pos and self.size > 0:
                        try:
                            self.rotate()
                        except OSError as exc:
                            self._failed(exc)
                            self.max_size = None  # keep writing to the current file
                        continue
                    if cut <= pos:  # one line longer than the limit: alone in a new file
                        cut = data.find(b"\n", pos) + 1 or len(data)
                    end = cut
            written = self._write_all(data, pos, end)
            pos += written
            if pos < end:  # the output would block: the rest waits, the line is open
                rest = data[pos:]
                self.buffer.append(rest)
                self.buffered = len(rest)
                self.partial = data[pos - 1:pos] != b"\n"  # no rotation inside a line
                return
            self.partial = False

    def _write_all(self, data: bytes, start: int, end: int) -> int:
        view = memoryview(data)
        done = start
        while done < end:
            try:
                count = self.output.write(view[done:end])
            except OSError as exc:  # ENOSPC, EIO, EPIPE: these lines are lost
                self._failed(exc)
                lost = data.count(b"\n", done, end)
                self.dropped += lost
                self.unreported += lost
                return end - start
            if count == 0:
                break
            done += count
            self.size += count
        return done - start

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        self.last_error = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror}"

    def take_unreported(self) -> int:
        """Lines dropped since the last call, once the buffer has room again."""
        if not self.unreported or self.buffered > self.max_buffer // 2:
            return 0
        count, self.unreported = self.unreported, 0
        return count


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rename(old: str, new: str) -> None:
    try:
        os.rename(old, new)
    except FileNotFoundError:
        pass
