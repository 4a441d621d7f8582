"""The supervisor's decisions, with no I/O. One entry point:
`Supervisor.handle(event, now) -> list[Action]`. Events are the typed values of
forkd.events (a worker forked, became ready, beat, reached its request limit,
exited; a memory sample; time passing; an operator's signal or control request);
actions (spawn, signal, log, reply, notify, exit, ...) come out.

`Driver` is the one action loop: it hands each action to an `Effects` (the
primary's shell, or the unit tests' fake) and feeds the outcome of a spawn back
in as an event, so the tests run exactly the loop the primary runs.

Where things live: events and the worker codec in events.py; the worker and slot
lifecycles and their legal moves in state.py; operations (Reload, Scale, Stop,
Upgrade) below, each an `Operation` that owns its steps and its requester, driven through
hooks (`on_ready`, `on_promoted`, `on_replacement_failed`, `on_stopped_accepting`,
`on_exited`, `on_occupant_died`); max-requests and memory recycles are replacements
(`_replace`), not operations, so several may overlap each other and an operation.
"""

from __future__ import annotations

import logging
import random
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from forkd import events as ev
from forkd.autoscale import Autoscaler, Sample
from forkd.config import Config, format_size
from forkd.errors import EXIT_APP_LOAD, EXIT_BOOT, ProtocolError
from forkd.protocol import Code, resolve_scale
from forkd.state import (
    Cause,
    Reason,
    Slot,
    SlotState,
    Worker,
    WorkerState,
    WorkerTable,
    exit_reason,
    exit_words,
)

__all__ = ["EXIT_APP_LOAD", "EXIT_BOOT"]
MIN_UPTIME = 0.5  # a worker that dies younger than this (or before ready) died "fast"
STABLE_AFTER = 10.0  # a run this long resets a slot's back-off
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
DRAIN_MARGIN = 5.0  # beyond --graceful-timeout before a draining worker is killed: room for
# the app's lifespan shutdown (worker.LIFESPAN_SHUTDOWN) after its requests are done
ABORT_GRACE = 3.0  # after SIGABRT (a hang) before SIGKILL
QUIT_GRACE = 2.0  # after SIGQUIT (immediate stop) before SIGKILL


# -- actions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    slot: int
    replacement: bool = False
    request_limit: int | None = None  # --max-requests (+ jitter) for the new worker


@dataclass(frozen=True)
class Signal:
    pid: int
    signum: int


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict[str, Any]
    level: int = logging.INFO


@dataclass(frozen=True)
class Progress:
    """A line of progress for whoever asked for the running operation."""

    requester: Any
    text: str


@dataclass(frozen=True)
class Reply:
    """The answer to a control request: ok with a result, or an error code and why.
    A requester of None is a signal: nobody to answer (a failure is also logged)."""

    requester: Any
    ok: bool
    message: str
    code: Code | None = None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Notify:
    kind: str  # ready | reloading | stopping


@dataclass(frozen=True)
class Exit:
    code: int
    # for a failure: what went wrong (a new primary tells its predecessor); not part of
    # an Exit's identity, which is its code
    why: str = field(default="", compare=False)


@dataclass(frozen=True)
class ReopenLogs:
    """SIGUSR1: reopen the log file (after a rotation by logrotate, say)."""


@dataclass(frozen=True)
class StartUpgrade:
    """Start a new primary with this one's options on the inherited listeners; the
    shell answers with SuccessorStarted (or SuccessorFailed), then SuccessorReady or
    SuccessorFailed as the new primary reports."""


@dataclass(frozen=True)
class FailHealth:
    """A graceful stop with --drain-delay began: from now every worker answers
    --health-path with 503 while it goes on serving, so a load balancer takes the host
    out before its listeners close."""


@dataclass(frozen=True)
class HandOver:
    """The new primary is ready: let go of the control endpoint and tell it to take it;
    stop speaking for the service to systemd (the new primary is its main process now)."""

    pid: int


Action = (Spawn | Signal | Log | Progress | Reply | Notify | Exit | ReopenLogs | StartUpgrade
          | FailHealth | HandOver)


# -- operations ------------------------------------------------------------------------------
class Operation:
    """An operator's request that takes many events to finish: reload, scale, stop,
    upgrade (of the primary itself). One runs at a time; a second
    mutating request meanwhile is refused as busy. The supervisor calls the hooks
    below at the moments they name; an operation answers with actions, and ends
    itself with `sup.finish(self)`. Health replacements (max-requests, memory,
    a crash) are not operations: they may overlap each other and any operation."""

    noun: ClassVar[str] = ""
    requester: Any = None

    def describe(self) -> str:
        return f"{self.noun} in progress"

    def on_cancelled(self, sup: Supervisor, now: float) -> list[Action]:
        """A stop signal ended the operation before it was done."""
        return []

    def begin(self, sup: Supervisor, now: float) -> list[Action]:
        return []

    def on_ready(self, sup: Supervisor, worker: Worker, now: float) -> list[Action]:
        return []

    def on_promoted(self, sup: Supervisor, slot: Slot, old: Worker | None, new: Worker,
                    now: float) -> list[Action]:
        return []

    def on_replacement_failed(self, sup: Supervisor, slot: Slot, why: str, now: float
                              ) -> list[Action]:
        return []

    def on_stopped_accepting(self, sup: Supervisor, worker: Worker, now: float
                             ) -> list[Action]:
        return []

    def on_exited(self, sup: Supervisor, worker: Worker, now: float) -> list[Action]:
        return []

    def on_occupant_died(self, sup: Supervisor, slot: Slot, now: float) -> None:
        return None

    def deadline(self) -> float | None:
        """When the operation's next step is due by the clock alone (on_tick then)."""
        return None

    def on_tick(self, sup: Supervisor, now: float) -> list[Action]:
        return []


@dataclass(eq=False)
class Reload(Operation):
    """Rolling: each slot gets a replacement; its old worker drains once the new one
    is ready; `reload_batch` slots at a time; the first failure aborts the rest."""

    slots: list[int]
    total: int
    started_at: float
    requester: Any = None
    done: int = 0
    active: dict[int, float] = field(default_factory=dict)  # slot -> step start
    # replaced workers that may still accept: the reload is done only once each has
    # closed its listeners (or exited), so no request reaches old code afterwards
    old_accepting: set[int] = field(default_factory=set)

    noun = "reload"

    def describe(self) -> str:
        return f"reload in progress ({self.done}/{self.total})"

    def begin(self, sup: Supervisor, now: float) -> list[Action]:
        return [Log("reload-start", {"workers": self.total}), Notify("reloading"),
                Progress(self.requester, f"reloading {self.total} worker(s), "
                         f"{sup.config.reload_batch} at a time"),
                *self.next(sup, now)]

    def next(self, sup: Supervisor, now: float) -> list[Action]:
        actions: list[Action] = []
        while self.slots and len(self.active) < sup.config.reload_batch:
            slot = sup.table.slots.get(self.slots.pop(0))
            if slot is None:
                self.total -= 1
                continue
            if slot.state is SlotState.SPAWNING:  # a worker for it is being forked: it
                self.done += 1  # loads the code as it is now, which is what a reload asks
                continue
            self.active[slot.id] = now
            slot.replace_reason = Reason(Cause.RELOAD)
            if slot.state is SlotState.REPLACING:
                continue  # a health replacement already on its way serves the reload
            slot.respawn_at = None
            slot.move(SlotState.REPLACING)  # (from OCCUPIED, or BACKING_OFF: filled now)
            actions.append(sup.spawn_action(slot.id, replacement=True))
        if not self.slots and not self.active and not self.old_accepting:
            sup.finish(self)
            sup.announced_ready = sup.all_ready()
            seconds = now - self.started_at
            actions.append(Log("reload-done", {"workers": self.total,
                                               "seconds": f"{seconds:.2f}"}))
            actions += sup.reply(self.requester, True,
                                 f"reloaded {self.total} worker(s) in {seconds:.1f}s",
                                 result={"workers": self.total})
            actions.append(Notify("ready"))
        return actions

    def on_promoted(self, sup: Supervisor, slot: Slot, old: Worker | None, new: Worker,
                    now: float) -> list[Action]:
        if slot.id not in self.active:
            return []
        self.active.pop(slot.id)
        self.done += 1
        if old is not None and not old.stopped_accepting:
            self.old_accepting.add(old.pid)
        old_pid = old.pid if old is not None else "-"
        return [Progress(self.requester,
                         f"slot {slot.id} ({self.done}/{self.total}): pid {old_pid} → "
                         f"{new.pid}, ready in {(now - new.started_at) * 1000:.0f} ms"),
                *self.next(sup, now)]

    def on_replacement_failed(self, sup: Supervisor, slot: Slot, why: str, now: float
                              ) -> list[Action]:
        if slot.id not in self.active:
            return []
        sup.finish(self)
        actions: list[Action] = []
        for other_id in self.active:
            other = sup.table.slots.get(other_id)
            if (other is not None and other_id != slot.id and other.replacement is not None
                    and other.pid is not None):  # (one with no occupant left stays)
                pending = sup.table.workers.get(other.replacement)
                other.move(SlotState.OCCUPIED)
                other.replacement = None
                other.replace_reason = None
                if pending is not None:
                    actions += sup.drain(pending, Reason(Cause.RELOAD_ABORTED), now)
        text = why.strip()
        message = (f"reload aborted: the replacement for slot {slot.id} failed ({text})"
                   if "\n" not in text else
                   f"reload aborted: the replacement for slot {slot.id} failed:\n{why}")
        actions.append(Log("reload-aborted", {"slot": slot.id, "done": self.done,
                                              "total": self.total}, ERROR))
        actions += sup.reply(self.requester, False, message, Code.FAILED)
        actions.append(Notify("ready"))
        return actions

    def on_stopped_accepting(self, sup: Supervisor, worker: Worker, now: float
                             ) -> list[Action]:
        if worker.pid not in self.old_accepting:
            return []
        self.old_accepting.discard(worker.pid)
        return self.next(sup, now)


@dataclass(eq=False)
class Scale(Operation):
    """New slots are ready-gated; removed slots' workers drain. Done when both are."""

    target: int
    requester: Any = None
    cause: Cause = Cause.SCALE  # AUTOSCALE when the autoscaler asked
    adding: set[int] = field(default_factory=set)
    removing: set[int] = field(default_factory=set)  # pids draining away

    noun = "scale"

    def describe(self) -> str:
        return f"scale to {self.target} in progress"

    def begin(self, sup: Supervisor, now: float) -> list[Action]:
        actions: list[Action] = [Log("scale", {"from": sup.target, "to": self.target,
                                               "by": self.cause.value})]
        slots = sup.table.slots
        while len(slots) < self.target:
            slot_id = next(i for i in range(self.target) if i not in slots)
            slots[slot_id] = Slot(slot_id, SlotState.SPAWNING)
            self.adding.add(slot_id)
            actions.append(sup.spawn_action(slot_id))
        # The highest slots go: the ones a scale-up added last, so the workers with the
        # coldest caches (and slot ids stay 0 … N-1, as FORKD_WORKER_ID promises).
        for slot_id in sorted(slots, reverse=True)[: max(0, len(slots) - self.target)]:
            slot = slots.pop(slot_id)
            for pid in (slot.pid, slot.replacement):
                worker = sup.table.workers.get(pid) if pid is not None else None
                if worker is not None:
                    self.removing.add(worker.pid)
                    actions += sup.drain(worker, Reason(self.cause), now)
        return actions + self._maybe_done(sup)

    def on_ready(self, sup: Supervisor, worker: Worker, now: float) -> list[Action]:
        if worker.slot not in self.adding:
            return []
        self.adding.discard(worker.slot)
        return [Progress(self.requester, f"slot {worker.slot}: pid {worker.pid} ready "
                         f"in {(now - worker.started_at) * 1000:.0f} ms"),
                *self._maybe_done(sup)]

    def on_exited(self, sup: Supervisor, worker: Worker, now: float) -> list[Action]:
        if worker.pid not in self.removing:
            return []
        self.removing.discard(worker.pid)
        return [Progress(self.requester, f"slot {worker.slot}: pid {worker.pid} drained"),
                *self._maybe_done(sup)]

    def on_occupant_died(self, sup: Supervisor, slot: Slot, now: float) -> None:
        self.adding.discard(slot.id)  # (its respawn is the slot's own business now)

    def _maybe_done(self, sup: Supervisor) -> list[Action]:
        if self.adding or self.removing:
            return []
        sup.finish(self)
        return [Log("scale-done", {"workers": sup.target}),
                *sup.reply(self.requester, True, f"{sup.target} worker(s) running",
                           result={"workers": sup.target})]


@dataclass(eq=False)
class Stop(Operation):
    """Every worker drains (graceful) or quits at once; the primary exits when the
    last one is gone. Never refused by, and never ends in favour of, another."""

    graceful: bool
    exit_code: int = 0
    why: str = ""
    requesters: list[Any] = field(default_factory=list)  # each stop asker gets the answer
    # --drain-delay: until this time the workers go on serving with the health path
    # failing, so that a load balancer lets go of the host first; then they drain
    drain_at: float | None = None
    # after an upgrade: a new primary is the service now, so nothing goes to systemd
    handed_over: bool = False

    noun = "stop"

    def begin(self, sup: Supervisor, now: float) -> list[Action]:
        # (after an upgrade the host goes on serving through the new primary: no delay)
        delay = (sup.config.drain_delay
                 if self.graceful and sup.table.workers and not self.handed_over else 0.0)
        fields: dict[str, Any] = {"graceful": self.graceful, "workers": len(sup.table.workers)}
        if delay > 0:
            fields["drain_delay"] = f"{delay:g}s"
        if self.handed_over:
            fields["reason"] = "upgraded"
        actions: list[Action] = [Log("stopping", fields)]
        if not self.handed_over:
            actions.append(Notify("stopping"))
        if self.why:
            actions.append(Log("stop-reason", {"why": self.why.splitlines()[-1]}, ERROR))
        for slot in sup.table.slots.values():
            if slot.state is SlotState.BACKING_OFF:
                slot.move(SlotState.EMPTY)
                slot.respawn_at = None
        if delay > 0:
            # first, so the health path already fails when the log says the stop began
            self.drain_at = now + delay
            return [FailHealth(), *actions]
        return actions + self._drain(sup, now)

    def deadline(self) -> float | None:
        return self.drain_at

    def on_tick(self, sup: Supervisor, now: float) -> list[Action]:
        if self.drain_at is None or now < self.drain_at:
            return []
        self.drain_at = None
        return [Log("drain-delay-over", {"workers": len(sup.table.workers)}),
                *self._drain(sup, now)]

    def _drain(self, sup: Supervisor, now: float) -> list[Action]:
        """Every worker drains (graceful) or quits; --graceful-timeout counts from here."""
        actions: list[Action] = []
        for worker in sup.table.workers.values():
            if self.graceful:
                if worker.state is not WorkerState.DRAINING:
                    worker.move(WorkerState.DRAINING)
                    worker.leave_reason = worker.leave_reason or Reason(Cause.STOP)
                    actions.append(Signal(worker.pid, signal.SIGTERM))
                worker.kill_at = now + sup.config.graceful_timeout + DRAIN_MARGIN
            else:
                worker.leave_reason = worker.leave_reason or Reason(Cause.STOP)
                actions.append(Signal(worker.pid, signal.SIGQUIT))
                worker.kill_at = now + QUIT_GRACE
        return actions + self.on_exited(sup, None, now)

    def on_exited(self, sup: Supervisor, worker: Worker | None, now: float) -> list[Action]:
        if sup.table.workers:
            return []
        actions: list[Action] = [Log("stopped", {"code": self.exit_code})]
        for requester in self.requesters:
            actions.append(Reply(requester, True, "stopped"))
        return actions + [Exit(self.exit_code, self.why)]


UPGRADE_MARGIN = 30.0  # beyond --startup-timeout for a new primary: its own start-up
# (interpreter, imports, a --preload import of the app) before its workers boot
SUCCESSOR_KILL_MARGIN = 10.0  # beyond --graceful-timeout for a failed new primary told to
# stop: it drains its own workers within --graceful-timeout, then exits; else SIGKILL


@dataclass
class LeavingSuccessor:
    """The new primary of a failed upgrade, told to stop and not yet reaped. Another
    upgrade waits for it to be gone: the shell holds one successor at a time, and a
    third generation of workers beside a second that is still draining on the same
    listeners is not what an operator asked for."""

    pid: int
    kill_at: float | None  # when it gets SIGKILL (None: sent)


@dataclass(eq=False)
class Upgrade(Operation):
    """The primary replaces itself. The shell starts a new primary with the same
    options on the inherited listeners (StartUpgrade); its workers accept beside ours
    as each becomes ready. Once it reports every worker ready, this primary answers,
    hands the control endpoint over (HandOver) and drains its own workers away: a
    Stop that tells systemd nothing, since the new primary is the service now.

    If the new primary fails (it says why, or exits) or is not ready by the deadline,
    it is told to stop and this primary goes on serving exactly as before."""

    started_at: float
    ready_by: float
    requester: Any = None
    successor: int | None = None

    noun = "upgrade"

    def describe(self) -> str:
        if self.successor is None:
            return "upgrade in progress"
        return f"upgrade in progress (new primary pid {self.successor})"

    def deadline(self) -> float | None:
        return self.ready_by

    def begin(self, sup: Supervisor, now: float) -> list[Action]:
        return [Log("upgrade-start", {"workers": sup.target}), Notify("reloading"),
                Progress(self.requester, "starting a new primary on the same listeners"),
                StartUpgrade()]

    def on_successor_started(self, sup: Supervisor, pid: int, now: float) -> list[Action]:
        self.successor = pid
        return [Log("upgrade-successor", {"pid": pid}),
                Progress(self.requester, f"new primary pid {pid} started, "
                         f"waiting for its {sup.target} worker(s) to be ready")]

    def on_successor_ready(self, sup: Supervisor, pid: int, now: float) -> list[Action]:
        if pid != self.successor:
            return []
        sup.finish(self)
        seconds = now - self.started_at
        actions: list[Action] = [
            Log("upgrade-done", {"pid": pid, "seconds": f"{seconds:.2f}"}),
            *sup.reply(self.requester, True,
                       f"upgraded in {seconds:.1f}s: new primary pid {pid} serves; "
                       "the old one drains its workers and exits",
                       result={"pid": pid, "seconds": round(seconds, 3)}),
            HandOver(pid)]
        return actions + sup._begin_stop(True, now, 0, handed_over=True)

    def on_successor_exited(self, sup: Supervisor, event: ev.SuccessorExited,
                            now: float) -> list[Action]:
        status = exit_words(event.code, event.signum)
        if event.why.strip():
            why = event.why
        elif event.said == "ready":  # (its word came too late: nobody takes over now)
            why = (f"the new primary (pid {event.pid}) said it was ready, then exited "
                   f"({status}) before it took over")
        else:
            why = f"the new primary (pid {event.pid}) exited ({status}) before it was ready"
        return self.on_successor_failed(sup, why, now, alive=False)

    def on_successor_failed(self, sup: Supervisor, why: str, now: float,
                            alive: bool = True) -> list[Action]:
        """The upgrade failed: this primary serves on. A successor that still runs
        (`alive`) is told to stop, and another upgrade waits until it is gone."""
        sup.finish(self)
        text = why.strip() or "no reason given"
        # (a traceback starts on its own line, as a failed reload prints it)
        message = (f"upgrade failed, the old primary goes on serving: {text}"
                   if "\n" not in text else
                   f"upgrade failed, the old primary goes on serving:\n{text}")
        actions: list[Action] = [Log("upgrade-failed", {"pid": self.successor,
                                                        "why": text.splitlines()[-1]}, ERROR)]
        if self.successor is not None and alive:
            actions.append(Signal(self.successor, signal.SIGTERM))
            sup.leaving_successor = LeavingSuccessor(
                self.successor, now + sup.config.graceful_timeout + SUCCESSOR_KILL_MARGIN)
        # (an exited one is not signalled: its pid is reaped, and may be another's now)
        return actions + sup.reply(self.requester, False, message, Code.FAILED) + [
            Notify("ready")]

    def on_tick(self, sup: Supervisor, now: float) -> list[Action]:
        if now < self.ready_by:
            return []
        limit = self.ready_by - self.started_at
        return self.on_successor_failed(
            sup, f"the new primary was not ready within {limit:g}s", now)

    def on_cancelled(self, sup: Supervisor, now: float) -> list[Action]:
        if self.successor is None:
            return []
        return [Signal(self.successor, signal.SIGTERM)]


def backoff_delay(fast_deaths: int) -> float:
    """Seconds before a slot that died fast `fast_deaths` times in a row respawns:
    twice at once (a worker killed twice in quick succession, by an operator or the
    OOM killer, is not a crash loop), then 0.5 s, 1 s, 2 s ... up to 30 s."""
    if fast_deaths <= 2:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (fast_deaths - 3))


WARNING = logging.WARNING
ERROR = logging.ERROR
_HEALTH = (Cause.CRASHED, Cause.KILLED, Cause.MEMORY, Cause.TIMEOUT, Cause.MAX_REQUESTS)
_DEFERRED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2)


class Supervisor:
    def __init__(self, config: Config, workers: int, rng: random.Random | None = None) -> None:
        self.config = config
        self.table = WorkerTable()
        self.rng = rng or random.Random()
        self.operation: Operation | None = None
        self.any_ready = False
        self.announced_ready = False
        self.interrupts = 0  # SIGINTs so far: the second means "now"
        self.deferred: list[int] = []  # operator signals waiting for the running operation
        # replacements for health reasons since start, by cause (shown in status)
        self.counters: dict[str, int] = {cause.value: 0 for cause in _HEALTH}
        self.autoscaler: Autoscaler | None = None
        self.leaving_successor: LeavingSuccessor | None = None  # of a failed upgrade
        if config.autoscale is not None:
            self.autoscaler = Autoscaler(*config.autoscale, target=config.autoscale_target,
                                         down_window=config.autoscale_window)
        for slot_id in range(workers):
            self.table.slots[slot_id] = Slot(slot_id)

    # -- the entry point ---------------------------------------------------------------------
    def handle(self, event: ev.Event, now: float) -> list[Action]:
        """Everything that happens to the primary comes in here, typed."""
        if isinstance(event, ev.FromWorker):
            worker = self.table.workers.get(event.pid)
            if worker is None:
                return []
            worker.last_seen = now
            actions = _WORKER_HANDLERS[type(event.message)](self, worker, event.message, now)
        else:
            actions = _HANDLERS[type(event)](self, event, now)
        if self.deferred and self.operation is None:
            actions += self._run_deferred(now)
        return actions

    # -- queries -----------------------------------------------------------------------------
    @property
    def target(self) -> int:
        return len(self.table.slots)

    @property
    def stopping(self) -> bool:
        return isinstance(self.operation, Stop)

    def all_ready(self) -> bool:
        return self.table.ready_count() == self.target

    def next_deadline(self, now: float) -> float | None:
        times: list[float] = []
        for slot in self.table.slots.values():
            if slot.respawn_at is not None:
                times.append(slot.respawn_at)
        step = self.operation.deadline() if self.operation is not None else None
        if step is not None:
            times.append(step)
        if self.leaving_successor is not None and self.leaving_successor.kill_at is not None:
            times.append(self.leaving_successor.kill_at)
        for worker in self.table.workers.values():
            if worker.kill_at is not None:
                times.append(worker.kill_at)
            if not worker.aborted:
                times.append(worker.last_seen + self._silence_limit(worker))
        return min(times) if times else None

    def _silence_limit(self, worker: Worker) -> float:
        if worker.state is WorkerState.STARTING:
            slot = self.table.slots.get(worker.slot)
            if slot is not None and slot.replacement == worker.pid:
                return self.config.timeout  # SPEC: a replacement must be ready within --timeout
            return max(self.config.startup_timeout, self.config.timeout)
        return self.config.timeout

    # -- start and spawns ----------------------------------------------------------------------
    def _start(self, event: ev.Start, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot in self.table.slots.values():
            slot.move(SlotState.SPAWNING)
            actions.append(self.spawn_action(slot.id))
        return actions

    def spawn_action(self, slot_id: int, replacement: bool = False) -> Spawn:
        limit = None
        if self.config.max_requests:
            limit = self.config.max_requests + self.rng.randint(
                0, self.config.max_requests_jitter)
        return Spawn(slot_id, replacement, limit)

    def _spawned(self, event: ev.Spawned, now: float) -> list[Action]:
        slot = self.table.slots.get(event.slot)
        worker = Worker(pid=event.pid, slot=event.slot, started_at=now, last_seen=now,
                        request_limit=event.request_limit)
        self.table.workers[event.pid] = worker
        if slot is None:  # scaled away meanwhile: let it go at once
            return self.drain(worker, Reason(Cause.SCALE), now)
        if event.replacement:
            slot.replacement = event.pid  # (the slot is REPLACING already)
        else:
            slot.move(SlotState.OCCUPIED)
            slot.pid = event.pid
        return [Log("worker-started", {"slot": event.slot, "pid": event.pid,
                                       "role": "replacement" if event.replacement else None})]

    def _spawn_failed(self, event: ev.SpawnFailed, now: float) -> list[Action]:
        slot = self.table.slots.get(event.slot)
        actions: list[Action] = [Log("spawn-failed", {"slot": event.slot,
                                                      "error": event.error}, ERROR)]
        if slot is None:
            return actions
        if event.replacement:
            return actions + self._replacement_failed(slot, None, f"fork failed: {event.error}",
                                                      now)
        slot.fast_deaths += 1
        slot.move(SlotState.BACKING_OFF)
        slot.respawn_at = now + max(backoff_delay(slot.fast_deaths), BACKOFF_BASE)
        return actions

    # -- messages from workers ---------------------------------------------------------------
    def _on_beat(self, worker: Worker, msg: ev.Beat, now: float) -> list[Action]:
        worker.requests = max(worker.requests, msg.requests)
        return self._check_requests(worker, now)

    def _on_limit(self, worker: Worker, msg: ev.LimitReached, now: float) -> list[Action]:
        worker.requests = max(worker.requests, msg.requests)
        return self._check_requests(worker, now)

    def _on_failed(self, worker: Worker, msg: ev.Failed, now: float) -> list[Action]:
        worker.error = msg.error
        return []

    def _on_draining(self, worker: Worker, msg: ev.Draining, now: float) -> list[Action]:
        return self._stopped_accepting(worker, now)

    def _stopped_accepting(self, worker: Worker, now: float) -> list[Action]:
        worker.stopped_accepting = True
        if self.operation is None:
            return []
        return self.operation.on_stopped_accepting(self, worker, now)

    def _on_ready(self, worker: Worker, msg: ev.Ready, now: float) -> list[Action]:
        if worker.state is not WorkerState.STARTING:
            return []
        worker.move(WorkerState.READY)
        worker.ready_at = now
        worker.cwd = msg.cwd
        self.any_ready = True
        actions: list[Action] = [Log("worker-ready", {
            "slot": worker.slot, "pid": worker.pid, "interface": msg.interface,
            "cwd": msg.cwd, "ms": round((now - worker.started_at) * 1000)})]
        slot = self.table.slots.get(worker.slot)
        if slot is None:
            return actions
        if slot.replacement == worker.pid:
            actions += self._promote(slot, worker, now)
        if self.operation is not None:
            actions += self.operation.on_ready(self, worker, now)
        if self.operation is None and not self.announced_ready and self.all_ready():
            self.announced_ready = True
            actions.append(Log("all-ready", {"workers": self.target}))
            actions.append(Notify("ready"))
        return actions

    def _promote(self, slot: Slot, new: Worker, now: float) -> list[Action]:
        """The replacement is ready: it becomes the occupant, the old one drains."""
        reason = slot.replace_reason or Reason(Cause.RELOAD)
        old = self.table.occupant(slot)
        slot.move(SlotState.OCCUPIED)
        slot.pid = new.pid
        slot.replacement = None
        slot.replace_reason = None
        slot.replace_failures = 0
        actions: list[Action] = []
        if old is not None:
            if reason.cause in _HEALTH:
                slot.restarts += 1
                self._count(reason)
            slot.last_exit = reason
            actions += self.drain(old, reason, now)
            actions.append(Log("worker-replaced", {"slot": slot.id, "old": old.pid,
                                                   "new": new.pid, "reason": str(reason)}))
        if self.operation is not None:
            actions += self.operation.on_promoted(self, slot, old, new, now)
        return actions

    def _check_requests(self, worker: Worker, now: float) -> list[Action]:
        """A worker at its --max-requests is replaced at once: ready-gated as every
        replacement (the old one serves until the new one is ready), so recycles of
        several slots may overlap without the ready count falling below the target."""
        limit = worker.request_limit
        if (limit is None or worker.requests < limit or worker.state is not WorkerState.READY
                or self.stopping):
            return []
        slot = self.table.slots.get(worker.slot)
        if slot is None or slot.pid != worker.pid:
            return []
        return self._replace(slot, Reason(Cause.MAX_REQUESTS), now,
                             {"requests": worker.requests, "limit": limit})

    # -- replacements ------------------------------------------------------------------------------
    def _replace(self, slot: Slot, reason: Reason, now: float,
                 figures: dict[str, Any] | None = None) -> list[Action]:
        if slot.state is not SlotState.OCCUPIED or now < slot.replace_after:
            return []
        slot.move(SlotState.REPLACING)
        slot.replace_reason = reason
        fields: dict[str, Any] = {"slot": slot.id, "pid": slot.pid, "reason": str(reason)}
        fields.update(figures or {})
        return [Log("worker-replacing", fields), self.spawn_action(slot.id, replacement=True)]

    def _replacement_failed(self, slot: Slot, worker: Worker | None, why: str, now: float
                            ) -> list[Action]:
        slot.move(SlotState.OCCUPIED if slot.pid is not None else SlotState.EMPTY)
        slot.replacement = None
        reason = slot.replace_reason
        slot.replace_reason = None
        # a replacement that cannot start (new code on disk that does not import, say) is
        # not retried by the health checks at every beat, but after a growing pause
        slot.replace_failures += 1
        slot.replace_after = now + max(BACKOFF_BASE, backoff_delay(slot.replace_failures + 1))
        actions: list[Action] = [Log("replacement-failed", {
            "slot": slot.id, "pid": worker.pid if worker else None,
            "reason": str(reason) if reason else None,
            "why": why.strip().splitlines()[-1] if why.strip() else why}, ERROR)]
        if self.operation is not None:
            actions += self.operation.on_replacement_failed(self, slot, why, now)
        if slot.state is SlotState.EMPTY and not self.stopping:
            actions += self._respawn(slot, now)  # its occupant died meanwhile
        return actions

    def drain(self, worker: Worker, reason: Reason, now: float) -> list[Action]:
        if worker.state is WorkerState.DRAINING:
            return []
        worker.move(WorkerState.DRAINING)
        worker.leave_reason = reason
        worker.kill_at = now + self.config.graceful_timeout + DRAIN_MARGIN
        return [Signal(worker.pid, signal.SIGTERM)]

    # -- exits -----------------------------------------------------------------------------------
    def _exited(self, event: ev.Exited, now: float) -> list[Action]:
        pid, code, signum = event.pid, event.code, event.signum
        worker = self.table.workers.pop(pid, None)
        if worker is None:
            return []
        reason = worker.leave_reason or exit_reason(code, signum)
        actions: list[Action] = [Log("worker-exited", {
            "slot": worker.slot, "pid": pid, "status": exit_words(code, signum),
            "reason": str(reason), "requests": worker.requests,
            "uptime": f"{now - worker.started_at:.1f}s"},
            logging.INFO if worker.leave_reason else WARNING)]
        if worker.error and worker.ready_at is None:
            actions.append(Log("worker-error", {"slot": worker.slot, "pid": pid,
                                                "error": worker.error.strip().splitlines()[-1]},
                               ERROR))
        slot = self.table.slots.get(worker.slot)
        if self.operation is not None:
            actions += self.operation.on_exited(self, worker, now)
        if self.stopping:
            return actions
        actions += self._stopped_accepting(worker, now)  # an exited worker accepts nothing
        if slot is None:
            return actions
        if slot.replacement == pid:
            why = worker.error or f"{exit_reason(code, signum)} before it was ready"
            if worker.aborted:
                why = worker.error or f"not ready within {self.config.timeout:g}s"
            return actions + self._replacement_failed(slot, worker, why, now)
        if slot.pid != pid:
            return actions  # an old occupant finished draining
        return actions + self._occupant_died(slot, worker, reason, code, now)

    def _occupant_died(self, slot: Slot, worker: Worker, reason: Reason, code: int | None,
                       now: float) -> list[Action]:
        slot.pid = None
        if slot.state is SlotState.OCCUPIED:
            slot.move(SlotState.EMPTY)
        slot.last_exit = reason
        slot.restarts += 1
        self._count(reason)
        actions: list[Action] = []
        if (not self.any_ready and worker.ready_at is None
                and code in (EXIT_APP_LOAD, EXIT_BOOT)):
            # The app cannot load in the first generation: respawning would only loop.
            message = (worker.error or "the app failed to load").rstrip()
            actions.append(Log("app-load-failed", {"slot": slot.id, "pid": worker.pid,
                                                   "code": code}, ERROR))
            return actions + self._begin_stop(False, now, 1, why=message)
        uptime = now - worker.started_at
        if worker.ready_at is None or uptime < MIN_UPTIME:
            slot.fast_deaths += 1
        elif uptime >= STABLE_AFTER:
            slot.fast_deaths = 0
        if self.operation is not None:
            self.operation.on_occupant_died(self, slot, now)
        if slot.state is SlotState.REPLACING:
            # a replacement is already on its way: once ready it takes the empty slot
            # (through _promote, so a reload waiting on it goes on)
            return actions
        return actions + self._respawn(slot, now)

    def _respawn(self, slot: Slot, now: float) -> list[Action]:
        """A worker for an empty slot: at once, or after the slot's back-off."""
        delay = backoff_delay(slot.fast_deaths)
        if delay > 0:
            slot.move(SlotState.BACKING_OFF)
            slot.respawn_at = now + delay
            return [Log("slot-backoff", {"slot": slot.id, "delay": f"{delay:g}s",
                                         "fast_deaths": slot.fast_deaths}, WARNING)]
        slot.move(SlotState.SPAWNING)
        return [self.spawn_action(slot.id)]

    def _count(self, reason: Reason) -> None:
        if reason.cause.value in self.counters:
            self.counters[reason.cause.value] += 1

    # -- time --------------------------------------------------------------------------------------
    def _tick(self, event: ev.Tick, now: float) -> list[Action]:
        actions: list[Action] = self.operation.on_tick(self, now) if self.operation else []
        leaving = self.leaving_successor
        if leaving is not None and leaving.kill_at is not None and now >= leaving.kill_at:
            leaving.kill_at = None
            actions += [Log("successor-kill", {"pid": leaving.pid}, WARNING),
                        Signal(leaving.pid, signal.SIGKILL)]
        for slot in self.table.slots.values():
            if (slot.state is SlotState.BACKING_OFF and slot.respawn_at is not None
                    and now >= slot.respawn_at):
                slot.respawn_at = None
                if self.stopping:
                    slot.move(SlotState.EMPTY)
                else:
                    slot.move(SlotState.SPAWNING)
                    actions.append(self.spawn_action(slot.id))
        for worker in list(self.table.workers.values()):
            if worker.kill_at is not None and now >= worker.kill_at:
                worker.kill_at = None
                why = str(worker.leave_reason) if worker.leave_reason else None
                actions.append(Log("worker-kill", {"slot": worker.slot, "pid": worker.pid,
                                                   "why": why}, WARNING))
                actions.append(Signal(worker.pid, signal.SIGKILL))
            elif not worker.aborted and now - worker.last_seen >= self._silence_limit(worker):
                worker.aborted = True
                silent = now - worker.last_seen
                if worker.leave_reason is None:
                    worker.leave_reason = Reason(Cause.TIMEOUT)
                worker.kill_at = now + ABORT_GRACE
                actions.append(Log("worker-timeout", {
                    "slot": worker.slot, "pid": worker.pid, "state": worker.state.value,
                    "silent": f"{silent:.1f}s"}, ERROR))
                actions.append(Signal(worker.pid, signal.SIGABRT))
        return actions

    def _memory(self, event: ev.MemorySample, now: float) -> list[Action]:
        limit = self.config.max_memory
        hard = self.config.hard_memory_limit
        if limit is None or hard is None or self.stopping:
            return []
        actions: list[Action] = []
        for pid, used in event.used.items():
            worker = self.table.workers.get(pid)
            if worker is None or worker.state is not WorkerState.READY:
                continue
            slot = self.table.slots.get(worker.slot)
            if slot is None or slot.pid != pid:
                continue
            reason = Reason(Cause.MEMORY, f"{format_size(used)} > {format_size(limit)}")
            if used > hard:
                worker.leave_reason = reason
                worker.kill_at = None
                actions.append(Log("worker-memory-kill", {
                    "slot": slot.id, "pid": pid, "used": used, "hard_limit": hard}, ERROR))
                actions.append(Signal(pid, signal.SIGKILL))
            elif used > limit:
                worker.memory_strikes += 1
                if worker.memory_strikes >= self.config.memory_samples:
                    actions += self._replace(slot, reason, now, {"used": used, "limit": limit})
            else:
                worker.memory_strikes = 0
        return actions

    # -- operator signals ---------------------------------------------------------------------
    def _signal(self, event: ev.OperatorSignal, now: float) -> list[Action]:
        signum = event.signum
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            if signum == signal.SIGINT:
                self.interrupts += 1
            # a second Ctrl-C means "now", as with every foreground server
            graceful = signum == signal.SIGTERM or (
                signum == signal.SIGINT and self.interrupts == 1)
            return ([Log("signal", {"name": name})]
                    + self._stop(graceful, None, now, forced=True))
        if signum in _DEFERRED:
            # carried out once the running operation (if any) ends: see _run_deferred
            self.deferred.append(signum)
            return []
        if signum == signal.SIGUSR1:
            return [ReopenLogs()]
        return []

    def _run_deferred(self, now: float) -> list[Action]:
        """Operator signals wait their turn; repeated SIGHUPs fold into one reload (and
        SIGUSR2s into one upgrade), SIGTTIN/SIGTTOU add up one worker each."""
        actions: list[Action] = []
        while self.deferred and self.operation is None:
            signum = self.deferred.pop(0)
            if signum == signal.SIGHUP:
                self.deferred = [s for s in self.deferred if s != signal.SIGHUP]
                actions += self._reload(ev.ReloadRequest(None), now)
            elif signum == signal.SIGUSR2:
                self.deferred = [s for s in self.deferred if s != signal.SIGUSR2]
                actions += [Log("signal", {"name": "SIGUSR2"}),
                            *self._upgrade(ev.UpgradeRequest(None), now)]
            else:
                step = 1 if signum == signal.SIGTTIN else -1
                actions += self._scale(ev.ScaleRequest(step, relative=True), now)
        if self.stopping:
            self.deferred.clear()
        return actions

    # -- operator requests ----------------------------------------------------------------------
    def finish(self, op: Operation) -> None:
        """An operation ended (done, aborted or cancelled)."""
        if self.operation is op:
            self.operation = None

    def reply(self, requester: Any, ok: bool, message: str, code: Code | None = None,
               result: dict[str, Any] | None = None) -> list[Action]:
        actions: list[Action] = [Reply(requester, ok, message, code, result or {})]
        if requester is None and not ok:  # a signal asked: nobody to tell but the log
            actions.insert(0, Log("operation-failed", {"why": message.splitlines()[0]}, ERROR))
        return actions

    def _refuse(self, command: str, requester: Any, code: Code, why: str) -> list[Action]:
        return [Log("refused", {"command": command, "why": why}, WARNING),
                Reply(requester, False, why, code)]

    def _busy(self, command: str, requester: Any) -> list[Action] | None:
        if self.operation is None:
            return None
        return self._refuse(command, requester, Code.BUSY, f"busy: {self.operation.describe()}")

    def _start_operation(self, op: Operation, now: float) -> list[Action]:
        self.operation = op
        return op.begin(self, now)

    def _reload(self, event: ev.ReloadRequest, now: float) -> list[Action]:
        busy = self._busy("reload", event.requester)
        if busy is not None:
            return busy
        slots = sorted(self.table.slots)
        return self._start_operation(Reload(slots=slots, total=len(slots), started_at=now,
                                            requester=event.requester), now)

    def _scale(self, event: ev.ScaleRequest, now: float) -> list[Action]:
        busy = self._busy("scale", event.requester)
        if busy is not None:
            return busy
        try:
            count = resolve_scale(event.count, event.relative, self.target)
        except ProtocolError as exc:
            return self._refuse("scale", event.requester, Code(exc.code), exc.message)
        if self.autoscaler is not None:
            low, high = self.autoscaler.minimum, self.autoscaler.maximum
            if not low <= count <= high:
                return self._refuse("scale", event.requester, Code.BAD_ARGS,
                                    f"cannot scale to {count} workers: --autoscale keeps the "
                                    f"count within {low}:{high}")
            # the operator's count holds for one stabilisation window
            self.autoscaler.held(now)
        return self._start_operation(Scale(target=count, requester=event.requester), now)

    def _load(self, event: ev.LoadSample, now: float) -> list[Action]:
        scaler = self.autoscaler
        if scaler is None or event.utilization is None:
            return []
        scaler.observe(Sample(now, self.table.ready_count(), event.utilization, event.queued))
        decision = scaler.decide(self.target, now,
                                 busy=self.operation is not None or self.stopping)
        if decision is None:
            return []
        scaler.changed(now)
        return [Log("autoscale", {"from": self.target, "to": decision.workers,
                                  "why": decision.reason,
                                  "utilization": round(decision.utilization, 3),
                                  "target": scaler.target, "queued": decision.queued}),
                *self._start_operation(Scale(target=decision.workers, cause=Cause.AUTOSCALE),
                                       now)]

    def autoscale_status(self) -> dict[str, Any] | None:
        scaler = self.autoscaler
        if scaler is None:
            return None
        return {"min": scaler.minimum, "max": scaler.maximum, "target": scaler.target,
                "window": scaler.down_window, "workers": self.target}

    def _stop_request(self, event: ev.StopRequest, now: float) -> list[Action]:
        return self._stop(event.graceful, event.requester, now, forced=False)

    def _stop(self, graceful: bool, requester: Any, now: float, forced: bool) -> list[Action]:
        """forced: a signal asked, which no running operation may refuse."""
        op = self.operation
        if isinstance(op, Stop):
            if requester is not None:
                op.requesters.append(requester)  # answered when the stop ends
            if graceful or not op.graceful:
                return []
            return self._begin_stop(False, now, op.exit_code, requesters=op.requesters)
        actions: list[Action] = []
        if op is not None:
            if not forced:
                return self._refuse("stop", requester, Code.BUSY, f"busy: {op.describe()}")
            actions += self.reply(op.requester, False,
                                  f"{op.noun} cancelled: forkd is stopping", Code.FAILED)
            actions += op.on_cancelled(self, now)
        return actions + self._begin_stop(graceful, now, 0,
                                          requesters=[requester] if requester else [])

    def _begin_stop(self, graceful: bool, now: float, exit_code: int, why: str = "",
                    requesters: list[Any] | None = None, handed_over: bool = False
                    ) -> list[Action]:
        return self._start_operation(Stop(graceful, exit_code, why, list(requesters or []),
                                          handed_over=handed_over), now)

    def _upgrade(self, event: ev.UpgradeRequest, now: float) -> list[Action]:
        busy = self._busy("upgrade", event.requester)
        if busy is not None:
            return busy
        if self.leaving_successor is not None:
            return self._refuse(
                "upgrade", event.requester, Code.BUSY,
                f"busy: the new primary of the last upgrade (pid "
                f"{self.leaving_successor.pid}) is still stopping; try again once it has "
                "exited")
        ready_by = now + self.config.startup_timeout + UPGRADE_MARGIN
        return self._start_operation(Upgrade(started_at=now, ready_by=ready_by,
                                             requester=event.requester), now)

    def _successor_started(self, event: ev.SuccessorStarted, now: float) -> list[Action]:
        op = self.operation
        if isinstance(op, Upgrade) and op.successor is None:
            return op.on_successor_started(self, event.pid, now)
        # the upgrade it was for has ended (a stop): it must not stay
        return [Signal(event.pid, signal.SIGTERM)]

    def _successor_ready(self, event: ev.SuccessorReady, now: float) -> list[Action]:
        op = self.operation
        if isinstance(op, Upgrade):
            return op.on_successor_ready(self, event.pid, now)
        return [Log("upgrade-late", {"pid": event.pid}, WARNING),
                Signal(event.pid, signal.SIGTERM)]

    def _successor_failed(self, event: ev.SuccessorFailed, now: float) -> list[Action]:
        op = self.operation
        if isinstance(op, Upgrade):
            return op.on_successor_failed(self, event.why, now)
        return []

    def _successor_exited(self, event: ev.SuccessorExited, now: float) -> list[Action]:
        if self.leaving_successor is not None and self.leaving_successor.pid == event.pid:
            self.leaving_successor = None  # gone: the next upgrade may start
        op = self.operation
        if isinstance(op, Upgrade) and op.successor == event.pid:
            return op.on_successor_exited(self, event, now)
        return []

    # -- status ----------------------------------------------------------------------------------
    def status_rows(self, now: float) -> list[dict[str, Any]]:
        """One row per worker process (occupants, replacements, draining), plus a row
        for a slot waiting out a back-off."""
        rows: list[dict[str, Any]] = []
        seen: set[int] = set()
        for slot in sorted(self.table.slots.values(), key=lambda s: s.id):
            for pid in (slot.pid, slot.replacement):
                worker = self.table.workers.get(pid) if pid is not None else None
                if worker is not None:
                    seen.add(worker.pid)
                    rows.append(self._row(slot, worker))
            if slot.state is SlotState.BACKING_OFF and slot.respawn_at is not None:
                rows.append({"id": slot.id, "pid": None, "state": "starting",
                             "started_at": None, "restarts": slot.restarts,
                             "last_exit": _words(slot.last_exit), "requests": 0,
                             "cwd": None,
                             "backoff": round(max(0.0, slot.respawn_at - now), 1)})
        for worker in self.table.workers.values():
            if worker.pid not in seen:
                slot = self.table.slots.get(worker.slot) or Slot(worker.slot)
                rows.append(self._row(slot, worker))
        return rows

    @staticmethod
    def _row(slot: Slot, worker: Worker) -> dict[str, Any]:
        return {"id": slot.id, "pid": worker.pid, "state": worker.state.value,
                "started_at": worker.started_at, "restarts": slot.restarts,
                "last_exit": _words(slot.last_exit), "requests": worker.requests,
                "cwd": worker.cwd}


def _words(reason: Reason | None) -> str | None:
    return str(reason) if reason is not None else None


_Handler = Callable[[Supervisor, Any, float], list[Action]]
_HANDLERS: dict[type, _Handler] = {
    ev.Start: Supervisor._start,
    ev.Spawned: Supervisor._spawned,
    ev.SpawnFailed: Supervisor._spawn_failed,
    ev.Exited: Supervisor._exited,
    ev.MemorySample: Supervisor._memory,
    ev.Tick: Supervisor._tick,
    ev.LoadSample: Supervisor._load,
    ev.OperatorSignal: Supervisor._signal,
    ev.ReloadRequest: Supervisor._reload,
    ev.ScaleRequest: Supervisor._scale,
    ev.StopRequest: Supervisor._stop_request,
    ev.UpgradeRequest: Supervisor._upgrade,
    ev.SuccessorStarted: Supervisor._successor_started,
    ev.SuccessorReady: Supervisor._successor_ready,
    ev.SuccessorFailed: Supervisor._successor_failed,
    ev.SuccessorExited: Supervisor._successor_exited,
}
_WorkerHandler = Callable[[Supervisor, Worker, Any, float], list[Action]]
_WORKER_HANDLERS: dict[type, _WorkerHandler] = {
    ev.Ready: Supervisor._on_ready,
    ev.Beat: Supervisor._on_beat,
    ev.LimitReached: Supervisor._on_limit,
    ev.Draining: Supervisor._on_draining,
    ev.Failed: Supervisor._on_failed,
}


# -- the action loop ------------------------------------------------------------------------------
class Effects(Protocol):
    """What carries actions out: the primary's shell, or a test's fake."""

    def spawn(self, action: Spawn) -> int:
        """Fork the worker; its pid. Raises OSError when it cannot."""
        ...

    def perform(self, action: Action) -> None:
        """Carry out any other action."""
        ...


class Driver:
    """The one action loop: the primary runs it, and so do the unit tests."""

    def __init__(self, supervisor: Supervisor, effects: Effects) -> None:
        self.supervisor = supervisor
        self.effects = effects

    def feed(self, event: ev.Event, now: float) -> list[Action]:
        """Hand the core an event and carry out every action it leads to, in order;
        a spawn's outcome goes back in as Spawned/SpawnFailed before the next action."""
        return self.run(self.supervisor.handle(event, now), now)

    def run(self, actions: list[Action], now: float) -> list[Action]:
        done: list[Action] = []
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            done.append(action)
            if isinstance(action, Spawn):
                outcome: ev.Event
                try:
                    pid = self.effects.spawn(action)
                except OSError as exc:
                    outcome = ev.SpawnFailed(action.slot, action.replacement, str(exc))
                else:
                    outcome = ev.Spawned(action.slot, action.replacement, pid,
                                         action.request_limit)
                queue.extendleft(reversed(self.supervisor.handle(outcome, now)))
            else:
                self.effects.perform(action)
        return done
