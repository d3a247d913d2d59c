"""The simulated device's clock (workloads/paced_clock.py): a schedule paced to an injected wall clock."""

from __future__ import annotations

import threading

import pytest

from wattledger.workloads.paced_clock import NS_PER_S, PacedClock


class Wall:
    """A wall clock the test moves; ``sleep`` moves it as a real sleep would, and records the sleeps."""

    def __init__(self, start_ns: int = 5 * NS_PER_S):
        self.ns = start_ns
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.ns

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.ns += round(seconds * NS_PER_S)

    def cpu(self, seconds: float) -> None:
        self.ns += round(seconds * NS_PER_S)


def test_a_cpu_faster_than_the_device_sleeps_to_the_schedule_and_never_lags():
    wall = Wall()
    clock = PacedClock(wall, wall.sleep)
    origin = clock.now_ns()
    assert origin == wall.ns
    wall.cpu(0.002)  # the CPU computes the step in 2 ms ...
    start, end = clock.spend(0.010)  # ... that the device takes 10 ms for
    assert (start, end) == (origin, origin + 10_000_000)
    assert wall.sleeps == [pytest.approx(0.008)] and wall.ns == end
    assert clock.report() == {"max_lag_seconds": 0.0, "lagging_seconds": 0.0, "device_seconds": 0.010}


def test_a_slow_cpu_lags_without_sleeping_and_catches_up_in_an_idle_wait():
    wall = Wall()
    clock = PacedClock(wall, wall.sleep)
    origin = clock.now_ns()
    for _ in range(3):
        wall.cpu(0.030)  # 30 ms of CPU for a 10 ms device step: 20 ms further behind each step
        clock.spend(0.010)
    assert wall.sleeps == []
    assert clock.now_ns() == origin + 30_000_000  # the schedule is the device's, not the CPU's
    assert clock.max_lag_s == pytest.approx(0.060)
    assert clock.lagging_seconds == pytest.approx(0.030)
    clock.wait_until(origin + NS_PER_S)  # an idle gap of the schedule: room to catch up
    assert wall.sleeps == [pytest.approx(1.0 - 0.090)] and wall.ns == origin + NS_PER_S
    assert clock.max_lag_s == pytest.approx(0.060)  # the worst lag is kept


def test_the_schedule_is_the_same_whatever_the_cpu_takes():
    def run(cpu_seconds: float) -> list[tuple[int, int]]:
        wall = Wall()
        clock = PacedClock(wall, wall.sleep)
        spans = []
        for step in range(20):
            wall.cpu(cpu_seconds)
            spans.append(clock.spend(0.004 + 0.001 * (step % 3)))
            if step % 5 == 4:
                clock.wait_until(clock.now_ns() + 50_000_000)
        origin = spans[0][0]
        return [(s - origin, e - origin) for s, e in spans]

    assert run(0.0001) == run(0.02)


def test_waiting_for_the_past_changes_nothing_and_bad_device_time_is_refused():
    wall = Wall()
    clock = PacedClock(wall, wall.sleep)
    now = clock.now_ns()
    clock.wait_until(now - 1)
    assert clock.now_ns() == now and wall.sleeps == []
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="device seconds must be >= 0"):
            clock.spend(bad)
    assert clock.now_ns() == now


def test_a_stop_request_ends_the_pacing_sleeps():
    wall = Wall()
    stop = threading.Event()
    clock = PacedClock(wall, wall.sleep, stop=stop)
    stop.set()
    clock.spend(1.0)  # the schedule still moves (the span is what the device did) but nobody waits for it
    assert wall.sleeps == [] and clock.now_ns() - wall.ns == NS_PER_S
