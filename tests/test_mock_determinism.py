"""The same simulated-device spans give the mock the same energy and utilization however late they arrive.

A workload on the mock stamps each step with its PacedClock's (start_ns, end_ns) and the step's simulated
activity (workloads/device_time.py). On a quiet machine each span reaches the agent as it ends; on a loaded
one, later, and out of order. As long as each arrives within the mock's lag of its start
(agent/span_activity.py), the mock's timeline, and so every figure it exports, must be the same.
"""

from __future__ import annotations

import random

import pytest

from fakes import NS_PER_S, FakeClock
from wattledger.agent.accounting import Accounting
from wattledger.agent.span_activity import LateSpans, SpanActivitySource
from wattledger.probes.mock import MockGpuBackend
from wattledger.workloads import device_time as dt
from wattledger.workloads.model import model_config
from wattledger.workloads.paced_clock import PacedClock

LAG_S = 1.0
SAMPLE_INTERVAL_S = 0.1
START_NS = 1_000 * NS_PER_S


def chat_like_spans(seed: int, seconds: float = 4.0) -> list[tuple[int, int, object]]:
    """Spans of a small 8b chat server on the simulated H100: batches of decode steps, prefills, idle gaps.

    Stamped by a PacedClock on a fake wall clock that never lags (the schedule is the same either way)."""
    rng = random.Random(seed)
    config = model_config("8b")
    device = dt.simulated_device("h100-sxm-80gb")
    wall = FakeClock(START_NS)
    clock = PacedClock(wall_ns=wall.ns, sleep_s=wall.advance)
    spans = []
    end_ns = START_NS + round(seconds * NS_PER_S)
    while clock.now_ns() < end_ns:
        if rng.random() < 0.15:  # no request waiting: idle until the next arrival
            clock.wait_until(clock.now_ns() + round(rng.uniform(0.005, 0.15) * NS_PER_S))
            continue
        batch = rng.randint(1, 16)
        chunks = [(rng.randint(16, 1024), 0)] if rng.random() < 0.2 else []
        step = device.step(dt.serving_step_work(config, [rng.randint(64, 2048) for _ in range(batch)], chunks))
        start, end = clock.spend(step.seconds)
        spans.append((start, end, step.activity))
    return spans


def run_mock(spans, delays_s: list[float]):
    """Feed ``spans`` to a span-driven mock, each arriving ``delay`` after its end; sample every 100 ms.

    Returns (true energy J, exported energy counter J, [utilization per sample], late spans)."""
    clock = FakeClock(START_NS)
    acct = Accounting([0], clock_ns=clock.ns)
    mock = MockGpuBackend(1, activity=SpanActivitySource(acct), clock_ns=clock.ns, delay_s=LAG_S)
    arrivals = [(end + round(delay * NS_PER_S), 1, (start, end, activity))
                for (start, end, activity), delay in zip(spans, delays_s)]
    last_ns = max(end for _, end, _ in spans) + round(2 * LAG_S * NS_PER_S)
    ticks = [(START_NS + i * round(SAMPLE_INTERVAL_S * NS_PER_S), 0, None)
             for i in range(1, (last_ns - START_NS) // round(SAMPLE_INTERVAL_S * NS_PER_S) + 1)]
    samples = []
    # At equal times a sample goes first (0 < 1): a span arriving exactly at a tick is seen by the next one.
    for at_ns, _, span in sorted(arrivals + ticks, key=lambda event: (event[0], event[1])):
        clock.now_ns = at_ns
        if span is None:
            samples.append(mock.sample()[0])
        else:
            start, end, activity = span
            acct.add_spans([acct.make_span("chat", "compute", start, end, [0], activity)])
    return (mock.true_energy_joules(0), samples[-1].energy_joules,
            [s.utilization_gpu_ratio for s in samples], mock.activity_source.late())


def late_delays(spans, rng: random.Random) -> list[float]:
    """A loaded machine: each span arrives after its end by a random delay that keeps it within the lag of
    its start (with 1 ms to spare: a span is simulated once its start is LAG_S old)."""
    return [rng.uniform(0.0, LAG_S - (end - start) / NS_PER_S - 0.001) for start, end, _ in spans]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prompt_and_late_spans_give_the_same_energy_and_utilization(seed):
    spans = chat_like_spans(seed)
    assert len(spans) > 100
    prompt = run_mock(spans, [0.0] * len(spans))
    late = run_mock(spans, late_delays(spans, random.Random(seed)))
    assert prompt[3] == late[3] == LateSpans(0, 0.0)
    assert late[0] == pytest.approx(prompt[0], rel=1e-12)
    assert late[1] == pytest.approx(prompt[1], abs=1e-3)  # the counter is whole mJ
    assert late[2] == pytest.approx(prompt[2], abs=1e-12)
    # Not a vacuous comparison: the GPU was busy part of the time, and drew more than idle.
    assert 0.0 < sum(prompt[2]) / len(prompt[2]) < 1.0
    assert prompt[0] > 70.0 * (len(prompt[2]) * SAMPLE_INTERVAL_S) * 1.05


def test_a_span_arriving_after_the_lag_changes_the_figures_and_is_counted_late():
    """The comparison above can fail: past the lag the mock has already simulated the span's time."""
    spans = chat_like_spans(4)
    prompt = run_mock(spans, [0.0] * len(spans))
    delays = [0.0] * len(spans)
    delays[len(spans) // 2] = 1.5 * LAG_S
    too_late = run_mock(spans, delays)
    assert too_late[3].spans == 1
    assert too_late[0] < prompt[0]
