"""--drain-delay in the core: on a graceful stop the workers go on serving with the
health path failing for that long, then drain as any graceful stop does. Typed events,
`now` passed in, the Driver the primary runs: no processes."""

from __future__ import annotations

import random
import signal

import pytest

from forkd import policy
from forkd.config import Config, merge
from forkd.errors import ConfigError
from forkd.events import (
    Exited,
    FromWorker,
    OperatorSignal,
    Ready,
    ReloadRequest,
    Start,
    StopRequest,
    Tick,
)
from forkd.policy import Driver, Exit, FailHealth, Notify, Reply, Signal, Spawn, Supervisor
from forkd.protocol import Code
from forkd.state import WorkerState


class Shell:
    """policy.Effects without processes: hands out pids, records what it was told."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.performed: list[policy.Action] = []

    def spawn(self, action: Spawn) -> int:
        self.next_pid += 1
        return self.next_pid

    def perform(self, action: policy.Action) -> None:
        self.performed.append(action)


def started(workers: int = 2, **options: object) -> tuple[Supervisor, Driver, list[int]]:
    sup = Supervisor(Config(app="m:app", **options), workers, random.Random(7))  # type: ignore[arg-type]
    driver = Driver(sup, Shell())
    driver.feed(Start(), 0.0)
    pids = sorted(sup.table.workers)
    for pid in pids:
        driver.feed(FromWorker(pid, Ready("asgi")), 0.0)
    return sup, driver, pids


def signals(actions: list[policy.Action]) -> list[Signal]:
    return [a for a in actions if isinstance(a, Signal)]


def states(sup: Supervisor) -> list[str]:
    return [w.state.value for w in sup.table.workers.values()]


def test_graceful_stop_fails_health_first_and_drains_after_the_delay() -> None:
    sup, driver, (a, b) = started(drain_delay=2.0, graceful_timeout=5.0)
    actions = driver.feed(OperatorSignal(signal.SIGTERM), 10.0)
    assert FailHealth() in actions and Notify("stopping") in actions
    assert signals(actions) == []  # still serving
    assert states(sup) == ["ready", "ready"]
    assert sup.next_deadline(10.0) == 12.0  # the loop wakes up for the end of the delay
    assert signals(driver.feed(Tick(), 11.99)) == []
    actions = driver.feed(Tick(), 12.0)
    assert signals(actions) == [Signal(a, signal.SIGTERM), Signal(b, signal.SIGTERM)]
    assert states(sup) == ["draining", "draining"]
    assert FailHealth() not in actions
    driver.feed(Exited(a, 0, None), 12.5)
    assert driver.feed(Exited(b, 0, None), 12.6)[-1] == Exit(0)


def test_the_graceful_timeout_counts_from_the_end_of_the_delay() -> None:
    sup, driver, (a, b) = started(drain_delay=2.0, graceful_timeout=5.0)
    driver.feed(StopRequest(), 10.0)
    driver.feed(Tick(), 12.0)
    kill_at = 12.0 + 5.0 + policy.DRAIN_MARGIN
    assert signals(driver.feed(Tick(), kill_at - 0.01)) == []
    assert signals(driver.feed(Tick(), kill_at)) == [
        Signal(a, signal.SIGKILL), Signal(b, signal.SIGKILL)]


def test_without_a_delay_the_stop_drains_at_once_and_health_is_left_to_the_drain() -> None:
    sup, driver, (a, b) = started(graceful_timeout=5.0)
    actions = driver.feed(OperatorSignal(signal.SIGTERM), 10.0)
    assert FailHealth() not in actions
    assert signals(actions) == [Signal(a, signal.SIGTERM), Signal(b, signal.SIGTERM)]


def test_an_immediate_stop_during_the_delay_quits_at_once() -> None:
    sup, driver, (a, b) = started(drain_delay=30.0)
    driver.feed(OperatorSignal(signal.SIGINT), 10.0)
    assert signals(driver.feed(OperatorSignal(signal.SIGINT), 11.0)) == [  # second Ctrl-C
        Signal(a, signal.SIGQUIT), Signal(b, signal.SIGQUIT)]
    assert signals(driver.feed(Tick(), 40.0)) == [  # no drain later: the kill, on time
        Signal(a, signal.SIGKILL), Signal(b, signal.SIGKILL)]


def test_a_stop_request_during_the_delay_waits_for_the_same_stop() -> None:
    sup, driver, (a, b) = started(drain_delay=2.0)
    first, second = object(), object()
    driver.feed(StopRequest(requester=first), 10.0)
    assert driver.feed(StopRequest(requester=second), 11.0) == []
    driver.feed(Tick(), 12.0)
    driver.feed(Exited(a, 0, None), 12.5)
    actions = driver.feed(Exited(b, 0, None), 12.6)
    assert [x for x in actions if isinstance(x, Reply)] == [
        Reply(first, True, "stopped"), Reply(second, True, "stopped")]


def test_a_reload_during_the_delay_is_refused_as_busy() -> None:
    sup, driver, _ = started(drain_delay=2.0)
    driver.feed(StopRequest(), 10.0)
    asker = object()
    assert driver.feed(ReloadRequest(asker), 10.5)[-1] == Reply(
        asker, False, "busy: stop in progress", Code.BUSY)


def test_a_worker_that_dies_during_the_delay_is_not_replaced_and_the_rest_serve_on() -> None:
    sup, driver, (a, b) = started(drain_delay=2.0)
    driver.feed(StopRequest(), 10.0)
    actions = driver.feed(Exited(a, 1, None), 10.5)
    assert not any(isinstance(x, Spawn) for x in actions)
    assert Exit(0) not in actions
    assert sup.table.workers[b].state is WorkerState.READY
    assert signals(driver.feed(Tick(), 12.0)) == [Signal(b, signal.SIGTERM)]
    assert driver.feed(Exited(b, 0, None), 12.5)[-1] == Exit(0)


def test_drain_delay_option_is_seconds_and_zero_means_off() -> None:
    assert merge("m:app", {}, {}, {}, "forkd.toml").drain_delay == 0.0
    assert merge("m:app", {"drain_delay": "2.5"}, {}, {}, "forkd.toml").drain_delay == 2.5
    assert merge("m:app", {}, {"FORKD_DRAIN_DELAY": "0"}, {}, "forkd.toml").drain_delay == 0.0
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="--drain-delay"):
            merge("m:app", {"drain_delay": bad}, {}, {}, "forkd.toml")
