"""The ledger: turns samples into series that stay correct however Prometheus scrapes them.

Three kinds of series come out of it:

1. counters integrated at the sample rate: energy (from the hardware counter, kept monotonic across
   driver resets), busy seconds per engine (ratio x interval), PCIe/NVLink bytes and throttle seconds.
   ``rate()`` of any of them over any window is the exact mean over that window, however bursty the
   load and however rarely Prometheus scrapes;
2. a histogram per device and engine of per-sample utilization, so a 200 ms burst between two 15 s
   scrapes still shows (idle fraction, p99);
3. last-value gauges (power, memory, clocks, temperatures).

Workload energy and active time are attributed here too: each GPU sample's energy delta covers the
interval since the previous sample, and it is split among the workloads that ran on that GPU during
that interval (equally among concurrent ones), by the samples' own timestamps.

The sampler thread writes; scrapes call ``snapshot()``, which copies under the lock and returns plain
data, so a scrape never waits on hardware and never sees half an update.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wattledger.agent.accounting import Accounting
from wattledger.probes.base import ENGINES, GpuInfo, GpuSample, HostSample, ProbeStats

NS_PER_S = 1_000_000_000

# Upper bounds of the utilization histogram buckets (ratios). 0.0 is a bucket of its own so that the
# idle fraction is exact: idle samples are those with utilization == 0. The buckets are few on purpose:
# they are 60% of the exposition's lines (5 engines per GPU), and each line costs scrape time.
UTILIZATION_BUCKETS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)

_ENGINE_FIELDS = {
    "gpu": "utilization_gpu_ratio",
    "memory_controller": "utilization_memory_controller_ratio",
    "sm": "sm_activity_ratio",
    "tensor": "tensor_activity_ratio",
    "dram": "dram_activity_ratio",
}
assert tuple(_ENGINE_FIELDS) == ENGINES


class MonotonicCounter:
    """A hardware counter made safe to export: it never goes down.

    A reading below the previous one means the hardware counter restarted (a driver reload resets
    NVML's energy counter); the new reading is then what accrued since the restart.
    """

    __slots__ = ("total", "_previous")

    def __init__(self) -> None:
        self.total = 0.0
        self._previous: float | None = None

    def update(self, raw: float) -> float:
        """Feed a raw reading; returns the increase it represents."""
        previous, self._previous = self._previous, raw
        if previous is None:
            return 0.0
        delta = raw - previous if raw >= previous else raw
        self.total += delta
        return delta


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-export histogram of ratios."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(UTILIZATION_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(UTILIZATION_BUCKETS, value)
        if index < len(self.bucket_counts):
            self.bucket_counts[index] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs ending with +Inf, as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip(UTILIZATION_BUCKETS, self.bucket_counts):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out

    def copy(self) -> "Histogram":
        return Histogram(list(self.bucket_counts), self.count, self.total)


@dataclass(slots=True)
class GpuLedger:
    """Everything the ledger keeps for one GPU."""

    info: GpuInfo
    last: GpuSample | None = None  # newest sample with up=True
    up: bool = False
    previous_ns: int | None = None  # time of the previous up sample (integration start)
    energy: MonotonicCounter = field(default_factory=MonotonicCounter)
    pcie_transmit: MonotonicCounter = field(default_factory=MonotonicCounter)
    pcie_receive: MonotonicCounter = field(default_factory=MonotonicCounter)
    nvlink_transmit: MonotonicCounter = field(default_factory=MonotonicCounter)
    nvlink_receive: MonotonicCounter = field(default_factory=MonotonicCounter)
    ecc_corrected: MonotonicCounter = field(default_factory=MonotonicCounter)
    ecc_uncorrected: MonotonicCounter = field(default_factory=MonotonicCounter)
    hardware_throttle: dict[str, MonotonicCounter] = field(default_factory=dict)
    busy_seconds: dict[str, float] = field(default_factory=dict)
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    # Which series have ever had data: a counter is exported only once its source has been read.
    seen: set[str] = field(default_factory=set)

    def copy(self) -> "GpuLedger":
        return GpuLedger(
            info=self.info,
            last=self.last,
            up=self.up,
            previous_ns=self.previous_ns,
            energy=_copy_counter(self.energy),
            pcie_transmit=_copy_counter(self.pcie_transmit),
            pcie_receive=_copy_counter(self.pcie_receive),
            nvlink_transmit=_copy_counter(self.nvlink_transmit),
            nvlink_receive=_copy_counter(self.nvlink_receive),
            ecc_corrected=_copy_counter(self.ecc_corrected),
            ecc_uncorrected=_copy_counter(self.ecc_uncorrected),
            hardware_throttle={},
            busy_seconds=dict(self.busy_seconds),
            throttle_seconds=dict(self.throttle_seconds),
            histograms={k: h.copy() for k, h in self.histograms.items()},
            seen=set(self.seen),
        )


def _copy_counter(counter: MonotonicCounter) -> MonotonicCounter:
    out = MonotonicCounter()
    out.total = counter.total
    return out


@dataclass(slots=True)
class HostLedger:
    last: HostSample | None = None
    cpu_busy: MonotonicCounter = field(default_factory=MonotonicCounter)
    cpu_core_busy: dict[int, MonotonicCounter] = field(default_factory=dict)
    rapl: dict[str, MonotonicCounter] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkloadProcessFigures:
    """Host figures of one workload's processes (the registered process and its descendants)."""

    resident_bytes: int
    cpu_seconds: float
    locked_bytes: int
    pinned_bytes: int


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """A consistent copy of the ledger for one scrape or report."""

    backend: str | None
    simulated: bool
    gpus: list[GpuLedger]
    host: HostSample | None
    host_cpu_busy_seconds: float | None
    host_cpu_core_busy_seconds: dict[int, float]
    host_energy_joules: dict[str, float]
    workload_energy_joules: dict[tuple[str, int], float]
    workload_active_seconds: dict[tuple[str, int], float]
    workload_tokens: dict[tuple[str, str], int]
    workload_processes: dict[str, WorkloadProcessFigures]
    workload_gpu_memory_bytes: dict[tuple[str, int], int]
    probes: dict[str, ProbeStats]
    overruns: int
    sample_age_seconds: float | None
    xid_counts: dict[tuple[int, int], int]


class Ledger:
    """Keeps the integrated series. Written by the sampler thread, read by any number of scrapers."""

    def __init__(self, accounting: Accounting | None = None, clock_ns: Callable[[], int] = time.monotonic_ns):
        self._accounting = accounting
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._backend: str | None = None
        self._simulated = False
        self._gpus: dict[int, GpuLedger] = {}
        self._host = HostLedger()
        self._workload_energy: dict[tuple[str, int], float] = {}
        self._workload_active: dict[tuple[str, int], float] = {}
        self._workload_processes: dict[str, WorkloadProcessFigures] = {}
        self._workload_cpu: dict[str, tuple[float, dict[int, float]]] = {}  # exited-process base, live pids
        self._probes: dict[str, ProbeStats] = {}
        self._overruns = 0
        self._last_record_ns: int | None = None
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._records = 0

    # -- writes (sampler thread) ----------------------------------------------------------------

    def set_devices(self, backend: str | None, simulated: bool, infos: Sequence[GpuInfo]) -> None:
        with self._lock:
            self._backend = backend
            self._simulated = simulated
            self._gpus = {info.index: GpuLedger(info) for info in infos}

    def record_gpus(self, samples: Sequence[GpuSample]) -> None:
        with self._lock:
            for sample in samples:
                state = self._gpus.get(sample.index)
                if state is not None:
                    self._record_gpu(state, sample)
            self._last_record_ns = self._clock_ns()
            self._records += 1
            if self._accounting is not None and self._records % 100 == 0:
                oldest = min((g.previous_ns for g in self._gpus.values() if g.previous_ns), default=None)
                if oldest is not None:
                    self._accounting.forget_intervals_before(oldest)

    def _record_gpu(self, state: GpuLedger, sample: GpuSample) -> None:
        if not sample.up:
            # Integration restarts when the device returns: nothing is known about the gap.
            state.up = False
            state.previous_ns = None
            return
        previous_ns = state.previous_ns
        dt = (sample.monotonic_ns - previous_ns) / NS_PER_S if previous_ns is not None else None
        if dt is not None and dt <= 0:
            return  # a sample no newer than the last one carries nothing new
        state.up = True
        state.last = sample
        state.previous_ns = sample.monotonic_ns
        seen = state.seen

        energy_delta = None
        if sample.energy_joules is not None:
            seen.add("energy")
            energy_delta = state.energy.update(sample.energy_joules)
        for counter, raw, key in (
            (state.pcie_transmit, sample.pcie_transmit_bytes, "pcie_transmit"),
            (state.pcie_receive, sample.pcie_receive_bytes, "pcie_receive"),
            (state.nvlink_transmit, sample.nvlink_transmit_bytes, "nvlink_transmit"),
            (state.nvlink_receive, sample.nvlink_receive_bytes, "nvlink_receive"),
            (state.ecc_corrected, sample.ecc_corrected_errors, "ecc"),
            (state.ecc_uncorrected, sample.ecc_uncorrected_errors, "ecc"),
        ):
            if raw is not None:
                seen.add(key)
                counter.update(raw)

        for engine, attribute in _ENGINE_FIELDS.items():
            ratio = getattr(sample, attribute)
            if ratio is None:
                continue
            histogram = state.histograms.get(engine)
            if histogram is None:
                histogram = state.histograms[engine] = Histogram()
                state.busy_seconds[engine] = 0.0
            histogram.observe(ratio)
            if dt is not None:
                # The ratio describes the interval that just ended: integrate it over that interval.
                state.busy_seconds[engine] += ratio * dt

        hardware = sample.throttle_seconds or {}
        for reason, seconds in hardware.items():
            counter = state.hardware_throttle.setdefault(reason, MonotonicCounter())
            counter.update(seconds)
            state.throttle_seconds[reason] = counter.total
        if sample.throttle_reasons is not None:
            for reason in sample.throttle_reasons:
                state.throttle_seconds.setdefault(reason, 0.0)
                if reason not in hardware and dt is not None:
                    state.throttle_seconds[reason] += dt

        if energy_delta is not None and previous_ns is not None and self._accounting is not None:
            self._attribute(state.info.index, previous_ns, sample.monotonic_ns, energy_delta)

    def _attribute(self, gpu: int, start_ns: int, end_ns: int, energy_joules: float) -> None:
        """Split one interval's energy among the workloads that held the GPU during it."""
        stretches = self._accounting.running_on(gpu, start_ns, end_ns)
        if not stretches:
            return
        span_ns = end_ns - start_ns
        for name, lo, hi in stretches:
            key = (name, gpu)
            self._workload_active[key] = self._workload_active.get(key, 0.0) + (hi - lo) / NS_PER_S
        if len(stretches) == 1:
            name, lo, hi = stretches[0]
            key = (name, gpu)
            self._workload_energy[key] = self._workload_energy.get(key, 0.0) + energy_joules * (hi - lo) / span_ns
            return
        edges = sorted({t for _, lo, hi in stretches for t in (lo, hi)})
        for lo, hi in zip(edges, edges[1:]):
            holders = [name for name, s, e in stretches if s <= lo and e >= hi]
            if holders:
                share = energy_joules * (hi - lo) / span_ns / len(holders)
                for name in holders:
                    key = (name, gpu)
                    self._workload_energy[key] = self._workload_energy.get(key, 0.0) + share

    def record_host(self, sample: HostSample) -> None:
        pids = self._accounting.pids() if self._accounting is not None else {}
        workload_of = {pid: name for name, pid in pids.items()}
        figures: dict[str, list[float]] = {}
        live_cpu: dict[str, dict[int, float]] = {}
        for process in sample.processes:
            name = workload_of.get(process.root_pid if process.root_pid is not None else process.pid)
            if name is None:
                continue
            acc = figures.setdefault(name, [0, 0.0, 0, 0])
            acc[0] += process.rss_bytes or 0
            acc[2] += process.locked_bytes or 0
            acc[3] += process.pinned_bytes or 0
            if process.cpu_seconds is not None:
                live_cpu.setdefault(name, {})[process.pid] = process.cpu_seconds
        with self._lock:
            # CPU time stays a counter when a child process exits: its last reading moves into the base.
            for name in set(self._workload_cpu) | set(live_cpu):
                base, previous = self._workload_cpu.get(name, (0.0, {}))
                current = live_cpu.get(name, {})
                base += sum(seconds for pid, seconds in previous.items() if pid not in current)
                self._workload_cpu[name] = (base, current)
                if name in figures:
                    figures[name][1] = base + sum(current.values())
            host = self._host
            host.last = sample
            if sample.cpu_busy_seconds is not None:
                host.cpu_busy.update(sample.cpu_busy_seconds)
            for core, seconds in enumerate(sample.cpu_busy_seconds_per_core or ()):
                host.cpu_core_busy.setdefault(core, MonotonicCounter()).update(seconds)
            for zone, joules in (sample.rapl_energy_joules or {}).items():
                host.rapl.setdefault(zone, MonotonicCounter()).update(joules)
            self._workload_processes = {
                name: WorkloadProcessFigures(int(a[0]), float(a[1]), int(a[2]), int(a[3]))
                for name, a in figures.items()
            }
            self._last_record_ns = self._clock_ns()

    def record_probe(self, name: str, success: bool, duration_seconds: float, error: str | None = None) -> None:
        with self._lock:
            stats = self._probes.setdefault(name, ProbeStats())
            stats.success = success
            stats.duration_seconds = duration_seconds
            if not success:
                stats.failures_total += 1
                stats.last_error = error

    def record_overrun(self) -> None:
        with self._lock:
            self._overruns += 1

    def record_xids(self, counts: dict[tuple[int, int], int]) -> None:
        with self._lock:
            self._xid_counts = dict(counts)

    # -- reads (any thread) ---------------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        tokens = self._accounting.tokens() if self._accounting is not None else {}
        pids = self._accounting.pids() if self._accounting is not None else {}
        with self._lock:
            gpus = [g.copy() for _, g in sorted(self._gpus.items())]
            host = self._host
            workload_gpu_memory: dict[tuple[str, int], int] = {}
            workload_of = {pid: name for name, pid in pids.items()}
            process_roots = {
                p.pid: (p.root_pid if p.root_pid is not None else p.pid)
                for p in (host.last.processes if host.last else ())
            }
            for gpu in gpus:
                for process in (gpu.last.processes or ()) if gpu.last else ():
                    name = workload_of.get(process_roots.get(process.pid, process.pid))
                    if name is not None and process.memory_used_bytes is not None:
                        key = (name, gpu.info.index)
                        workload_gpu_memory[key] = workload_gpu_memory.get(key, 0) + process.memory_used_bytes
            age = None
            if self._last_record_ns is not None:
                age = max(0.0, (self._clock_ns() - self._last_record_ns) / NS_PER_S)
            return LedgerSnapshot(
                backend=self._backend,
                simulated=self._simulated,
                gpus=gpus,
                host=host.last,
                host_cpu_busy_seconds=host.cpu_busy.total if host.last and host.last.cpu_busy_seconds is not None else None,
                host_cpu_core_busy_seconds={c: m.total for c, m in host.cpu_core_busy.items()},
                host_energy_joules={z: m.total for z, m in host.rapl.items()},
                workload_energy_joules=dict(self._workload_energy),
                workload_active_seconds=dict(self._workload_active),
                workload_tokens=tokens,
                workload_processes=dict(self._workload_processes),
                workload_gpu_memory_bytes=workload_gpu_memory,
                probes={k: ProbeStats(v.success, v.duration_seconds, v.failures_total, v.last_error)
                        for k, v in self._probes.items()},
                overruns=self._overruns,
                sample_age_seconds=age,
                xid_counts=dict(self._xid_counts),
            )
