"""Bytes as they come out of a pipe -> whole lines. Pure.

A pipe delivers whatever the writer wrote, cut wherever the kernel cut it: a 3 KB line
may arrive in two reads, and two lines in one. The splitter keeps the unfinished tail of
each stream until its newline comes. A line longer than `cap` is not held without bound:
it is cut into pieces of `cap` bytes, each marked as cut, so memory stays bounded and
nothing is silently lost."""

from __future__ import annotations

DEFAULT_CAP = 64 * 1024  # bytes of one line; longer ones are cut into pieces this long


class LineSplitter:
    __slots__ = ("cap", "pending")

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.pending = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The lines `data` completes, without their newlines, each with whether it is
        a piece of a longer line (cut at `cap`)."""
        if self.pending:
            data = self.pending + data
        if b"\n" not in data:
            self.pending = data
            return self._cut_overlong()
        *whole, self.pending = data.split(b"\n")
        if max(map(len, whole)) <= self.cap:
            lines = [(line, False) for line in whole]
        else:
            lines = []
            for line in whole:
                lines += _pieces(line, self.cap)
        return lines + self._cut_overlong()

    def feed_block(self, data: bytes) -> bytes | None:
        """The whole lines `data` completes, as one bytes object (newlines kept; b"" when
        none), or None when a line may be over the cap: then nothing was taken, and
        feed(data) cuts it."""
        joined = self.pending + data if self.pending else data
        end = joined.rfind(b"\n") + 1
        # Only the first line can be longer than one read (it began in what was pending);
        # a read is never over the cap, so no other line can be.
        if (len(data) > self.cap or joined.find(b"\n") + 1 > self.cap
                or len(joined) - end > self.cap):
            return None
        self.pending = joined[end:]
        return joined[:end]

    def close(self) -> list[tuple[bytes, bool]]:
        """At the end of the stream: the unfinished last line, if any."""
        rest, self.pending = self.pending, b""
        return [(rest, False)] if rest else []

    def _cut_overlong(self) -> list[tuple[bytes, bool]]:
        if len(self.pending) <= self.cap:
            return []
        cut = len(self.pending) - len(self.pending) % self.cap
        if cut == len(self.pending):
            cut -= self.cap  # keep the last piece: its line may still end within the cap
        pieces = [(self.pending[i:i + self.cap], True) for i in range(0, cut, self.cap)]
        self.pending = self.pending[cut:]
        return pieces


def _pieces(line: bytes, cap: int) -> list[tuple[bytes, bool]]:
    if len(line) <= cap:
        return [(line, False)]
    starts = range(0, len(line), cap)
    return [(line[i:i + cap], i + cap < len(line)) for i in starts]
