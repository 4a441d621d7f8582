"""The autoscaling decision on recorded load shapes: a step, a ramp, a spike, oscillation.

A small simulation stands in for the pool: the load is a demand in busy workers; with n
workers, utilisation is min(1, demand / n) and connections queue while demand exceeds n.
Every second one sample is observed and a decision, if any, is carried out at once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from forkd.autoscale import DOWN_WINDOW, UP_WINDOW, Autoscaler, Sample


def simulate(scaler: Autoscaler, demand: Callable[[float], float], seconds: int,
             start: int) -> list[int]:
    """The worker count at each second."""
    workers = start
    counts = []
    for t in range(seconds):
        load = demand(t)
        scaler.observe(Sample(t, workers, min(1.0, load / workers), int(load > workers) * 5))
        decision = scaler.decide(workers, t)
        if decision is not None:
            workers = decision.workers
            scaler.changed(t)
        counts.append(workers)
    return counts


def changes(counts: list[int]) -> int:
    return sum(1 for a, b in zip(counts, counts[1:], strict=False) if a != b)


def test_a_step_up_is_followed_within_seconds_and_held_at_the_target() -> None:
    scaler = Autoscaler(1, 8)
    counts = simulate(scaler, lambda t: 0.3 if t < 20 else 3.0, 60, start=1)
    assert counts[19] == 1
    # 3 busy workers at 60% each need 5; reached by doubling steps, each after a window
    assert counts[20 + int(UP_WINDOW) * 3 + 2] == 5
    assert counts[-1] == 5
    assert max(counts) == 5


def test_a_step_down_waits_for_the_stabilisation_window() -> None:
    scaler = Autoscaler(1, 8)
    counts = simulate(scaler, lambda t: 3.0 if t < 30 else 0.3, 30 + int(DOWN_WINDOW) + 10, start=5)
    assert counts[29] == 5
    assert counts[30 + int(DOWN_WINDOW) - 2] == 5  # not before the window has passed
    assert counts[-1] == 1


def test_a_ramp_is_followed_without_overshoot() -> None:
    scaler = Autoscaler(1, 16)
    counts = simulate(scaler, lambda t: t / 10, 60, start=1)  # 0 → 6 busy workers
    assert counts == sorted(counts)  # never down while the load rises
    assert counts[-1] >= 6 / 0.6 - 2  # keeps up within a couple of workers
    assert max(counts) <= 11


def test_a_short_spike_changes_nothing() -> None:
    scaler = Autoscaler(1, 8)
    counts = simulate(scaler, lambda t: 4.0 if 30 <= t < 32 else 0.4, 80, start=1)
    assert set(counts) == {1}


def test_oscillating_load_does_not_flap() -> None:
    scaler = Autoscaler(1, 8)
    counts = simulate(scaler, lambda t: 2.4 if (t // 10) % 2 else 0.6, 300, start=1)
    # up once for the peaks, then held: the down window always contains a peak
    assert changes(counts) <= 2
    assert counts[-1] == 4


def test_never_beyond_the_bounds() -> None:
    scaler = Autoscaler(2, 3)
    counts = simulate(scaler, lambda t: 10.0 if t < 40 else 0.0, 40 + int(DOWN_WINDOW) + 10,
                      start=2)
    assert max(counts) == 3
    assert min(counts) == 2


def test_queued_connections_add_a_worker_even_at_full_utilisation() -> None:
    scaler = Autoscaler(1, 4, target=1.0)  # at 100% target, utilisation alone never grows it
    counts = simulate(scaler, lambda t: 3.0, 30, start=1)
    assert counts[-1] == 3  # queue growth stops once demand fits


def test_nothing_while_another_operation_runs() -> None:
    scaler = Autoscaler(1, 8)
    for t in range(10):
        scaler.observe(Sample(t, 1, 1.0, 10))
    assert scaler.decide(1, 9, busy=True) is None
    decision = scaler.decide(1, 9)
    assert decision is not None
    assert (decision.workers, decision.reason) == (2, "up")
    assert decision.queued == 10


def test_a_manual_scale_holds_for_one_window() -> None:
    scaler = Autoscaler(1, 8)
    scaler.held(0)
    for t in range(int(DOWN_WINDOW) + 5):
        scaler.observe(Sample(t, 6, 0.05))
        if t < DOWN_WINDOW:
            assert scaler.decide(6, t) is None
    decision = scaler.decide(6, DOWN_WINDOW + 4)
    assert decision is not None
    assert (decision.workers, decision.reason) == (1, "down")


def test_a_count_outside_the_bounds_is_brought_back() -> None:
    scaler = Autoscaler(2, 4)
    decision = scaler.decide(6, 0.0)
    assert decision is not None
    assert (decision.workers, decision.reason) == (4, "bounds")


@pytest.mark.parametrize(("minimum", "maximum", "target"), [(0, 2, 0.6), (3, 2, 0.6), (1, 2, 0)])
def test_bad_settings_are_refused(minimum: int, maximum: int, target: float) -> None:
    with pytest.raises(ValueError, match="autoscale"):
        Autoscaler(minimum, maximum, target)
