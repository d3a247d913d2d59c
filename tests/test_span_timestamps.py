"""The mock GPU runs on the spans' own timestamps, not on when they arrive (issue 9, "The simulator").

The rule (agent/span_activity.py): the mock simulates time t once t is its lag old; a span that arrives
by then counts in full by its own timestamps, whatever the batching or the order; a span that arrives
later has its already-simulated part counted as late, never silently dropped. Unit tests drive the mock
with fake clocks against a reference mock fed the same spans as a fixed script; the replay test plays one
recorded set of spans through the real sampler on real time, once quiet and once beside busy processes.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from busy import spin
from fakes import NS_PER_S, FakeClock
from wattledger.agent.accounting import Accounting
from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent
from wattledger.agent.span_activity import LateSpans, SpanActivitySource
from wattledger.probes.activity import Activity, ScriptedTimeline, flatten
from wattledger.probes.mock import ENERGY_COUNTER_PERIOD_NS, MockGpuBackend, power_demand_watts
from wattledger.workloads.reporter import DECODE_ACTIVITY, TRAIN_ACTIVITY, TRANSFER_ACTIVITY, AccountingReporter

MS = 1_000_000
COMPUTE = Activity(gpu=1.0, sm=0.8, tensor=0.5, dram=0.5)


def span_driven_mock(lag_s: float):
    clock = FakeClock()
    acct = Accounting([0], clock_ns=clock.ns)
    mock = MockGpuBackend(1, activity=SpanActivitySource(acct), clock_ns=clock.ns, delay_s=lag_s)
    return clock, acct, mock


def reference_energy_and_busy(spans: list[tuple[int, int, Activity]], start_ns: int, end_ns: int):
    """What the spans say by their timestamps: a mock fed them as a fixed script from ``start_ns`` to
    ``end_ns``. Returns its true energy (J) and the busy seconds of the spans."""
    timeline = ScriptedTimeline(origin_ns=start_ns)
    for s, e, activity in spans:
        timeline.add((s - start_ns) / NS_PER_S, (e - start_ns) / NS_PER_S, activity)
    clock = FakeClock(start_ns)
    mock = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns)
    clock.now_ns = end_ns
    mock.sample()
    busy_s = sum((seg.end_ns - seg.start_ns) * seg.activity.gpu for seg in timeline.segments(0, start_ns, end_ns))
    return mock.true_energy_joules(0), busy_s / NS_PER_S


def busy_seconds(samples) -> float:
    """Utilization integrated over the samples (each is the busy fraction since the one before)."""
    return sum(b.utilization_gpu_ratio * (b.monotonic_ns - a.monotonic_ns) / NS_PER_S
               for a, b in zip(samples, samples[1:]))


def test_a_span_reported_after_it_ends_counts_in_full_within_the_lag():
    clock, acct, mock = span_driven_mock(lag_s=1.0)
    t0 = clock.ns()
    samples = [mock.sample()[0]]
    for _ in range(5):  # 0.5 s pass; the span [0.1, 0.9) s has not been reported yet
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    clock.advance(0.4)  # it ends at 0.9 s and arrives at 0.9 s: after it ended, within the lag
    acct.add_spans([acct.make_span("train", "compute", t0 + 100 * MS, t0 + 900 * MS, [0], COMPUTE)])
    for _ in range(20):
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    assert busy_seconds(samples) == pytest.approx(0.8)
    energy, _ = reference_energy_and_busy([(t0 + 100 * MS, t0 + 900 * MS, COMPUTE)], t0 - NS_PER_S,
                                          samples[-1].monotonic_ns)
    assert mock.true_energy_joules(0) == pytest.approx(energy, rel=1e-9)
    assert mock.activity_source.late() == LateSpans(0, 0.0)


def test_a_span_arriving_after_the_lag_is_counted_late_and_the_rest_still_simulated():
    clock, acct, mock = span_driven_mock(lag_s=0.5)
    t0 = clock.ns()
    clock.advance(1.5)
    samples = [mock.sample()[0]]  # simulated up to t0 + 1.0 s
    # [0.6, 1.4) s arrives at 1.5 s: 0.4 s of it is in the simulated past, 0.4 s still ahead.
    acct.add_spans([acct.make_span("train", "compute", t0 + 600 * MS, t0 + 1400 * MS, [0], COMPUTE)])
    late = mock.activity_source.late()
    assert late.spans == 1 and late.seconds == pytest.approx(0.4)
    for _ in range(12):
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    assert busy_seconds(samples) == pytest.approx(0.4)


def test_late_spans_are_exported_by_the_agent():
    """Counted, not dropped, and not only in a log: Prometheus sees them (SIMULATED figures only)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    clock = FakeClock()
    config = build_config({"backend": "mock", "mock_gpus": 1, "mock_delay": "500ms"}, {})
    agent = Agent(config, clock_ns=clock.ns)
    try:
        t0 = clock.ns()
        clock.advance(1.5)
        agent.sampler.tick()
        agent.accounting.add_spans([agent.accounting.make_span("train", "compute", t0 + 600 * MS, t0 + 1400 * MS,
                                                               [0], COMPUTE)])
        values = {s.name: s.value for f in text_string_to_metric_families(generate_latest(agent.registry).decode())
                  for s in f.samples}
    finally:
        agent.stop()
    assert values["wattledger_mock_late_spans_total"] == 1
    assert values["wattledger_mock_late_span_seconds_total"] == pytest.approx(0.4)


def test_open_spans_are_read_once_per_sample_not_once_per_gpu():
    clock = FakeClock()
    acct = Accounting([0, 1, 2, 3], clock_ns=clock.ns)
    calls = []
    original = acct.open_spans
    acct.open_spans = lambda: calls.append(1) or original()
    mock = MockGpuBackend(4, activity=SpanActivitySource(acct), clock_ns=clock.ns, delay_s=0.5)
    handle = acct.begin_span("train", "compute", [0, 1, 2, 3], COMPUTE)
    for _ in range(10):
        clock.advance(0.1)
        mock.sample()
    acct.end_span(handle)
    assert len(calls) == 10  # one read per sample for all four GPUs (it was one per GPU: 40)


def test_idle_spans_and_spans_wholly_ahead_of_the_mock_are_never_late():
    clock, acct, mock = span_driven_mock(lag_s=0.5)
    t0 = clock.ns()
    clock.advance(2)
    mock.sample()
    acct.add_spans([acct.make_span("agent", "tool_call", t0, t0 + 2 * NS_PER_S, [0]),
                    acct.make_span("agent", "compute", t0 + 1600 * MS, t0 + 1900 * MS, [0])])
    assert mock.activity_source.late() == LateSpans(0, 0.0)


def test_each_step_reaches_the_mock_when_reported_while_the_reporter_still_merges():
    """The in-process reporter holds back-to-back steps to record them as one span; the mock must not wait
    for that (it used to: activity reached the mock only when the merged span was sent)."""
    clock, acct, mock = span_driven_mock(lag_s=0.5)
    reporter = AccountingReporter(acct, "train", [0])  # not started: no background flusher
    t0 = clock.ns()
    samples = [mock.sample()[0]]
    for step in range(20):  # 20 steps of 10 ms, back to back: 200 ms, under the 250 ms merge length
        clock.advance(0.01)
        reporter.span("compute", t0 + step * 10 * MS, t0 + (step + 1) * 10 * MS, TRAIN_ACTIVITY)
        if step % 5 == 4:
            samples.append(mock.sample()[0])
    assert acct.recent_spans() == []  # still merging: nothing recorded yet
    clock.advance(0.6)
    samples.append(mock.sample()[0])  # the mock has now simulated past the steps
    assert busy_seconds(samples) == pytest.approx(0.2)
    reporter.flush()  # the merged span is recorded, and not simulated a second time
    (recorded,) = acct.recent_spans()
    assert (recorded.start_ns, recorded.end_ns) == (t0, t0 + 200 * MS)
    assert mock.activity_source.late() == LateSpans(0, 0.0) and mock.activity_source.pending_spans() == 0


@pytest.mark.parametrize("announced_at_start", [True, False])
def test_a_step_longer_than_the_lag_counts_in_full_when_announced_at_its_start(announced_at_start):
    """A training step on a busy host can outlast the mock's lag: reported only at its end, its start is
    late (counted); announced with ``span_started``, the mock counts it while it runs."""
    clock, acct, mock = span_driven_mock(lag_s=0.5)
    reporter = AccountingReporter(acct, "train", [0])
    samples = [mock.sample()[0]]
    start = clock.ns()
    if announced_at_start:
        reporter.span_started("compute", start, TRAIN_ACTIVITY)
    for _ in range(12):  # a 1.2 s step
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    reporter.span("compute", start, clock.ns(), TRAIN_ACTIVITY)
    for _ in range(10):
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    reporter.flush()
    late = mock.activity_source.late()
    if announced_at_start:
        assert busy_seconds(samples) == pytest.approx(1.2) and late == LateSpans(0, 0.0)
    else:
        assert busy_seconds(samples) == pytest.approx(0.5) and late.spans == 1 and late.seconds == pytest.approx(0.7)
    (recorded,) = acct.recent_spans()  # recorded once either way
    assert recorded.end_ns - recorded.start_ns == round(1.2 * NS_PER_S) and acct.open_spans() == []


def test_an_open_span_is_not_late_when_it_closes():
    clock, acct, mock = span_driven_mock(lag_s=0.5)
    samples = [mock.sample()[0]]
    handle = acct.begin_span("train", "compute", [0], COMPUTE)
    for _ in range(20):
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    acct.end_span(handle)  # 2 s long; the mock has simulated 1.5 s of it while it was open
    for _ in range(10):
        clock.advance(0.1)
        samples.append(mock.sample()[0])
    assert busy_seconds(samples) == pytest.approx(2.0)
    assert mock.activity_source.late() == LateSpans(0, 0.0)


ACTIVITIES = st.sampled_from([COMPUTE, TRAIN_ACTIVITY, DECODE_ACTIVITY, TRANSFER_ACTIVITY])


@st.composite
def reported_spans(draw):
    """Spans on [0, 4) s with an arrival time each: after the span ends, at most ``lag`` after it starts."""
    lag_ms = draw(st.integers(200, 1000))
    spans = []
    for _ in range(draw(st.integers(1, 25))):
        start = draw(st.integers(0, 3800))
        length = draw(st.integers(1, min(lag_ms, 4000 - start)))
        arrival = draw(st.integers(start + length, start + lag_ms))
        spans.append((start * MS, (start + length) * MS, draw(ACTIVITIES), arrival * MS))
    ticks_ms = draw(st.lists(st.integers(10, 400), min_size=1, max_size=60))
    return lag_ms, spans, ticks_ms


@settings(max_examples=150, deadline=None)
@given(case=reported_spans())
def test_spans_that_arrive_within_the_lag_drive_the_mock_exactly_by_their_timestamps(case):
    """Any arrival order, any batching, any sampling cadence: energy, utilization and the ground truth are
    those of the spans as a fixed script, and nothing is late."""
    lag_ms, relative, ticks_ms = case
    base = 10 * NS_PER_S
    spans = [(base + s, base + e, a, base + arrival) for s, e, a, arrival in relative]
    clock = FakeClock(base)
    acct = Accounting([0], clock_ns=clock.ns)
    mock = MockGpuBackend(1, activity=SpanActivitySource(acct), clock_ns=clock.ns, delay_s=lag_ms / 1000)
    arrivals = sorted(spans, key=lambda s: s[3])
    samples, ticks = [mock.sample()[0]], itertools.cycle(ticks_ms)
    end_ns = base + 4 * NS_PER_S + lag_ms * MS + 100 * MS
    while clock.now_ns < end_ns:
        clock.now_ns = min(end_ns, clock.now_ns + next(ticks) * MS)
        due = [s for s in arrivals if s[3] <= clock.now_ns]
        arrivals = arrivals[len(due):]
        if due:  # what arrived since the last tick, as one batch (a reporter's flush)
            acct.add_spans([acct.make_span("w", "compute", s, e, [0], a) for s, e, a, _ in due])
        samples.append(mock.sample()[0])
    energy, busy = reference_energy_and_busy([s[:3] for s in spans], base - lag_ms * MS, samples[-1].monotonic_ns)
    assert mock.true_energy_joules(0) == pytest.approx(energy, rel=1e-9)
    assert busy_seconds(samples) == pytest.approx(busy, abs=1e-9)
    assert mock.activity_source.late() == LateSpans(0, 0.0)


def test_late_spans_are_a_failed_check_of_their_phase_in_the_run_files(tmp_path):
    """The bench records the mock's late-span counts in its phase events; the summary's "late spans"
    check fails for the phase they arrived in, and passes for a phase without any."""
    from wattledger.workloads.bench.analysis import late_spans_check
    from wattledger.workloads.bench.session import RunRecorder
    from wattledger.workloads.bench.rundata import load_run

    clock = FakeClock()
    mock = MockGpuBackend(1, clock_ns=clock.ns, delay_s=1.0)
    agent = Agent(build_config({"backend": "mock", "mock_gpus": 1}, {}), gpu=mock, clock_ns=clock.ns,
                  serve_http=False)
    recorder = RunRecorder(tmp_path / "run", agent, agent.config.interval_seconds)
    acct = agent.accounting
    recorder.event("run_start", settings={})
    for phase, span_age_s in (("training", 0.5), ("chat", 3.0)):
        recorder.event("phase_start", phase=phase)
        clock.advance(5)
        mock.sample()  # simulated up to 1 s ago
        now = clock.ns()
        acct.add_spans([acct.make_span(phase, "compute", now - round(span_age_s * NS_PER_S),
                                       now - round((span_age_s - 0.4) * NS_PER_S), [0], COMPUTE)])
        recorder.event("phase_end", phase=phase)
    recorder.close()
    run = load_run(tmp_path / "run")
    on_time, late = late_spans_check(run, "training"), late_spans_check(run, "chat")
    assert on_time["passed"] and "within 1 s lag" in on_time["detail"]
    assert not late["passed"] and late["detail"].startswith("1 span(s)") and "0.400 s" in late["detail"]


# -- replay on real time, quiet and beside busy processes ------------------------------------------------

REPLAY_LAG_S = 0.25  # shorter than the agent's 1 s, so that holding steps back (the old reporter) shows
STEP_MS = 80


def recorded_spans() -> list[tuple[str, int, int, Activity]]:
    """A fixed, recorded set of spans (ms from the replay's start): training steps back to back, decode
    bursts with gaps, and one long transfer, about 3 s in all."""
    spans = [("compute", t, t + STEP_MS, TRAIN_ACTIVITY) for t in range(0, 1200, STEP_MS)]
    spans += [("compute", t, t + 8, DECODE_ACTIVITY) for t in range(1500, 2300, 10)]
    spans += [("transfer", 2500, 2700, TRANSFER_ACTIVITY)]
    return [(kind, s * MS, e * MS, activity) for kind, s, e, activity in spans]


def replay(spans) -> dict:
    """Play ``spans`` through an in-process reporter at their own times (each reported when it ends, as a
    workload does) into an agent with the span-driven mock and the real sampler; return its figures."""
    mock = MockGpuBackend(1, delay_s=REPLAY_LAG_S)
    agent = Agent(build_config({"backend": "mock", "mock_gpus": 1, "interval": "50ms"}, {}), gpu=mock,
                  serve_http=False)
    samples = []
    agent.sampler.add_sink(lambda gpu_samples, host: samples.extend(gpu_samples))
    agent.start()
    reporter = AccountingReporter(agent.accounting, "replay", [0])
    reporter.start()
    try:
        t0 = time.monotonic_ns() + 200 * MS
        for kind, start, end, activity in spans:
            time.sleep(max(0.0, (t0 + end - time.monotonic_ns()) / NS_PER_S))
            reporter.span(kind, t0 + start, t0 + end, activity)
        reporter.stop()
        done_ns = t0 + spans[-1][2] + 200 * MS
        give_up = time.monotonic() + 30  # not a timing assertion: only how long to wait for the sampler
        while (not samples or samples[-1].monotonic_ns < done_ns) and time.monotonic() < give_up:
            time.sleep(0.05)
    finally:
        agent.stop()
    window = [s for s in samples if t0 - 100 * MS <= s.monotonic_ns <= done_ns]
    first, last = window[0], window[-1]
    edges = [s.monotonic_ns - s.monotonic_ns % ENERGY_COUNTER_PERIOD_NS for s in (first, last)]
    idle_w = power_demand_watts(mock.spec, Activity())
    return {"busy_seconds": busy_seconds(window),
            "dynamic_joules": last.energy_joules - first.energy_joules - idle_w * (edges[1] - edges[0]) / NS_PER_S,
            "late": mock.activity_source.late(), "t0": t0}


def keep_every_core_busy(seconds: float) -> list:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=spin, args=(time.monotonic() + seconds, os.getpid()), daemon=True)
               for _ in range(os.cpu_count() or 1)]
    for worker in workers:
        worker.start()
    return workers


@pytest.mark.slow
def test_one_recorded_set_of_spans_gives_the_same_figures_quiet_and_under_full_cpu_load():
    spans = recorded_spans()
    truth_joules, truth_busy = reference_energy_and_busy([(s, e, a) for _, s, e, a in spans], -NS_PER_S,
                                                         spans[-1][2] + NS_PER_S)
    truth_dynamic = truth_joules - power_demand_watts(MockGpuBackend(1).spec, Activity()) * (
        spans[-1][2] + 2 * NS_PER_S) / NS_PER_S
    quiet = replay(spans)
    workers = keep_every_core_busy(seconds=60)  # bounded even if the finally below never ran
    try:
        loaded = replay(spans)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(5)
    for figures in (quiet, loaded):
        assert figures["late"] == LateSpans(0, 0.0)
        assert figures["busy_seconds"] == pytest.approx(truth_busy, rel=0.01)
        assert figures["dynamic_joules"] == pytest.approx(truth_dynamic, rel=0.01)
    assert loaded["busy_seconds"] == pytest.approx(quiet["busy_seconds"], rel=0.01)
    assert loaded["dynamic_joules"] == pytest.approx(quiet["dynamic_joules"], rel=0.01)
