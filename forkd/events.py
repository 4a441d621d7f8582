"""The events the supervisor core (policy.Supervisor.handle) takes, and the codec
of the worker channel: the one place where worker datagrams become typed values.

Two kinds of event exist:

* **Worker messages** travel from a worker to the primary over its datagram pair.
  The worker builds them with `encode(Ready(...))`; the primary's shell turns the
  bytes back into the same class with `decode(data)` and hands the core
  `FromWorker(pid, message)`. A datagram is `TAG` or `TAG SPACE JSON-object`; the
  JSON holds the message's fields by name. Malformed input decodes to None (the
  worker is our child, but an app can write anything to a descriptor it finds).

* **Primary events** are made by the shell itself (a fork succeeded or failed, a
  child was reaped, a memory sample, time passing, a signal, a control request)
  and never cross a wire.

Adding a worker message (say, a periodic metrics snapshot riding on the beat):

1. Write a frozen dataclass here whose fields are JSON types (int, float, str,
   bool, None, lists/dicts of those), decorate it with `@message("tag")` using a
   short tag no other message uses, and give its fields defaults when an older
   worker might omit them.
2. In the worker, `_send(channel, encode(YourMessage(...)))`.
3. In policy.Supervisor, add `YourMessage: _on_your_message` to `_WORKER_HANDLERS`
   (a method taking `(worker, message, now)` and returning actions) and assert the
   resulting table in tests/unit/test_policy.py.

Adding a primary event: a frozen dataclass here, added to `Event`, a handler in
`Supervisor._HANDLERS`, and the shell building it where the fact is observed.

Cost: a beat is one small datagram a second per worker; `decode` of it is one
dict lookup and one `json.loads` of a few bytes (64 idle workers: well under a
millisecond of the primary's CPU per second).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

MAX_ERROR = 60_000  # bytes of an error text a worker sends (one datagram)

_REGISTRY: dict[bytes, type[Any]] = {}
# per message class: (field name, the JSON types its value may have) in order
_FIELDS: dict[type[Any], tuple[tuple[str, frozenset[str]], ...]] = {}
_M = TypeVar("_M")


def message(tag: str) -> Callable[[type[_M]], type[_M]]:
    """Register a worker message class under its wire tag."""

    def register(cls: type[_M]) -> type[_M]:
        key = tag.encode("ascii")
        if key in _REGISTRY or b" " in key:
            raise ValueError(f"worker message tag {tag!r} is taken or has a space")
        _REGISTRY[key] = cls
        cls.TAG = key  # type: ignore[attr-defined]
        _FIELDS[cls] = tuple(
            (spec.name, frozenset(part.strip() for part in str(spec.type).split("|")))
            for spec in dataclasses.fields(cls))  # type: ignore[arg-type]
        return cls

    return register


# -- worker messages ---------------------------------------------------------------------------
@message("ready")
@dataclass(frozen=True)
class Ready:
    """The worker imported the app, finished its lifespan startup and accepts."""

    TAG: ClassVar[bytes]
    interface: str | None = None
    cwd: str | None = None  # the directory it resolved --chdir to (the release it serves)


@message("hb")
@dataclass(frozen=True)
class Beat:
    """Alive; requests counted so far. Once a second, dropped when the primary lags.
    `metrics` is the worker's metrics snapshot (forkd.metrics.snapshot's wire form,
    checked by the metrics shell, not here); the last beat, sent after the drain,
    carries the final counts."""

    TAG: ClassVar[bytes]
    requests: int = 0
    metrics: dict[str, Any] | None = None


@message("limit")
@dataclass(frozen=True)
class LimitReached:
    """The worker just started its --max-requests'th request."""

    TAG: ClassVar[bytes]
    requests: int = 0


@message("draining")
@dataclass(frozen=True)
class Draining:
    """The worker closed its listeners: it accepts nothing more."""

    TAG: ClassVar[bytes]


@message("error")
@dataclass(frozen=True)
class Failed:
    """What went wrong, sent before the worker exits with a failure."""

    TAG: ClassVar[bytes]
    error: str = ""


WorkerMessage = Ready | Beat | LimitReached | Draining | Failed


def encode(msg: WorkerMessage) -> bytes:
    fields = _FIELDS[type(msg)]
    if not fields:
        return msg.TAG
    values = {name: getattr(msg, name) for name, _ in fields}
    text = json.dumps(values, separators=(",", ":"), ensure_ascii=False)
    return msg.TAG + b" " + text.encode("utf-8", "replace")


def decode(data: bytes) -> WorkerMessage | None:
    """A datagram from a worker -> its message, or None when it is not one."""
    tag, _, payload = data.partition(b" ")
    cls = _REGISTRY.get(tag)
    if cls is None:
        return None
    try:
        values = json.loads(payload) if payload else {}
        if not isinstance(values, dict):
            return None
        msg = cls(**values)
    except (ValueError, TypeError):  # bad JSON, unknown or missing fields
        return None
    for name, allowed in _FIELDS[cls]:
        if not _fits(getattr(msg, name), allowed):
            return None
    return msg  # type: ignore[no-any-return]


def _fits(value: Any, allowed: frozenset[str]) -> bool:
    """The value has one of the types its field's annotation names (read as text, as
    annotations are postponed here); JSON only gives int, float, str, bool, None,
    list, dict."""
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return "int" in allowed or "float" in allowed
    if isinstance(value, float):
        return "float" in allowed
    if isinstance(value, str):
        return "str" in allowed
    return any(a.startswith(("list", "dict")) for a in allowed)


# -- primary events ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The primary is up: fill every slot."""


@dataclass(frozen=True)
class FromWorker:
    pid: int
    message: WorkerMessage


@dataclass(frozen=True)
class Spawned:
    """A Spawn action was carried out: the child runs with this pid."""

    slot: int
    replacement: bool
    pid: int
    request_limit: int | None = None


@dataclass(frozen=True)
class SpawnFailed:
    slot: int
    replacement: bool
    error: str


@dataclass(frozen=True)
class Exited:
    """A child was reaped: its exit code, or the signal that ended it."""

    pid: int
    code: int | None
    signum: int | None


@dataclass(frozen=True)
class MemorySample:
    used: dict[int, int] = field(default_factory=dict)  # pid -> bytes by --memory-metric


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines (back-off, kills, heartbeat silence) may be due."""


@dataclass(frozen=True)
class LoadSample:
    """Once a second: the pool's utilisation (busy time over wall time, averaged over the
    ready workers; None before any worker reported) and the connections waiting in the
    listen queues. Autoscaling decides from these."""

    utilization: float | None
    queued: int = 0


@dataclass(frozen=True)
class OperatorSignal:
    """A signal an operator sent to the primary (SIGCHLD is the shell's own)."""

    signum: int


@dataclass(frozen=True)
class ReloadRequest:
    requester: Any = None  # opaque to the core: handed back in Reply/Progress actions


@dataclass(frozen=True)
class ScaleRequest:
    """`forkd scale N` (relative False) or `+N` / `-N` (relative True)."""

    count: int
    relative: bool = False
    requester: Any = None


@dataclass(frozen=True)
class StopRequest:
    graceful: bool = True
    requester: Any = None


@dataclass(frozen=True)
class UpgradeRequest:
    """`forkd upgrade` (or SIGUSR2, with no requester): replace the primary itself."""

    requester: Any = None


# -- the successor of an upgrade (a new primary this one started) ------------------------------
@dataclass(frozen=True)
class SuccessorStarted:
    """The StartUpgrade action was carried out: the new primary runs with this pid."""

    pid: int


@dataclass(frozen=True)
class SuccessorReady:
    """The new primary says every one of its workers is ready."""

    pid: int


@dataclass(frozen=True)
class SuccessorFailed:
    """The new primary could not be started, or said it failed (while it runs: once it
    has exited, SuccessorExited carries its last words)."""

    why: str


@dataclass(frozen=True)
class SuccessorExited:
    """The new primary was reaped. `said` is what it had told this primary by then:
    "ready", "failed", "gone" (its end closed without a word) or None; `why` is a
    failure's reason it sent as its last words."""

    pid: int
    code: int | None
    signum: int | None
    said: str | None = None
    why: str = ""


ControlRequest = ReloadRequest | ScaleRequest | StopRequest | UpgradeRequest
Event = (Start | FromWorker | Spawned | SpawnFailed | Exited | MemorySample | Tick
         | LoadSample | OperatorSignal | ControlRequest | SuccessorStarted | SuccessorReady
         | SuccessorFailed | SuccessorExited)
