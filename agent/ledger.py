"""The ledger: turns samples into series that stay correct however Prometheus scrapes them.

Three kinds of series come out of it:

1. counters integrated at the sample rate: energy (from the hardware counter, kept monotonic across
   driver resets), busy seconds per engine (ratio x interval), PCIe/NVLink bytes and throttle seconds.
   ``rate()`` of any of them over any window is the exact mean over that window, however bursty the
   load and however rarely Prometheus scrapes;
2. a histogram per device and engine of per-sample utilization, so a 200 ms burst between two 15 s
   scrapes still shows (idle fraction, p99);
3. last-value gauges (power, memory, clocks, temperatures).

No exported total ever goes down. Raw counters come in three kinds, each with its own rule for a
reading below the previous one (see :class:`HardwareCounter`, :class:`KernelCounter`,
:class:`RebasingCounter`); readings that are not finite numbers >= 0 are ignored.

A field that stops being readable (unsupported after a driver change, or failing) takes its counters
and histograms out of the exposition once it has been unreadable for ``FIELD_LOST_AFTER_NS``:
absent, never frozen, so ``rate()`` never shows 0 W or 0% busy for a GPU that works. The snapshot
lists such fields (``GpuLedger.lost_fields``). When the field returns, its series resume from the
total they had: nothing is reset, and an energy counter adds what the hardware counted meanwhile.

Workload energy and active time are attributed here too: each GPU energy reading's increase covers
the interval since the previous energy reading, and it is split among the workloads that ran on that
GPU during that interval (equally among concurrent ones), by the samples' own timestamps. An interval
that spans a gap (the device lost, or its energy unreadable) has no power profile, so its energy goes
only to workloads that held the GPU through the whole gap. Whatever no workload gets is counted as the
GPU's unattributed energy, so that for every GPU, at every scrape,
``sum(workload energy) + unattributed energy == GPU energy``.

The sampler thread writes; scrapes call ``snapshot()``, which copies under the lock and returns plain
data, so a scrape never waits on hardware and never sees half an update.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from wattledger.agent.accounting import Accounting, time_shares
from wattledger.probes.base import ENGINES, GpuInfo, GpuSample, HostSample, ProbeStats

NS_PER_S = 1_000_000_000

# A field unreadable for longer than this, in the device's own sample time, counts as lost. The grace
# keeps one-sample gaps (NVML's NoData, GPM's first sample after a device returns) from making series
# flap in and out of the exposition.
FIELD_LOST_AFTER_NS = NS_PER_S

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

# Counter series (the keys of GpuLedger.seen) and the GpuSample fields each is read from.
_COUNTER_SOURCES: dict[str, tuple[str, ...]] = {
    "energy": ("energy_joules",),
    "pcie_transmit": ("pcie_transmit_bytes",),
    "pcie_receive": ("pcie_receive_bytes",),
    "nvlink_transmit": ("nvlink_transmit_bytes",),
    "nvlink_receive": ("nvlink_receive_bytes",),
    "ecc": ("ecc_corrected_errors", "ecc_uncorrected_errors"),
}

# Gauge fields watched only so that wattledger_gpu_field_lost can name them (the exporter already
# leaves a gauge out when its field is None).
_GAUGE_FIELDS: tuple[str, ...] = (
    "power_watts", "power_average_watts", "power_limit_watts", "memory_used_bytes", "memory_total_bytes",
    "memory_reserved_bytes", "sm_occupancy_ratio", "sm_clock_hertz", "memory_clock_hertz",
    "temperature_gpu_celsius", "temperature_memory_celsius",
)

_ENGINE_ATTRIBUTES: tuple[str, ...] = tuple(_ENGINE_FIELDS.values())
# Counters read from one field each, besides energy (whose increase the accounting needs):
# (series key in GpuLedger.seen, GpuSample field, GpuLedger counter).
_FIELD_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("pcie_transmit", "pcie_transmit_bytes", "pcie_transmit"),
    ("pcie_receive", "pcie_receive_bytes", "pcie_receive"),
    ("nvlink_transmit", "nvlink_transmit_bytes", "nvlink_transmit"),
    ("nvlink_receive", "nvlink_receive_bytes", "nvlink_receive"),
    ("ecc", "ecc_corrected_errors", "ecc_corrected"),
    ("ecc", "ecc_uncorrected_errors", "ecc_uncorrected"),
)
_FIELD_COUNTER_KEYS = tuple((key, name) for key, name, _ in _FIELD_COUNTERS)
assert {key for key, _, _ in _FIELD_COUNTERS} | {"energy"} == set(_COUNTER_SOURCES)
assert all(name in _COUNTER_SOURCES[key] for key, name, _ in _FIELD_COUNTERS)


# The per-sample loops read a sample's fields in groups, each through a function that spells the
# attributes out: an attribute written in the code is read by CPython's specialised slot access, several
# times faster than getattr(sample, name) or operator.attrgetter, which look each name up. Each
# function's order is its name tuple's (tests/test_tick_fast_paths.py checks them against attrgetter).

def _engine_values(s: GpuSample) -> tuple:
    """The sample's ``_ENGINE_ATTRIBUTES``, in that order."""
    return (s.utilization_gpu_ratio, s.utilization_memory_controller_ratio, s.sm_activity_ratio,
            s.tensor_activity_ratio, s.dram_activity_ratio)


def _gauge_values(s: GpuSample) -> tuple:
    """The sample's ``_GAUGE_FIELDS``, in that order."""
    return (s.power_watts, s.power_average_watts, s.power_limit_watts, s.memory_used_bytes,
            s.memory_total_bytes, s.memory_reserved_bytes, s.sm_occupancy_ratio, s.sm_clock_hertz,
            s.memory_clock_hertz, s.temperature_gpu_celsius, s.temperature_memory_celsius)


def _field_counter_values(s: GpuSample) -> tuple:
    """The sample's readings of the ``_FIELD_COUNTERS`` (their second items), in that order."""
    return (s.pcie_transmit_bytes, s.pcie_receive_bytes, s.nvlink_transmit_bytes, s.nvlink_receive_bytes,
            s.ecc_corrected_errors, s.ecc_uncorrected_errors)


def _field_counters(g: "GpuLedger") -> tuple:
    """The GPU's counters of the ``_FIELD_COUNTERS`` (their third items), in that order."""
    return (g.pcie_transmit, g.pcie_receive, g.nvlink_transmit, g.nvlink_receive, g.ecc_corrected,
            g.ecc_uncorrected)


_INF = math.inf
_LARGEST_FLOAT_INT = int(sys.float_info.max)


def _reading(raw: object) -> float | None:
    """A raw counter reading as a float, or None when it cannot be one (not a finite number >= 0).

    A driver that returns garbage (NaN, a negative value, an integer past float range) must not move an
    exported total, in either direction. (Exact type checks first: this runs for every counter of every
    sample, and bool, a subclass of int, is no reading.)"""
    kind = type(raw)
    if kind is float:
        return raw if 0.0 <= raw < math.inf else None  # False for NaN too
    if kind is int:
        return float(raw) if 0 <= raw <= _LARGEST_FLOAT_INT else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return _reading(float(raw)) if isinstance(raw, float) or raw <= _LARGEST_FLOAT_INT else None


def _ratio(raw: object) -> float | None:
    """A utilization ratio clamped to [0, 1], or None when it is not a finite number."""
    if type(raw) is float and 0.0 <= raw <= 1.0:
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return min(1.0, max(0.0, float(raw)))


class HardwareCounter:
    """A device's own counter made safe to export: its total never goes down.

    For counters that restart from zero when the driver reloads or the device resets: NVML energy
    (millijoules since driver load), PCIe and NVLink bytes, volatile ECC counts, throttle time. A reading
    below the previous one is such a restart, and the reading itself is what accrued since. Readings that
    are not finite numbers >= 0 are ignored. ``total`` starts at 0 with the first reading (same units as
    the readings).
    """

    __slots__ = ("total", "_previous")

    def __init__(self) -> None:
        self.total = 0.0
        self._previous: float | None = None

    def update(self, raw: object) -> float | None:
        """Feed a raw reading; returns the increase it represents (>= 0), or None when it was ignored."""
        # _reading's answer for the common cases, without the call (the comparisons are False for NaN).
        kind = type(raw)
        if kind is float and 0.0 <= raw < _INF:
            value = raw
        elif kind is int and 0 <= raw <= _LARGEST_FLOAT_INT:
            value = float(raw)
        else:
            value = _reading(raw)
            if value is None:
                return None
        previous = self._previous
        if previous is None:
            self._previous = value
            return 0.0
        if value >= previous:
            increase, self._previous = value - previous, value
        else:
            increase, self._previous = self._on_decrease(previous, value)
        self.total += increase
        return increase

    @staticmethod
    def _on_decrease(previous: float, value: float) -> tuple[float, float]:
        """``(increase, new previous)`` for a reading below ``previous``: here, a restart from zero."""
        return value, value

    def copy(self) -> "HardwareCounter":
        out = type(self)()
        out.total, out._previous = self.total, self._previous
        return out


class KernelCounter(HardwareCounter):
    """A kernel counter that only resets at boot: /proc/stat CPU time, /proc/PID/stat utime + stime.

    Some hypervisors make ``steal`` or ``iowait`` (and so sums over columns) step back a tick. Such a
    decrease is not a reset: the previous value is held, and the counter moves again only once the
    readings pass it, as node_exporter does for its CPU counters.
    """

    __slots__ = ()

    @staticmethod
    def _on_decrease(previous: float, value: float) -> tuple[float, float]:
        return 0.0, previous


class RebasingCounter(HardwareCounter):
    """A total a probe keeps itself, from an arbitrary origin: RAPL energy, already unwrapped by
    ``probes/rapl.py``. It only goes down when the probe restarts and starts again from the raw register,
    so a decrease tells nothing about the energy since: count nothing and continue from the new value."""

    __slots__ = ()

    @staticmethod
    def _on_decrease(previous: float, value: float) -> tuple[float, float]:
        return 0.0, value


# The name this class had before counters came in kinds; token_sources and older tests use it.
MonotonicCounter = HardwareCounter


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-export histogram of ratios."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(UTILIZATION_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        """Count one ratio; the caller clamps it to [0, 1] (see ``_ratio``), so the sum never goes down."""
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
    """Everything the ledger keeps for one GPU (or, in a snapshot, what is exported of it)."""

    info: GpuInfo
    last: GpuSample | None = None  # newest sample with up=True
    up: bool = False
    previous_ns: int | None = None  # time of the previous up sample (integration start)
    energy: HardwareCounter = field(default_factory=HardwareCounter)
    pcie_transmit: HardwareCounter = field(default_factory=HardwareCounter)
    pcie_receive: HardwareCounter = field(default_factory=HardwareCounter)
    nvlink_transmit: HardwareCounter = field(default_factory=HardwareCounter)
    nvlink_receive: HardwareCounter = field(default_factory=HardwareCounter)
    ecc_corrected: HardwareCounter = field(default_factory=HardwareCounter)
    ecc_uncorrected: HardwareCounter = field(default_factory=HardwareCounter)
    hardware_throttle: dict[str, HardwareCounter] = field(default_factory=dict)
    busy_seconds: dict[str, float] = field(default_factory=dict)
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    # Counter series that have had data (keys of _COUNTER_SOURCES). In a snapshot: those exported now,
    # i.e. whose fields are still read (a counter is exported only once its source has been read).
    seen: set[str] = field(default_factory=set)
    # GpuSample field name (or "throttle_seconds.<reason>") -> sample time it was last read, in ns
    # (live ledger only: a snapshot has lost_fields instead).
    read_at_ns: dict[str, int] = field(default_factory=dict)
    # Fields once read and now unreadable for longer than FIELD_LOST_AFTER_NS (filled in snapshots).
    lost_fields: tuple[str, ...] = ()
    # Energy of this GPU's counter charged to no workload, in joules (see the module docstring).
    unattributed_energy_joules: float = 0.0
    energy_since_ns: int | None = None  # time of the newest accepted energy reading (kept across a loss)
    active_since_ns: int | None = None  # up to when workload active time has been counted

    def readable_fields(self) -> set[str]:
        """Fields read within FIELD_LOST_AFTER_NS of the newest up sample (all others once read are lost)."""
        if self.last is None:
            return set()
        cutoff_ns = self.last.monotonic_ns - FIELD_LOST_AFTER_NS
        return {name for name, read_ns in self.read_at_ns.items() if read_ns >= cutoff_ns}

    def copy(self) -> "GpuLedger":
        """A snapshot: only the series whose sources are still read, and the fields that are lost."""
        readable = self.readable_fields()
        engines = [e for e in self.histograms if _ENGINE_FIELDS[e] in readable]
        # A reason's seconds come from the driver's counter where it has one, else from integrating the
        # active-reasons bitmask: either source keeps its series alive.
        reasons_read = "throttle_reasons" in readable
        return GpuLedger(
            info=self.info,
            last=self.last,
            up=self.up,
            previous_ns=self.previous_ns,
            energy=self.energy.copy(),
            pcie_transmit=self.pcie_transmit.copy(),
            pcie_receive=self.pcie_receive.copy(),
            nvlink_transmit=self.nvlink_transmit.copy(),
            nvlink_receive=self.nvlink_receive.copy(),
            ecc_corrected=self.ecc_corrected.copy(),
            ecc_uncorrected=self.ecc_uncorrected.copy(),
            hardware_throttle={},
            busy_seconds={e: self.busy_seconds[e] for e in engines},
            throttle_seconds={r: seconds for r, seconds in self.throttle_seconds.items()
                              if reasons_read or "throttle_seconds." + r in readable},
            histograms={e: self.histograms[e].copy() for e in engines},
            seen={key for key in self.seen if readable.issuperset(_COUNTER_SOURCES[key])},
            lost_fields=tuple(sorted(self.read_at_ns.keys() - readable)),
            unattributed_energy_joules=self.unattributed_energy_joules,
            energy_since_ns=self.energy_since_ns,
            active_since_ns=self.active_since_ns,
        )


@dataclass(slots=True)
class HostLedger:
    last: HostSample | None = None
    cpu_busy: KernelCounter = field(default_factory=KernelCounter)
    cpu_busy_read: bool = False  # the newest sample's reading was accepted
    cpu_core_busy: dict[int, KernelCounter] = field(default_factory=dict)
    cores_read: frozenset[int] = frozenset()  # online cores in the newest sample
    rapl: dict[str, RebasingCounter] = field(default_factory=dict)
    zones_read: frozenset[str] = frozenset()  # RAPL zones readable in the newest sample


def _core_ids(sample: HostSample) -> Iterable[int]:
    """Core numbers of ``cpu_busy_seconds_per_core``: the probe's own where it gives them (an offline
    core leaves a hole, and positions would shift the next cores onto its counter), else positions."""
    per_core = sample.cpu_busy_seconds_per_core or ()
    ids = getattr(sample, "cpu_core_ids", None)
    if ids is not None and len(ids) == len(per_core) and len(set(ids)) == len(ids):
        return ids
    return range(len(per_core))


def _held_throughout(stretches: list[tuple[str, int, int]], start_ns: int, end_ns: int) -> list[str]:
    """Workloads whose stretches (clipped to [start_ns, end_ns)) cover all of it, in name order."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, lo, hi in stretches:
        by_name.setdefault(name, []).append((lo, hi))
    holders = []
    for name, spans in sorted(by_name.items()):
        reach = start_ns
        for lo, hi in sorted(spans):
            if lo > reach:
                break
            reach = max(reach, hi)
        if reach >= end_ns:
            holders.append(name)
    return holders


def _time_shares(stretches: list[tuple[str, int, int]]) -> tuple[dict[str, float], int]:
    """``({workload: ns weight}, covered ns)``: each stretch of time split equally among its holders.

    A workload's share of the interval's energy is its weight over the interval's length; time that no
    workload held (``covered`` < the length) is the unattributed part."""
    return time_shares(stretches)  # one O(n log n) sweep: a tick stays cheap with many workloads


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
    # Unexpected backend read errors, each logged once and then only counted: (gpu or None, probe, error) -> n.
    backend_error_counts: dict[tuple[int | None, str, str], int] = field(default_factory=dict)


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
        # Per workload: (CPU seconds so far, {live pid: highest CPU seconds read}).
        self._workload_cpu: dict[str, tuple[float, dict[int, float]]] = {}
        self._probes: dict[str, ProbeStats] = {}
        self._overruns = 0
        self._last_record_ns: int | None = None
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._backend_error_counts: dict[tuple[int | None, str, str], int] = {}
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
                # Run stretches are needed back to the oldest interval still to be charged: a GPU that is
                # lost (or whose energy is unreadable) keeps its interval open across the gap.
                cursors = [t for g in self._gpus.values() for t in (g.energy_since_ns, g.active_since_ns)
                           if t is not None]
                if cursors:
                    self._accounting.forget_intervals_before(min(cursors))

    def _record_gpu(self, state: GpuLedger, sample: GpuSample) -> None:
        if not sample.up:
            # Busy-time integration restarts when the device returns: no ratio is known for the gap. The
            # energy counter and workload time keep their cursors: the gap is charged when it returns.
            state.up = False
            state.previous_ns = None
            return
        now_ns = sample.monotonic_ns
        if state.last is not None and now_ns <= state.last.monotonic_ns:
            return  # a sample no newer than the last one carries nothing new
        previous_ns = state.previous_ns
        read_at = state.read_at_ns
        if previous_ns is None and state.last is not None:
            # Back from a loss: the grace before a field counts as lost starts again now, so a field that
            # needs two samples (GPM) does not flap out of the exposition. Fields lost before stay lost.
            for name in state.readable_fields():
                read_at[name] = now_ns
        dt = (now_ns - previous_ns) / NS_PER_S if previous_ns is not None else None
        state.up = True
        state.last = sample
        state.previous_ns = now_ns

        seen = state.seen
        energy_increase = state.energy.update(sample.energy_joules) if sample.energy_joules is not None else None
        if energy_increase is not None:
            read_at["energy_joules"] = now_ns
            seen.add("energy")
        for (key, name), counter, raw in zip(_FIELD_COUNTER_KEYS, _field_counters(state),
                                             _field_counter_values(sample)):
            if raw is not None and counter.update(raw) is not None:
                read_at[name] = now_ns
                seen.add(key)
        for name, value in zip(_GAUGE_FIELDS, _gauge_values(sample)):
            if value is not None:
                read_at[name] = now_ns

        self._record_engines(state, sample, dt)
        self._record_throttle(state, sample, dt)
        self._account(state, previous_ns, now_ns, energy_increase)

    @staticmethod
    def _record_engines(state: GpuLedger, sample: GpuSample, dt: float | None) -> None:
        now_ns = sample.monotonic_ns
        read_at, histograms, busy_seconds = state.read_at_ns, state.histograms, state.busy_seconds
        for engine, attribute, raw in zip(ENGINES, _ENGINE_ATTRIBUTES, _engine_values(sample)):
            if raw is None:  # not read this time (what _ratio says of None)
                continue
            # _ratio's answer for the common case, a float in [0, 1], without the call.
            ratio = raw if type(raw) is float and 0.0 <= raw <= 1.0 else _ratio(raw)
            if ratio is None:
                continue
            read_at[attribute] = now_ns
            histogram = histograms.get(engine)
            if histogram is None:
                histogram = histograms[engine] = Histogram()
                busy_seconds[engine] = 0.0
            # Histogram.observe, inlined: five per sample.
            index = bisect_left(UTILIZATION_BUCKETS, ratio)
            counts = histogram.bucket_counts
            if index < len(counts):
                counts[index] += 1
            histogram.count += 1
            histogram.total += ratio
            if dt is not None:
                # The ratio describes the interval that just ended: integrate it over that interval.
                busy_seconds[engine] += ratio * dt

    @staticmethod
    def _record_throttle(state: GpuLedger, sample: GpuSample, dt: float | None) -> None:
        """Throttle seconds per reason: the driver's own counter where it has one, else integrated from
        the active reasons. Both add increases to one total, so switching source never lowers it."""
        now_ns = sample.monotonic_ns
        read_at, totals = state.read_at_ns, state.throttle_seconds
        hardware: dict[str, float] = {}
        if sample.throttle_seconds:
            driver_counters = state.hardware_throttle
            for reason, seconds in sample.throttle_seconds.items():
                counter = driver_counters.get(reason)
                if counter is None:  # (not setdefault: that would build a counter per sample)
                    counter = driver_counters[reason] = HardwareCounter()
                increase = counter.update(seconds)
                if increase is not None:
                    hardware[reason] = increase
                    read_at["throttle_seconds." + reason] = now_ns
                    totals[reason] = totals.get(reason, 0.0) + increase
        if sample.throttle_reasons is not None:
            read_at["throttle_reasons"] = now_ns
            for reason in sample.throttle_reasons:
                totals.setdefault(reason, 0.0)
                if reason not in hardware and dt is not None:
                    totals[reason] += dt

    def _account(self, state: GpuLedger, previous_ns: int | None, now_ns: int, energy_increase: float | None) -> None:
        """Charges workload active time up to ``now_ns``, and the energy increase over the interval since
        the previous energy reading; energy no workload gets is the GPU's unattributed energy."""
        gpu = state.info.index
        active_since, state.active_since_ns = state.active_since_ns, now_ns
        stretches: list[tuple[str, int, int]] = []
        if self._accounting is not None and active_since is not None:
            stretches = self._accounting.running_on(gpu, active_since, now_ns)
            for name, lo, hi in stretches:
                key = (name, gpu)
                self._workload_active[key] = self._workload_active.get(key, 0.0) + (hi - lo) / NS_PER_S
        if energy_increase is None:
            return  # no energy reading this sample: the next one covers this interval too
        energy_since, state.energy_since_ns = state.energy_since_ns, now_ns
        if energy_since is None:
            return  # the first reading is the counter's baseline
        if self._accounting is not None and energy_since != active_since:
            stretches = self._accounting.running_on(gpu, energy_since, now_ns)
        # Consecutive up samples, each with energy: power was known at the sample rate, so time shares
        # are fair. Otherwise the interval spans a gap whose power profile nobody knows.
        observed = previous_ns is not None and energy_since == previous_ns
        unattributed = self._charge(gpu, energy_since, now_ns, energy_increase, stretches, observed)
        state.unattributed_energy_joules += unattributed

    def _charge(self, gpu: int, start_ns: int, end_ns: int, energy_joules: float,
                stretches: list[tuple[str, int, int]], observed: bool) -> float:
        """Adds one interval's energy to its workloads; returns the part no workload got (joules, >= 0)."""
        if not stretches or energy_joules == 0.0:
            return energy_joules
        if not observed:
            holders = _held_throughout(stretches, start_ns, end_ns)
            for name in holders:
                key = (name, gpu)
                self._workload_energy[key] = self._workload_energy.get(key, 0.0) + energy_joules / len(holders)
            return 0.0 if holders else energy_joules
        span_ns = end_ns - start_ns
        weights, covered_ns = _time_shares(stretches)
        for name, weight_ns in weights.items():
            key = (name, gpu)
            self._workload_energy[key] = self._workload_energy.get(key, 0.0) + energy_joules * weight_ns / span_ns
        return energy_joules * max(0, span_ns - covered_ns) / span_ns

    def record_host(self, sample: HostSample) -> None:
        pids = self._accounting.pids() if self._accounting is not None else {}
        workload_of = {pid: name for name, pid in pids.items()}
        figures: dict[str, list[float]] = {}
        live_cpu: dict[str, dict[int, float | None]] = {}
        for process in sample.processes:
            name = workload_of.get(process.root_pid if process.root_pid is not None else process.pid)
            if name is None:
                continue
            acc = figures.setdefault(name, [0, 0.0, 0, 0])
            acc[0] += process.rss_bytes or 0
            acc[2] += process.locked_bytes or 0
            acc[3] += process.pinned_bytes or 0
            live_cpu.setdefault(name, {})[process.pid] = _reading(process.cpu_seconds)
        with self._lock:
            for name in set(self._workload_cpu) | set(live_cpu):
                total = self._workload_cpu_total(name, live_cpu.get(name, {}))
                if name in figures:
                    figures[name][1] = total
            self._record_host_counters(sample)
            self._workload_processes = {
                name: WorkloadProcessFigures(int(a[0]), float(a[1]), int(a[2]), int(a[3]))
                for name, a in figures.items()
            }
            self._last_record_ns = self._clock_ns()

    def _workload_cpu_total(self, name: str, readings: dict[int, float | None]) -> float:
        """A workload's CPU seconds, kept a counter by adding increases only: each live process adds what
        its reading grew by (a kernel counter, held on a decrease and while unreadable), a new process its
        whole reading, and one that exited nothing more. (Re-summing the readings instead could lose an
        ulp when a process exits.)"""
        total, held = self._workload_cpu.get(name, (0.0, {}))
        current: dict[int, float] = {}
        for pid, seconds in readings.items():
            previous = held.get(pid)
            if seconds is None or (previous is not None and seconds <= previous):
                if previous is not None:
                    current[pid] = previous
                continue
            total += seconds - (previous or 0.0)
            current[pid] = seconds
        self._workload_cpu[name] = (total, current)
        return total

    def _record_host_counters(self, sample: HostSample) -> None:
        host = self._host
        host.last = sample
        host.cpu_busy_read = (
            sample.cpu_busy_seconds is not None and host.cpu_busy.update(sample.cpu_busy_seconds) is not None)
        cores_read = set()
        for core, seconds in zip(_core_ids(sample), sample.cpu_busy_seconds_per_core or ()):
            if host.cpu_core_busy.setdefault(core, KernelCounter()).update(seconds) is not None:
                cores_read.add(core)
        host.cores_read = frozenset(cores_read)  # an offline core's series is absent until it returns
        zones_read = set()
        for zone, joules in (sample.rapl_energy_joules or {}).items():
            if host.rapl.setdefault(zone, RebasingCounter()).update(joules) is not None:
                zones_read.add(zone)
        host.zones_read = frozenset(zones_read)

    def record_probe(self, name: str, success: bool, duration_seconds: float, error: str | None = None) -> None:
        with self._lock:
            stats = self._probes.setdefault(name, ProbeStats())
            stats.success = success
            stats.duration_seconds = duration_seconds
            if not success:
                stats.failures_total += 1
                stats.last_error = error

    def forget_workload(self, name: str) -> None:
        """Drop a forgotten workload's series (energy, active time, process figures): an accounting
        forget listener. Its energy leaves the exposition with it; Prometheus keeps what it scraped."""
        with self._lock:
            for series in (self._workload_energy, self._workload_active):
                for key in [key for key in series if key[0] == name]:
                    del series[key]
            self._workload_processes.pop(name, None)
            self._workload_cpu.pop(name, None)

    def record_overrun(self) -> None:
        with self._lock:
            self._overruns += 1

    def record_xids(self, counts: dict[tuple[int, int], int]) -> None:
        with self._lock:
            self._xid_counts = dict(counts)

    def record_backend_errors(self, counts: dict[tuple[int | None, str, str], int]) -> None:
        """The backend's own cumulative counts of unexpected read errors (they only grow)."""
        with self._lock:
            self._backend_error_counts = dict(counts)

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
            # Workload energy on a GPU whose energy counter is lost would be frozen: absent instead.
            energy_gpus = {g.info.index for g in gpus if "energy" in g.seen}
            age = None
            if self._last_record_ns is not None:
                age = max(0.0, (self._clock_ns() - self._last_record_ns) / NS_PER_S)
            return LedgerSnapshot(
                backend=self._backend,
                simulated=self._simulated,
                gpus=gpus,
                host=host.last,
                host_cpu_busy_seconds=host.cpu_busy.total if host.cpu_busy_read else None,
                host_cpu_core_busy_seconds={c: m.total for c, m in host.cpu_core_busy.items() if c in host.cores_read},
                host_energy_joules={z: m.total for z, m in host.rapl.items() if z in host.zones_read},
                workload_energy_joules={k: j for k, j in self._workload_energy.items() if k[1] in energy_gpus},
                workload_active_seconds=dict(self._workload_active),
                workload_tokens=tokens,
                workload_processes=dict(self._workload_processes),
                workload_gpu_memory_bytes=workload_gpu_memory,
                probes={k: ProbeStats(v.success, v.duration_seconds, v.failures_total, v.last_error)
                        for k, v in self._probes.items()},
                overruns=self._overruns,
                sample_age_seconds=age,
                xid_counts=dict(self._xid_counts),
                backend_error_counts=dict(self._backend_error_counts),
            )
