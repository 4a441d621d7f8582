"""Pure: how many workers the pool should have, from what it has been doing.

Each second the primary hands in one `Sample` (the pool's utilisation, busy time over wall
time averaged over its ready workers, and the connections waiting in the listen queue).
From every sample a *recommendation* is made, the Kubernetes HPA's rule:

    recommended = ceil(workers * utilisation / target)    (unchanged within ±TOLERANCE)

plus one worker more whenever connections wait in the accept queue (the pool is short of
workers even if utilisation, which saturates at 1.0, cannot say by how much).

- Up, quickly: when every recommendation of the last `up_window` seconds is above the
  current count, go to the smallest of them (so a one-second spike does nothing, a load
  that stays does within seconds), at most doubling in one step.
- Down, slowly: when every recommendation of the last `down_window` seconds (the
  stabilisation window) is below the current count, go to the largest of them.
- Never outside MIN…MAX, never while another operation runs (the caller says), never
  while a manual `forkd scale` holds the count (one down window), and never again until
  the samples taken since the last change fill the window that would decide it.

Which worker goes when scaling down is the caller's business (the youngest: it has the
coldest caches and the fewest requests in flight on keep-alive connections).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

TOLERANCE = 0.1  # as the HPA: no change while utilisation is within 10% of the target
UP_WINDOW = 3.0  # seconds a higher need must last before workers are added
DOWN_WINDOW = 60.0  # seconds a lower need must last before workers are removed


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() of the sample
    workers: int  # ready workers when it was taken
    utilization: float  # 0…1, busy time over wall time, averaged over those workers
    queued: int = 0  # connections waiting in the listen queue(s)


@dataclass(frozen=True)
class Decision:
    workers: int
    reason: str  # "up" or "down"
    utilization: float  # the window's mean utilisation, for the log line
    queued: int  # the most connections seen waiting in the window


@dataclass
class Autoscaler:
    minimum: int
    maximum: int
    target: float = 0.6
    up_window: float = UP_WINDOW
    down_window: float = DOWN_WINDOW
    samples: deque[Sample] = field(default_factory=deque)
    changed_at: float = -math.inf  # the last change (ours or an operator's)
    hold_until: float = -math.inf  # a manual scale holds the count until then

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(
                f"autoscale bounds {self.minimum}:{self.maximum}: need 1 <= MIN <= MAX")
        if not 0 < self.target <= 1:
            raise ValueError(f"autoscale target {self.target}: need 0 < RATIO <= 1")

    def recommend(self, sample: Sample) -> int:
        ratio = sample.utilization / self.target
        count = sample.workers
        if sample.workers and abs(ratio - 1.0) > TOLERANCE:
            count = math.ceil(sample.workers * ratio - 1e-9)
        if sample.queued > 0:
            count = max(count, sample.workers + 1)
        return max(self.minimum, min(self.maximum, count))

    def observe(self, sample: Sample) -> None:
        self.samples.append(sample)
        oldest = sample.at - max(self.up_window, self.down_window) - 1.0
        while self.samples and self.samples[0].at < oldest:
            self.samples.popleft()

    def held(self, now: float) -> None:
        """An operator set the count (`forkd scale`): keep it for one down window."""
        self.hold_until = now + self.down_window
        self.changed_at = now

    def decide(self, current: int, now: float, busy: bool = False) -> Decision | None:
        if busy or now < self.hold_until:
            return None
        if current < self.minimum or current > self.maximum:
            # (a reload or crash left the pool outside its bounds: bring it back)
            target = max(self.minimum, min(self.maximum, current))
            return Decision(target, "bounds", self._mean(now, self.up_window), 0)
        up = self._window(now, self.up_window)
        if up:
            lowest = min(self.recommend(s) for s in up)
            if lowest > current:
                workers = min(lowest, current * 2, self.maximum)
                return Decision(workers, "up", self._mean(now, self.up_window),
                                max(s.queued for s in up))
        down = self._window(now, self.down_window)
        if down:
            highest = max(self.recommend(s) for s in down)
            if highest < current:
                return Decision(highest, "down", self._mean(now, self.down_window),
                                max(s.queued for s in down))
        return None

    def changed(self, now: float) -> None:
        """The count changed (our decision was carried out): judge anew from now on."""
        self.changed_at = now

    def _window(self, now: float, seconds: float) -> list[Sample]:
        """The samples of the last `seconds`, if they cover it and all came after the last
        change (samples of another worker count say nothing of this one)."""
        start = now - seconds
        if self.changed_at > start:
            return []
        window = [s for s in self.samples if s.at >= start]
        if not window or window[0].at > start + 1.5:  # a gap at the start: not covered yet
            return []
        return window

    def _mean(self, now: float, seconds: float) -> float:
        window = [s.utilization for s in self.samples if s.at >= now - seconds]
        return sum(window) / len(window) if window else 0.0
