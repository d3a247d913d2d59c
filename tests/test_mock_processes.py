"""The mock GPU's scripted processes (issue 13): per-process shares on NVML's ~1 Hz cadence, the GPU as busy
as its processes, and the energy that follows; and the plain-data constructor's one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.mock import Fault, MockGpuBackend, power_demand_watts
from wattledger.probes.mock_presets import PRESETS
from wattledger.probes.mock_processes import ScriptedProcess, ScriptedProcesses

GIB = 2**30
SPEC = PRESETS["h100-sxm-80gb"]
VLLM = {"namespace": "llm", "pod": "vllm-0", "container": "vllm"}
TRAINER = {"group": "trainer.service"}


def sampled(backend: MockGpuBackend, clock: FakeClock, seconds: float, step_s: float = 0.1) -> list[list]:
    """Samples every ``step_s`` for ``seconds``; element k is read at (k + 1) * step_s."""
    out = []
    for _ in range(round(seconds / step_s)):
        clock.advance(step_s)
        out.append(backend.sample())
    return out


def at(samples: list[list], t_s: float, step_s: float = 0.1) -> list:
    return samples[round(t_s / step_s) - 1]


def by_pid(sample) -> dict:
    return {p.pid: p for p in sample.processes}


def test_each_process_carries_its_memory_and_its_share_of_the_last_second():
    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 101, 0.5, 20 * GIB, VLLM, dram_ratio=0.4),
        ScriptedProcess(0, 202, 0.25, 4 * GIB, TRAINER),
    ])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns)
    samples = sampled(backend, clock, 3.0)
    (sample,) = at(samples, 2.0)
    processes = by_pid(sample)
    assert set(processes) == {101, 202}
    assert processes[101].memory_used_bytes == 20 * GIB and processes[202].memory_used_bytes == 4 * GIB
    assert processes[101].sm_utilization_ratio == pytest.approx(0.5)
    assert processes[202].sm_utilization_ratio == pytest.approx(0.25)
    # Its memory-controller share: busy 40 % of the time it runs, and it runs half the time.
    assert processes[101].memory_controller_utilization_ratio == pytest.approx(0.2)
    assert processes[202].memory_controller_utilization_ratio == pytest.approx(0.0)
    assert all(p.gpu_instance_id is None and p.compute_instance_id is None for p in processes.values())
    assert sample.memory_used_bytes == 24 * GIB
    assert backend.scripted_owner_labels() == {101: VLLM, 202: TRAINER}


def test_the_list_is_refreshed_once_a_second_and_carried_between():
    clock = FakeClock()
    script = ScriptedProcesses([ScriptedProcess(0, 7, [(0.0, 0.2), (0.5, 0.4), (1.5, 0.8)], GIB, TRAINER)])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns, process_interval_s=1.0)
    samples = sampled(backend, clock, 3.05, step_s=0.05)
    shares = [s[0].processes[0].sm_utilization_ratio for s in samples]
    # Refreshed at the first sample (0.05 s), then at 1.05, 2.05 and 3.05 s: constant in between.
    changes = [k for k in range(1, len(shares)) if shares[k] != shares[k - 1]]
    assert [round((k + 1) * 0.05, 2) for k in changes] == [1.05, 2.05, 3.05]
    assert shares[0] == pytest.approx(0.2)  # over [0, 0.05)
    assert at(samples, 1.0, 0.05)[0].processes[0].sm_utilization_ratio == pytest.approx(0.2)  # carried
    # The refresh at 1.05 s: [0.05, 1.05); at 2.05 s: [1.05, 2.05).
    assert at(samples, 1.5, 0.05)[0].processes[0].sm_utilization_ratio == pytest.approx(0.45 * 0.2 + 0.55 * 0.4)
    assert at(samples, 2.5, 0.05)[0].processes[0].sm_utilization_ratio == pytest.approx(0.45 * 0.4 + 0.55 * 0.8)
    assert at(samples, 3.05, 0.05)[0].processes[0].sm_utilization_ratio == pytest.approx(0.8)
    # The instantaneous GPU reading moves at once, the per-process list at its own cadence.
    assert at(samples, 1.6, 0.05)[0].utilization_gpu_ratio == pytest.approx(0.8)


def test_first_sample_at_the_backend_start_has_unmeasured_shares_and_the_next_one_measures():
    clock = FakeClock()
    backend = MockGpuBackend(1, processes=ScriptedProcesses([ScriptedProcess(0, 7, 0.3, GIB, TRAINER)]),
                             clock_ns=clock.ns)
    (first,) = backend.sample()  # no simulated time yet
    assert [(p.pid, p.sm_utilization_ratio) for p in first.processes] == [(7, None)]
    clock.advance(0.1)
    (second,) = backend.sample()
    assert second.processes[0].sm_utilization_ratio == pytest.approx(0.3)


def test_a_process_that_starts_and_ends_mid_run():
    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 11, 0.4, 8 * GIB, TRAINER),
        ScriptedProcess(0, 22, 0.3, 2 * GIB, VLLM, start_s=2.5, end_s=5.5),
    ])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns)
    samples = sampled(backend, clock, 8.0)
    assert set(by_pid(at(samples, 2.4)[0])) == {11}
    assert at(samples, 2.4)[0].memory_used_bytes == 8 * GIB
    assert at(samples, 2.6)[0].memory_used_bytes == 10 * GIB  # memory at once, the list at its refresh
    assert set(by_pid(at(samples, 3.1)[0])) == {11, 22}
    # Refreshed at 3.1 s over [2.1, 3.1): alive for 0.6 s of it.
    assert by_pid(at(samples, 3.1)[0])[22].sm_utilization_ratio == pytest.approx(0.3 * 0.6)
    assert by_pid(at(samples, 5.1)[0])[22].sm_utilization_ratio == pytest.approx(0.3)
    assert set(by_pid(at(samples, 6.1)[0])) == {11}  # gone from the list at the first refresh after its end
    assert at(samples, 6.1)[0].memory_used_bytes == 8 * GIB
    assert at(samples, 4.0)[0].utilization_gpu_ratio == pytest.approx(0.7)
    assert at(samples, 7.0)[0].utilization_gpu_ratio == pytest.approx(0.4)
    assert script.mean_sm_share(0, 22, 2.0, 6.0) == pytest.approx(0.3 * 3.0 / 4.0)


def test_two_gpus_each_list_their_own_processes():
    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 1, 0.6, GIB, VLLM),
        ScriptedProcess(1, 2, 0.1, 3 * GIB, TRAINER),
        ScriptedProcess(1, 1, 0.2, GIB, VLLM),  # one process on two GPUs (tensor parallel in one process)
    ])
    backend = MockGpuBackend(3, processes=script, clock_ns=clock.ns)
    first, second, third = at(sampled(backend, clock, 2.0), 2.0)
    assert {p.pid: p.sm_utilization_ratio for p in first.processes} == pytest.approx({1: 0.6})
    assert {p.pid: p.sm_utilization_ratio for p in second.processes} == pytest.approx({2: 0.1, 1: 0.2})
    assert third.processes == ()  # a GPU with no process: an empty list, as NVML gives
    assert (first.utilization_gpu_ratio, second.utilization_gpu_ratio) == pytest.approx((0.6, 0.3))
    assert (first.memory_used_bytes, second.memory_used_bytes, third.memory_used_bytes) == (GIB, 4 * GIB, 0)


def test_gpu_activity_is_the_sum_of_shares_capped_with_oversubscribed_shares_in_proportion():
    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 1, 0.9, GIB, VLLM, tensor_ratio=0.5),
        ScriptedProcess(0, 2, 0.6, GIB, TRAINER, tensor_ratio=1.0, dram_ratio=0.5),
    ])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns)
    (sample,) = at(sampled(backend, clock, 2.0), 2.0)
    assert sample.utilization_gpu_ratio == pytest.approx(1.0)
    assert sample.sm_activity_ratio == pytest.approx(1.0)
    shares = {p.pid: p.sm_utilization_ratio for p in sample.processes}
    assert shares == pytest.approx({1: 0.9 / 1.5, 2: 0.6 / 1.5})
    assert sample.tensor_activity_ratio == pytest.approx(0.9 / 1.5 * 0.5 + 0.6 / 1.5 * 1.0)
    assert sample.dram_activity_ratio == pytest.approx(0.6 / 1.5 * 0.5)
    assert script.mean_sm_share(0, 1, 0.0, 2.0) == pytest.approx(0.6)


def test_power_and_energy_follow_the_processes():
    from fakes import run_ticks
    from wattledger.agent.ledger import Ledger
    from wattledger.agent.sampler import Sampler
    from wattledger.exporters.prometheus import make_registry

    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 1, 0.5, GIB, VLLM, end_s=6.0, tensor_ratio=0.6, dram_ratio=0.4),
        ScriptedProcess(0, 2, 0.25, GIB, TRAINER, start_s=3.0, end_s=9.0, tensor_ratio=0.2),
    ])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns)
    ledger = Ledger(None, clock_ns=clock.ns)
    sampler = Sampler(ledger, backend, None, 0.1, clock=clock.seconds)
    sampler.tick()
    run_ticks(sampler, clock, 12.0)
    # The activity the script implies in each stretch, through the mock's documented power model.
    first = Activity(gpu=0.5, sm=0.5, tensor=0.3, dram=0.2)  # [0, 3)
    both = Activity(gpu=0.75, sm=0.75, tensor=0.35, dram=0.2)  # [3, 6)
    second = Activity(gpu=0.25, sm=0.25, tensor=0.05)  # [6, 9), then idle to 12
    expected = 3 * sum(power_demand_watts(SPEC, a) for a in (first, both, second)) + 3 * SPEC.idle_power_watts
    assert backend.true_energy_joules(0) == pytest.approx(expected, rel=1e-9)
    registry = make_registry(ledger, "test")
    info = backend.devices()[0]
    exported = registry.get_sample_value("wattledger_gpu_energy_joules_total", {"gpu": "0", "uuid": info.uuid})
    assert exported == pytest.approx(expected, rel=0.005)


def test_processes_combine_with_an_activity_source_by_maximum():
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(1.0, 2.0, Activity(gpu=1.0, sm=0.3, tensor=0.9, dram=0.1))
    script = ScriptedProcesses([ScriptedProcess(0, 5, 0.5, GIB, TRAINER, dram_ratio=0.6)])
    backend = MockGpuBackend(1, activity=timeline, processes=script, clock_ns=clock.ns)
    samples = sampled(backend, clock, 3.0)
    busy = at(samples, 1.5)[0]
    assert (busy.utilization_gpu_ratio, busy.sm_activity_ratio) == pytest.approx((1.0, 0.5))
    assert (busy.tensor_activity_ratio, busy.dram_activity_ratio) == pytest.approx((0.9, 0.3))
    quiet = at(samples, 2.5)[0]
    assert (quiet.utilization_gpu_ratio, quiet.tensor_activity_ratio) == pytest.approx((0.5, 0.0))


def test_a_lost_gpu_drops_its_list_and_measures_a_fresh_interval_when_back():
    clock = FakeClock()
    script = ScriptedProcesses([ScriptedProcess(0, 3, [(0.0, 0.2), (2.0, 0.6)], GIB, TRAINER)])
    backend = MockGpuBackend(1, processes=script, clock_ns=clock.ns, faults=[Fault("gpu_lost", at_s=1.0, until_s=3.0)])
    samples = sampled(backend, clock, 4.0)
    assert at(samples, 2.0)[0].processes is None and not at(samples, 2.0)[0].up
    back = at(samples, 3.0)[0]
    # Back at 3.0 s: the first list covers the second before, [2, 3), as NVML's first read does.
    assert back.up and back.processes[0].sm_utilization_ratio == pytest.approx(0.6)


def test_without_scripted_processes_nothing_changes_but_the_list():
    def run(processes):
        clock = FakeClock()
        timeline = ScriptedTimeline(clock.ns()).bursts(0, 3, 0.5, 0.2, Activity(gpu=1.0, sm=0.7, dram=0.4))
        backend = MockGpuBackend(2, activity=timeline, processes=processes, clock_ns=clock.ns)
        return backend, sampled(backend, clock, 3.0)

    plain_backend, plain = run(None)
    empty_backend, empty = run(ScriptedProcesses([]))
    assert all(s.processes is None for step in plain for s in step)
    assert all(s.processes == () for step in empty for s in step)
    assert [[dataclasses.replace(s, processes=None) for s in step] for step in empty] == plain
    assert plain_backend.scripted_owner_labels() == {} and plain_backend.scripted_processes is None
    status = {s.name: s for s in plain_backend.field_status(0)}
    assert not status["processes"].supported and "process_utilization" not in status
    status = {s.name: s for s in empty_backend.field_status(0)}
    assert status["processes"].supported and status["process_utilization"].supported


def test_a_process_on_a_gpu_the_mock_does_not_have_is_refused():
    script = ScriptedProcesses([ScriptedProcess(2, 9, 0.1, 0, TRAINER)])
    with pytest.raises(ValueError, match="GPU 2, but the mock has 2 GPU"):
        MockGpuBackend(2, processes=script)
    with pytest.raises(ValueError, match="process_interval_s"):
        MockGpuBackend(3, processes=script, process_interval_s=0)


# -- the plain-data constructor ------------------------------------------------------------------------


def test_from_spec_builds_the_same_processes_as_the_constructor():
    spec = [
        {"gpu": 0, "pid": 4242, "sm_share": 0.6, "memory_bytes": 20 * GIB, "labels": dict(VLLM)},
        {"gpu": 1, "pid": 77, "sm_share": [[0, 0.1], [30, 0.9]], "memory_bytes": 0, "labels": TRAINER,
         "start_s": 5, "end_s": 60.5, "tensor_ratio": 0.25, "dram_ratio": 1},
    ]
    built = list(ScriptedProcesses.from_spec(spec))
    assert built == [
        ScriptedProcess(0, 4242, 0.6, 20 * GIB, VLLM),
        ScriptedProcess(1, 77, [[0, 0.1], [30, 0.9]], 0, TRAINER, start_s=5, end_s=60.5, tensor_ratio=0.25,
                        dram_ratio=1),
    ]
    assert built[1].share_steps == ((0.0, 0.1), (30.0, 0.9))
    spec[0]["labels"]["pod"] = "changed"
    assert built[0].labels["pod"] == "vllm-0"  # labels are copied


@pytest.mark.parametrize("spec, message", [
    ({"gpu": 0}, "list of tables"),
    ("gpu=0", "list of tables"),
    ([7], r"processes\[0\] must be a table"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0}], r"processes\[0\]: missing labels"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "share": 1}], "unknown key 'share'"),
    ([{"gpu": -1, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}}], "gpu must be"),
    ([{"gpu": True, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}}], "gpu must be"),
    ([{"gpu": 0, "pid": 0, "sm_share": 0.1, "memory_bytes": 0, "labels": {}}], "pid must be"),
    ([{"gpu": 0, "pid": 1, "sm_share": 1.5, "memory_bytes": 0, "labels": {}}], "sm_share must be a ratio"),
    ([{"gpu": 0, "pid": 1, "sm_share": float("nan"), "memory_bytes": 0, "labels": {}}], "sm_share must be"),
    ([{"gpu": 0, "pid": 1, "sm_share": "0.5", "memory_bytes": 0, "labels": {}}], "sm_share must be"),
    ([{"gpu": 0, "pid": 1, "sm_share": [[2, 0.1], [1, 0.2]], "memory_bytes": 0, "labels": {}}], "must ascend"),
    ([{"gpu": 0, "pid": 1, "sm_share": [[0, 0.1, 3]], "memory_bytes": 0, "labels": {}}], r"\[at_s, share\] pairs"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 1.5, "labels": {}}], "memory_bytes must be"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {"pod": 3}}], "labels must map"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "start_s": 4, "end_s": 4}], "end_s"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "dram_ratio": -0.1}], "dram_ratio"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {"pod": "a"}},
      {"gpu": 1, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {"pod": "b"}}], "two different label sets"),
    ([{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "end_s": 5},
      {"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "start_s": 4}], "already on GPU 0"),
])
def test_from_spec_refuses_bad_input_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        ScriptedProcesses.from_spec(spec)
    assert "\n" not in str(caught.value)


def test_a_pid_may_come_back_on_the_same_gpu_after_it_ended():
    spec = [{"gpu": 0, "pid": 1, "sm_share": 0.1, "memory_bytes": 0, "labels": {}, "end_s": 5},
            {"gpu": 0, "pid": 1, "sm_share": 0.3, "memory_bytes": 0, "labels": {}, "start_s": 5}]
    assert ScriptedProcesses.from_spec(spec).mean_sm_share(0, 1, 4.0, 6.0) == pytest.approx(0.2)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=5),
                    st.lists(st.lists(st.floats(-1, 40), max_size=3), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2))
_ENTRIES = st.dictionaries(st.sampled_from(["gpu", "pid", "sm_share", "memory_bytes", "labels", "start_s", "end_s",
                                            "tensor_ratio", "dram_ratio", "other"]), _VALUES, max_size=9)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENTRIES, max_size=3))
def test_from_spec_accepts_or_gives_a_one_line_value_error(spec):
    try:
        script = ScriptedProcesses.from_spec(spec)
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert len(script) == len(spec)
