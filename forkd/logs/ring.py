"""The primary's memory of recent lines, which `forkd logs` reads. Pure.

Bounded twice: by count and by bytes (a line may be up to 64 KB). Every line gets a
sequence number; a reader keeps the number of the last line it saw (its cursor) and asks
for what came after, so following the log is a series of small independent requests
that survive a lost reply, and a reader that fell behind the ring learns how many lines
it missed instead of silently skipping them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from forkd.logs.record import Entry

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
    def __init__(self, max_lines: int = DEFAULT_LINES, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        self.last_seq = 0

    def append(self, entry: Entry) -> None:
        self.last_seq += 1
        entry.seq = self.last_seq
        entries = self.entries
        entries.append(entry)
        size = entry.size = (ENTRY_OVERHEAD + len(entry.data)
                             + (len(entry.raw) if entry.raw is not None else 0)
                + (len(entry.text) if entry.text is not None else 0))
        self.bytes += size  # (a JSON rendering added later is not counted)
        if len(entries) > self.max_lines:
            self.bytes -= entries.popleft().size
        while self.bytes > self.max_bytes and len(entries) > 1:
            self.bytes -= entries.popleft().size

    @property
    def first_seq(self) -> int:
        return self.entries[0].seq if self.entries else self.last_seq + 1

    def tail(self, count: int, slot: int | None = None, primary_only: bool = False) -> Page:
        """The last `count` lines (of one slot when given)."""
        picked: list[Entry] = []
        for entry in reversed(self.entries):
            if len(picked) >= count:
                break
            if _matches(entry, slot, primary_only):
                picked.append(entry)
        picked.reverse()
        return Page(picked, self.last_seq, 0, False)

    def since(self, cursor: int, slot: int | None = None, primary_only: bool = False,
              limit: int = 1000) -> Page:
        """The lines after `cursor`, at most `limit` of them."""
        if cursor > self.last_seq:  # a cursor from an earlier primary: start afresh
            cursor = self.last_seq
        missed = max(0, self.first_seq - cursor - 1)
        start = max(0, cursor + 1 - self.first_seq)  # index of the first unseen line
        picked: list[Entry] = []
        for index in range(start, len(self.entries)):
            entry = self.entries[index]
            if _matches(entry, slot, primary_only):
                if len(picked) == limit:
                    return Page(picked, picked[-1].seq, missed, True)
                picked.append(entry)
        return Page(picked, self.last_seq, missed, False)


def _matches(entry: Entry, slot: int | None, primary_only: bool) -> bool:
    if primary_only:
        return entry.slot is None
    return slot is None or entry.slot == slot
