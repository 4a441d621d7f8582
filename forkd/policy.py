"""The supervisor's decisions, with no I/O: events (a worker forked, became
ready, beat, exited; a memory sample; a reload, scale or stop request; time
passing) go in, and actions (spawn, signal, log, report, notify, exit) come out.
The primary's loop (primary.py) carries the actions out; the tests feed events
and read actions, with `now` passed in."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from typing import Any

from forkd.config import Config, format_size
from forkd.state import Slot, Worker, WorkerState, WorkerTable, describe_exit, exit_words

EXIT_APP_LOAD = 3  # kept equal to worker.EXIT_APP_LOAD (the worker module imports uvloop)
EXIT_BOOT = 4
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


@dataclass(frozen=True)
class Signal:
    pid: int
    signum: int


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict[str, Any]
    level: str = "info"


@dataclass(frozen=True)
class Progress:
    text: str


@dataclass(frozen=True)
class Finish:
    """The running operation ended; its requester gets ok or the error."""

    ok: bool
    message: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Notify:
    kind: str  # ready | reloading | stopping


@dataclass(frozen=True)
class Exit:
    code: int


Action = Spawn | Signal | Log | Progress | Finish | Notify | Exit


# -- operations ------------------------------------------------------------------------------
@dataclass
class Reload:
    slots: list[int]
    total: int
    started_at: float
    done: int = 0
    active: dict[int, float] = field(default_factory=dict)  # slot -> step start
    # replaced workers that may still accept: the reload is done only once each has
    # closed its listeners (or exited), so no request reaches old code afterwards
    old_accepting: set[int] = field(default_factory=set)

    def describe(self) -> str:
        return f"reload in progress ({self.done}/{self.total})"


@dataclass
class Scale:
    target: int
    adding: set[int] = field(default_factory=set)
    removing: set[int] = field(default_factory=set)  # pids draining away

    def describe(self) -> str:
        return f"scale to {self.target} in progress"


@dataclass
class Stop:
    graceful: bool
    exit_code: int = 0

    def describe(self) -> str:
        return "stop in progress"


Operation = Reload | Scale | Stop


class Busy(Exception):
    """A second mutating request while one runs."""


def backoff_delay(fast_deaths: int) -> float:
    """Seconds before a slot that died fast `fast_deaths` times in a row respawns:
    twice at once (a worker killed twice in quick succession, by an operator or the
    OOM killer, is not a crash loop), then 0.5 s, 1 s, 2 s ... up to 30 s."""
    if fast_deaths <= 2:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (fast_deaths - 3))


class Supervisor:
    def __init__(self, config: Config, workers: int, rng: random.Random | None = None) -> None:
        self.config = config
        self.table = WorkerTable()
        self.rng = rng or random.Random()
        self.operation: Operation | None = None
        self.any_ready = False
        self.announced_ready = False
        self.exit_code: int | None = None
        # replacements for health reasons since start, by kind (shown in status)
        self.counters: dict[str, int] = {"crashed": 0, "killed": 0, "memory": 0,
                                         "timeout": 0, "max-requests": 0}
        for slot_id in range(workers):
            self.table.slots[slot_id] = Slot(slot_id)

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

    # -- start ---------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot in self.table.slots.values():
            slot.spawn_pending = True
            actions.append(Spawn(slot.id))
        return actions

    def spawned(self, spawn: Spawn, pid: int, now: float) -> list[Action]:
        slot = self.table.slots.get(spawn.slot)
        worker = Worker(pid=pid, slot=spawn.slot, started_at=now, last_seen=now)
        if self.config.max_requests:
            worker.request_limit = self.config.max_requests + self.rng.randint(
                0, self.config.max_requests_jitter)
        self.table.workers[pid] = worker
        if slot is None:  # scaled away meanwhile: let it go at once
            return self._drain(worker, "scale", now)
        if spawn.replacement:
            slot.replace_pending = False
            slot.replacement = pid
        else:
            slot.spawn_pending = False
            slot.pid = pid
        return [Log("worker-started", {"slot": spawn.slot, "pid": pid,
                                       "role": "replacement" if spawn.replacement else None})]

    def spawn_failed(self, spawn: Spawn, error: str, now: float) -> list[Action]:
        slot = self.table.slots.get(spawn.slot)
        actions: list[Action] = [Log("spawn-failed", {"slot": spawn.slot, "error": error},
                                     "error")]
        if slot is None:
            return actions
        if spawn.replacement:
            slot.replace_pending = False
            return actions + self._replacement_failed(slot, None, f"fork failed: {error}", now)
        slot.spawn_pending = False
        slot.fast_deaths += 1
        slot.respawn_at = now + max(backoff_delay(slot.fast_deaths), BACKOFF_BASE)
        return actions

    # -- messages from workers ---------------------------------------------------------------
    def message(self, pid: int, data: bytes, now: float) -> list[Action]:
        worker = self.table.workers.get(pid)
        if worker is None:
            return []
        worker.last_seen = now
        if data.startswith(b"hb "):
            try:
                worker.requests = int(data[3:])
            except ValueError:
                return []
            return self._check_requests(worker, now)
        if data.startswith(b"ready"):
            return self._ready(worker, data[6:].decode("ascii", "replace") or None, now)
        if data == b"draining":
            return self._stopped_accepting(worker, now)
        if data.startswith(b"error "):
            worker.error = data[6:].decode("utf-8", "replace")
        return []

    def _stopped_accepting(self, worker: Worker, now: float) -> list[Action]:
        worker.stopped_accepting = True
        op = self.operation
        if isinstance(op, Reload) and worker.pid in op.old_accepting:
            op.old_accepting.discard(worker.pid)
            return self._reload_next(now)
        return []

    def _ready(self, worker: Worker, interface: str | None, now: float) -> list[Action]:
        if worker.state is not WorkerState.STARTING:
            return []
        worker.move(WorkerState.READY)
        worker.ready_at = now
        self.any_ready = True
        actions: list[Action] = [Log("worker-ready", {
            "slot": worker.slot, "pid": worker.pid, "interface": interface,
            "ms": round((now - worker.started_at) * 1000)})]
        slot = self.table.slots.get(worker.slot)
        if slot is None:
            return actions
        if slot.replacement == worker.pid:
            actions += self._promote(slot, worker, now)
        if isinstance(self.operation, Scale) and worker.slot in self.operation.adding:
            self.operation.adding.discard(worker.slot)
            actions.append(Progress(f"slot {worker.slot}: pid {worker.pid} ready in "
                                    f"{(now - worker.started_at) * 1000:.0f} ms"))
            actions += self._maybe_finish_scale()
        if self.operation is None and not self.announced_ready and self.all_ready():
            self.announced_ready = True
            actions.append(Log("all-ready", {"workers": self.target}))
            actions.append(Notify("ready"))
        return actions

    def _promote(self, slot: Slot, new: Worker, now: float) -> list[Action]:
        """The replacement is ready: it becomes the occupant, the old one drains."""
        reason = slot.replace_reason or "reload"
        old = self.table.occupant(slot)
        slot.pid = new.pid
        slot.replacement = None
        slot.replace_reason = None
        slot.replace_failures = 0
        actions: list[Action] = []
        if old is not None:
            if reason not in ("reload", "scale"):
                slot.restarts += 1
                self._count(reason)
            slot.last_exit = reason
            actions += self._drain(old, reason, now)
            actions.append(Log("worker-replaced", {"slot": slot.id, "old": old.pid,
                                                   "new": new.pid, "reason": reason}))
        if isinstance(self.operation, Reload) and slot.id in self.operation.active:
            op = self.operation
            op.active.pop(slot.id)
            op.done += 1
            if old is not None and not old.stopped_accepting:
                op.old_accepting.add(old.pid)
            old_pid = old.pid if old is not None else "-"
            actions.append(Progress(
                f"slot {slot.id} ({op.done}/{op.total}): pid {old_pid} → {new.pid}, "
                f"ready in {(now - new.started_at) * 1000:.0f} ms"))
            actions += self._reload_next(now)
        return actions

    def _check_requests(self, worker: Worker, now: float) -> list[Action]:
        limit = worker.request_limit
        if limit is None or worker.requests < limit or worker.state is not WorkerState.READY:
            return []
        slot = self.table.slots.get(worker.slot)
        if slot is None or slot.pid != worker.pid or self.operation is not None:
            return []
        # never all at once: one max-requests recycle in flight at a time
        for other in self.table.slots.values():
            if other.replace_reason == "max-requests":
                return []
        return self._replace(slot, "max-requests", now,
                             {"requests": worker.requests, "limit": limit})

    # -- replacements ------------------------------------------------------------------------------
    def _replace(self, slot: Slot, reason: str, now: float,
                 figures: dict[str, Any] | None = None) -> list[Action]:
        if slot.replacement is not None or slot.replace_pending or now < slot.replace_after:
            return []
        slot.replace_reason = reason
        slot.replace_pending = True
        fields: dict[str, Any] = {"slot": slot.id, "pid": slot.pid, "reason": reason}
        fields.update(figures or {})
        return [Log("worker-replacing", fields), Spawn(slot.id, replacement=True)]

    def _replacement_failed(self, slot: Slot, worker: Worker | None, why: str, now: float
                            ) -> list[Action]:
        slot.replacement = None
        reason = slot.replace_reason
        slot.replace_reason = None
        # a replacement that cannot start (new code on disk that does not import, say) is
        # not retried by the health checks at every beat, but after a growing pause
        slot.replace_failures += 1
        slot.replace_after = now + max(BACKOFF_BASE, backoff_delay(slot.replace_failures + 1))
        actions: list[Action] = [Log("replacement-failed", {
            "slot": slot.id, "pid": worker.pid if worker else None, "reason": reason,
            "why": why.strip().splitlines()[-1] if why.strip() else why}, "error")]
        if isinstance(self.operation, Reload) and slot.id in self.operation.active:
            op = self.operation
            self.operation = None
            for other_id in op.active:
                other = self.table.slots.get(other_id)
                if (other is not None and other_id != slot.id and other.replacement is not None
                        and other.pid is not None):  # (one with no occupant left stays)
                    pending = self.table.workers.get(other.replacement)
                    other.replacement = None
                    other.replace_reason = None
                    if pending is not None:
                        actions += self._drain(pending, "reload aborted", now)
            message = (f"reload aborted: the replacement for slot {slot.id} failed ({why.strip()})"
                       if "\n" not in why.strip() else
                       f"reload aborted: the replacement for slot {slot.id} failed:\n{why}")
            actions.append(Log("reload-aborted", {"slot": slot.id, "done": op.done,
                                                  "total": op.total}, "error"))
            actions.append(Finish(False, message))
            actions.append(Notify("ready"))
        if slot.pid is None and not self.stopping:
            actions += self._respawn(slot, now)  # its occupant died meanwhile
        return actions

    def _drain(self, worker: Worker, reason: str, now: float) -> list[Action]:
        if worker.state is WorkerState.DRAINING:
            return []
        worker.move(WorkerState.DRAINING)
        worker.leave_reason = reason
        worker.kill_at = now + self.config.graceful_timeout + DRAIN_MARGIN
        return [Signal(worker.pid, signal.SIGTERM)]

    # -- exits -----------------------------------------------------------------------------------
    def exited(self, pid: int, code: int | None, signum: int | None, now: float
               ) -> list[Action]:
        worker = self.table.workers.pop(pid, None)
        if worker is None:
            return []
        status = describe_exit(code, signum)
        reason = worker.leave_reason or status
        actions: list[Action] = [Log("worker-exited", {
            "slot": worker.slot, "pid": pid, "status": exit_words(code, signum),
            "reason": reason,
            "uptime": f"{now - worker.started_at:.1f}s"},
            "info" if worker.leave_reason else "warning")]
        if worker.error and worker.ready_at is None:
            actions.append(Log("worker-error", {"slot": worker.slot, "pid": pid,
                                                "error": worker.error.strip().splitlines()[-1]},
                               "error"))
        slot = self.table.slots.get(worker.slot)
        if self.stopping:
            return actions + self._maybe_exit()
        if isinstance(self.operation, Scale) and pid in self.operation.removing:
            self.operation.removing.discard(pid)
            actions.append(Progress(f"slot {worker.slot}: pid {pid} drained"))
            actions += self._maybe_finish_scale()
        actions += self._stopped_accepting(worker, now)  # an exited worker accepts nothing
        if slot is None:
            return actions
        if slot.replacement == pid:
            why = worker.error or f"{status} before it was ready"
            if worker.aborted:
                why = worker.error or f"not ready within {self.config.timeout:g}s"
            return actions + self._replacement_failed(slot, worker, why, now)
        if slot.pid != pid:
            return actions  # an old occupant finished draining
        return actions + self._occupant_died(slot, worker, reason, code, now)

    def _occupant_died(self, slot: Slot, worker: Worker, reason: str, code: int | None,
                       now: float) -> list[Action]:
        slot.pid = None
        slot.last_exit = reason
        slot.restarts += 1
        self._count(reason)
        actions: list[Action] = []
        if (not self.any_ready and worker.ready_at is None
                and code in (EXIT_APP_LOAD, EXIT_BOOT)):
            # The app cannot load in the first generation: respawning would only loop.
            message = (worker.error or "the app failed to load").rstrip()
            actions.append(Log("app-load-failed", {"slot": slot.id, "pid": worker.pid,
                                                   "code": code}, "error"))
            return actions + self._begin_stop(graceful=False, now=now, exit_code=1,
                                              why=message)
        uptime = now - worker.started_at
        if worker.ready_at is None or uptime < MIN_UPTIME:
            slot.fast_deaths += 1
        elif uptime >= STABLE_AFTER:
            slot.fast_deaths = 0
        if isinstance(self.operation, Scale):
            self.operation.adding.discard(slot.id)
        if slot.replacement is not None or slot.replace_pending:
            # a replacement is already on its way: once ready it takes the empty slot
            # (through _promote, so a reload waiting on it goes on)
            return actions
        return actions + self._respawn(slot, now)

    def _respawn(self, slot: Slot, now: float) -> list[Action]:
        """A worker for an empty slot: at once, or after the slot's back-off."""
        delay = backoff_delay(slot.fast_deaths)
        if delay > 0:
            slot.respawn_at = now + delay
            return [Log("slot-backoff", {"slot": slot.id, "delay": f"{delay:g}s",
                                         "fast_deaths": slot.fast_deaths}, "warning")]
        slot.spawn_pending = True
        return [Spawn(slot.id)]

    def _count(self, reason: str) -> None:
        kind = reason.split(":", 1)[0]
        if kind in self.counters:
            self.counters[kind] += 1

    # -- time --------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot in self.table.slots.values():
            if slot.respawn_at is not None and now >= slot.respawn_at and slot.pid is None:
                slot.respawn_at = None
                if not self.stopping:
                    slot.spawn_pending = True
                    actions.append(Spawn(slot.id))
        for worker in list(self.table.workers.values()):
            if worker.kill_at is not None and now >= worker.kill_at:
                worker.kill_at = None
                actions.append(Log("worker-kill", {"slot": worker.slot, "pid": worker.pid,
                                                   "why": worker.leave_reason}, "warning"))
                actions.append(Signal(worker.pid, signal.SIGKILL))
            elif not worker.aborted and now - worker.last_seen >= self._silence_limit(worker):
                worker.aborted = True
                silent = now - worker.last_seen
                if worker.leave_reason is None:
                    worker.leave_reason = "timeout"
                worker.kill_at = now + ABORT_GRACE
                actions.append(Log("worker-timeout", {
                    "slot": worker.slot, "pid": worker.pid, "state": worker.state.value,
                    "silent": f"{silent:.1f}s"}, "error"))
                actions.append(Signal(worker.pid, signal.SIGABRT))
        return actions

    def memory(self, samples: dict[int, int], now: float) -> list[Action]:
        limit = self.config.max_memory
        hard = self.config.hard_memory_limit
        if limit is None or hard is None or self.stopping:
            return []
        actions: list[Action] = []
        for pid, used in samples.items():
            worker = self.table.workers.get(pid)
            if worker is None or worker.state is not WorkerState.READY:
                continue
            slot = self.table.slots.get(worker.slot)
            if slot is None or slot.pid != pid:
                continue
            words = f"memory: {format_size(used)} > {format_size(limit)}"
            if used > hard:
                worker.leave_reason = words
                worker.kill_at = None
                actions.append(Log("worker-memory-kill", {
                    "slot": slot.id, "pid": pid, "used": used, "hard_limit": hard}, "error"))
                actions.append(Signal(pid, signal.SIGKILL))
            elif used > limit:
                worker.memory_strikes += 1
                if worker.memory_strikes >= self.config.memory_samples:
                    actions += self._replace(slot, words, now,
                                             {"used": used, "limit": limit})
            else:
                worker.memory_strikes = 0
        return actions

    # -- operator requests ----------------------------------------------------------------------
    def _check_busy(self) -> None:
        if self.operation is not None:
            raise Busy(f"busy: {self.operation.describe()}")

    def request_reload(self, now: float) -> list[Action]:
        self._check_busy()
        slots = sorted(self.table.slots)
        self.operation = Reload(slots=slots, total=len(slots), started_at=now)
        actions: list[Action] = [
            Log("reload-start", {"workers": len(slots)}),
            Notify("reloading"),
            Progress(f"reloading {len(slots)} worker(s), "
                     f"{self.config.reload_batch} at a time"),
        ]
        return actions + self._reload_next(now)

    def _reload_next(self, now: float) -> list[Action]:
        op = self.operation
        assert isinstance(op, Reload)
        actions: list[Action] = []
        while op.slots and len(op.active) < self.config.reload_batch:
            slot = self.table.slots.get(op.slots.pop(0))
            if slot is None:
                op.total -= 1
                continue
            op.active[slot.id] = now
            if slot.replacement is not None or slot.replace_pending:
                slot.replace_reason = "reload"  # a health replacement already on its way
                continue
            slot.respawn_at = None
            slot.replace_reason = "reload"
            slot.replace_pending = True
            actions.append(Spawn(slot.id, replacement=True))
        if not op.slots and not op.active and not op.old_accepting:
            self.operation = None
            self.announced_ready = self.all_ready()
            seconds = now - op.started_at
            actions.append(Log("reload-done", {"workers": op.total,
                                               "seconds": f"{seconds:.2f}"}))
            actions.append(Finish(True, f"reloaded {op.total} worker(s) in {seconds:.1f}s",
                                  {"workers": op.total}))
            actions.append(Notify("ready"))
        return actions

    def request_scale(self, count: int, now: float) -> list[Action]:
        self._check_busy()
        if count < 1:
            raise ValueError(f"cannot scale to {count}: at least one worker is needed")
        op = Scale(target=count)
        self.operation = op
        actions: list[Action] = [Log("scale", {"from": self.target, "to": count})]
        slots = self.table.slots
        while len(slots) < count:
            slot_id = next(i for i in range(count) if i not in slots)
            slots[slot_id] = Slot(slot_id, spawn_pending=True)
            op.adding.add(slot_id)
            actions.append(Spawn(slot_id))
        for slot_id in sorted(slots, reverse=True)[: max(0, len(slots) - count)]:
            slot = slots.pop(slot_id)
            for pid in (slot.pid, slot.replacement):
                worker = self.table.workers.get(pid) if pid is not None else None
                if worker is not None:
                    op.removing.add(worker.pid)
                    actions += self._drain(worker, "scale", now)
        return actions + self._maybe_finish_scale()

    def _maybe_finish_scale(self) -> list[Action]:
        op = self.operation
        if not isinstance(op, Scale) or op.adding or op.removing:
            return []
        self.operation = None
        return [Log("scale-done", {"workers": self.target}),
                Finish(True, f"{self.target} worker(s) running", {"workers": self.target})]

    def request_stop(self, graceful: bool, now: float, forced: bool = False) -> list[Action]:
        """forced: a signal asked, which no running operation may refuse."""
        if isinstance(self.operation, Stop):
            if graceful or not self.operation.graceful:
                return []
            return self._begin_stop(graceful=False, now=now, exit_code=0)
        actions: list[Action] = []
        if self.operation is not None:
            if not forced:
                self._check_busy()
            actions.append(Finish(False, f"{self.operation.describe().split(' in ')[0]} "
                                         "cancelled: forkd is stopping"))
        return actions + self._begin_stop(graceful=graceful, now=now, exit_code=0)

    def _begin_stop(self, graceful: bool, now: float, exit_code: int, why: str = ""
                    ) -> list[Action]:
        self.operation = Stop(graceful=graceful, exit_code=exit_code)
        actions: list[Action] = [Log("stopping", {"graceful": graceful,
                                                  "workers": len(self.table.workers)}),
                                 Notify("stopping")]
        if why:
            actions.append(Log("stop-reason", {"why": why.splitlines()[-1]}, "error"))
        for worker in self.table.workers.values():
            if graceful:
                if worker.state is not WorkerState.DRAINING:
                    worker.move(WorkerState.DRAINING)
                    worker.leave_reason = worker.leave_reason or "stop"
                    actions.append(Signal(worker.pid, signal.SIGTERM))
                worker.kill_at = now + self.config.graceful_timeout + DRAIN_MARGIN
            else:
                worker.leave_reason = worker.leave_reason or "stop"
                actions.append(Signal(worker.pid, signal.SIGQUIT))
                worker.kill_at = now + QUIT_GRACE
        for slot in self.table.slots.values():
            slot.respawn_at = None
        return actions + self._maybe_exit()

    def _maybe_exit(self) -> list[Action]:
        op = self.operation
        assert isinstance(op, Stop)
        if self.table.workers:
            return []
        self.exit_code = op.exit_code
        return [Log("stopped", {"code": op.exit_code}), Finish(True, "stopped"),
                Exit(op.exit_code)]

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
            if slot.pid is None and slot.respawn_at is not None:
                rows.append({"id": slot.id, "pid": None, "state": "starting",
                             "started_at": None, "restarts": slot.restarts,
                             "last_exit": slot.last_exit, "requests": 0,
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
                "last_exit": slot.last_exit, "requests": worker.requests}
