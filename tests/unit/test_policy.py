"""The supervisor's decisions, fed events with `now` passed in: no processes."""

from __future__ import annotations

import random
import signal

import pytest

from forkd import policy
from forkd.config import Config
from forkd.policy import Exit, Finish, Notify, Progress, Signal, Spawn, Supervisor
from forkd.state import IllegalTransition, Worker, WorkerState


def make(workers: int = 2, **options: object) -> Supervisor:
    return Supervisor(Config(app="m:app", **options), workers, random.Random(7))  # type: ignore[arg-type]


class Harness:
    """Plays the shell: gives pids to spawns and remembers the actions."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.next_pid = 100
        self.actions: list[policy.Action] = []

    def run(self, actions: list[policy.Action], now: float) -> list[policy.Action]:
        done: list[policy.Action] = []
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            done.append(action)
            if isinstance(action, Spawn):
                self.next_pid += 1
                queue[0:0] = self.sup.spawned(action, self.next_pid, now)
        self.actions += done
        return done

    def start(self, now: float = 0.0) -> list[int]:
        self.run(self.sup.start(now), now)
        pids = sorted(self.sup.table.workers)
        for pid in pids:
            self.run(self.sup.message(pid, b"ready asgi", now), now)
        return pids


def occupant(sup: Supervisor, slot: int) -> int | None:
    return sup.table.slots[slot].pid


def test_start_spawns_one_worker_per_slot_and_announces_ready_once_all_are() -> None:
    sup = make(3)
    h = Harness(sup)
    actions = h.run(sup.start(0.0), 0.0)
    assert [a.slot for a in actions if isinstance(a, Spawn)] == [0, 1, 2]
    pids = sorted(sup.table.workers)
    assert h.run(sup.message(pids[0], b"ready", 0.1), 0.1).count(Notify("ready")) == 0
    assert h.run(sup.message(pids[1], b"ready", 0.1), 0.1).count(Notify("ready")) == 0
    assert Notify("ready") in h.run(sup.message(pids[2], b"ready", 0.2), 0.2)


def test_dead_worker_is_replaced_at_once_in_the_same_slot() -> None:
    sup = make(2)
    h = Harness(sup)
    pids = h.start()
    slot1 = sup.table.workers[pids[1]].slot
    actions = h.run(sup.exited(pids[1], None, signal.SIGKILL, 50.0), 50.0)
    assert Spawn(slot1) in actions
    new = occupant(sup, slot1)
    assert new is not None and new != pids[1]
    assert sup.table.slots[slot1].restarts == 1
    assert sup.table.slots[slot1].last_exit == "killed: SIGKILL"


def test_a_slot_that_keeps_dying_fast_backs_off_exponentially_up_to_the_cap() -> None:
    sup = make(1)
    h = Harness(sup)
    now = 100.0
    h.start(now)
    delays = []
    for _ in range(11):
        pid = occupant(sup, 0)
        assert pid is not None
        h.run(sup.message(pid, b"ready", now), now)
        actions = h.run(sup.exited(pid, 1, None, now + 0.2), now + 0.2)
        now += 0.2
        if any(isinstance(a, Spawn) for a in actions):
            delays.append(0.0)
            continue
        respawn_at = sup.table.slots[0].respawn_at
        assert respawn_at is not None
        delays.append(round(respawn_at - now, 3))
        assert h.run(sup.tick(respawn_at - 0.01), respawn_at) == []  # not before its time
        now = respawn_at
        assert Spawn(0) in h.run(sup.tick(now), now)
    assert delays[:7] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert max(delays) == policy.BACKOFF_CAP
    # visible in status while waiting
    pid = occupant(sup, 0)
    assert pid is not None
    h.run(sup.exited(pid, 1, None, now + 0.1), now + 0.1)
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
        h.run(sup.exited(pid, 1, None, now), now)
        at = sup.table.slots[0].respawn_at
        now = at if at is not None else now
        h.run(sup.tick(now), now)
    assert sup.table.slots[0].fast_deaths == 4
    pid = occupant(sup, 0)
    assert pid is not None
    h.run(sup.message(pid, b"ready", now), now)
    later = now + policy.STABLE_AFTER + 1
    actions = h.run(sup.exited(pid, 1, None, later), later)
    assert Spawn(0) in actions  # at once again
    assert sup.table.slots[0].fast_deaths == 0


def test_app_that_cannot_load_in_the_first_generation_stops_everything_with_exit_1() -> None:
    sup = make(2)
    h = Harness(sup)
    h.run(sup.start(0.0), 0.0)
    first, second = sorted(sup.table.workers)
    h.run(sup.message(first, b"error Traceback...\nRuntimeError: boom\n", 0.1), 0.1)
    actions = h.run(sup.exited(first, policy.EXIT_APP_LOAD, None, 0.2), 0.2)
    assert not any(isinstance(a, Spawn) for a in actions)
    assert Signal(second, signal.SIGQUIT) in actions
    assert Exit(1) in h.run(sup.exited(second, None, signal.SIGQUIT, 0.3), 0.3)


def test_load_failure_after_a_good_generation_backs_off_instead_of_stopping() -> None:
    sup = make(1)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.run(sup.exited(pid, 1, None, 20.0), 20.0)
    new = occupant(sup, 0)
    assert new is not None
    actions = h.run(sup.exited(new, policy.EXIT_APP_LOAD, None, 20.1), 20.1)
    assert not any(isinstance(a, Exit) for a in actions)
    assert sup.table.slots[0].respawn_at is not None or any(isinstance(a, Spawn) for a in actions)


def test_rolling_reload_replaces_one_slot_at_a_time_ready_first_then_drains_the_old() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    actions = h.run(sup.request_reload(10.0), 10.0)
    assert Notify("reloading") in actions
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(0, replacement=True)]
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    # the old worker is not touched until its replacement is ready
    assert not any(isinstance(a, Signal) for a in actions)
    with pytest.raises(policy.Busy, match=r"busy: reload in progress \(0/2\)"):
        sup.request_reload(10.1)
    actions = h.run(sup.message(new0, b"ready", 10.2), 10.2)
    assert Signal(old[0], signal.SIGTERM) in actions
    assert Spawn(1, replacement=True) in actions
    assert any(isinstance(a, Progress) and "slot 0 (1/2)" in a.text for a in actions)
    assert sup.table.workers[old[0]].state is WorkerState.DRAINING
    new1 = sup.table.slots[1].replacement
    assert new1 is not None
    actions = h.run(sup.message(new1, b"ready", 10.4), 10.4)
    assert Signal(old[1], signal.SIGTERM) in actions
    # not done while an old worker may still accept a connection
    assert not any(isinstance(a, Finish) for a in actions)
    assert h.run(sup.message(old[0], b"draining", 10.5), 10.5) == []
    actions = h.run(sup.message(old[1], b"draining", 10.6), 10.6)
    finish = [a for a in actions if isinstance(a, Finish)]
    assert finish and finish[0].ok
    assert Notify("ready") in actions
    assert {occupant(sup, 0), occupant(sup, 1)} == {new0, new1}
    # the drained workers leave; nothing respawns and nothing counts as a restart
    assert sup.operation is None
    for pid in old:
        assert not any(isinstance(a, Spawn) for a in h.run(sup.exited(pid, 0, None, 11), 11))
    assert [s.restarts for s in sup.table.slots.values()] == [0, 0]
    assert [s.last_exit for s in sup.table.slots.values()] == ["reload", "reload"]


def test_failed_replacement_aborts_the_reload_and_old_workers_keep_serving() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    h.run(sup.request_reload(5.0), 5.0)
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    h.run(sup.message(new0, b"error Traceback\nSyntaxError: bad deploy\n", 5.1), 5.1)
    actions = h.run(sup.exited(new0, policy.EXIT_APP_LOAD, None, 5.2), 5.2)
    finish = [a for a in actions if isinstance(a, Finish)]
    assert len(finish) == 1 and not finish[0].ok
    assert "SyntaxError: bad deploy" in finish[0].message
    assert not any(isinstance(a, Signal) for a in actions)
    assert [occupant(sup, 0), occupant(sup, 1)] == old
    assert sup.operation is None
    assert all(sup.table.workers[pid].state is WorkerState.READY for pid in old)
    # and a later reload is accepted
    assert any(isinstance(a, Spawn) for a in h.run(sup.request_reload(6.0), 6.0))


def test_replacement_that_never_becomes_ready_times_out_and_aborts() -> None:
    sup = make(1, timeout=5.0)
    h = Harness(sup)
    (old,) = h.start(0.0)
    h.run(sup.request_reload(1.0), 1.0)
    new = sup.table.slots[0].replacement
    assert new is not None
    h.run(sup.message(old, b"hb 3", 5.5), 5.5)
    actions = h.run(sup.tick(6.1), 6.1)
    assert Signal(new, signal.SIGABRT) in actions
    actions = h.run(sup.exited(new, None, signal.SIGABRT, 6.2), 6.2)
    finish = [a for a in actions if isinstance(a, Finish)]
    assert finish and not finish[0].ok and "not ready within 5s" in finish[0].message
    assert occupant(sup, 0) == old


def test_silent_worker_gets_sigabrt_then_sigkill_and_is_replaced() -> None:
    sup = make(1, timeout=10.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    h.run(sup.message(pid, b"hb 1", 5.0), 5.0)
    assert h.run(sup.tick(14.9), 14.9) == []
    actions = h.run(sup.tick(15.0), 15.0)
    assert Signal(pid, signal.SIGABRT) in actions
    actions = h.run(sup.tick(15.0 + policy.ABORT_GRACE), 15.0 + policy.ABORT_GRACE)
    assert Signal(pid, signal.SIGKILL) in actions
    actions = h.run(sup.exited(pid, None, signal.SIGKILL, 18.5), 18.5)
    assert Spawn(0) in actions
    assert sup.table.slots[0].last_exit == "timeout"
    assert sup.table.slots[0].restarts == 1


def test_graceful_stop_drains_then_exits_0_and_kills_stragglers_after_the_timeout() -> None:
    sup = make(2, graceful_timeout=5.0)
    h = Harness(sup)
    pids = h.start(0.0)
    actions = h.run(sup.request_stop(True, 1.0), 1.0)
    assert [a for a in actions if isinstance(a, Signal)] == [
        Signal(pids[0], signal.SIGTERM), Signal(pids[1], signal.SIGTERM)]
    assert Notify("stopping") in actions
    assert h.run(sup.exited(pids[0], 0, None, 2.0), 2.0)[-1] != Exit(0)
    kill_at = 1.0 + 5.0 + policy.DRAIN_MARGIN
    assert Signal(pids[1], signal.SIGKILL) in h.run(sup.tick(kill_at), kill_at)
    assert Exit(0) in h.run(sup.exited(pids[1], None, signal.SIGKILL, kill_at), kill_at)


def test_stop_request_while_reloading_is_busy_but_a_signal_stop_wins() -> None:
    sup = make(1)
    h = Harness(sup)
    h.start(0.0)
    h.run(sup.request_reload(1.0), 1.0)
    with pytest.raises(policy.Busy):
        sup.request_stop(True, 1.1)
    actions = h.run(sup.request_stop(True, 1.2, forced=True), 1.2)
    assert any(isinstance(a, Finish) and not a.ok for a in actions)
    assert sup.stopping


def test_scale_up_is_ready_gated_and_scale_down_drains_the_highest_slots() -> None:
    sup = make(2)
    h = Harness(sup)
    h.start(0.0)
    actions = h.run(sup.request_scale(4, 1.0), 1.0)
    assert [a.slot for a in actions if isinstance(a, Spawn)] == [2, 3]
    assert not any(isinstance(a, Finish) for a in actions)
    for slot in (2, 3):
        pid = occupant(sup, slot)
        assert pid is not None
        actions = h.run(sup.message(pid, b"ready", 1.5), 1.5)
    assert any(isinstance(a, Finish) and a.ok for a in actions)
    top = [occupant(sup, 3), occupant(sup, 2)]
    actions = h.run(sup.request_scale(2, 2.0), 2.0)
    assert [a.pid for a in actions if isinstance(a, Signal)] == top
    assert sorted(sup.table.slots) == [0, 1]
    for pid in top:
        assert pid is not None
        actions = h.run(sup.exited(pid, 0, None, 2.5), 2.5)
        assert not any(isinstance(a, Spawn) for a in actions)
    assert any(isinstance(a, Finish) and a.ok for a in actions)
    with pytest.raises(ValueError):
        sup.request_scale(0, 3.0)


def test_memory_over_the_limit_for_two_samples_is_replaced_gracefully() -> None:
    sup = make(1, max_memory=100 << 20)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert h.run(sup.memory({pid: 120 << 20}, 1.0), 1.0) == []
    actions = h.run(sup.memory({pid: 130 << 20}, 2.0), 2.0)
    assert Spawn(0, replacement=True) in actions
    assert not any(isinstance(a, Signal) for a in actions)  # nothing killed yet
    new = sup.table.slots[0].replacement
    assert new is not None
    actions = h.run(sup.message(new, b"ready", 2.3), 2.3)
    assert Signal(pid, signal.SIGTERM) in actions
    assert sup.table.slots[0].last_exit == "memory: 130M > 100M"
    assert sup.table.slots[0].restarts == 1


def test_memory_over_the_hard_ceiling_is_killed_at_once() -> None:
    sup = make(1, max_memory=100 << 20)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    actions = h.run(sup.memory({pid: 151 << 20}, 1.0), 1.0)
    assert Signal(pid, signal.SIGKILL) in actions
    assert Spawn(0) in h.run(sup.exited(pid, None, signal.SIGKILL, 1.1), 1.1)
    assert sup.table.slots[0].last_exit == "memory: 151M > 100M"


def test_max_requests_recycles_one_worker_at_a_time() -> None:
    sup = make(2, max_requests=50)
    h = Harness(sup)
    a, b = h.start(0.0)
    first = h.run(sup.message(a, b"hb 50", 1.0), 1.0)
    second = h.run(sup.message(b, b"hb 51", 1.0), 1.0)
    assert Spawn(sup.table.workers[a].slot, replacement=True) in first
    assert not any(isinstance(x, Spawn) for x in second)
    new = sup.table.slots[sup.table.workers[a].slot].replacement
    assert new is not None
    h.run(sup.message(new, b"ready", 1.2), 1.2)
    assert Spawn(sup.table.workers[b].slot, replacement=True) in h.run(
        sup.message(b, b"hb 52", 1.5), 1.5)
    assert sup.table.slots[0].last_exit == "max-requests"


def test_max_requests_jitter_spreads_the_limits() -> None:
    sup = make(8, max_requests=1000, max_requests_jitter=100)
    h = Harness(sup)
    h.start(0.0)
    limits = {w.request_limit for w in sup.table.workers.values()}
    assert len(limits) > 1
    assert all(limit is not None and 1000 <= limit <= 1100 for limit in limits)


def test_illegal_worker_moves_raise() -> None:
    worker = Worker(pid=1, slot=0, started_at=0, last_seen=0)
    worker.move(WorkerState.DRAINING)
    with pytest.raises(IllegalTransition):
        worker.move(WorkerState.READY)


def test_next_deadline_covers_backoff_kills_and_heartbeats() -> None:
    sup = make(1, timeout=30.0)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    assert sup.next_deadline(0.0) == pytest.approx(30.0)
    h.run(sup.request_stop(True, 1.0), 1.0)
    assert sup.next_deadline(1.0) == pytest.approx(min(30.0, 1.0 + 30.0 + policy.DRAIN_MARGIN))


def test_old_worker_dying_while_its_reload_replacement_starts_does_not_stall_the_reload() -> None:
    sup = make(2)
    h = Harness(sup)
    old = h.start(0.0)
    h.run(sup.request_reload(1.0), 1.0)
    new0 = sup.table.slots[0].replacement
    assert new0 is not None
    actions = h.run(sup.exited(old[0], None, signal.SIGKILL, 1.5), 1.5)
    assert not any(isinstance(a, Spawn) for a in actions)  # the replacement will take it
    actions = h.run(sup.message(new0, b"ready", 2.0), 2.0)
    assert occupant(sup, 0) == new0
    assert Spawn(1, replacement=True) in actions
    new1 = sup.table.slots[1].replacement
    assert new1 is not None
    h.run(sup.message(new1, b"ready", 2.5), 2.5)
    actions = h.run(sup.message(old[1], b"draining", 2.6), 2.6)
    assert any(isinstance(a, Finish) and a.ok for a in actions)
    assert sup.operation is None
    assert any(isinstance(a, Spawn) for a in h.run(sup.request_reload(3.0), 3.0))


def test_replacement_failing_after_its_old_worker_died_respawns_the_empty_slot() -> None:
    sup = make(1)
    h = Harness(sup)
    (old,) = h.start(0.0)
    h.run(sup.request_reload(20.0), 20.0)
    new = sup.table.slots[0].replacement
    assert new is not None
    h.run(sup.exited(old, None, signal.SIGKILL, 20.1), 20.1)
    actions = h.run(sup.exited(new, policy.EXIT_APP_LOAD, None, 20.2), 20.2)
    assert any(isinstance(a, Finish) and not a.ok for a in actions)
    assert Spawn(0) in actions or sup.table.slots[0].respawn_at is not None


def test_a_health_replacement_that_keeps_failing_is_retried_with_a_growing_pause() -> None:
    sup = make(1, max_requests=10)
    h = Harness(sup)
    (pid,) = h.start(0.0)
    forks = 0
    now = 1.0
    while now < 4.0:
        actions = h.run(sup.message(pid, b"hb 50", now), now)
        for action in actions:
            if isinstance(action, Spawn):
                forks += 1
                new = sup.table.slots[0].replacement
                assert new is not None
                h.run(sup.exited(new, policy.EXIT_APP_LOAD, None, now + 0.05), now + 0.05)
        now += 0.5
    assert forks <= 3  # not one per heartbeat (that would be 6)
    assert occupant(sup, 0) == pid  # the serving worker was never touched
