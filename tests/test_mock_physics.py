"""The mock GPU behaves like a real one in the ways that matter to measurement."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.base import ProbeUnavailable
from wattledger.probes.mock import Fault, MockGpuBackend, parse_fault, power_demand_watts
from wattledger.probes.mock_presets import PRESETS

HEAVY = Activity(gpu=1.0, sm=1.0, tensor=1.0, dram=1.0)  # asks for more than the power limit
MEDIUM = Activity(gpu=1.0, sm=0.6, tensor=0.3, dram=0.4)


def bursty_timeline(origin_ns: int) -> ScriptedTimeline:
    """Busy 200 ms out of every second, alternating heavy and medium, for 60 s."""
    timeline = ScriptedTimeline(origin_ns)
    for second in range(60):
        timeline.add(second, second + 0.2, HEAVY if second % 2 else MEDIUM)
    return timeline


def test_energy_counter_matches_ground_truth_and_moves_in_100ms_steps():
    clock = FakeClock()
    backend = MockGpuBackend(1, activity=bursty_timeline(clock.ns()), clock_ns=clock.ns)
    spec = PRESETS["h100-sxm-80gb"]
    readings = []
    for _ in range(600 * 7):  # 60 s sampled every 1/70 s: many samples between counter updates
        clock.now_ns += NS_PER_S // 70
        (sample,) = backend.sample()
        readings.append(sample)
        assert sample.power_watts <= spec.power_limit_watts
    # Whole millijoules, and only ever changed right after a 100 ms boundary.
    changes = 0
    for before, after in zip(readings, readings[1:]):
        assert after.energy_joules * 1000 == pytest.approx(round(after.energy_joules * 1000), abs=1e-6)
        if after.energy_joules != before.energy_joules:
            changes += 1
            crossed = after.monotonic_ns // 100_000_000 != before.monotonic_ns // 100_000_000
            assert crossed, "the counter moved without crossing a 100 ms boundary"
        assert after.energy_joules >= before.energy_joules
    assert changes <= 600 + 1
    truth = backend.true_energy_joules(0)
    assert readings[-1].energy_joules == pytest.approx(truth, rel=0.005)
    # The truth itself is what the script implies: 30 heavy and 30 medium bursts of 0.2 s, idle otherwise.
    heavy = min(power_demand_watts(spec, HEAVY), spec.power_limit_watts)
    medium = power_demand_watts(spec, MEDIUM)
    elapsed_s = (readings[-1].monotonic_ns - readings[0].monotonic_ns + NS_PER_S // 70) / NS_PER_S
    expected = 30 * 0.2 * heavy + 30 * 0.2 * medium + (elapsed_s - 12) * spec.idle_power_watts
    assert truth == pytest.approx(expected, rel=1e-3)


def test_power_is_clipped_at_the_limit_with_power_cap_reason_and_lower_clock():
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(0, 10, HEAVY)
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns, power_limit_watts=500)
    clock.advance(2)
    (sample,) = backend.sample()
    assert sample.power_watts == 500
    assert sample.power_limit_watts == 500
    assert "sw_power_cap" in sample.throttle_reasons
    assert sample.sm_clock_hertz < PRESETS["h100-sxm-80gb"].sm_clock_max_hertz
    assert sample.throttle_seconds["sw_power_cap"] == pytest.approx(2.0)
    clock.advance(10)
    (idle,) = backend.sample()
    assert idle.power_watts == PRESETS["h100-sxm-80gb"].idle_power_watts
    assert idle.throttle_reasons == frozenset({"gpu_idle"})


def test_average_power_is_a_one_second_boxcar():
    clock = FakeClock()
    spec = PRESETS["h100-sxm-80gb"]
    timeline = ScriptedTimeline(clock.ns()).add(5.0, 5.5, MEDIUM)
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns)
    clock.advance(5.75)
    (sample,) = backend.sample()
    # Last second: 0.25 s idle, 0.5 s medium, 0.25 s idle.
    expected = 0.5 * power_demand_watts(spec, MEDIUM) + 0.5 * spec.idle_power_watts
    assert sample.power_average_watts == pytest.approx(expected)
    assert sample.power_watts == spec.idle_power_watts  # the instant reading already fell back


def test_temperature_follows_power_with_a_first_order_lag():
    clock = FakeClock()
    spec = PRESETS["h100-sxm-80gb"]
    timeline = ScriptedTimeline(clock.ns()).add(0, 1000, MEDIUM)
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns)
    start = backend.sample()[0].temperature_gpu_celsius
    clock.advance(spec.thermal_time_constant_seconds)
    one_tau = backend.sample()[0].temperature_gpu_celsius
    clock.advance(10 * spec.thermal_time_constant_seconds)
    settled = backend.sample()[0].temperature_gpu_celsius
    steady = spec.ambient_celsius + spec.celsius_per_watt * power_demand_watts(spec, MEDIUM)
    assert settled == pytest.approx(steady, abs=0.1)
    assert one_tau == pytest.approx(steady + (start - steady) * math.exp(-1), abs=0.1)


def test_memory_used_comes_from_declared_allocations():
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).allocate(1, 40 * 2**30)
    backend = MockGpuBackend(2, activity=timeline, clock_ns=clock.ns)
    clock.advance(0.1)
    first, second = backend.sample()
    assert first.memory_used_bytes == 0
    assert second.memory_used_bytes == 40 * 2**30


def test_activity_ratios_are_exact_means_between_samples():
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).bursts(0, 10, 1.0, 0.25, Activity(gpu=1, sm=0.8, tensor=0.4, dram=0.2))
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns)
    assert backend.sample()[0].sm_activity_ratio is None  # GPM-style ratios need two samples
    clock.advance(4.0)
    (sample,) = backend.sample()
    assert sample.sm_activity_ratio == pytest.approx(0.25 * 0.8)
    assert sample.tensor_activity_ratio == pytest.approx(0.25 * 0.4)
    assert sample.dram_activity_ratio == pytest.approx(0.25 * 0.2)


def test_faults_unsupported_field_lost_gpu_and_counter_reset():
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(0, 100, MEDIUM)
    faults = [
        Fault("field_unsupported", at_s=2, gpu=0, field="power_watts"),
        Fault("gpu_lost", at_s=4, until_s=6, gpu=1),
        Fault("energy_reset", at_s=8),
    ]
    backend = MockGpuBackend(2, activity=timeline, clock_ns=clock.ns, faults=faults)
    seen = []
    for _ in range(100):
        clock.advance(0.1)
        seen.append(backend.sample())
    at = lambda s: seen[round(s * 10) - 1]  # noqa: E731 - samples at s seconds
    assert at(1.9)[0].power_watts is not None and at(2.5)[0].power_watts is None
    assert at(2.5)[1].power_watts is not None  # only gpu 0 lost the field
    assert not dict((s.name, s.supported) for s in backend.field_status(0))["power_watts"]
    assert at(3.9)[1].up and not at(4.5)[1].up and at(6.1)[1].up
    assert at(4.5)[1].energy_joules is None
    assert at(7.9)[0].energy_joules > 100 and at(8.2)[0].energy_joules < 200  # counter restarted
    assert backend.true_energy_joules(0) > at(10)[0].energy_joules  # the truth did not reset


def test_init_failure_fault_refuses_to_open():
    with pytest.raises(ProbeUnavailable, match="init"):
        MockGpuBackend(1, faults=[Fault("init_failure")])


@pytest.mark.parametrize("text", ["gpu_lost:gpu=0:at=10:until=20", "energy_reset:at=3.5",
                                  "field_unsupported:field=power_watts", "init_failure"])
def test_fault_specs_parse(text):
    assert parse_fault(text).kind == text.split(":")[0]


@pytest.mark.parametrize("text", ["gpu_lost:gpu=x", "melt", "field_unsupported:field=nope",
                                  "gpu_lost:at=5:until=1", "energy_reset:when=3"])
def test_bad_fault_specs_are_rejected(text):
    with pytest.raises(ValueError):
        parse_fault(text)


def test_same_script_gives_identical_samples():
    def run():
        clock = FakeClock()
        backend = MockGpuBackend(2, activity=bursty_timeline(clock.ns()), clock_ns=clock.ns)
        out = []
        for _ in range(50):
            clock.advance(0.1)
            out.append(backend.sample())
        return out
    assert run() == run()


def test_exported_energy_counter_matches_ground_truth_over_60_seconds():
    from fakes import run_ticks
    from wattledger.agent.ledger import Ledger
    from wattledger.agent.sampler import Sampler
    from wattledger.exporters.prometheus import make_registry

    clock = FakeClock()
    backend = MockGpuBackend(2, activity=bursty_timeline(clock.ns()), clock_ns=clock.ns)
    ledger = Ledger(None, clock_ns=clock.ns)
    sampler = Sampler(ledger, backend, None, 0.1, clock=clock.seconds)
    sampler.tick()  # the exported counter starts from the agent's first reading
    truth_at_start = [backend.true_energy_joules(i) for i in range(2)]
    run_ticks(sampler, clock, 60.0)
    registry = make_registry(ledger, "test")
    for info in backend.devices():
        exported = registry.get_sample_value("wattledger_gpu_energy_joules_total",
                                             {"gpu": str(info.index), "uuid": info.uuid})
        truth = backend.true_energy_joules(info.index) - truth_at_start[info.index]
        assert exported == pytest.approx(truth, rel=0.005)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_fault_parser_accepts_or_gives_one_line_value_error(text):
    try:
        fault = parse_fault(text)
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(fault, Fault)


# -- energy_reset and field faults (issue 8) --------------------------------------------------------


def _energy_at(backend: MockGpuBackend, index: int, ns: int) -> float:
    return backend._gpus[index].energy_at(ns)  # the simulated truth at a past instant


@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=0.5, max_value=5.0), st.floats(min_value=0.0, max_value=0.5),
       st.sampled_from([0.01, 0.05, 0.1, 0.13, 0.25]))
def test_energy_counter_is_never_negative_and_restarts_at_the_reset_time(reset_at_s, delay_s, period_s):
    # Off the 100 ms grid, the reset used to come after the last counter update and read negative.
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(0, 10, MEDIUM)
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns, delay_s=delay_s,
                             faults=[Fault("energy_reset", at_s=reset_at_s)])
    reset_ns = backend._start_ns + round(reset_at_s * NS_PER_S)
    readings = []
    while clock.now_ns - delay_s * NS_PER_S < reset_ns + 2 * NS_PER_S:
        clock.advance(period_s)
        (sample,) = backend.sample()
        readings.append(sample)
        assert sample.energy_joules >= 0
    last = readings[-1]
    boundary = last.monotonic_ns - last.monotonic_ns % 100_000_000
    assert last.energy_joules == pytest.approx(_energy_at(backend, 0, boundary) - _energy_at(backend, 0, reset_ns),
                                               abs=0.002)


def test_energy_reset_restarts_every_gpus_counter_at_the_same_instant():
    # Faults used to fire while the first GPU had been advanced and the others had not.
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(0, 10, HEAVY, gpus=[0]).add(0, 10, MEDIUM, gpus=[1])
    backend = MockGpuBackend(2, activity=timeline, clock_ns=clock.ns, faults=[Fault("energy_reset", at_s=4.95)])
    for _ in range(50):
        clock.advance(0.1)  # samples at 0.1 s steps: the reset is found at 5.0 s
        samples = backend.sample()
    clock.advance(0.1)
    samples = backend.sample()
    reset_ns = backend._start_ns + round(4.95 * NS_PER_S)
    for index, sample in enumerate(samples):
        boundary = sample.monotonic_ns - sample.monotonic_ns % 100_000_000
        since_reset = _energy_at(backend, index, boundary) - _energy_at(backend, index, reset_ns)
        assert sample.energy_joules == pytest.approx(since_reset, abs=0.002)


def test_field_unsupported_until_a_time_makes_the_field_readable_again():
    clock = FakeClock()
    backend = MockGpuBackend(1, activity=ScriptedTimeline(clock.ns()).add(0, 10, MEDIUM), clock_ns=clock.ns,
                             faults=[parse_fault("field_unsupported:field=energy_joules:at=2:until=4")])
    seen = []
    for _ in range(60):
        clock.advance(0.1)
        seen.append(backend.sample()[0].energy_joules)
    assert seen[18] is not None and seen[21] is None and seen[38] is None and seen[41] is not None
    assert seen[41] > seen[18]  # the hardware counter kept counting while unreadable
    assert dict((s.name, s.supported) for s in backend.field_status(0))["energy_joules"]
    with pytest.raises(ValueError, match="until_s must come after"):
        Fault("field_unsupported", field="power_watts", at_s=3, until_s=2)
