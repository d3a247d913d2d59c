"""The mock GPU lists registered workloads' processes (issue 13, item 1): a workload started through the
accounting API with a pid, reporting spans, shows as a compute process on the GPUs its spans drive, with
its spans' mean SM share over each ~1 s refresh (probes/mock_processes.py, ``workload_processes`` in
agent/span_activity.py); and with ``--attribution`` that process is charged to the workload owner.

Spans are reported ahead of the mock (it runs no lag here), so every one of them is simulated by its own
timestamps and the shares are exact.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock, run_ticks, scripted_mock_agent
from test_attribution_wiring import assert_identity, owner_rows, scrape_metrics as scrape, total
from wattledger.agent.accounting import Accounting
from wattledger.agent.http_api import make_app
from wattledger.agent.span_activity import DEFAULT_SPAN_ACTIVITY, SpanActivitySource
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.mock import Fault, MockGpuBackend
from wattledger.probes.mock_processes import ScriptedProcess, ScriptedProcesses

GIB = 2**30
PID = 7301
COMPUTE = DEFAULT_SPAN_ACTIVITY["compute"]  # sm 0.8, dram 0.5: what a compute span without activity drives
STEP_S = 0.1


class Rig:
    """A mock GPU driven by an accounting's spans, on a fake clock (the agent's wiring, without the agent)."""

    def __init__(self, gpus: int = 2, processes: ScriptedProcesses | None = None, faults=()):
        self.clock = FakeClock()
        # No process_start_ticks: the pids are not checked against /proc.
        self.accounting = Accounting(list(range(gpus)), clock_ns=self.clock.ns)
        self.source = SpanActivitySource(self.accounting, monotonic_s=self.clock.seconds)
        self.backend = MockGpuBackend(gpus, activity=self.source, clock_ns=self.clock.ns, processes=processes,
                                      faults=faults)
        self.origin_ns = self.clock.ns()

    def half_time_compute(self, name: str, gpus: list[int], seconds: float, busy_s: float = STEP_S / 2) -> None:
        """Compute spans (default activity) for the first ``busy_s`` of every 0.1 s, for ``seconds``."""
        spans = [self.accounting.make_span(name, "compute", self.at(k * STEP_S), self.at(k * STEP_S + busy_s), gpus)
                 for k in range(round(seconds / STEP_S))]
        self.accounting.add_spans(spans)

    def at(self, seconds: float) -> int:
        return self.origin_ns + round(seconds * NS_PER_S)

    def run(self, seconds: float) -> list[list]:
        """Samples every 0.1 s; element k is read at (k + 1) * 0.1 s."""
        out = []
        for _ in range(round(seconds / STEP_S)):
            self.clock.advance(STEP_S)
            out.append(self.backend.sample())
        return out


def at(samples: list[list], t_s: float) -> list:
    return samples[round(t_s / STEP_S) - 1]


def by_pid(sample) -> dict:
    return {p.pid: p for p in sample.processes}


def test_a_registered_pid_is_listed_with_its_spans_share_and_declared_memory():
    rig = Rig()
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    rig.accounting.set_memory("trainer", 0, 8 * GIB)
    rig.half_time_compute("trainer", [0], 4.0)
    samples = rig.run(4.0)
    for t_s in (1.1, 1.5, 2.1, 3.1, 3.5):
        gpu0, gpu1 = at(samples, t_s)
        (process,) = gpu0.processes
        assert process.pid == PID and process.memory_used_bytes == 8 * GIB, t_s
        assert process.sm_utilization_ratio == pytest.approx(COMPUTE.sm * 0.5, rel=1e-12), t_s
        assert process.memory_controller_utilization_ratio == pytest.approx(COMPUTE.dram * 0.5, rel=1e-12), t_s
        assert gpu1.processes == (), t_s  # listed where its spans run, nowhere else
        # The memory the workload declared is counted once: not again for its process.
        assert gpu0.memory_used_bytes == 8 * GIB
    status = {s.name: s.supported for s in rig.backend.field_status(0)}
    assert status["processes"] and status["process_utilization"]


def test_the_list_adds_entries_and_nothing_else():
    def run(pid):
        rig = Rig()
        rig.accounting.start("trainer", [0], pid=pid, at_ns=rig.origin_ns)
        rig.half_time_compute("trainer", [0], 3.0)
        return rig, rig.run(3.0)

    with_pid, listed = run(PID)
    without_pid, unlisted = run(None)
    assert any(s.processes for step in listed for s in step)
    assert all(s.processes == () for step in unlisted for s in step)  # a workload without a pid is no process
    strip = [[dataclasses.replace(s, processes=None) for s in step] for step in listed]
    assert strip == [[dataclasses.replace(s, processes=None) for s in step] for step in unlisted]
    assert with_pid.backend.true_energy_joules(0) == without_pid.backend.true_energy_joules(0)
    assert at(unlisted, 2.0)[0].utilization_gpu_ratio == pytest.approx(0.5)  # not idle: busy, with no pid


def test_spans_on_gpu_1_only_list_the_process_on_gpu_1_only():
    rig = Rig()
    rig.accounting.start("trainer", [0, 1], pid=PID, at_ns=rig.origin_ns)
    rig.half_time_compute("trainer", [1], 3.0)
    samples = rig.run(3.0)
    gpu0, gpu1 = at(samples, 2.1)
    assert gpu0.processes == ()
    assert [p.pid for p in gpu1.processes] == [PID]
    assert gpu1.processes[0].sm_utilization_ratio == pytest.approx(0.4, rel=1e-12)


def test_a_workload_whose_spans_ended_before_the_interval_is_not_listed():
    rig = Rig()
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    rig.half_time_compute("trainer", [0], 1.6)  # spans on [0, 1.6 s); it keeps running, idle
    samples = rig.run(4.0)
    # Refreshes at 0.1 s, 1.1 s, 2.1 s, 3.1 s; [1.1, 2.1) holds 0.5 s of spans at half time.
    assert by_pid(at(samples, 1.5)[0])[PID].sm_utilization_ratio == pytest.approx(0.4, rel=1e-12)
    assert by_pid(at(samples, 2.1)[0])[PID].sm_utilization_ratio == pytest.approx(0.8 * 0.25, rel=1e-12)
    assert at(samples, 3.1)[0].processes == ()


def test_a_stopped_workload_is_not_listed():
    rig = Rig()
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    rig.half_time_compute("trainer", [0], 3.0)
    rig.run(2.0)
    rig.accounting.stop("trainer")
    samples = rig.run(1.0)
    assert at(samples, 0.1)[0].processes == ()  # the refresh at 2.1 s: its pid is gone with it


def test_an_open_span_counts_up_to_the_mocks_present():
    rig = Rig()
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    handle = rig.accounting.begin_span("trainer", "compute", [0], activity=Activity(gpu=1.0, sm=0.6, dram=0.2))
    samples = rig.run(1.5)
    process = by_pid(at(samples, 1.1)[0])[PID]
    assert process.sm_utilization_ratio == pytest.approx(0.6) and process.memory_controller_utilization_ratio \
        == pytest.approx(0.2)
    rig.accounting.end_span(handle)


def test_a_pid_both_scripted_and_registered_is_the_scripted_process():
    script = ScriptedProcesses([ScriptedProcess(0, PID, 0.25, 4 * GIB, {"group": "trainer.service"}),
                                ScriptedProcess(0, PID + 1, 0.1, 2 * GIB, {"group": "jupyter"})])
    rig = Rig(processes=script)
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    rig.accounting.start("notebook", [0], pid=PID + 2, at_ns=rig.origin_ns)
    rig.accounting.set_memory("trainer", 0, 16 * GIB)
    rig.half_time_compute("trainer", [0], 3.0)
    rig.half_time_compute("notebook", [0], 3.0, busy_s=0.02)
    (gpu0, _) = at(rig.run(3.0), 2.1)
    processes = by_pid(gpu0)
    assert [p.pid for p in gpu0.processes] == [PID, PID + 1, PID + 2]  # scripted first, then registered
    assert processes[PID].sm_utilization_ratio == pytest.approx(0.25)
    assert processes[PID].memory_used_bytes == 4 * GIB
    assert processes[PID + 2].sm_utilization_ratio == pytest.approx(0.8 * 0.2, rel=1e-12)
    assert processes[PID + 2].memory_used_bytes == 0


def test_after_a_gpu_loss_the_first_list_covers_the_second_before_it():
    rig = Rig(faults=[Fault("gpu_lost", at_s=1.5, until_s=3.0, gpu=0)])
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    rig.half_time_compute("trainer", [0], 1.0)  # [0, 1 s), then busy again from 2.5 s
    spans = [rig.accounting.make_span("trainer", "compute", rig.at(2.5 + k * STEP_S), rig.at(2.55 + k * STEP_S), [0])
             for k in range(15)]
    rig.accounting.add_spans(spans)
    samples = rig.run(4.0)
    assert at(samples, 2.0)[0].processes is None and not at(samples, 2.0)[0].up
    back = at(samples, 3.0)[0]
    # Back at 3.0 s: the first list covers [2, 3), half of it at half time, as for scripted processes.
    assert back.up and by_pid(back)[PID].sm_utilization_ratio == pytest.approx(0.8 * 0.25, rel=1e-12)


def test_without_a_span_source_nothing_changes():
    timeline = ScriptedTimeline(FakeClock().ns()).add(0, 2, Activity(gpu=1.0, sm=0.5))
    backend = MockGpuBackend(1, activity=timeline, clock_ns=FakeClock().ns)
    assert not backend.lists_processes and backend.scripted_processes is None
    status = {s.name: s for s in backend.field_status(0)}
    assert not status["processes"].supported and "process_utilization" not in status


def _spans_strategy():
    span = st.tuples(st.integers(0, 2900), st.integers(1, 1200), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
    return st.lists(span, min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(_spans_strategy())
def test_each_refresh_shows_the_exact_mean_of_its_own_spans(raw):
    """Random overlapping spans with their own activity: each list's share is the exact time-weighted mean
    over its refresh interval of the workload's spans combined with max, computed here independently by a
    ScriptedTimeline holding the same spans."""
    rig = Rig(gpus=1)
    truth = ScriptedTimeline(rig.origin_ns)
    rig.accounting.start("trainer", [0], pid=PID, at_ns=rig.origin_ns)
    spans = []
    for start_ms, length_ms, sm, dram in raw:
        activity = Activity(gpu=1.0, sm=sm, dram=dram)
        spans.append(rig.accounting.make_span("trainer", "compute", rig.at(start_ms / 1000),
                                              rig.at((start_ms + length_ms) / 1000), [0], activity))
        truth.add(start_ms / 1000, (start_ms + length_ms) / 1000, activity)
    rig.accounting.add_spans(spans)
    samples = rig.run(4.1)
    for lo_s, hi_s in ((0.0, 0.1), (0.1, 1.1), (1.1, 2.1), (2.1, 3.1), (3.1, 4.1)):
        listed = by_pid(at(samples, hi_s)[0])
        window = (rig.at(lo_s), rig.at(hi_s))
        covered = bool(truth.segments(0, *window))  # a span of its overlaps the refresh interval
        assert (PID in listed) == covered, (lo_s, hi_s)
        if covered:
            sm = truth.mean_busy_ratio(0, *window, field="sm")
            dram = truth.mean_busy_ratio(0, *window, field="dram")
            assert listed[PID].sm_utilization_ratio == pytest.approx(sm, rel=1e-9, abs=1e-12)
            assert listed[PID].memory_controller_utilization_ratio == pytest.approx(dram, rel=1e-9, abs=1e-12)


# -- attribution: a registered workload and a scripted pod share GPU 0 ---------------------------------------

POD = {"namespace": "llm", "pod": "vllm-0", "container": "vllm"}
POD_PID, POD_SHARE, POD_MEMORY = 4101, 0.3, 30 * GIB
WORKLOAD_MEMORY = 10 * GIB
RUN_S = 12


@pytest.fixture
def shared_gpu_agent(tmp_path):
    pod = {"gpu": 0, "pid": POD_PID, "sm_share": POD_SHARE, "memory_bytes": POD_MEMORY, "labels": POD}
    with scripted_mock_agent(tmp_path, [pod]) as (agent, clock):
        yield agent, clock


def test_the_registered_workload_is_charged_its_share_on_a_shared_gpu(shared_gpu_agent):
    agent, clock = shared_gpu_agent
    origin = clock.ns()
    pid = os.getpid()  # alive, as the agent's accounting checks; not the pod's
    assert pid != POD_PID
    agent.accounting.start("trainer", [0], pid=pid, at_ns=origin)
    agent.accounting.set_memory("trainer", 0, WORKLOAD_MEMORY)
    # Compute for the first half of every tick: each 0.1 s interval is alike, so each is charged alike.
    agent.accounting.add_spans([agent.accounting.make_span(
        "trainer", "compute", origin + k * NS_PER_S // 10, origin + k * NS_PER_S // 10 + NS_PER_S // 20, [0])
        for k in range(RUN_S * 10 + 5)])
    # The documented rules (docs/attribution.md 3 and 4) with the simulated truth: the GPU is busy all of
    # each compute half (gpu=1.0) and the pod's share of the rest; the shares (0.4 and 0.3) sum above it,
    # so they split the active part in proportion, and the idle part goes by memory held.
    busy = 0.5 * COMPUTE.gpu + 0.5 * POD_SHARE
    workload_share = 0.5 * COMPUTE.sm
    fraction = (busy * workload_share / (workload_share + POD_SHARE)
                + (1 - busy) * WORKLOAD_MEMORY / (WORKLOAD_MEMORY + POD_MEMORY))
    app = make_app(agent.accounting, agent.registry, lambda: True)
    workload_key = ("workload", "", "", "", "trainer")
    for second in range(1, RUN_S + 1):
        run_ticks(agent.sampler, clock, 1.0)
        metrics = scrape(app)
        assert_identity(metrics)
        gpu_energy = total(metrics, "wattledger_gpu_energy_joules_total")
        charged = total(metrics, "wattledger_owner_energy_joules_total")
        energy = owner_rows(metrics, "wattledger_owner_energy_joules_total")
        assert energy[workload_key] == pytest.approx(fraction * gpu_energy, rel=0.02), second
        assert charged > 0.97 * gpu_energy  # the pod and the workload fill the GPU: no vacuous identity
    assert pid in {p.pid for p in agent.ledger.snapshot().gpus[0].last.processes}  # NVML's view: listed
