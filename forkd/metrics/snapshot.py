"""A worker's metrics snapshot, and its form on the worker channel: a small JSON
object that rides on each heartbeat (events.Beat.metrics), decoded and checked
here. Pure: no I/O.

Everything in a snapshot is cumulative since the worker started, except the gauges
(in flight, connections, websockets), so a lost beat loses nothing: the next one
carries the same totals and more. On the wire (about 200 bytes):
`{"r": [[method, code, count], ...], "b": [16 bucket counts], "s": duration_sum,
"f": in_flight, "c": connections, "w": websockets, "u": busy_seconds, "cpu": cpu}`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Latency bucket bounds in seconds (`le`), fixed so that workers and primary agree
# and the histogram can be summed across workers. +Inf is implied.
BOUNDS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Known methods keep the label bounded; anything else counts as "other" (index 0).
METHODS: tuple[str, ...] = ("other", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT",
                            "OPTIONS", "TRACE", "PATCH")
_METHOD_INDEX = {name: index for index, name in enumerate(METHODS)}
MAX_PAIRS = 1000  # (method, code) pairs a snapshot may carry: 10 methods x ~100 codes


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can read."""


def method_index(method: str) -> int:
    return _METHOD_INDEX.get(method, 0)


@dataclass(frozen=True)
class Snapshot:
    requests: dict[tuple[int, int], int] = field(default_factory=dict)  # (method, code)
    buckets: tuple[int, ...] = (0,) * (len(BOUNDS) + 1)
    duration_sum: float = 0.0
    in_flight: int = 0
    connections: int = 0
    websockets: int = 0
    busy: float = 0.0  # seconds spent with a request in flight
    cpu: float = 0.0  # the worker's CPU seconds (user + system)

    @property
    def answered(self) -> int:
        return sum(self.requests.values())


EMPTY = Snapshot()


def to_wire(snapshot: Snapshot) -> dict[str, Any]:
    return {"r": [[METHODS[m], code, n] for (m, code), n in snapshot.requests.items()],
            "b": list(snapshot.buckets), "s": snapshot.duration_sum,
            "f": snapshot.in_flight, "c": snapshot.connections, "w": snapshot.websockets,
            "u": snapshot.busy, "cpu": snapshot.cpu}


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise SnapshotError(f"{value!r} is not a count")
    return value


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise SnapshotError(f"{value!r} is not a number of seconds")
    return float(value)


def from_wire(data: Any) -> Snapshot:
    """The checked Snapshot of a beat's `metrics` object; SnapshotError when it is not
    one (a damaged or foreign datagram is refused whole, never half-read)."""
    if not isinstance(data, dict):
        raise SnapshotError("a snapshot is a JSON object")
    try:
        pairs, buckets = data["r"], data["b"]
        if not isinstance(pairs, list) or len(pairs) > MAX_PAIRS:
            raise SnapshotError("bad request counts")
        if not isinstance(buckets, list) or len(buckets) != len(BOUNDS) + 1:
            raise SnapshotError(f"{len(BOUNDS) + 1} histogram buckets expected")
        requests: dict[tuple[int, int], int] = {}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 3 or not isinstance(pair[0], str):
                raise SnapshotError(f"bad request count {pair!r}")
            code = _count(pair[1])
            if not 100 <= code <= 999:
                raise SnapshotError(f"bad status code {code}")
            key = (method_index(pair[0]), code)
            requests[key] = requests.get(key, 0) + _count(pair[2])
        return Snapshot(requests=requests, buckets=tuple(_count(b) for b in buckets),
                        duration_sum=_seconds(data["s"]), in_flight=_count(data["f"]),
                        connections=_count(data["c"]), websockets=_count(data["w"]),
                        busy=_seconds(data["u"]), cpu=_seconds(data["cpu"]))
    except KeyError as exc:
        raise SnapshotError(f"snapshot without {exc}") from None
