"""The primary's memory of recent lines, which `forkd logs` reads. Pure.

Bounded twice: by count and by bytes (a line may be up to 64 KB). Every line gets a
sequence number; a reader keeps the number of the last line it saw (its cursor) and asks
for what came after, so following the log is a series of small independent requests
that survive a lost reply, and a reader that fell behind the ring learns how many lines
it missed instead of silently skipping them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from forkd.logs.record import Entry, worker_line

DEFAULT_LINES = 10_000
DEFAULT_BYTES = 8 << 20
ENTRY_OVERHEAD = 200  # rough bytes of an Entry besides its text


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    cursor: int  # the seq of the last line the reader has now seen
    missed: int  # lines that left the ring before the reader could see them
    more: bool  # further lines are ready now (the page was cut at its limit)


class Ring:
    """An entry is one line, or a block of `count` whole lines from one worker (its
    records, or its app's output, as they came through the pipe: see LogHub), kept as
    one bytes object and cut into lines only when a reader asks for them. The first
    entry may have lost its first `skip` lines to the bounds already: they are still
    in its bytes (and counted in `bytes`), and readers never see them."""

    def __init__(self, max_lines: int = DEFAULT_LINES, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        self.lines = 0
        self.last_seq = 0
        # lines of the first entry (a block) that have left the ring already: readers
        # skip them; the block's bytes stay as they are (see _drop_first)
        self.skip = 0

    def append(self, entry: Entry) -> None:
        count = entry.count
        self.last_seq += count
        entry.seq = self.last_seq  # (a block's: that of its last line)
        entries = self.entries
        entries.append(entry)
        self.lines += count
        size = entry.size = _counted(entry)
        self.bytes += size
        while self.lines > self.max_lines:
            self._drop_first(self.lines - self.max_lines)
        while self.bytes > self.max_bytes and len(entries) > 1:
            self._drop_first(entries[0].count)

    def _drop_first(self, lines: int) -> None:
        """Drop the oldest `lines` lines. A block that loses only some of them keeps its
        bytes, its dropped lines counted in `skip` (a full ring drops a block's worth of
        lines at every append: cutting the block's bytes each time was a Python loop per
        line); its bytes stay counted until the whole block leaves."""
        first = self.entries[0]
        left = first.count - self.skip
        if left <= lines:
            self.entries.popleft()
            self.lines -= left
            self.bytes -= first.size
            self.skip = 0
            return
        self.lines -= lines
        self.skip += lines

    @property
    def first_seq(self) -> int:
        if not self.entries:
            return self.last_seq + 1
        first = self.entries[0]
        return first.seq - first.count + 1 + self.skip

    def tail(self, count: int, slot: int | None = None, primary_only: bool = False) -> Page:
        """The last `count` lines (of one slot when given)."""
        picked: list[Entry] = []
        for entry in reversed(self.entries):
            if len(picked) >= count:
                break
            if _matches(entry, slot, primary_only):
                if entry.count == 1:
                    picked.append(entry)
                else:
                    lines = expand(entry)
                    if entry is self.entries[0]:
                        lines = lines[self.skip:]
                    picked += reversed(lines[-(count - len(picked)):])
        picked.reverse()
        return Page(picked, self.last_seq, 0, False)

    def since(self, cursor: int, slot: int | None = None, primary_only: bool = False,
              limit: int = 1000) -> Page:
        """The lines after `cursor`, at most `limit` of them."""
        if cursor > self.last_seq:  # a cursor from an earlier primary: start afresh
            cursor = self.last_seq
        first_seq = self.first_seq
        missed = max(0, first_seq - cursor - 1)
        cursor = max(cursor, first_seq - 1)  # (the dropped lines of a first block too)
        entries = self.entries
        start = len(entries)  # the first entry with unseen lines (a follower is near the end)
        while start > 0 and entries[start - 1].seq > cursor:
            start -= 1
        picked: list[Entry] = []
        for index in range(start, len(entries)):
            entry = entries[index]
            if not _matches(entry, slot, primary_only):
                continue
            for line in (entry,) if entry.count == 1 else expand(entry):
                if line.seq <= cursor:
                    continue
                if len(picked) == limit:
                    return Page(picked, picked[-1].seq, missed, True)
                picked.append(line)
        return Page(picked, self.last_seq, missed, False)


def expand(block: Entry) -> list[Entry]:
    """A block's lines, each an entry of its own, numbered in order: an app's output
    lines as LogHub._lines makes them, records undecoded, as record.from_json makes
    them, a text rendering after a tab split off."""
    if block.count == 1:
        return [block]
    output = block.stream is not None  # an app's lines in `data`, records in `raw`
    data = block.data if output else block.raw
    assert data is not None
    entries = []
    for seq, line in enumerate(data.split(b"\n")[:-1], block.seq - block.count + 1):
        entry = (Entry(block.ts, "info", block.pid, block.slot, stream=block.stream, data=line)
                 if output else worker_line(block.pid, block.slot, line))
        entry.seq = seq
        entries.append(entry)
    return entries


def _counted(entry: Entry) -> int:
    """What the ring counts for an entry: its bytes (a JSON rendering added later is not
    counted) and a rough overhead."""
    return (ENTRY_OVERHEAD + len(entry.data) + len(entry.raw or b"")
            + len(entry.text or b""))


def _matches(entry: Entry, slot: int | None, primary_only: bool) -> bool:
    if primary_only:
        return entry.slot is None
    return slot is None or entry.slot == slot
