"""The ledger keeps series that stay right however rarely Prometheus scrapes."""

from __future__ import annotations

import pytest
from prometheus_client.registry import CollectorRegistry

from fakes import NS_PER_S, FakeClock, run_ticks
from host_tree import build_proc, proc_stat_text
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import HardwareCounter, KernelCounter, Ledger, RebasingCounter
from wattledger.agent.sampler import Sampler
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.base import FixedGpuBackend, GpuInfo, GpuSample, ProbeUnavailable
from wattledger.probes.host import ProcfsHostBackend
from wattledger.probes.mock import FAULTABLE_FIELDS, Fault, MockGpuBackend

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
    counter = HardwareCounter()
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

    class SparseBackend(FixedGpuBackend):
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


# -- counters come in kinds (issue 8) ---------------------------------------------------------------


def test_hardware_counter_ignores_negative_and_non_finite_readings():
    counter = HardwareCounter()
    for raw in (100.0, 150.0, -12.791, float("nan"), float("inf"), 10**400, 160.0):
        counter.update(raw)
    assert counter.total == 60.0  # 50 + 10: no garbage reading moved it, in either direction


def test_kernel_counter_holds_a_tick_back_and_moves_again_only_past_it():
    counter = KernelCounter()
    increases = [counter.update(raw) for raw in (4056.0, 4055.99, 4056.0, 4056.5)]
    assert increases == [0.0, 0.0, 0.0, 0.5]
    assert counter.total == 0.5  # not +4055.99 for a "reset"


def test_rebasing_counter_counts_nothing_when_its_probe_restarts():
    counter = RebasingCounter()
    for raw in (1000.0, 1010.0, 3.0, 5.0):  # the RAPL reader restarted from the raw register (3 J)
        counter.update(raw)
    assert counter.total == 10.0 + 2.0


# -- host CPU counters (issue 8, item 2) -----------------------------------------------------------

# ~1 hour of busy time per core, then two more readings: one where a column steps back one tick and
# nothing else moves (an idle vCPU on a hypervisor that reports steal or iowait that way), then 50 ticks
# of user time.
HOUR_OF_TICKS = (301388, 2000, 30000, 900000, 500, 0, 200, 7000, 0, 0)


def _host_ledger(tmp_path):
    clock = FakeClock()
    proc = build_proc(tmp_path, cores=[HOUR_OF_TICKS] * 4)
    backend = ProcfsHostBackend(str(proc), str(tmp_path / "sys"), clock_ns=clock.ns, clk_tck=100)
    ledger = Ledger(None, clock_ns=clock.ns)
    registry = make_registry(ledger, "test")

    def read(cores):
        (proc / "stat").write_text(proc_stat_text(cores))
        clock.advance(1.0)
        ledger.record_host(backend.sample())
        return (value(registry, "wattledger_host_cpu_busy_seconds_total"),
                {c: value(registry, "wattledger_host_cpu_core_busy_seconds_total", core=str(c)) for c in range(4)})

    return read


@pytest.mark.parametrize("column", [4, 7], ids=["iowait", "steal"])
@pytest.mark.parametrize("which", ["every core", "one core"])
def test_host_cpu_column_one_tick_back_adds_nothing(tmp_path, column, which):
    read = _host_ledger(tmp_path)
    assert read([HOUR_OF_TICKS] * 4) == (0.0, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})
    back = list(HOUR_OF_TICKS)
    back[column] -= 1
    cores = [tuple(back)] * 4 if which == "every core" else [tuple(back)] + [HOUR_OF_TICKS] * 3
    assert read(cores) == (0.0, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})
    back[0] += 50  # 0.5 s of user time on each core that moved
    cores = [tuple(back)] * 4 if which == "every core" else [tuple(back)] + [HOUR_OF_TICKS] * 3
    total, per_core = read(cores)
    assert per_core[0] == pytest.approx(0.5)
    assert total == pytest.approx(sum(per_core.values()))
    assert total == pytest.approx(2.0 if which == "every core" else 0.5)


def test_host_cpu_busy_leaves_out_steal_as_node_exporter_does(tmp_path):
    read = _host_ledger(tmp_path)
    read([HOUR_OF_TICKS] * 4)
    stolen = list(HOUR_OF_TICKS)
    stolen[7] += 100  # 1 s stolen by the hypervisor: another guest's work, not ours
    stolen[8] += 30  # guest time, already inside user
    stolen[0] += 30
    total, per_core = read([tuple(stolen)] * 4)
    assert total == pytest.approx(4 * 0.3)


def test_an_offline_core_is_absent_and_the_cores_after_it_keep_their_own_counters(tmp_path):
    clock = FakeClock()
    rows = [(HOUR_OF_TICKS[0] + 100_000 * i,) + HOUR_OF_TICKS[1:] for i in range(4)]  # each core its own
    proc = build_proc(tmp_path, cores=rows)
    backend = ProcfsHostBackend(str(proc), str(tmp_path / "sys"), clock_ns=clock.ns, clk_tck=100)
    ledger = Ledger(None, clock_ns=clock.ns)
    registry = make_registry(ledger, "test")
    ledger.record_host(backend.sample())
    stat = proc_stat_text([(r[0] + 10,) + r[1:] for r in rows])
    lines = [line for line in stat.splitlines() if not line.startswith("cpu2 ")]  # cpu2 goes offline
    (proc / "stat").write_text("\n".join(lines) + "\n")
    clock.advance(1.0)
    ledger.record_host(backend.sample())
    per_core = {c: value(registry, "wattledger_host_cpu_core_busy_seconds_total", core=str(c)) for c in range(4)}
    assert per_core == {0: pytest.approx(0.1), 1: pytest.approx(0.1), 2: None, 3: pytest.approx(0.1)}


# -- GPU energy across a driver reset (issue 8, item 3) ---------------------------------------------


@pytest.mark.parametrize("delay_s, reset_at_s", [(0.25, 10.0), (0.37, 7.38), (0.05, 3.08)])
def test_energy_reset_never_lowers_the_exported_energy(delay_s, reset_at_s):
    # The reset falls between two 100 ms counter updates: the mock's counter read negative there.
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).add(0, 30, BURST)
    backend = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns, delay_s=delay_s,
                             faults=[Fault("energy_reset", at_s=reset_at_s)])
    ledger = Ledger(None, clock_ns=clock.ns)
    sampler = Sampler(ledger, backend, None, 0.1, clock=clock.seconds)
    registry = make_registry(ledger, "test")
    uuid = backend.devices()[0].uuid
    readings, raw = [], []
    run_ticks(sampler, clock, 20.0, on_tick=lambda: (
        readings.append(value(registry, "wattledger_gpu_energy_joules_total", gpu="0", uuid=uuid)),
        raw.append(ledger.snapshot().gpus[0].last.energy_joules)))
    assert min(raw) >= 0
    assert all(b >= a for a, b in zip(readings, readings[1:]))
    assert any(b < a for a, b in zip(raw, raw[1:]))  # the hardware counter did restart


# -- workload energy across a GPU loss (issue 8, item 4) --------------------------------------------


def _identity(registry, ledger, gpu: int) -> tuple[float, float, float] | None:
    """(GPU energy, sum of workload energy, unattributed) as exported, or None while energy is absent."""
    uuid = ledger.snapshot().gpus[gpu].info.uuid
    total = value(registry, "wattledger_gpu_energy_joules_total", gpu=str(gpu), uuid=uuid)
    unattributed = value(registry, "wattledger_gpu_unattributed_energy_joules_total", gpu=str(gpu), uuid=uuid)
    if total is None:
        assert unattributed is None
        return None
    workloads = sum(s.value for m in registry.collect() if m.name == "wattledger_workload_energy_joules"
                    for s in m.samples if s.labels["gpu"] == str(gpu))
    return total, workloads, unattributed


def test_the_energy_of_a_loss_goes_to_the_workload_that_held_the_gpu_throughout():
    clock, _, backend, acct, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 100, BURST), accounting=True,
        faults=[Fault("gpu_lost", at_s=10, until_s=20)])
    registry = make_registry(ledger, "test")
    run_ticks(sampler, clock, 0.1)
    acct.start("train", [0])
    run_ticks(sampler, clock, 30.0)
    total, workloads, unattributed = _identity(registry, ledger, 0)
    assert workloads == pytest.approx(total, rel=1e-12)  # was 34% short: the gap went to nobody
    assert unattributed == 0.0
    assert value(registry, "wattledger_workload_active_seconds_total", workload="train", gpu="0") == pytest.approx(30.0)


def test_the_energy_of_a_loss_nobody_held_throughout_is_unattributed():
    clock, _, backend, acct, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 100, BURST), accounting=True,
        faults=[Fault("gpu_lost", at_s=10, until_s=20)])
    registry = make_registry(ledger, "test")
    run_ticks(sampler, clock, 15.0)
    acct.start("train", [0])  # starts while the GPU is lost: it held only part of the gap
    energy_before_return = ledger.snapshot().gpus[0].energy.total
    run_ticks(sampler, clock, 5.0)
    gap_energy = ledger.snapshot().gpus[0].energy.total - energy_before_return
    total, workloads, unattributed = _identity(registry, ledger, 0)
    assert gap_energy > 0
    assert unattributed == pytest.approx(gap_energy + energy_before_return)  # nothing ran before either
    assert workloads + unattributed == pytest.approx(total, rel=1e-12)


IDENTITY_FAULTS = [
    [Fault("energy_reset", at_s=7.33)],
    [Fault("gpu_lost", at_s=5, until_s=12)],
    [Fault("gpu_lost", gpu=1, at_s=18)],  # never comes back
    [Fault("gpu_lost", at_s=3, until_s=4), Fault("energy_reset", at_s=3.5), Fault("gpu_lost", at_s=9, until_s=16)],
    *[[Fault("field_unsupported", at_s=6, until_s=14, field=name)] for name in FAULTABLE_FIELDS],
    [Fault("field_unsupported", at_s=6, field="energy_joules")],  # never comes back
]


@pytest.mark.parametrize("faults", IDENTITY_FAULTS,
                         ids=lambda faults: "+".join(f"{f.kind}:{f.field or f.at_s}" for f in faults))
def test_workload_plus_unattributed_energy_is_gpu_energy_under_every_scheduled_fault(faults):
    clock, _, backend, acct, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).bursts(0, 30, 1.0, 0.4, BURST), gpus=2, accounting=True,
        faults=faults)
    registry = make_registry(ledger, "test")
    plan = {10: ("start", "train", [0]), 40: ("start", "chat", [1]), 80: ("start", "eval", [0, 1]),
            130: ("stop", "train"), 170: ("stop", "eval"), 200: ("start", "train", [0, 1]), 260: ("stop", "chat")}
    highest: dict = {}
    for tick in range(300):
        step = plan.get(tick)
        if step is not None and step[0] == "start":
            acct.start(step[1], step[2])
        elif step is not None:
            acct.stop(step[1])
        run_ticks(sampler, clock, 0.1)
        for gpu in (0, 1):
            figures = _identity(registry, ledger, gpu)
            if figures is not None:
                total, workloads, unattributed = figures
                assert workloads + unattributed == pytest.approx(total, rel=1e-9, abs=1e-9), (tick, gpu)
        for family in registry.collect():
            if family.type in ("counter", "histogram"):
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    assert s.value >= highest.get(key, 0.0), (tick, key)
                    highest[key] = s.value
    assert any(k[0] == "wattledger_workload_energy_joules_total" for k in highest)


def test_init_failure_leaves_no_figures_to_disagree():
    # The fifth scheduled fault kind: the backend never opens, so there is no GPU energy to attribute.
    with pytest.raises(ProbeUnavailable):
        MockGpuBackend(1, faults=[Fault("init_failure")])


# -- a field that becomes unsupported (issue 8, item 5) ---------------------------------------------


def test_a_lost_field_takes_its_counters_out_of_the_exposition_and_names_itself():
    clock, _, backend, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 100, BURST),
        faults=[Fault("field_unsupported", at_s=5, until_s=15, field="energy_joules"),
                Fault("field_unsupported", at_s=5, until_s=15, field="sm_activity_ratio"),
                Fault("field_unsupported", at_s=5, until_s=15, field="pcie_transmit_bytes"),
                Fault("field_unsupported", at_s=5, until_s=15, field="throttle_reasons")])
    registry = make_registry(ledger, "test")
    uuid = backend.devices()[0].uuid
    ids = {"gpu": "0", "uuid": uuid}

    def figures():
        return (value(registry, "wattledger_gpu_energy_joules_total", **ids),
                value(registry, "wattledger_gpu_busy_seconds_total", engine="sm", **ids),
                value(registry, "wattledger_gpu_utilization_ratio_count", engine="sm", **ids),
                value(registry, "wattledger_gpu_pcie_transmit_bytes_total", **ids),
                value(registry, "wattledger_gpu_throttle_seconds_total", reason="gpu_idle", **ids))

    run_ticks(sampler, clock, 4.9)
    before = figures()
    truth_before = backend.true_energy_joules(0)
    assert before[:3] != (None, None, None) and before[3] is not None
    run_ticks(sampler, clock, 0.6)  # lost for 0.5 s: within the grace, still exported
    assert figures()[0] is not None
    run_ticks(sampler, clock, 1.0)
    assert figures() == (None, None, None, None, None)  # absent, never a frozen value that rate() reads as 0
    lost = {s.labels["field"]: s.value for m in registry.collect() if m.name == "wattledger_gpu_field_lost"
            for s in m.samples}
    assert lost == {"energy_joules": 1.0, "sm_activity_ratio": 1.0, "pcie_transmit_bytes": 1.0,
                    "throttle_reasons": 1.0}
    assert value(registry, "wattledger_gpu_busy_seconds_total", engine="gpu", **ids) is not None  # others stay
    assert value(registry, "wattledger_gpu_unattributed_energy_joules_total", **ids) is None
    run_ticks(sampler, clock, 9.0)  # readable again from 15 s
    after = figures()
    assert all(a is not None and a >= b for a, b in zip(after, before) if b is not None)  # resumed, not reset
    assert lost_fields(registry) == []
    # The hardware counter kept counting while it could not be read: the total has all of it.
    assert after[0] - before[0] == pytest.approx(backend.true_energy_joules(0) - truth_before, rel=0.01)


def test_the_exported_figures_are_none_exactly_where_a_series_is_absent():
    clock, _, _, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 30, BURST),
        faults=[Fault("field_unsupported", at_s=2, field="pcie_transmit_bytes"),
                Fault("field_unsupported", at_s=2, field="sm_activity_ratio"),
                Fault("gpu_lost", at_s=5, until_s=8)])
    run_ticks(sampler, clock, 4.0)
    (gpu,) = ledger.snapshot().gpu_figures
    assert gpu.up and gpu.pcie_transmit_bytes is None and gpu.pcie_receive_bytes is not None  # a lost field
    assert "sm" not in gpu.busy_seconds and "sm" not in gpu.utilization_histograms and "gpu" in gpu.busy_seconds
    assert {"pcie_transmit_bytes", "sm_activity_ratio"} <= set(gpu.lost_fields)
    assert gpu.energy_joules is not None and gpu.unattributed_energy_joules is not None
    assert gpu.power_watts is not None and gpu.temperature_gpu_celsius is not None
    run_ticks(sampler, clock, 2.0)  # the GPU is lost: its gauges go, its counters stay
    (gpu,) = ledger.snapshot().gpu_figures
    assert not gpu.up and gpu.energy_joules is not None and "gpu" in gpu.busy_seconds
    assert (gpu.power_watts, gpu.sm_clock_hertz, gpu.temperature_gpu_celsius) == (None, None, None)
    assert gpu.throttle_reasons_active == () and gpu.mig_instances == ()


def lost_fields(registry) -> list[str]:
    return [s.labels["field"] for m in registry.collect() if m.name == "wattledger_gpu_field_lost" for s in m.samples]


def test_a_gpu_back_from_a_loss_loses_no_field_while_gpm_needs_its_second_sample():
    clock, _, backend, _, ledger, sampler = build(
        lambda origin: ScriptedTimeline(origin).add(0, 30, BURST),
        faults=[Fault("gpu_lost", at_s=5, until_s=8), Fault("field_unsupported", at_s=2, field="power_watts")])
    registry = make_registry(ledger, "test")
    ids = {"gpu": "0", "uuid": backend.devices()[0].uuid}
    run_ticks(sampler, clock, 8.0)  # the first sample after the loss: GPM ratios are None in it
    assert ledger.snapshot().gpus[0].last.sm_activity_ratio is None
    assert value(registry, "wattledger_gpu_busy_seconds_total", engine="sm", **ids) is not None
    assert lost_fields(registry) == ["power_watts"]  # lost before the loss, still lost
    run_ticks(sampler, clock, 2.0)
    assert lost_fields(registry) == ["power_watts"]
