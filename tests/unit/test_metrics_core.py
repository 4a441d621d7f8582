"""The metrics core without processes: the worker's counters, the snapshot codec,
and the primary's aggregator (counters never go down across worker exits)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd.metrics import snapshot as snap
from forkd.metrics.aggregate import Aggregator, quantile
from forkd.metrics.counters import RequestCounters
from forkd.metrics.snapshot import BOUNDS, Snapshot, SnapshotError, from_wire, to_wire


def served(counters: RequestCounters, n: int, now: float, method: bytes = b"GET",
           status: bytes = b"200", duration: float = 0.003) -> float:
    """n requests one after another, each taking `duration`; returns the new now."""
    for _ in range(n):
        counters.begin(now)
        counters.finish(method, status, now, now + duration)
        now += duration
    return now


def test_counters_count_by_method_and_code_and_bucket() -> None:
    counters = RequestCounters()
    served(counters, 3, 0.0)
    served(counters, 2, 1.0, method=b"POST", status=b"503", duration=0.2)
    served(counters, 1, 2.0, method=b"BREW", status=b"418", duration=120.0)
    shot = counters.snapshot(200.0, connections=4, cpu=1.5)
    get, post, other = (snap.METHODS.index(m) for m in ("GET", "POST", "other"))
    assert shot.requests == {(get, 200): 3, (post, 503): 2, (other, 418): 1}
    assert shot.buckets[BOUNDS.index(0.005)] == 3  # 3 ms falls in le=0.005
    assert shot.buckets[BOUNDS.index(0.25)] == 2
    assert shot.buckets[-1] == 1  # 120 s: +Inf
    assert shot.duration_sum == pytest.approx(3 * 0.003 + 2 * 0.2 + 120.0)
    assert (shot.connections, shot.in_flight, shot.cpu) == (4, 0, 1.5)


def test_busy_time_counts_overlap_once_and_includes_the_running_period() -> None:
    counters = RequestCounters()
    counters.begin(10.0)
    counters.begin(10.5)  # overlaps the first: not busier
    counters.end(11.0)
    counters.end(12.0)  # busy 10..12
    counters.begin(15.0)  # still running at the snapshot
    assert counters.snapshot(16.0, 1, 0.0).busy == pytest.approx(3.0)
    assert counters.snapshot(16.0, 1, 0.0).in_flight == 1
    counters.end(17.0)
    counters.end(18.0)  # an extra end (a client gone twice) never goes negative
    assert counters.in_flight == 0 and counters.busy == pytest.approx(4.0)


def test_wire_round_trip_through_the_worker_channel_codec() -> None:
    from forkd import events

    counters = RequestCounters()
    served(counters, 5, 0.0, status=b"404")
    shot = counters.snapshot(1.0, connections=2, cpu=0.25)
    beat = events.decode(events.encode(events.Beat(5, to_wire(shot))))
    assert isinstance(beat, events.Beat) and beat.requests == 5
    assert from_wire(beat.metrics) == shot
    assert len(events.encode(events.Beat(5, to_wire(shot)))) < 300  # one small datagram


@given(st.dictionaries(st.tuples(st.integers(0, len(snap.METHODS) - 1), st.integers(100, 999)),
                       st.integers(0, 2**63), max_size=50),
       st.lists(st.integers(0, 2**63), min_size=len(BOUNDS) + 1, max_size=len(BOUNDS) + 1),
       st.floats(0, 1e9), st.integers(0, 2**32 - 1))
def test_wire_round_trips_any_snapshot(requests: dict[tuple[int, int], int],
                                       buckets: list[int], busy: float, in_flight: int
                                       ) -> None:
    import json

    shot = Snapshot(requests=requests, buckets=tuple(buckets), busy=busy, in_flight=in_flight)
    assert from_wire(json.loads(json.dumps(to_wire(shot)))) == shot


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(st.text(max_size=3), inner, max_size=5), max_leaves=30)


@given(JSONISH)
def test_from_wire_refuses_anything_else_with_one_error(data: object) -> None:
    try:
        from_wire(data)
    except SnapshotError:
        pass


def test_from_wire_refuses_damaged_snapshots() -> None:
    good = to_wire(Snapshot(requests={(1, 200): 7}))
    for key, value in (("b", [0] * 3), ("r", [["GET", 99, 1]]), ("r", [["GET", 200, -1]]),
                       ("u", float("nan")), ("f", True), ("s", "1"), ("r", {"GET": 1})):
        with pytest.raises(SnapshotError):
            from_wire({**good, key: value})
    with pytest.raises(SnapshotError):
        from_wire({k: v for k, v in good.items() if k != "cpu"})


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[BOUNDS.index(0.01)] = 100  # all between 5 ms and 10 ms
    assert quantile(0.5, buckets) == pytest.approx(0.0075)
    assert quantile(0.99, buckets) == pytest.approx(0.00995)
    assert quantile(0.5, [0] * (len(BOUNDS) + 1)) is None


def requests_total(agg: Aggregator) -> int:
    return sum(agg.totals().requests.values())


def test_counters_survive_worker_exits_and_replacements() -> None:
    agg = Aggregator()
    workers = {1: RequestCounters(), 2: RequestCounters()}
    agg.started(1, 0, 0.0)
    agg.started(2, 1, 0.0)
    served(workers[1], 10, 0.0)
    served(workers[2], 5, 0.0)
    agg.update(1, workers[1].snapshot(1.0, 0, 0.5), 1.0)
    agg.update(2, workers[2].snapshot(1.0, 0, 0.25), 1.0)
    assert requests_total(agg) == 15
    # worker 1 serves 3 more and exits cleanly with a final snapshot
    served(workers[1], 3, 1.0)
    agg.update(1, workers[1].snapshot(2.0, 0, 0.75), 2.0)
    agg.exited(1)
    assert requests_total(agg) == 18
    assert agg.cpu_by_slot()[0] == pytest.approx(0.75)
    # its replacement in slot 0 starts from zero: the pool's totals do not drop
    agg.started(3, 0, 2.0)
    agg.update(3, RequestCounters().snapshot(2.5, 0, 0.01), 2.5)
    assert requests_total(agg) == 18
    assert agg.cpu_by_slot()[0] == pytest.approx(0.76)
    # worker 2 crashes after serving 4 requests it never reported: those are lost
    # (at most one heartbeat's worth), the 5 it reported stay
    served(workers[2], 4, 3.0)
    agg.exited(2)
    assert requests_total(agg) == 18
    assert agg.totals().count == 18
    # a late datagram from a worker already folded in is not counted twice
    agg.update(2, workers[2].snapshot(4.0, 0, 1.0), 4.0)
    agg.exited(2)
    assert requests_total(agg) == 18


@given(st.lists(st.tuples(st.sampled_from(["serve", "beat", "exit", "spawn"]),
                          st.integers(0, 3), st.integers(0, 20)), max_size=80))
def test_pool_counters_never_go_down(steps: list[tuple[str, int, int]]) -> None:
    agg = Aggregator()
    counters: dict[int, RequestCounters] = {}
    next_pid = 100
    now = 0.0
    last_total = last_count = 0
    last_cpu: dict[int, float] = {}
    for kind, slot, n in steps:
        now += 0.1
        pids = [pid for pid in counters if agg.slot_of(pid) == slot]
        if kind == "spawn" or not pids:
            next_pid += 1
            counters[next_pid] = RequestCounters()
            agg.started(next_pid, slot, now)
            continue
        pid = pids[0]
        if kind == "serve":
            now = served(counters[pid], n, now)
        elif kind == "beat":
            agg.update(pid, counters[pid].snapshot(now, 0, now), now)
        else:
            agg.exited(pid)
            del counters[pid]
        total, count = requests_total(agg), agg.totals().count
        assert total >= last_total and count >= last_count
        cpu = agg.cpu_by_slot()
        assert all(cpu.get(s, 0.0) >= value for s, value in last_cpu.items())
        last_total, last_count, last_cpu = total, count, cpu


def test_rates_over_the_last_interval() -> None:
    agg = Aggregator()
    counters = RequestCounters()
    agg.started(7, 0, 0.0)
    now = served(counters, 100, 0.0, duration=0.002)  # 0.2 s busy
    agg.update(7, counters.snapshot(1.0, 0, 0.0), 1.0)
    served(counters, 50, 1.0, duration=0.004)  # 0.2 s busy in the next second
    agg.update(7, counters.snapshot(2.0, 0, 0.0), 2.0)
    rates = agg.rates(7)
    assert rates.rps == pytest.approx(50.0)
    assert rates.utilization == pytest.approx(0.2)
    assert rates.p50 is not None and 0.001 < rates.p50 <= 0.0025  # most were 2 ms
    assert rates.p99 is not None and 0.0025 < rates.p99 <= 0.005
    assert agg.pool_utilization() == pytest.approx(0.2)
    assert agg.rates(8).rps is None and now > 0


def test_restart_reasons_and_reloads_are_counted_by_kind() -> None:
    agg = Aggregator()
    for reason in ("crashed: exit 1", "killed: SIGKILL", "memory: 612M > 512M", "timeout",
                   "max-requests", "max-requests", "nonsense"):
        agg.restarted(reason)
    agg.reloaded("done")
    assert agg.restarts["crashed"] == agg.restarts["killed"] == agg.restarts["memory"] == 1
    assert agg.restarts["max-requests"] == 2 and sum(agg.restarts.values()) == 6
    assert agg.reloads == {"done": 1, "aborted": 0}


def test_pool_load_reads_utilization_of_ready_workers_and_the_accept_queue() -> None:
    import socket

    from forkd.metrics.shell import PoolMetrics

    pool = PoolMetrics()
    for pid, busy_per_second in ((1, 0.5), (2, 0.25)):
        counters = RequestCounters()
        pool.spawned(pid, pid, 0.0)
        pool.update(pid, counters.snapshot(1.0, 0, 0.0), 1.0)
        counters.begin(1.0)
        counters.finish(b"GET", b"200", 1.0, 1.0 + busy_per_second)
        pool.update(pid, counters.snapshot(2.0, 0, 0.0), 2.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        load = pool.load([1, 2], [listener])
    finally:
        client.close()
        listener.close()
    assert load.utilization == pytest.approx(0.375)
    assert load.rps == pytest.approx(2.0) and load.ready == 2 and load.in_flight == 0
    assert load.listen_queue == 1
    assert pool.load([], []).utilization is None
