"""The worker table: pure records of slots and the worker processes in them, and
the legal moves between worker states. No I/O."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


_LEGAL: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.DRAINING}),
    WorkerState.READY: frozenset({WorkerState.DRAINING}),
    WorkerState.DRAINING: frozenset(),
}


class Cause(enum.Enum):
    """Why a worker left (or was asked to); the value is the word status and the
    metrics' `reason` label show."""

    CRASHED = "crashed"
    KILLED = "killed"
    MEMORY = "memory"
    TIMEOUT = "timeout"
    MAX_REQUESTS = "max-requests"
    RELOAD = "reload"
    SCALE = "scale"
    AUTOSCALE = "autoscale"
    STOP = "stop"
    RELOAD_ABORTED = "reload aborted"


@dataclass(frozen=True)
class Reason:
    """A cause and its detail: `Reason(Cause.CRASHED, "exit 1")` reads `crashed: exit 1`,
    as SPEC's `last_exit` shows it."""

    cause: Cause
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.cause.value}: {self.detail}" if self.detail else self.cause.value


class IllegalTransition(Exception):
    """A worker was asked to move between states in a way that cannot happen."""


@dataclass
class Worker:
    pid: int
    slot: int
    started_at: float
    last_seen: float
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    requests: int = 0
    request_limit: int | None = None
    leave_reason: Reason | None = None  # why forkd asked it to go; None until then
    kill_at: float | None = None  # SIGKILL when still alive at this time
    aborted: bool = False  # SIGABRT sent for a hang
    memory_strikes: int = 0
    stopped_accepting: bool = False  # it said it closed its listeners (draining)
    error: str | None = None  # what it reported before failing
    cwd: str | None = None  # the directory it resolved --chdir to (its release)

    def move(self, new: WorkerState) -> None:
        if new not in _LEGAL[self.state]:
            raise IllegalTransition(f"worker {self.pid}: {self.state.value} -> {new.value}")
        self.state = new


class SlotState(enum.Enum):
    """Where a slot is in its life. The occupant is the worker serving for the slot;
    a replacement is a new worker starting to take over from it."""

    EMPTY = "empty"  # no worker and none on its way (only ever between two steps)
    SPAWNING = "spawning"  # an occupant was asked for and is not forked yet
    BACKING_OFF = "backing-off"  # no worker: a crash-looping slot waits until respawn_at
    OCCUPIED = "occupied"  # an occupant (starting or ready) serves
    REPLACING = "replacing"  # a replacement is asked for or starting; the occupant (if it
    # still lives) serves until the replacement is ready


_SLOT_MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.EMPTY: frozenset({SlotState.SPAWNING, SlotState.BACKING_OFF}),
    SlotState.SPAWNING: frozenset({SlotState.OCCUPIED, SlotState.BACKING_OFF}),
    SlotState.BACKING_OFF: frozenset({SlotState.SPAWNING, SlotState.EMPTY,
                                      SlotState.REPLACING}),  # (a reload fills it)
    SlotState.OCCUPIED: frozenset({SlotState.REPLACING, SlotState.EMPTY}),
    # promoted, or failed while the occupant lives (OCCUPIED); failed with none (EMPTY)
    SlotState.REPLACING: frozenset({SlotState.OCCUPIED, SlotState.EMPTY}),
}


@dataclass
class Slot:
    id: int
    state: SlotState = SlotState.EMPTY
    pid: int | None = None  # the occupant
    replacement: int | None = None  # the replacement once forked (state REPLACING)
    replace_reason: Reason | None = None
    replace_failures: int = 0  # replacements in a row that never became ready
    replace_after: float = 0.0  # no health replacement before this time (after failures)
    restarts: int = 0
    last_exit: Reason | None = None
    fast_deaths: int = 0
    respawn_at: float | None = None  # when BACKING_OFF ends

    def move(self, new: SlotState) -> None:
        if new not in _SLOT_MOVES[self.state]:
            raise IllegalTransition(f"slot {self.id}: {self.state.value} -> {new.value}")
        self.state = new


@dataclass
class WorkerTable:
    workers: dict[int, Worker] = field(default_factory=dict)
    slots: dict[int, Slot] = field(default_factory=dict)

    def occupant(self, slot: Slot) -> Worker | None:
        return self.workers.get(slot.pid) if slot.pid is not None else None

    def ready_count(self) -> int:
        count = 0
        for slot in self.slots.values():
            worker = self.occupant(slot)
            if worker is not None and worker.state is WorkerState.READY:
                count += 1
        return count


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_words(code: int | None, signum: int | None) -> str:
    """An exit status for a log line: `exit 0`, `SIGKILL`."""
    return signal_name(signum) if signum is not None else f"exit {code}"


def exit_reason(code: int | None, signum: int | None) -> Reason:
    """An unasked-for exit: `crashed: exit 1`, `killed: SIGKILL`."""
    if signum is not None:
        return Reason(Cause.KILLED, signal_name(signum))
    return Reason(Cause.CRASHED, f"exit {code}")
