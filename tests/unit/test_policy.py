"""The supervisor's decisions, fed typed events with `now` passed in: no processes.
The tests drive the core through policy.Driver, the action loop the primary runs."""

from __future__ import annotations

import random
import signal

import pytest

from forkd import policy
from forkd.config import Config
from forkd.events import (
    Beat,
    Draining,
    Event,
    Exited,
    Failed,
    FromWorker,
    LimitReached,
    MemorySample,
    OperatorSignal,
    Ready,
    ReloadRequest,
    ScaleRequest,
    Start,
    StopRequest,
    SuccessorExited,
    SuccessorFailed,
    SuccessorReady,
    SuccessorStarted,
    Tick,
    UpgradeRequest,
    WorkerMessage,
)
from forkd.policy import (
    Driver,
    Exit,
    HandOver,
    Notify,
    Progress,
    ReopenLogs,
    Reply,
    Signal,
    Spawn,
    StartUpgrade,
    Supervisor,
)
from forkd.protocol import Code
from forkd.state import IllegalTransition, Slot, SlotState, Worker, WorkerState


def make(workers: int = 2, **options: object) -> Supervisor:
    return Supervisor(Config(app="m:app", **options), workers, random.Random(7))  # type: ignore[arg-type]


class FakeShell:
    """policy.Effects without processes: hands out pids, records what it was told."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.performed: list[policy.Action] = []
        self.fail_spawns = False
        self.spawned: list[Spawn] = []

    def spawn(self, action: Spawn) -> int:
        if self.fail_spawns:
            raise OSError("Resource temporarily unavailable")
        self.next_pid += 1
        self.spawned.append(action)
        return self.next_pid

    def perform(self, action: policy.Action) -> None:
        self.performed.append(action)


class Harness:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.shell = FakeShell()
        self.driver = Driver(sup, self.shell)

    def feed(self, event: Event, now: float) -> list[policy.Action]:
        return self.driver.feed(event, now)

    def msg(self, pid: int, message: WorkerMessage, now: float) -> list[policy.Action]:
        return self.feed(FromWorker(pid, message), now)

    def start(self, now: float = 0.0) -> list[int]:
        self.feed(Start(), now)
        pids = sorted(self.sup.table.workers)
        for pid in pids:
            self.msg(pid, Ready("asgi"), now)
        return pids


def occupant(sup: Supervisor, slot: int) -> int | None:
    return sup.table.slots[slot].pid


def last_exit(sup: Supervisor, slot: int) -> str | None:
    """The slot's `last_exit` as `forkd status` shows it."""
    rows = [row for row in sup.status_rows(0.0) if row["id"] == slot]
    assert rows, f"no status row for slot {slot}"
    return rows[0]["last_exit"]  # type: ignore[no-any-return]


def test_start_spawns_one_worker_per_slot_and_announces_ready_once_all_are() -> None:
    sup = make(3)
    h = Harness(sup)
    actions = h.feed(Start(), 0.0)
    assert [a.slot for a in actions if isinstance(a, Spawn)] == [0, 1, 2]
    pids = sorted(sup.table.workers)
    assert h.msg(pids[0], Ready(), 0.1).count(Notify("ready")) == 0
    assert h.msg(pids[1], Ready(), 0.1).count(Notify("ready")) == 0
    assert Notify("ready") in h.msg(pids[2], Ready(), 0.2)


def test_dead_worker_is_replaced_at_once_in_the_same_slot() -> None:
    sup = make(2)
    h = Harness(sup)
    pids = h.start()
    slot1 = sup.table.workers[pids[1]].slot
    actions = h.feed(Exited(pids[1], None, signal.SIGKILL), 50.0)
    assert Spawn(slot1) in actions
    new = occupant(sup, slot1)
    assert new is not None and new != pids[1]
    assert sup.table.slots[slot1].restarts == 1
    assert last_exit(sup, slot1) == "killed: SIGKILL"


def test_a_slot_that_keeps_dying_fast_backs_off_exponentially_up_to_the_cap() -> None:
    sup = make(1)
    h = Harness(sup)
    now = 100.0
    h.start(now)
    delays = []
    for _ in range(11):
        pid = occupant(sup, 0)
        assert pid is not None
        h.msg(pid, Ready(), now)
        actions = h.feed(Exited(pid, 1, None), now + 0.2)
        now += 0.2
        if any(isinstance(a, Spawn) for a in actions):
            delays.append(0.0)
            continue
        respawn_at = sup.table.slots[0].respawn_at
        assert respawn_at is not None
        delays.append(round(respawn_at - now, 3))
        assert h.feed(Tick(), respawn_at - 0.01) == []  # not before its time
        now = respawn_at
        assert Spawn(0) in h.feed(Tick(), now)
    assert delays[:7] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert max(delays) == policy.BACKOFF_CAP
    # visible in status while waiting
    pid = occupant(sup, 0)
    assert pid is not None
    h.feed(Exited(pid, 1, None), now + 0.1)
    rows = sup.status_rows(now + 0.1)
    assert rows[0]["pid"] is None and rows[0]["backoff"] > 0


def test_a_stable_run_resets_the_backoff() -> None:
    sup = make(1)
    h = Harness(sup)
    now = 10.0
    h.start(now)
    for _ in range(4):  # four fast deaths
        pid = occupant(sup, 0)
        assert pid is not None
        h.feed(Exited(pid, 1, None), now)
        at = sup.table.slots[0].respawn_at
        now = at if at is not None else now
        h.feed(Tick(), now)
    assert sup.table.slots[0].fast_deaths == 4
    pid = occupant(sup, 0)
    assert pid is not None
    h.msg(pid, Ready(), now)
    later = now + policy.STABLE_AFTER + 1
    actions = h.feed(Exited(pid, 1, None), later)
    assert Spawn(0) in actions  # at once again
    assert sup.table.slots[0].fast_deaths == 0


def test_app_that_cannot_load_in_the_first_generation_stops_everything_with_exit_1() -> None:
    sup = make(2)
    h = Harness(sup)
    h.feed(Start(), 0.0)
    first, second = sorted(sup.table.workers)
    h.msg(first, Failed("Traceback...\nRuntimeError: boom\n"), 0.1)
    actions = h.feed(Exited(first, policy.EXIT_APP_LOAD, None), 0.2)
    assert not any(isinstance(a, Spawn) for a in actions)
    assert Signal(second, signal.SIGQUIT) in actions
    assert Exit(1) in h.feed(Exited(second, None, signal.SIGQUIT), 0.3)


def test_load_failure_after_a_good_generation_backs_off_instead_of_stopping() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(Exited(pid, 1, None), 20.0)
    new = occupant(sup, 0)
    assert new is not None
    actions = h.feed(Exited(new, policy.EXIT_APP_LOAD, None), 20.1)
    assert not any(isinstance(a, Exit) for a in actions)
    # one quick death after a stable run: respawned at once (back-off starts at the third)
    assert Spawn(0) in actions
    assert slots(sup) == {0: "occupied"} and sup.table.slots[0].fast_deaths == 1


def test_rolling_reload_replaces_one_slot_at_a_time_ready_first_then_drains_the_old() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    actions = h.feed(ReloadRequest(), 10.0)
    assert Notify("reloading") in actions
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(0, replacement=True)]
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    # the old worker is not touched until its replacement is ready
    assert not any(isinstance(a, Signal) for a in actions)
    who = object()
    assert h.feed(ReloadRequest(who), 10.1)[-1] == Reply(
        who, False, "busy: reload in progress (0/2)", Code.BUSY)
    actions = h.msg(new0, Ready(), 10.2)
    assert Signal(old[0], signal.SIGTERM) in actions
    assert Spawn(1, replacement=True) in actions
    assert any(isinstance(a, Progress) and "slot 0 (1/2)" in a.text for a in actions)
    assert sup.table.workers[old[0]].state is WorkerState.DRAINING
    new1 = sup.table.slots[1].replacement
    assert new1 is not None
    actions = h.msg(new1, Ready(), 10.4)
    assert Signal(old[1], signal.SIGTERM) in actions
    # not done while an old worker may still accept a connection
    assert not any(isinstance(a, Reply) for a in actions)
    assert h.msg(old[0], Draining(), 10.5) == []
    actions = h.msg(old[1], Draining(), 10.6)
    finish = [a for a in actions if isinstance(a, Reply)]
    assert finish and finish[0].ok
    assert Notify("ready") in actions
    assert {occupant(sup, 0), occupant(sup, 1)} == {new0, new1}
    # the drained workers leave; nothing respawns and nothing counts as a restart
    assert sup.operation is None
    for pid in old:
        assert not any(isinstance(a, Spawn) for a in h.feed(Exited(pid, 0, None), 11))
    assert [s.restarts for s in sup.table.slots.values()] == [0, 0]
    assert [str(s.last_exit) for s in sup.table.slots.values()] == ["reload", "reload"]


def test_failed_replacement_aborts_the_reload_and_old_workers_keep_serving() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    h.feed(ReloadRequest(), 5.0)
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    h.msg(new0, Failed("Traceback\nSyntaxError: bad deploy\n"), 5.1)
    actions = h.feed(Exited(new0, policy.EXIT_APP_LOAD, None), 5.2)
    finish = [a for a in actions if isinstance(a, Reply)]
    assert len(finish) == 1 and not finish[0].ok
    assert "SyntaxError: bad deploy" in finish[0].message
    assert not any(isinstance(a, Signal) for a in actions)
    assert [occupant(sup, 0), occupant(sup, 1)] == old
    assert sup.operation is None
    assert all(sup.table.workers[pid].state is WorkerState.READY for pid in old)
    # and a later reload is accepted
    assert any(isinstance(a, Spawn) for a in h.feed(ReloadRequest(), 6.0))


def test_replacement_that_never_becomes_ready_times_out_and_aborts() -> None:
    sup = make(1, timeout=5.0)
    h = Harness(sup)
    (old,) = h.start(0.0)
    h.feed(ReloadRequest(), 1.0)
    new = sup.table.slots[0].replacement
    assert new is not None
    h.msg(old, Beat(3), 5.5)
    actions = h.feed(Tick(), 6.1)
    assert Signal(new, signal.SIGABRT) in actions
    actions = h.feed(Exited(new, None, signal.SIGABRT), 6.2)
    finish = [a for a in actions if isinstance(a, Reply)]
    assert finish and not finish[0].ok and "not ready within 5s" in finish[0].message
    assert occupant(sup, 0) == old


def test_silent_worker_gets_sigabrt_then_sigkill_and_is_replaced() -> None:
    sup = make(1, timeout=10.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.msg(pid, Beat(1), 5.0)
    assert h.feed(Tick(), 14.9) == []
    actions = h.feed(Tick(), 15.0)
    assert Signal(pid, signal.SIGABRT) in actions
    actions = h.feed(Tick(), 15.0 + policy.ABORT_GRACE)
    assert Signal(pid, signal.SIGKILL) in actions
    actions = h.feed(Exited(pid, None, signal.SIGKILL), 18.5)
    assert Spawn(0) in actions
    assert last_exit(sup, 0) == "timeout"
    assert sup.table.slots[0].restarts == 1


def test_graceful_stop_drains_then_exits_0_and_kills_stragglers_after_the_timeout() -> None:
    sup = make(2, graceful_timeout=5.0)
    h = Harness(sup)
    pids = h.start(0.0)
    actions = h.feed(StopRequest(), 1.0)
    assert [a for a in actions if isinstance(a, Signal)] == [
        Signal(pids[0], signal.SIGTERM), Signal(pids[1], signal.SIGTERM)]
    assert Notify("stopping") in actions
    assert h.feed(Exited(pids[0], 0, None), 2.0)[-1] != Exit(0)
    kill_at = 1.0 + 5.0 + policy.DRAIN_MARGIN
    assert Signal(pids[1], signal.SIGKILL) in h.feed(Tick(), kill_at)
    assert Exit(0) in h.feed(Exited(pids[1], None, signal.SIGKILL), kill_at)


def test_stop_request_while_reloading_is_busy_but_a_signal_stop_wins() -> None:
    sup = make(1)
    h = Harness(sup)
    h.start(0.0)
    h.feed(ReloadRequest(), 1.0)
    asker = object()
    actions = h.feed(StopRequest(requester=asker), 1.1)
    assert actions[-1] == Reply(asker, False, "busy: reload in progress (0/1)", Code.BUSY)
    assert not sup.stopping
    actions = h.feed(OperatorSignal(signal.SIGTERM), 1.2)
    assert Reply(None, False, "reload cancelled: forkd is stopping", Code.FAILED) in actions
    assert sup.stopping


def test_scale_up_is_ready_gated_and_scale_down_drains_the_highest_slots() -> None:
    sup = make(2)
    h = Harness(sup)
    h.start(0.0)
    actions = h.feed(ScaleRequest(4), 1.0)
    assert [a.slot for a in actions if isinstance(a, Spawn)] == [2, 3]
    assert not any(isinstance(a, Reply) for a in actions)
    for slot in (2, 3):
        pid = occupant(sup, slot)
        assert pid is not None
        actions = h.msg(pid, Ready(), 1.5)
    assert any(isinstance(a, Reply) and a.ok for a in actions)
    top = [occupant(sup, 3), occupant(sup, 2)]
    actions = h.feed(ScaleRequest(2), 2.0)
    assert [a.pid for a in actions if isinstance(a, Signal)] == top
    assert sorted(sup.table.slots) == [0, 1]
    for pid in top:
        assert pid is not None
        actions = h.feed(Exited(pid, 0, None), 2.5)
        assert not any(isinstance(a, Spawn) for a in actions)
    assert any(isinstance(a, Reply) and a.ok for a in actions)
    who = object()
    actions = h.feed(ScaleRequest(0, requester=who), 3.0)
    assert [a for a in actions if isinstance(a, Reply)] == [Reply(
        who, False, "cannot scale to 0 workers (now 2): at least 1 must run; "
        "use `forkd stop` to stop them all", Code.BAD_ARGS)]
    assert sorted(sup.table.slots) == [0, 1] and sup.operation is None


def test_memory_over_the_limit_for_two_samples_is_replaced_gracefully() -> None:
    sup = make(1, max_memory=100 << 20)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert h.feed(MemorySample({pid: 120 << 20}), 1.0) == []
    actions = h.feed(MemorySample({pid: 130 << 20}), 2.0)
    assert Spawn(0, replacement=True) in actions
    assert not any(isinstance(a, Signal) for a in actions)  # nothing killed yet
    new = sup.table.slots[0].replacement
    assert new is not None
    actions = h.msg(new, Ready(), 2.3)
    assert Signal(pid, signal.SIGTERM) in actions
    assert last_exit(sup, 0) == "memory: 130M > 100M"
    assert sup.table.slots[0].restarts == 1


def test_memory_over_the_hard_ceiling_is_killed_at_once() -> None:
    sup = make(1, max_memory=100 << 20)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    actions = h.feed(MemorySample({pid: 151 << 20}), 1.0)
    assert Signal(pid, signal.SIGKILL) in actions
    assert Spawn(0) in h.feed(Exited(pid, None, signal.SIGKILL), 1.1)
    assert last_exit(sup, 0) == "memory: 151M > 100M"


def slots(sup: Supervisor) -> dict[int, str]:
    """Every slot's lifecycle state."""
    return {slot_id: slot.state.value for slot_id, slot in sorted(sup.table.slots.items())}


def table(sup: Supervisor) -> dict[int, tuple[int, str, str]]:
    """The whole worker table: pid -> (slot, state, role in its slot)."""
    result: dict[int, tuple[int, str, str]] = {}
    for pid, worker in sup.table.workers.items():
        slot = sup.table.slots.get(worker.slot)
        role = ("occupant" if slot is not None and slot.pid == pid else
                "replacement" if slot is not None and slot.replacement == pid else "leaving")
        result[pid] = (worker.slot, worker.state.value, role)
    return result


def test_max_requests_recycles_at_the_limit_and_recycles_may_overlap() -> None:
    sup = make(2, max_requests=50)
    h = Harness(sup)
    a, b = h.start(0.0)
    assert table(sup) == {a: (0, "ready", "occupant"), b: (1, "ready", "occupant")}
    # the worker says so as its 50th request starts: the replacement forks at once
    actions = h.msg(a, LimitReached(50), 1.0)
    assert [x for x in actions if isinstance(x, Spawn)] == [Spawn(0, True, 50)]
    (new_a,) = set(sup.table.workers) - {a, b}
    assert table(sup) == {a: (0, "ready", "occupant"), b: (1, "ready", "occupant"),
                          new_a: (0, "starting", "replacement")}
    # telling it twice changes nothing
    assert h.msg(a, LimitReached(51), 1.01) == []
    # a second worker at its limit does not wait for the first recycle to end
    actions = h.msg(b, LimitReached(50), 1.05)
    assert [x for x in actions if isinstance(x, Spawn)] == [Spawn(1, True, 50)]
    (new_b,) = set(sup.table.workers) - {a, b, new_a}
    assert table(sup) == {a: (0, "ready", "occupant"), b: (1, "ready", "occupant"),
                          new_a: (0, "starting", "replacement"),
                          new_b: (1, "starting", "replacement")}
    assert sup.table.ready_count() == sup.target
    # each old worker drains only once its replacement is ready
    actions = h.msg(new_a, Ready(), 1.2)
    assert [x for x in actions if isinstance(x, Signal)] == [Signal(a, signal.SIGTERM)]
    assert table(sup) == {a: (0, "draining", "leaving"), b: (1, "ready", "occupant"),
                          new_a: (0, "ready", "occupant"),
                          new_b: (1, "starting", "replacement")}
    assert sup.table.ready_count() == sup.target
    actions = h.msg(new_b, Ready(), 1.3)
    assert [x for x in actions if isinstance(x, Signal)] == [Signal(b, signal.SIGTERM)]
    assert table(sup) == {a: (0, "draining", "leaving"), b: (1, "draining", "leaving"),
                          new_a: (0, "ready", "occupant"), new_b: (1, "ready", "occupant")}
    exits = h.feed(Exited(a, 0, None), 1.5) + h.feed(Exited(b, 0, None), 1.6)
    assert not any(isinstance(x, Spawn) for x in exits)
    assert table(sup) == {new_a: (0, "ready", "occupant"), new_b: (1, "ready", "occupant")}
    assert [last_exit(sup, 0), last_exit(sup, 1)] == ["max-requests", "max-requests"]
    assert [s.restarts for s in sup.table.slots.values()] == [1, 1]
    assert sup.counters["max-requests"] == 2


def test_a_lost_limit_message_is_made_up_for_by_the_next_beat() -> None:
    sup = make(1, max_requests=50)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert h.msg(pid, Beat(49), 1.0) == []
    assert table(sup) == {pid: (0, "ready", "occupant")}
    actions = h.msg(pid, Beat(75), 2.0)
    assert [x for x in actions if isinstance(x, Spawn)] == [Spawn(0, True, 50)]
    (new,) = set(sup.table.workers) - {pid}
    assert table(sup) == {pid: (0, "ready", "occupant"), new: (0, "starting", "replacement")}


def test_max_requests_during_a_reload_is_served_by_the_reload() -> None:
    sup = make(2, max_requests=50)
    h = Harness(sup)
    a, b = h.start(0.0)
    h.feed(ReloadRequest(), 1.0)
    (r0,) = set(sup.table.workers) - {a, b}
    # slot 1 reaches its limit while slot 0 reloads: its replacement starts now ...
    h.msg(b, LimitReached(50), 1.1)
    (r1,) = set(sup.table.workers) - {a, b, r0}
    assert table(sup) == {a: (0, "ready", "occupant"), b: (1, "ready", "occupant"),
                          r0: (0, "starting", "replacement"),
                          r1: (1, "starting", "replacement")}
    h.msg(r0, Ready(), 1.2)
    # ... and the reload, reaching slot 1, waits for that one instead of forking another
    assert set(sup.table.workers) == {a, b, r0, r1}
    h.msg(r1, Ready(), 1.3)
    actions = h.msg(a, Draining(), 1.4) + h.msg(b, Draining(), 1.4)
    assert any(isinstance(x, Reply) and x.ok for x in actions)
    assert table(sup) == {a: (0, "draining", "leaving"), b: (1, "draining", "leaving"),
                          r0: (0, "ready", "occupant"), r1: (1, "ready", "occupant")}
    assert [last_exit(sup, 0), last_exit(sup, 1)] == ["reload", "reload"]


def test_no_recycle_while_stopping() -> None:
    sup = make(1, max_requests=50)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(StopRequest(), 1.0)
    assert h.msg(pid, LimitReached(50), 1.1) == []
    assert table(sup) == {pid: (0, "draining", "occupant")}


def test_max_requests_jitter_spreads_the_limits() -> None:
    sup = make(8, max_requests=1000, max_requests_jitter=100)
    h = Harness(sup)
    h.start(0.0)
    limits = {w.request_limit for w in sup.table.workers.values()}
    assert len(limits) > 1
    # the limit the core chose is the one the shell hands the worker to count against
    assert sorted(w.request_limit or 0 for w in sup.table.workers.values()) == sorted(
        a.request_limit or 0 for a in h.shell.spawned)
    assert all(limit is not None and 1000 <= limit <= 1100 for limit in limits)


def test_illegal_worker_moves_raise() -> None:
    worker = Worker(pid=1, slot=0, started_at=0, last_seen=0)
    worker.move(WorkerState.DRAINING)
    with pytest.raises(IllegalTransition):
        worker.move(WorkerState.READY)


@pytest.mark.parametrize(("start", "illegal"), [
    (SlotState.EMPTY, SlotState.OCCUPIED),  # an occupant comes only through a spawn
    (SlotState.SPAWNING, SlotState.REPLACING),
    (SlotState.OCCUPIED, SlotState.BACKING_OFF),  # a death empties the slot first
    (SlotState.REPLACING, SlotState.SPAWNING),
    (SlotState.BACKING_OFF, SlotState.OCCUPIED),
])
def test_illegal_slot_moves_raise(start: SlotState, illegal: SlotState) -> None:
    slot = Slot(0, start)
    with pytest.raises(IllegalTransition, match=f"slot 0: {start.value} -> {illegal.value}"):
        slot.move(illegal)
    assert slot.state is start


def test_a_slot_walks_its_lifecycle_and_each_step_shows_in_the_table() -> None:
    sup = make(1, max_requests=10)
    h = Harness(sup)
    h.feed(Start(), 0.0)
    (a,) = sup.table.workers
    assert (slots(sup), table(sup)) == ({0: "occupied"}, {a: (0, "starting", "occupant")})
    h.msg(a, Ready(), 0.1)
    assert (slots(sup), table(sup)) == ({0: "occupied"}, {a: (0, "ready", "occupant")})
    h.msg(a, LimitReached(10), 1.0)
    (b,) = set(sup.table.workers) - {a}
    assert (slots(sup), table(sup)) == ({0: "replacing"}, {
        a: (0, "ready", "occupant"), b: (0, "starting", "replacement")})
    h.msg(b, Ready(), 1.1)
    assert (slots(sup), table(sup)) == ({0: "occupied"}, {
        a: (0, "draining", "leaving"), b: (0, "ready", "occupant")})
    h.feed(Exited(a, 0, None), 1.2)
    assert (slots(sup), table(sup)) == ({0: "occupied"}, {b: (0, "ready", "occupant")})
    # a crash of the ready worker, then quick deaths (never ready): respawned at once
    # twice, and the third quick death in a row waits out a back-off
    for now in (2.0, 2.1, 2.2):
        (pid,) = sup.table.workers
        h.feed(Exited(pid, 1, None), now)
        assert slots(sup) == {0: "occupied"}
    (pid,) = sup.table.workers
    h.feed(Exited(pid, 1, None), 2.3)
    assert (slots(sup), table(sup)) == ({0: "backing-off"}, {})
    assert [row["backoff"] for row in sup.status_rows(2.3)] == [policy.BACKOFF_BASE]
    h.feed(Tick(), 2.3 + policy.BACKOFF_BASE)
    (c,) = sup.table.workers
    assert (slots(sup), table(sup)) == ({0: "occupied"}, {c: (0, "starting", "occupant")})


def test_next_deadline_covers_backoff_kills_and_heartbeats() -> None:
    sup = make(1, timeout=30.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert sup.next_deadline(0.0) == pytest.approx(30.0)
    h.feed(StopRequest(), 1.0)
    assert sup.next_deadline(1.0) == pytest.approx(min(30.0, 1.0 + 30.0 + policy.DRAIN_MARGIN))


def test_old_worker_dying_while_its_reload_replacement_starts_does_not_stall_the_reload() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    h.feed(ReloadRequest(), 1.0)
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    actions = h.feed(Exited(old[0], None, signal.SIGKILL), 1.5)
    assert not any(isinstance(a, Spawn) for a in actions)  # the replacement will take it
    actions = h.msg(new0, Ready(), 2.0)
    assert occupant(sup, 0) == new0
    assert Spawn(1, replacement=True) in actions
    new1 = sup.table.slots[1].replacement
    assert new1 is not None
    h.msg(new1, Ready(), 2.5)
    actions = h.msg(old[1], Draining(), 2.6)
    assert any(isinstance(a, Reply) and a.ok for a in actions)
    assert sup.operation is None
    assert any(isinstance(a, Spawn) for a in h.feed(ReloadRequest(), 3.0))


def test_replacement_failing_after_its_old_worker_died_respawns_the_empty_slot() -> None:
    sup = make(1)
    h = Harness(sup)
    (old,) = h.start(0.0)
    h.feed(ReloadRequest(), 20.0)
    new = sup.table.slots[0].replacement
    assert new is not None
    h.feed(Exited(old, None, signal.SIGKILL), 20.1)
    actions = h.feed(Exited(new, policy.EXIT_APP_LOAD, None), 20.2)
    assert any(isinstance(a, Reply) and not a.ok for a in actions)
    assert Spawn(0) in actions  # its occupant had run 20 s: no back-off
    (pid,) = sup.table.workers
    assert table(sup) == {pid: (0, "starting", "occupant")} and slots(sup) == {0: "occupied"}


def test_a_health_replacement_that_keeps_failing_is_retried_with_a_growing_pause() -> None:
    sup = make(1, max_requests=10)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    forks = 0
    now = 1.0
    while now < 4.0:
        actions = h.msg(pid, Beat(50), now)
        for action in actions:
            if isinstance(action, Spawn):
                forks += 1
                new = sup.table.slots[0].replacement
                assert new is not None
                h.feed(Exited(new, policy.EXIT_APP_LOAD, None), now + 0.05)
        now += 0.5
    assert forks <= 3  # not one per heartbeat (that would be 6)
    assert occupant(sup, 0) == pid  # the serving worker was never touched


# -- operator signals, decided in the core ------------------------------------------------------
def test_first_sigint_drains_and_a_second_stops_at_once() -> None:
    sup = make(2, graceful_timeout=5.0)
    h = Harness(sup)
    a, b = h.start(0.0)
    actions = h.feed(OperatorSignal(signal.SIGINT), 1.0)
    assert [x for x in actions if isinstance(x, Signal)] == [
        Signal(a, signal.SIGTERM), Signal(b, signal.SIGTERM)]
    assert table(sup) == {a: (0, "draining", "occupant"), b: (1, "draining", "occupant")}
    assert isinstance(sup.operation, policy.Stop) and sup.operation.graceful
    actions = h.feed(OperatorSignal(signal.SIGINT), 1.5)
    assert [x for x in actions if isinstance(x, Signal)] == [
        Signal(a, signal.SIGQUIT), Signal(b, signal.SIGQUIT)]
    assert isinstance(sup.operation, policy.Stop) and not sup.operation.graceful
    # the stragglers get SIGKILL after QUIT_GRACE, not after the graceful timeout
    kill_at = 1.5 + policy.QUIT_GRACE
    assert [x for x in h.feed(Tick(), kill_at) if isinstance(x, Signal)] == [
        Signal(a, signal.SIGKILL), Signal(b, signal.SIGKILL)]
    h.feed(Exited(a, None, signal.SIGKILL), kill_at)
    assert h.feed(Exited(b, None, signal.SIGKILL), kill_at)[-1] == Exit(0)
    assert table(sup) == {}


def test_sigterm_twice_stays_graceful_and_sigquit_is_immediate() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(OperatorSignal(signal.SIGTERM), 1.0)
    assert [x for x in h.feed(OperatorSignal(signal.SIGTERM), 1.1)
            if isinstance(x, Signal)] == []
    actions = h.feed(OperatorSignal(signal.SIGQUIT), 1.2)
    assert [x for x in actions if isinstance(x, Signal)] == [Signal(pid, signal.SIGQUIT)]


def test_repeated_sighups_during_a_reload_fold_into_one_more_reload() -> None:
    sup = make(1)
    h = Harness(sup)
    (old,) = h.start(0.0)
    asker = object()
    h.feed(ReloadRequest(asker), 1.0)
    (first,) = set(sup.table.workers) - {old}
    for t in (1.1, 1.2, 1.3):
        assert h.feed(OperatorSignal(signal.SIGHUP), t) == []  # waits its turn
    assert table(sup) == {old: (0, "ready", "occupant"), first: (0, "starting", "replacement")}
    h.msg(first, Ready(), 1.4)
    actions = h.msg(old, Draining(), 1.5)
    # the asker's reload is answered, then ONE reload for the three SIGHUPs starts
    replies = [x for x in actions if isinstance(x, Reply)]
    assert replies == [Reply(asker, True, "reloaded 1 worker(s) in 0.5s", None, {"workers": 1})]
    assert [x for x in actions if isinstance(x, Spawn)] == [Spawn(0, True)]
    (second,) = set(sup.table.workers) - {old, first}
    assert table(sup) == {old: (0, "draining", "leaving"), first: (0, "ready", "occupant"),
                          second: (0, "starting", "replacement")}
    h.msg(second, Ready(), 2.0)
    actions = h.msg(first, Draining(), 2.1)
    assert Reply(None, True, "reloaded 1 worker(s) in 0.6s", None, {"workers": 1}) in actions
    assert sup.operation is None and sup.deferred == []
    assert not any(isinstance(x, Spawn) for x in actions)  # no third reload


def test_sigttin_and_sigttou_add_up_one_worker_each_in_turn() -> None:
    sup = make(1)
    h = Harness(sup)
    (first,) = h.start(0.0)
    h.feed(OperatorSignal(signal.SIGTTIN), 1.0)
    h.feed(OperatorSignal(signal.SIGTTIN), 1.0)  # waits for the first scale
    assert sup.target == 2
    (second,) = set(sup.table.workers) - {first}
    assert table(sup) == {first: (0, "ready", "occupant"), second: (1, "starting", "occupant")}
    h.msg(second, Ready(), 1.2)  # the first scale ends; the second starts
    assert sup.target == 3
    (third,) = set(sup.table.workers) - {first, second}
    h.msg(third, Ready(), 1.4)
    assert sup.operation is None
    assert table(sup) == {first: (0, "ready", "occupant"), second: (1, "ready", "occupant"),
                          third: (2, "ready", "occupant")}
    actions = h.feed(OperatorSignal(signal.SIGTTOU), 2.0)
    assert [x for x in actions if isinstance(x, Signal)] == [Signal(third, signal.SIGTERM)]
    assert sup.target == 2
    h.feed(Exited(third, 0, None), 2.5)
    assert table(sup) == {first: (0, "ready", "occupant"), second: (1, "ready", "occupant")}


def test_sigttou_at_one_worker_is_refused_in_the_log() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    actions = h.feed(OperatorSignal(signal.SIGTTOU), 1.0)
    assert [x.event for x in actions if isinstance(x, policy.Log)] == ["refused"]
    assert table(sup) == {pid: (0, "ready", "occupant")} and sup.operation is None


def test_sigusr1_reopens_logs_and_sigusr2_asks_for_an_upgrade_unless_stopping() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert h.feed(OperatorSignal(signal.SIGUSR1), 1.0) == [ReopenLogs()]
    assert StartUpgrade() in h.feed(OperatorSignal(signal.SIGUSR2), 1.1)
    assert table(sup) == {pid: (0, "ready", "occupant")}
    h.feed(OperatorSignal(signal.SIGTERM), 1.2)
    assert StartUpgrade() not in h.feed(OperatorSignal(signal.SIGUSR2), 1.3)


# -- upgrade of the primary itself ---------------------------------------------------------------
def test_upgrade_hands_over_once_the_new_primary_is_ready_then_drains_and_exits() -> None:
    sup = make(2)
    h = Harness(sup)
    pids = h.start(0.0)
    who = object()
    actions = h.feed(UpgradeRequest(who), 1.0)
    assert StartUpgrade() in actions and Notify("reloading") in actions
    h.feed(SuccessorStarted(900), 1.0)
    # while the new primary boots, this one serves on, and refuses another operation
    busy = h.feed(ReloadRequest("other"), 1.5)
    assert Reply("other", False, "busy: upgrade in progress (new primary pid 900)",
                 Code.BUSY) in busy
    assert table(sup) == {p: (i, "ready", "occupant") for i, p in enumerate(pids)}
    assert not [a for a in busy if isinstance(a, Signal)]

    actions = h.feed(SuccessorReady(900), 3.0)
    replies = [a for a in actions if isinstance(a, Reply)]
    assert [(r.requester, r.ok, r.result) for r in replies] == [
        (who, True, {"pid": 900, "seconds": 2.0})]
    # the answer first, then the endpoint goes, then the old workers drain
    kinds = [type(a) for a in actions]
    assert kinds.index(Reply) < kinds.index(HandOver) < kinds.index(Signal)
    assert HandOver(900) in actions
    assert sorted(a.pid for a in actions if isinstance(a, Signal)
                  and a.signum == signal.SIGTERM) == pids
    # the new primary is the service now: nothing goes to systemd from this one
    assert not [a for a in actions if isinstance(a, Notify)]
    h.feed(Exited(pids[0], 0, None), 3.5)
    assert h.feed(Exited(pids[1], 0, None), 3.6)[-1] == Exit(0)


def test_after_a_hand_over_the_old_workers_drain_at_once_despite_a_drain_delay() -> None:
    """--drain-delay keeps a host in its load balancer's pool while it is taken out; after
    an upgrade the host stays in (the new primary serves), so no delay and no failing
    health path."""
    sup = make(1, drain_delay=10.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    actions = h.feed(SuccessorReady(900), 2.0)
    assert Signal(pid, signal.SIGTERM) in actions
    assert not [a for a in actions if isinstance(a, policy.FailHealth)]


def test_a_failed_new_primary_leaves_the_old_one_serving_and_says_why() -> None:
    sup = make(2)
    h = Harness(sup)
    pids = h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    actions = h.feed(SuccessorFailed("cannot import app:main:\nModuleNotFoundError: x"), 2.0)
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert not reply.ok and reply.code is Code.FAILED
    assert reply.message.endswith("\ncannot import app:main:\nModuleNotFoundError: x")
    assert Signal(900, signal.SIGTERM) in actions and Notify("ready") in actions
    assert not [a for a in actions if isinstance(a, Signal) and a.pid in pids]
    assert sup.operation is None
    assert table(sup) == {p: (i, "ready", "occupant") for i, p in enumerate(pids)}
    # a late word from that successor changes nothing
    assert h.feed(SuccessorFailed("exited"), 2.5) == []
    h.feed(ReloadRequest("again"), 3.0)  # and the next operation may run
    assert sup.operation is not None and sup.operation.noun == "reload"


def test_a_new_primary_not_ready_by_the_deadline_is_stopped() -> None:
    sup = make(1, startup_timeout=10.0)
    h = Harness(sup)
    h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    deadline = 1.0 + 10.0 + policy.UPGRADE_MARGIN
    assert sup.next_deadline(2.0) is not None and sup.next_deadline(2.0) <= deadline
    assert not [a for a in h.feed(Tick(), deadline - 0.1) if isinstance(a, Reply)]
    actions = h.feed(Tick(), deadline)
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert not reply.ok and f"not ready within {10.0 + policy.UPGRADE_MARGIN:g}s" in (
        reply.message)
    assert Signal(900, signal.SIGTERM) in actions
    # it reports ready after all: too late, it is told to stop again
    late = h.feed(SuccessorReady(900), deadline + 1)
    assert Signal(900, signal.SIGTERM) in late and HandOver(900) not in late


def test_a_new_primary_that_said_ready_then_died_is_a_failed_upgrade() -> None:
    """Its "ready" reached this primary only with (or after) its exit: nobody is there
    to take over, so no hand-over; the old primary serves on and says why."""
    sup = make(2)
    h = Harness(sup)
    pids = h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    actions = h.feed(SuccessorExited(900, None, signal.SIGKILL, said="ready"), 2.0)
    assert not [a for a in actions if isinstance(a, HandOver | Signal)]
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert (reply.ok, reply.code) == (False, Code.FAILED)
    assert reply.message == ("upgrade failed, the old primary goes on serving: the new "
                             "primary (pid 900) said it was ready, then exited (SIGKILL) "
                             "before it took over")
    assert Notify("ready") in actions and sup.operation is None
    assert table(sup) == {p: (i, "ready", "occupant") for i, p in enumerate(pids)}
    # it is gone: the next upgrade may start at once
    assert StartUpgrade() in h.feed(UpgradeRequest("again"), 2.1)


def test_a_new_primary_whose_last_words_were_a_failure_gives_that_reason() -> None:
    sup = make(1)
    h = Harness(sup)
    h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    actions = h.feed(SuccessorExited(900, 1, None, said="failed",
                                     why="cannot import app:main"), 2.0)
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert reply.message.endswith(": cannot import app:main") and not reply.ok
    assert not [a for a in actions if isinstance(a, Signal)]  # (reaped: not ours now)
    actions = h.feed(SuccessorExited(901, 0, None), 3.0)  # (no upgrade of its own)
    assert actions == []


def test_another_upgrade_waits_until_the_last_failed_new_primary_is_gone() -> None:
    """The first upgrade timed out; its new primary was told to stop but still drains.
    A second upgrade is refused as busy, naming it, until it is reaped; one that does
    not stop within --graceful-timeout (and a margin) gets SIGKILL."""
    sup = make(1, startup_timeout=10.0, graceful_timeout=5.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(UpgradeRequest("op"), 1.0)
    h.feed(SuccessorStarted(900), 1.0)
    failed_at = 1.0 + 10.0 + policy.UPGRADE_MARGIN
    assert Signal(900, signal.SIGTERM) in h.feed(Tick(), failed_at)

    busy = h.feed(UpgradeRequest("second"), failed_at + 0.1)
    why = ("busy: the new primary of the last upgrade (pid 900) is still stopping; "
           "try again once it has exited")
    assert Reply("second", False, why, Code.BUSY) in busy
    assert StartUpgrade() not in busy and sup.operation is None
    assert StartUpgrade() not in h.feed(OperatorSignal(signal.SIGUSR2), failed_at + 0.2)
    # other operations are not held back by it
    h.feed(ReloadRequest("r"), failed_at + 0.3)
    assert sup.operation is not None and sup.operation.noun == "reload"
    (new,) = [p for p in sup.table.workers if p != pid]
    h.msg(new, Ready("asgi"), failed_at + 0.4)
    h.msg(pid, Draining(), failed_at + 0.4)
    h.feed(Exited(pid, 0, None), failed_at + 0.5)
    assert sup.operation is None

    kill_at = failed_at + 5.0 + policy.SUCCESSOR_KILL_MARGIN
    assert sup.next_deadline(failed_at + 1) is not None
    assert sup.next_deadline(failed_at + 1) <= kill_at
    assert Signal(900, signal.SIGKILL) not in h.feed(Tick(), kill_at - 0.1)
    assert Signal(900, signal.SIGKILL) in h.feed(Tick(), kill_at)
    assert Signal(900, signal.SIGKILL) not in h.feed(Tick(), kill_at + 1)  # once
    assert StartUpgrade() not in h.feed(UpgradeRequest("third"), kill_at + 1.5)

    h.feed(SuccessorExited(900, None, signal.SIGKILL), kill_at + 2)
    actions = h.feed(UpgradeRequest("fourth"), kill_at + 2.1)
    assert StartUpgrade() in actions


def test_signals_during_an_upgrade_wait_and_a_stop_ends_the_new_primary_too() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.feed(ReloadRequest("r"), 1.0)
    assert StartUpgrade() not in h.feed(OperatorSignal(signal.SIGUSR2), 1.1)
    (new,) = [p for p in sup.table.workers if p != pid]
    actions = h.msg(new, Ready(), 1.5)  # the reload's step...
    actions += h.msg(pid, Draining(), 1.6)  # ...is done once the old one stops accepting
    assert StartUpgrade() in actions  # now the upgrade's turn
    h.feed(SuccessorStarted(900), 1.6)
    assert h.feed(OperatorSignal(signal.SIGHUP), 1.7) == []  # waits its turn
    actions = h.feed(OperatorSignal(signal.SIGTERM), 2.0)
    assert Signal(900, signal.SIGTERM) in actions and sup.stopping


def test_a_second_stop_asker_is_answered_too() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    one, two = object(), object()
    h.feed(StopRequest(requester=one), 1.0)
    assert h.feed(StopRequest(requester=two), 1.1) == []
    actions = h.feed(Exited(pid, 0, None), 1.2)
    assert [x for x in actions if isinstance(x, Reply)] == [
        Reply(one, True, "stopped"), Reply(two, True, "stopped")]
    assert actions[-1] == Exit(0)


def test_a_failed_fork_goes_back_into_the_core_through_the_driver() -> None:
    sup = make(1)
    h = Harness(sup)
    h.shell.fail_spawns = True
    actions = h.feed(Start(), 0.0)
    assert [x.event for x in actions if isinstance(x, policy.Log)] == ["spawn-failed"]
    assert table(sup) == {} and sup.table.slots[0].respawn_at == policy.BACKOFF_BASE
    h.shell.fail_spawns = False
    h.feed(Tick(), policy.BACKOFF_BASE)
    (pid,) = sup.table.workers
    assert table(sup) == {pid: (0, "starting", "occupant")}


def test_status_shows_the_directory_each_worker_resolved() -> None:
    sup = make(2)
    h = Harness(sup)
    h.feed(Start(), 0.0)
    a, b = sorted(sup.table.workers)
    h.msg(a, Ready("wsgi", "/srv/app/releases/1"), 0.5)
    h.msg(b, Ready("wsgi", "/srv/app/releases/2"), 0.5)
    assert [(row["pid"], row["cwd"]) for row in sup.status_rows(1.0)] == [
        (a, "/srv/app/releases/1"), (b, "/srv/app/releases/2")]


def test_a_leaving_workers_last_count_reaches_the_exit_line() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.msg(pid, Beat(10), 1.0)
    h.feed(StopRequest(), 2.0)
    h.msg(pid, Beat(17), 2.5)  # the worker's final count, sent after its drain
    actions = h.feed(Exited(pid, 0, None), 2.6)
    (line,) = [a for a in actions if isinstance(a, policy.Log) and a.event == "worker-exited"]
    assert line.fields["requests"] == 17 and line.fields["reason"] == "stop"


# -- autoscaling ---------------------------------------------------------------------------------
def test_autoscale_adds_workers_when_utilisation_stays_above_target() -> None:
    from forkd.autoscale import UP_WINDOW
    from forkd.events import LoadSample

    sup = make(1, autoscale=(1, 4))
    h = Harness(sup)
    h.start(0.0)
    actions: list[policy.Action] = []
    for t in range(int(UP_WINDOW)):  # each sample stands for the second before it
        actions = h.feed(LoadSample(0.95, 0), 10.0 + t)
        if t < UP_WINDOW - 1:
            assert not any(isinstance(a, Spawn) for a in actions)
    # 1 worker at 95% for a whole up window: ceil(0.95/0.6) = 2
    assert [a.slot for a in actions if isinstance(a, Spawn)] == [1]
    logged = [a for a in actions if isinstance(a, policy.Log) and a.event == "autoscale"]
    assert [(a.fields["from"], a.fields["to"], a.fields["why"]) for a in logged] == [(1, 2, "up")]
    assert sup.operation is not None and sup.target == 2
    pid = occupant(sup, 1)
    assert pid is not None
    h.msg(pid, Ready(), 14.5)
    assert sup.operation is None
    assert sup.autoscale_status() == {"min": 1, "max": 4, "target": 0.6, "window": 60.0,
                                      "workers": 2}


def test_autoscale_removes_the_highest_slots_after_the_down_window_with_its_own_reason() -> None:
    from forkd.autoscale import DOWN_WINDOW
    from forkd.events import LoadSample

    sup = make(3, autoscale=(1, 3))
    h = Harness(sup)
    h.start(0.0)
    top = [occupant(sup, 2), occupant(sup, 1)]
    decided_at = None
    for t in range(int(DOWN_WINDOW) + 3):
        actions = h.feed(LoadSample(0.05, 0), 1.0 + t)
        if any(isinstance(a, Signal) for a in actions):
            decided_at = 1.0 + t
            assert [a.pid for a in actions if isinstance(a, Signal)] == top
            break
    assert decided_at is not None and decided_at - 1.0 >= DOWN_WINDOW - 1  # a whole window
    assert sorted(sup.table.slots) == [0]
    for pid in top:
        assert pid is not None
        assert sup.table.workers[pid].state is WorkerState.DRAINING
        h.feed(Exited(pid, 0, None), decided_at + 1)
    assert sup.operation is None and sup.target == 1


def test_autoscale_waits_for_a_running_operation() -> None:
    from forkd.events import LoadSample

    sup = make(1, autoscale=(1, 4))
    h = Harness(sup)
    h.start(0.0)
    h.feed(ReloadRequest(), 1.0)  # a reload runs: its replacement is not ready yet
    for t in range(10):
        actions = h.feed(LoadSample(1.0, 20), 2.0 + t)
        assert not any(isinstance(a, policy.Log) and a.event == "autoscale" for a in actions)
    assert sup.target == 1


def test_a_manual_scale_inside_the_bounds_holds_outside_is_refused() -> None:
    from forkd.autoscale import DOWN_WINDOW
    from forkd.events import LoadSample

    sup = make(1, autoscale=(1, 4))
    h = Harness(sup)
    h.start(0.0)
    who = object()
    actions = h.feed(ScaleRequest(6, requester=who), 1.0)
    assert [a for a in actions if isinstance(a, Reply)] == [Reply(
        who, False, "cannot scale to 6 workers: --autoscale keeps the count within 1:4",
        Code.BAD_ARGS)]
    h.feed(ScaleRequest(3), 2.0)
    for slot in (1, 2):
        pid = occupant(sup, slot)
        assert pid is not None
        h.msg(pid, Ready(), 2.5)
    assert sup.operation is None and sup.target == 3
    # idle: the autoscaler would go down to 1, but the operator's 3 holds for a window
    for t in range(int(DOWN_WINDOW) - 1):
        actions = h.feed(LoadSample(0.0, 0), 3.0 + t)
        assert not any(isinstance(a, Signal) for a in actions)
    assert sup.target == 3


def test_load_samples_without_autoscale_change_nothing() -> None:
    from forkd.events import LoadSample

    sup = make(1)
    h = Harness(sup)
    h.start(0.0)
    for t in range(30):
        assert h.feed(LoadSample(1.0, 50), 1.0 + t) == []
    assert sup.autoscale_status() is None
