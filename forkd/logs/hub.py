"""The primary's log hub: it reads every worker's pipes, cuts what it reads into whole
lines, tags each with its slot and pid, renders it (text or JSON), queues it on the
writer and remembers it in the ring for `forkd logs`. The primary's own lines arrive
through `submit`. The primary's loop polls `fds()` and calls `on_readable(fd)`, then
`flush()` once per pass, so many lines leave in one write."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from forkd.logs import record
from forkd.logs.lines import LineSplitter
from forkd.logs.pipes import WorkerPipes
from forkd.logs.record import Entry
from forkd.logs.ring import Ring
from forkd.logs.writer import LogWriter

READ_SIZE = 64 * 1024
READS_PER_PASS = 8  # per descriptor and loop pass: one chatty worker cannot starve the rest
REPLY_BYTES = 4 << 20  # rendered bytes per `forkd logs` reply; the client asks again for more
MAX_TAIL = 100_000


class Poller(Protocol):
    def register(self, target: Any) -> None: ...
    def unregister(self, target: Any) -> None: ...


@dataclass
class _Reader:
    slot: int
    pid: int
    stream: str  # stdout, stderr or records
    splitter: LineSplitter


class LogHub:
    def __init__(self, writer: LogWriter, *, fmt: str = "text", app_name: str = "app",
                 ring: Ring | None = None, poller: Poller | None = None) -> None:
        self.writer = writer
        self.fmt = fmt
        self.app_name = app_name
        self.ring = ring or Ring()
        self.poller = poller
        self.readers: dict[int, _Reader] = {}
        self.pid = os.getpid()

    # -- workers' pipes ---------------------------------------------------------------
    def attach(self, pipes: WorkerPipes, slot: int, pid: int) -> None:
        """After a fork: close the worker's ends here and start reading ours."""
        pipes.close_write()
        for stream, fd in pipes.read.items():
            self.readers[fd] = _Reader(slot, pid, stream, LineSplitter())
            if self.poller is not None:
                self.poller.register(fd)
        pipes.read.clear()

    def fds(self) -> list[int]:
        """Every descriptor of ours a forked worker must close."""
        fds = list(self.readers)
        if self.writer.output.owned:
            fds.append(self.writer.output.fd)
        return fds

    def on_readable(self, fd: int) -> None:
        reader = self.readers.get(fd)
        if reader is None:
            return
        for _ in range(READS_PER_PASS):
            try:
                data = os.read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # every writer is gone (the worker and its subprocesses)
                self._lines(reader, reader.splitter.close())
                self._forget(fd)
                return
            block = reader.splitter.feed_block(data)
            if block is None:  # (a line may be over the cap: cut it)
                self._lines(reader, reader.splitter.feed(data))
            elif block:
                if reader.stream == "records":
                    self._records(reader, block)
                else:
                    self._output(reader, block)
            if len(data) < READ_SIZE:
                return

    def drain_all(self) -> None:
        """Read whatever the pipes hold (at shutdown, before the last flush)."""
        for fd in list(self.readers):
            self.on_readable(fd)

    def _forget(self, fd: int) -> None:
        self.readers.pop(fd, None)
        if self.poller is not None:
            try:
                self.poller.unregister(fd)
            except KeyError:
                pass
        os.close(fd)

    def _records(self, reader: _Reader, block: bytes) -> None:
        """Whole lines from a worker's records pipe. A block of the worker's own access
        records (JSON output: each holds record.access_marker of the pipe's pid and
        slot; text output: each names them and carries its text rendering after a tab,
        as only access records do) goes to the ring as it is and its JSON or text to the
        output: no Python per line, which is what an access line per request needs. The
        ring cuts it into lines if `forkd logs` asks. Any other block goes line by line."""
        if block.startswith(b'{"ts":"'):
            if self.fmt == "json":
                # A block of access records (the hot path: one a request) passes when each
                # of its lines holds the part every access record of this pipe's worker
                # has after its time (record.access_marker): no JSON string holds a bare
                # quote, so a record holds it once and a line that is no such record not at
                # all. Two C counts, the second with a long needle that skips ahead: the
                # cheapest check found live (perf: the primary's bytes.count calls were a
                # third of its CPU with three counts of short needles).
                if b"\t" not in block and block.endswith(b"}\n"):  # (a C search)
                    count = block.count(b"\n")
                    if (count > 1 and block.count(
                            record.access_marker(reader.pid, reader.slot)) == count):
                        self.ring.append(record.undecoded(reader.pid, reader.slot, block,
                                                          count=count))
                        self.writer.write(block, count)
                        return
            else:  # JSON\tTEXT\nJSON\tTEXT\n...: a tab after each record
                count = block.count(b'\n{"ts":"') + 1
                out = _texts(block) if block.count(b"}\t") == count else None
                if (out is not None and count > 1 and block.count(
                        record.origin_marker(reader.pid, reader.slot)) == count):
                    self.ring.append(record.undecoded(reader.pid, reader.slot, block,
                                                      count=count))
                    self.writer.write(out, count)
                    return
        self._lines(reader, [(line, False) for line in block.split(b"\n")[:-1]])

    def _output(self, reader: _Reader, block: bytes) -> None:
        """Whole lines an app printed (a worker's stdout or stderr, none over the cap),
        read together: tagged and rendered in a few C-level calls for the whole read,
        not per line, and kept in the ring as one block, cut into lines only when
        `forkd logs` reads it. The same bytes as _lines would make of them."""
        count = block.count(b"\n")
        if count < 2:
            self._lines(reader, [(block[:-1], False)])
            return
        ts = record.rfc3339(time.time())
        entry = Entry(ts, "info", reader.pid, reader.slot, stream=reader.stream, data=block,
                      count=count)
        self.ring.append(entry)
        self.writer.write(record.render_block(entry, self.fmt, self.app_name), count)

    def _lines(self, reader: _Reader, lines: list[tuple[bytes, bool]]) -> None:
        if not lines:
            return
        if reader.stream == "records":  # (what the block path in _records declined)
            from_json, add = record.from_json, self._add
            slot, pid = reader.slot, reader.pid
            origin = record.origin_marker(pid, slot)
            for line, _cut in lines:
                if line:
                    add(from_json(line, slot, pid, origin))
            return
        ts = record.rfc3339(time.time())
        for line, cut in lines:
            entry = Entry(ts=ts, level="info", pid=reader.pid, slot=reader.slot,
                          stream=reader.stream, data=line)
            if cut:
                entry.fields = {"cut": True}
            self._add(entry)

    # -- the primary's own lines ------------------------------------------------------
    def submit(self, entry: Entry) -> None:
        self._add(entry)

    def _add(self, entry: Entry) -> None:
        self.ring.append(entry)
        self.writer.write(record.render(entry, self.fmt, self.app_name))

    # -- output -------------------------------------------------------------------------
    def flush(self) -> None:
        self.writer.flush()
        dropped = self.writer.take_unreported()
        if dropped:
            why = self.writer.last_error or "the log output was too slow"
            self.writer.last_error = None
            self._own("log-dropped", logging.WARNING, lines=dropped,
                      total=self.writer.dropped, why=why)
            self.writer.flush()

    @property
    def pending(self) -> bool:
        """Lines wait for the output (a stalled pipe): poll again soon."""
        return self.writer.pending

    def reopen(self) -> None:
        """SIGUSR1 (logrotate's postrotate): reopen --log-file."""
        if self.writer.path is None:
            self._own("logs-reopen", logging.INFO, target="stderr")  # nothing to reopen
            return
        try:
            self.writer.reopen()
        except OSError as exc:
            self._own("logs-reopen-failed", logging.ERROR, file=self.writer.path,
                      error=exc.strerror)
            return
        self._own("logs-reopen", logging.INFO, file=self.writer.path)

    def close(self) -> None:
        self.drain_all()
        self.writer.close()
        for fd in list(self.readers):
            self._forget(fd)

    def _own(self, event: str, level: int, **fields: Any) -> None:
        self._add(Entry(ts=record.rfc3339(time.time()), level=logging.getLevelName(level).lower(),
                        pid=self.pid, slot=None, event=event, fields=fields))

    # -- `forkd logs` ---------------------------------------------------------------------
    def query(self, args: dict[str, Any]) -> dict[str, Any]:
        """The answer to a `logs` request: {"lines", "cursor", "missed", "more"}.

        args: `lines` (how many of the latest, when there is no cursor), `after` (the
        cursor of a follower: what came after it), `slot` (one worker only), `json`."""
        slot = args.get("slot")
        fmt = "json" if args.get("json") else "text"
        after = args.get("after")
        if after is None:
            page = self.ring.tail(min(int(args.get("lines", 50)), MAX_TAIL), slot)
        else:
            page = self.ring.since(int(after), slot)
        rendered: list[str] = []
        size = 0
        entries = page.entries
        cursor, more = page.cursor, page.more
        if after is None:  # the latest lines: when too many, keep the newest
            chosen: list[Entry] = []
            for entry in reversed(entries):
                line = record.render(entry, fmt, self.app_name)
                size += len(line)
                if size > REPLY_BYTES and chosen:
                    break
                chosen.append(entry)
                rendered.append(line.decode("utf-8", "replace").rstrip("\n"))
            rendered.reverse()
        else:
            for entry in entries:
                line = record.render(entry, fmt, self.app_name)
                size += len(line)
                if size > REPLY_BYTES and rendered:
                    cursor, more = entry.seq - 1, True
                    break
                rendered.append(line.decode("utf-8", "replace").rstrip("\n"))
        return {"lines": rendered, "cursor": cursor, "missed": page.missed, "more": more,
                "pid": self.pid}


def _texts(block: bytes) -> bytes | None:
    """The text parts of a text-output block of records (JSON\tTEXT\n each), joined;
    None when a line among them is no record (after its text, a record or the end)."""
    texts = []
    for part in block.split(b"\t")[1:]:
        end = part.find(b"\n") + 1
        if not end or (end < len(part) and not part.startswith(b'{"ts":"', end)):
            return None
        texts.append(part[:end])
    return b"".join(texts)
