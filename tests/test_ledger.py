"""The ledger keeps series that stay right however rarely Prometheus scrapes."""

from __future__ import annotations

import pytest
from prometheus_client.registry import CollectorRegistry

from fakes import NS_PER_S, FakeClock, run_ticks
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import Ledger, MonotonicCounter
from wattledger.agent.sampler import Sampler
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.activity import ScriptedTimeline
from wattledger.probes.base import Activity, GpuInfo, GpuSample
from wattledger.probes.mock import Fault, MockGpuBackend

BURST = Activity(gpu=1.0, sm=0.9, tensor=0.7, dram=0.5)


def value(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def build(timeline_factory, gpus=1, faults=(), accounting=False):
    clock = FakeClock()
    timeline = timeline_factory(clock.ns())
    backend = MockGpuBackend(gpus, activity=timeline, clock_ns=clock.ns, faults=faults)
    acct = Accounting(range(gpus), clock_ns=clock.ns) if accounting else None
    ledger = Ledger(acct, clock_ns=clock.ns)
    sampler = Sampler(ledger, backend, None, 0.1, clock=clock.seconds)
    return clock, timeline, backend, acct, ledger, sampler


def test_busy_seconds_rate_is_exact_where_a_scrape_time_gauge_is_far_off():
    # 200 ms bursts every 1.3 s: the mean is 15.4% but a reading at scrape time sees 0 or ~100%.
    clock, timeline, _, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).bursts(0, 400, 1.3, 0.2, BURST))
    registry = make_registry(ledger, "test")
    labels = {"gpu": "0", "uuid": ledger.snapshot().gpus[0].info.uuid, "engine": "gpu"}
    scrapes = []  # (time ns, busy seconds counter, last-value utilization as a gauge would show it)
    for _ in range(20):
        run_ticks(sampler, clock, 15.0)
        busy = value(registry, "wattledger_gpu_busy_seconds_total", **labels)
        gauge = ledger.snapshot().gpus[0].last.utilization_gpu_ratio
        scrapes.append((clock.ns(), busy, gauge))
    rate_errors, gauge_errors = [], []
    for (t0, busy0, _), (t1, busy1, gauge1) in zip(scrapes, scrapes[1:]):
        truth = timeline.mean_busy_ratio(0, t0, t1)
        rate = (busy1 - busy0) / ((t1 - t0) / NS_PER_S)
        rate_errors.append(abs(rate - truth) / truth)
        gauge_errors.append(abs(gauge1 - truth) / truth)
    assert max(rate_errors) < 0.02
    assert sum(gauge_errors) / len(gauge_errors) > 0.5


def test_histogram_shows_the_bursts_and_the_idle_fraction():
    clock, _, _, _, ledger, sampler = build(lambda origin: ScriptedTimeline(origin).bursts(0, 60, 1.0, 0.2, BURST))
    registry = make_registry(ledger, "test")
    run_ticks(sampler, clock, 60.0)
    labels = {"gpu": "0", "uuid": ledger.snapshot().gpus[0].info.uuid, "engine": "gpu"}
    count = value(registry, "wattledger_gpu_utilization_ratio_count", **labels)
    idle = value(registry, "wattledger_gpu_utilization_ratio_bucket", le="0.0", **labels)
    full = count - value(registry, "wattledger_gpu_utilization_ratio_bucket", le="0.99", **labels)
    assert count == 600
    assert idle / count == pytest.approx(0.8, abs=0.01)  # idle 800 ms of every second
    assert full / count == pytest.approx(0.2, abs=0.01)  # and fully busy in the bursts


def test_driver_reset_keeps_the_energy_counter_monotonic():
    clock, _, backend, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 30, BURST), faults=[Fault("energy_reset", at_s=10)])
    registry = make_registry(ledger, "test")
    uuid = ledger.snapshot().gpus[0].info.uuid
    readings = []
    run_ticks(sampler, clock, 20.0, on_tick=lambda: readings.append(
        value(registry, "wattledger_gpu_energy_joules_total", gpu="0", uuid=uuid)))
    assert all(b >= a for a, b in zip(readings, readings[1:]))
    raw = ledger.snapshot().gpus[0].last.energy_joules
    assert raw < readings[-1] / 1.5  # the hardware counter did restart
    # Only the energy of the one interval that straddles the reset is lost.
    assert readings[-1] == pytest.approx(backend.true_energy_joules(0), rel=0.01)


def test_monotonic_counter_treats_a_drop_as_a_restart():
    counter = MonotonicCounter()
    for raw in (100.0, 150.0, 20.0, 30.0):
        counter.update(raw)
    assert counter.total == 50 + 20 + 10


def test_energy_accrues_only_to_the_workload_on_that_gpu_and_splits_when_shared():
    clock, _, backend, acct, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 100, BURST), gpus=2, accounting=True)
    run_ticks(sampler, clock, 1.0)
    start = clock.ns()
    acct.start("train", [0])
    acct.start("chat", [1])
    energy_before = [g.energy.total for g in ledger.snapshot().gpus]
    run_ticks(sampler, clock, 10.0)
    acct.start("eval", [1])  # shares gpu 1 with chat from now on
    run_ticks(sampler, clock, 10.0)
    acct.stop("chat")
    acct.stop("eval")
    acct.stop("train")
    run_ticks(sampler, clock, 5.0)  # energy after the stop goes to nobody
    snap = ledger.snapshot()
    gpu0 = snap.gpus[0].energy.total - energy_before[0]
    gpu1 = snap.gpus[1].energy.total - energy_before[1]
    energy, active = snap.workload_energy_joules, snap.workload_active_seconds
    after_stop = gpu0 / 25 * 5  # constant load: the last 5 s are a fifth of 25 s
    assert energy[("train", 0)] == pytest.approx(gpu0 - after_stop, rel=0.01)
    assert ("train", 1) not in energy and ("chat", 0) not in energy
    assert energy[("chat", 1)] == pytest.approx((gpu1 - after_stop) * 0.75, rel=0.01)
    assert energy[("eval", 1)] == pytest.approx((gpu1 - after_stop) * 0.25, rel=0.01)
    assert active[("train", 0)] == pytest.approx(20.0)
    assert active[("chat", 1)] == pytest.approx(20.0) and active[("eval", 1)] == pytest.approx(10.0)
    assert clock.ns() - start == 25 * NS_PER_S


def test_a_lost_gpu_is_down_its_gauges_vanish_and_it_comes_back():
    clock, _, _, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 30, BURST), faults=[Fault("gpu_lost", at_s=5, until_s=8)])
    registry = make_registry(ledger, "test")
    uuid = ledger.snapshot().gpus[0].info.uuid
    run_ticks(sampler, clock, 6.0)
    assert value(registry, "wattledger_gpu_up", gpu="0", uuid=uuid) == 0
    assert value(registry, "wattledger_gpu_power_watts", gpu="0", uuid=uuid) is None
    assert value(registry, "wattledger_gpu_energy_joules_total", gpu="0", uuid=uuid) > 0  # counters stay
    run_ticks(sampler, clock, 3.0)
    assert value(registry, "wattledger_gpu_up", gpu="0", uuid=uuid) == 1
    assert value(registry, "wattledger_gpu_power_watts", gpu="0", uuid=uuid) > 0


def test_unsupported_fields_are_absent_not_zero():
    info = GpuInfo(0, "GPU-x", "Old GPU", "1.0", None, None)

    class SparseBackend:
        name, simulated = "stub", False

        def devices(self):
            return [info]

        def sample(self):
            return [GpuSample(0, "GPU-x", clock.ns(), utilization_gpu_ratio=0.5)]

        def field_status(self, index):
            return []

        def close(self):
            pass

    clock = FakeClock()
    ledger = Ledger(None, clock_ns=clock.ns)
    sampler = Sampler(ledger, SparseBackend(), None, 0.1, clock=clock.seconds)
    run_ticks(sampler, clock, 1.0)
    registry = make_registry(ledger, "test")
    text = {m.name: m.samples for m in registry.collect()}
    assert text["wattledger_gpu_energy_joules"] == []
    assert text["wattledger_gpu_power_watts"] == []
    assert text["wattledger_gpu_memory_total_bytes"] == []
    busy = [s for s in text["wattledger_gpu_busy_seconds"] if s.name.endswith("_total")]
    assert [s.labels["engine"] for s in busy] == ["gpu"]
    assert busy[0].value == pytest.approx(0.45)  # 0.5 x 0.9 s: the first sample starts the integral
