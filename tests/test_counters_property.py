"""No exported ``_total`` ever decreases, whatever the hardware and the kernel report.

Hypothesis drives one ledger with arbitrary raw sequences for every counter it keeps: GPU energy, PCIe,
NVLink, ECC, the driver's throttle seconds, busy seconds and histograms (from arbitrary ratios), host CPU
(all cores and per core, cores going offline), RAPL, workload CPU, workload energy and active time,
unattributed energy. The sequences hold what real devices produce: increases, resets to zero, a tick
back, wraps, the device lost, fields missing, and readings that are negative, NaN, infinite or too large
for a float. After every sample the whole exposition is collected, and each counter and histogram series
must be at least what it was the last time it was exported. The identity workload energy + unattributed
== GPU energy must hold at every scrape too.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import HardwareCounter, KernelCounter, RebasingCounter
from wattledger.agent.ledger import Ledger
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.base import GpuInfo, GpuSample, HostSample, ProcessSample

ROOT_PID = os.getpid()  # the accounting API checks that a workload's process exists
CHILD_PID = 2**22 + 11  # a descendant: only ever seen through the host samples
GARBAGE = [math.nan, math.inf, -math.inf, -1.0, -1e-9, -5e12, 10**400, True]

# One raw reading: None (field not read this time), garbage, or a number of any size.
raw_reading = st.one_of(
    st.none(),
    st.sampled_from(GARBAGE),
    st.floats(min_value=0, max_value=1e15, allow_nan=False),
    st.integers(min_value=0, max_value=2**80),
)


@st.composite
def counter_walk(draw, length: int) -> list[object]:
    """A counter's raw readings: mostly increases, with resets, ticks back and arbitrary readings."""
    value: float = draw(st.floats(min_value=0, max_value=1e6))
    out: list[object] = []
    for _ in range(length):
        step = draw(st.sampled_from(["up", "up", "up", "same", "tick_back", "reset", "any"]))
        if step == "up":
            value += draw(st.floats(min_value=0, max_value=1e4))
        elif step == "tick_back":
            value = max(0.0, value - 0.01)
        elif step == "reset":
            value = draw(st.floats(min_value=0, max_value=10))
        elif step == "any":
            reading = draw(raw_reading)
            out.append(reading)
            continue
        out.append(value)
    return out


ratio = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                  st.floats(min_value=0, max_value=1))
reasons = st.one_of(st.none(), st.frozensets(st.sampled_from(["gpu_idle", "sw_power_cap", "hw_slowdown"])))
ENGINE_FIELDS = ("utilization_gpu_ratio", "utilization_memory_controller_ratio", "sm_activity_ratio",
                 "tensor_activity_ratio", "dram_activity_ratio")
COUNTER_FIELDS = ("energy_joules", "pcie_transmit_bytes", "pcie_receive_bytes", "nvlink_transmit_bytes",
                  "nvlink_receive_bytes", "ecc_corrected_errors", "ecc_uncorrected_errors")


@st.composite
def scenario(draw):
    n = draw(st.integers(min_value=2, max_value=40))
    walks = {name: draw(counter_walk(n)) for name in COUNTER_FIELDS}
    throttle_walks = {reason: draw(counter_walk(n)) for reason in ("sw_power_cap", "hw_slowdown")}
    host_walks = {name: draw(counter_walk(n)) for name in ("cpu", "core0", "core1", "core2", "rapl", "root", "child")}
    steps = []
    for i in range(n):
        steps.append(dict(
            dt_s=draw(st.sampled_from([0.1, 0.1, 0.1, 0.0, 2.5, -0.05])),  # 0 and < 0: stale samples
            up=draw(st.sampled_from([True, True, True, True, False])),
            ratios={name: draw(ratio) for name in ENGINE_FIELDS},
            reasons=draw(reasons),
            throttle={r: w[i] for r, w in throttle_walks.items() if w[i] is not None},
            throttle_present=draw(st.booleans()),
            counters={name: walks[name][i] for name in COUNTER_FIELDS},
            host={name: w[i] for name, w in host_walks.items()},
            online=draw(st.sets(st.sampled_from([0, 1, 2]))),
            workload=draw(st.sampled_from(["keep", "keep", "start_a", "stop_a", "start_b", "stop_b"])),
        ))
    return steps


def _gpu_sample(step: dict, now_ns: int) -> GpuSample:
    if not step["up"]:
        return GpuSample(0, "GPU-p", now_ns, up=False)
    return GpuSample(
        0, "GPU-p", now_ns,
        throttle_reasons=step["reasons"],
        throttle_seconds=step["throttle"] if step["throttle_present"] else None,
        **step["ratios"], **step["counters"],
    )


def _host_sample(step: dict, now_ns: int) -> HostSample:
    host = step["host"]
    cores = sorted(step["online"])
    return HostSample(
        now_ns,
        cpu_busy_seconds=host["cpu"],
        cpu_busy_seconds_per_core=tuple(host[f"core{c}"] for c in cores
                                        if host[f"core{c}"] is not None) or None,
        cpu_core_ids=tuple(c for c in cores if host[f"core{c}"] is not None) or None,
        rapl_energy_joules={"package-0": host["rapl"]} if host["rapl"] is not None else None,
        processes=tuple(
            ProcessSample(pid, 1, host[name], 0, 0, root_pid=ROOT_PID)
            for pid, name in ((ROOT_PID, "root"), (CHILD_PID, "child")) if host[name] is not None or pid == ROOT_PID
        ),
    )


def _change_workloads(acct: Accounting, op: str, running: set[str]) -> None:
    action, _, name = op.partition("_")
    if action == "start" and name not in running:
        acct.start(name, [0], pid=ROOT_PID if name == "a" else None)
        running.add(name)
    elif action == "stop" and name in running:
        acct.stop(name)
        running.discard(name)


def _exported_counters(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in registry.collect():
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith(("_total", "_bucket", "_count", "_sum")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _check_energy_identity(registry) -> None:
    gpu = registry.get_sample_value("wattledger_gpu_energy_joules_total", {"gpu": "0", "uuid": "GPU-p"})
    unattributed = registry.get_sample_value("wattledger_gpu_unattributed_energy_joules_total",
                                             {"gpu": "0", "uuid": "GPU-p"})
    workloads = sum(registry.get_sample_value("wattledger_workload_energy_joules_total",
                                              {"workload": name, "gpu": "0"}) or 0.0 for name in ("a", "b"))
    if gpu is None:
        assert unattributed is None
        return
    assert workloads + unattributed == pytest.approx(gpu, rel=1e-9, abs=1e-6)


@pytest.mark.slow  # 200 whole scenarios through the ledger and both renderers: about 20 s
@settings(max_examples=200, deadline=None)
@given(scenario())
def test_no_exported_total_ever_decreases(steps):
    clock = FakeClock()
    acct = Accounting([0], clock_ns=clock.ns)
    ledger = Ledger(acct, clock_ns=clock.ns)
    ledger.set_devices("stub", False, [GpuInfo(0, "GPU-p", "Stub GPU", "1.0", None, None)])
    registry = make_registry(ledger, "test")
    highest: dict[tuple[str, tuple], float] = {}
    running: set[str] = set()
    sample_ns = clock.ns()
    for step in steps:
        clock.advance(max(step["dt_s"], 0.0) + 0.001)
        _change_workloads(acct, step["workload"], running)
        sample_ns += round(step["dt_s"] * NS_PER_S)
        ledger.record_gpus([_gpu_sample(step, sample_ns)])
        ledger.record_host(_host_sample(step, sample_ns))
        for key, value in _exported_counters(registry).items():
            assert not math.isnan(value), key
            assert value >= highest.get(key, 0.0), f"{key} went down to {value} from {highest[key]}"
            highest[key] = value
        _check_energy_identity(registry)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([HardwareCounter, KernelCounter, RebasingCounter]), st.lists(raw_reading, max_size=50))
def test_every_counter_kind_only_grows_and_reports_what_it_added(kind, readings):
    counter = kind()
    totals = [counter.total]
    for raw in readings:
        before = counter.total
        increase = counter.update(raw)
        assert increase is None or increase >= 0
        assert counter.total == before + (increase or 0.0)
        totals.append(counter.total)
    assert totals == sorted(totals)
    assert all(math.isfinite(t) for t in totals)
