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
lists such fields (``GpuFigures.lost_fields``). When the field returns, its series resume from the
total they had: nothing is reset, and an energy counter adds what the hardware counted meanwhile.

Workload energy and active time are attributed here too: each GPU energy reading's increase covers
the interval since the previous energy reading, and it is split among the workloads that ran on that
GPU during that interval (equally among concurrent ones), by the samples' own timestamps. An interval
that spans a gap (the device lost, or its energy unreadable) has no power profile, so its energy goes
only to workloads that held the GPU through the whole gap. Whatever no workload gets is counted as the
GPU's unattributed energy, so that for every GPU, at every scrape,
``sum(workload energy) + unattributed energy == GPU energy``.

With owner attribution on (``attribution=OwnerAttribution(...)``, the ``attribution`` setting; issue 13,
docs/attribution.md), each GPU interval also goes to ``agent.attribution``'s accumulator, split among the
owners of the sample's processes (pods, units, commands, from the resolver) and the registered workloads
(owners whose pids are declared), and the GPU's unattributed energy becomes what no owner was charged:
``sum(owner energy) + unattributed == GPU energy`` across the GPUs. With it off, nothing of it runs.

The sampler thread writes; scrapes call ``snapshot()``, which copies under the lock and returns plain
data, so a scrape never waits on hardware and never sees half an update. Its ``gpu_figures``
(:class:`GpuFigures`) are each GPU's exported values, present or None: exporters read those, never the
ledger's own records.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from wattledger.agent.accounting import (
    NO_RUN_STRETCHES,
    Accounting,
    GpuRunStretches,
    clip_run_stretches,
    time_shares,
)
from wattledger.agent.attribution import (
    OTHER_OWNER,
    AttributionAccumulator,
    AttributionSnapshot,
    DeclaredOwner,
    OwnerUsage,
    ProcessActivity,
    owner_usages,
    quanta_joules,
)
from wattledger.probes.base import ENGINES, GpuInfo, GpuSample, HostSample, MigInstance, ProbeStats, direct_slot_init
from wattledger.probes.errors import bounded_line

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
# The per-sample path relies on both ends: 0.0 has a bucket of its own, and no ratio is past the last.
assert UTILIZATION_BUCKETS[0] == 0.0 and UTILIZATION_BUCKETS[-1] == 1.0

# Counter series (the keys of GpuLedger.seen) and the GpuSample fields each is read from.
_COUNTER_SOURCES: dict[str, tuple[str, ...]] = {
    "energy": ("energy_joules",),
    "pcie_transmit": ("pcie_transmit_bytes",),
    "pcie_receive": ("pcie_receive_bytes",),
    "nvlink_transmit": ("nvlink_transmit_bytes",),
    "nvlink_receive": ("nvlink_receive_bytes",),
    "ecc": ("ecc_corrected_errors", "ecc_uncorrected_errors"),
}

# Gauge fields: watched so that wattledger_gpu_field_lost can name them, and exported as GpuFigures'
# gauges (same names, this order).
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


def _fields_present(s: GpuSample) -> tuple:
    """Whether the sample has each of the ``_WATCHED_FIELDS`` (not None), in that order."""
    return (s.energy_joules is not None,
            s.pcie_transmit_bytes is not None, s.pcie_receive_bytes is not None,
            s.nvlink_transmit_bytes is not None, s.nvlink_receive_bytes is not None,
            s.ecc_corrected_errors is not None, s.ecc_uncorrected_errors is not None,
            s.power_watts is not None, s.power_average_watts is not None, s.power_limit_watts is not None,
            s.memory_used_bytes is not None, s.memory_total_bytes is not None,
            s.memory_reserved_bytes is not None, s.sm_occupancy_ratio is not None,
            s.sm_clock_hertz is not None, s.memory_clock_hertz is not None,
            s.temperature_gpu_celsius is not None, s.temperature_memory_celsius is not None,
            s.utilization_gpu_ratio is not None, s.utilization_memory_controller_ratio is not None,
            s.sm_activity_ratio is not None, s.tensor_activity_ratio is not None,
            s.dram_activity_ratio is not None,
            s.throttle_reasons is not None)


def _field_counter_values(s: GpuSample) -> tuple:
    """The sample's readings of the ``_FIELD_COUNTERS`` (their second items), in that order."""
    return (s.pcie_transmit_bytes, s.pcie_receive_bytes, s.nvlink_transmit_bytes, s.nvlink_receive_bytes,
            s.ecc_corrected_errors, s.ecc_uncorrected_errors)


def _field_counters(g: "GpuLedger") -> tuple:
    """The GPU's counters of the ``_FIELD_COUNTERS`` (their third items), in that order."""
    return (g.pcie_transmit, g.pcie_receive, g.nvlink_transmit, g.nvlink_receive, g.ecc_corrected,
            g.ecc_uncorrected)


# Every field whose read time ``read_at_ns`` keeps under its own name (``throttle_seconds.<reason>`` aside),
# in ``_fields_present`` order.
_WATCHED_FIELDS: tuple[str, ...] = (
    ("energy_joules",) + tuple(name for _, name, _ in _FIELD_COUNTERS) + _GAUGE_FIELDS + _ENGINE_ATTRIBUTES
    + ("throttle_reasons",))

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
    """Everything the ledger keeps for one GPU (or, in a snapshot, a copy of it: ``copy``). What is
    exported of it is its :class:`GpuFigures`."""

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
        """A snapshot's copy: only the series whose sources are still read (in ``seen``, busy seconds,
        histograms, throttle seconds), and the fields that are lost."""
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


class _CounterSlot:
    """One counter of a live GPU (one of its ``_FIELD_COUNTERS``, or a driver's throttle-time counter) with
    its series key, its field in ``read_at_ns``, and the raw reading it last took."""

    __slots__ = ("key", "name", "counter", "raw")

    def __init__(self, key: str, name: str, counter: HardwareCounter):
        self.key, self.name, self.counter = key, name, counter
        # The last reading the counter accepted, as the sample held it. The same object again (ECC counts
        # and idle NVLink bytes repeat, small ints are shared) is the same value: nothing to count.
        self.raw: object = None


class _LiveGpuLedger(GpuLedger):
    """The ledger's own, growing record of one GPU: a GpuLedger, plus what the per-sample path keeps at
    hand so that it does not look the same things up, or write the same things down, every sample. Never
    part of a snapshot (``copy`` makes a plain GpuLedger).

    Read times are held: while consecutive samples have the same watched fields (``_fields_present``)
    and every one of them is accepted, which they mostly are, only the newest such sample's time is kept
    (``held_read_ns``) and stands for all of those fields (``held_names``). It goes into ``read_at_ns``
    when that is read (``readable_fields``) or when a sample breaks the run (``release_held``).
    """

    __slots__ = ("field_counter_slots", "engine_slots", "throttle_slots", "held_present", "held_names",
                 "held_read_ns", "sole_holder")

    def __init__(self, info: GpuInfo):
        super().__init__(info)
        self.field_counter_slots: tuple[_CounterSlot, ...] = tuple(  # in ``_FIELD_COUNTERS`` order
            _CounterSlot(key, name, counter)
            for (key, name), counter in zip(_FIELD_COUNTER_KEYS, _field_counters(self)))
        # reason -> the driver's counter of its time (in ``hardware_throttle``), key = the reason
        self.throttle_slots: dict[str, _CounterSlot] = {}
        # ((engine, GpuSample field, its Histogram or None before its first ratio), ...) in ENGINES order.
        self.engine_slots: tuple[tuple[str, str, Histogram | None], ...] = tuple(
            (engine, attribute, None) for engine, attribute in zip(ENGINES, _ENGINE_ATTRIBUTES))
        self.held_present: tuple[bool, ...] | None = None  # _fields_present of the held run's samples
        self.held_names: tuple[str, ...] = ()  # the watched fields they have
        self.held_read_ns: int | None = None  # the time of its newest sample, if not yet in read_at_ns
        # (since_ns, (workload, gpu index)) while exactly one workload runs here and no stopped one has
        # stretches here still to charge (see set_run_stretches); else None.
        self.sole_holder: tuple[int, tuple[str, int]] | None = None

    def set_run_stretches(self, stretches: GpuRunStretches) -> None:
        """This GPU's run stretches changed (``Accounting.run_stretches``)."""
        closed, running = stretches
        if not closed and len(running) == 1:
            ((name, since_ns),) = running
            self.sole_holder = (since_ns, (name, self.info.index))
        else:
            self.sole_holder = None

    def add_engine(self, engine: str) -> Histogram:
        """The engine's first ratio: its histogram and busy seconds start here."""
        histogram = self.histograms[engine] = Histogram()
        self.busy_seconds[engine] = 0.0
        self.engine_slots = tuple((e, a, self.histograms.get(e)) for e, a, _ in self.engine_slots)
        return histogram

    def add_throttle_counter(self, reason: str) -> _CounterSlot:
        """The first time the driver counts ``reason``'s throttle time."""
        counter = self.hardware_throttle[reason] = HardwareCounter()
        slot = self.throttle_slots[reason] = _CounterSlot(reason, "throttle_seconds." + reason, counter)
        return slot

    def hold(self, present: tuple[bool, ...], read_ns: int) -> None:
        """Start a run at a sample whose watched fields (``present``) were all accepted at ``read_ns``.
        (Their series keys are then all in ``seen``: later samples of the run need not add them.)"""
        self.release_held()
        if present != self.held_present:
            self.held_present = present
            self.held_names = tuple(name for name, there in zip(_WATCHED_FIELDS, present) if there)
        self.held_read_ns = read_ns

    def release_held(self) -> None:
        """Put the held read time into ``read_at_ns``. Until a sample holds a time again, ``read_at_ns``
        alone is right (and may be given newer times meanwhile, which a late release would overwrite)."""
        read_ns = self.held_read_ns
        if read_ns is not None:
            read_at = self.read_at_ns
            for name in self.held_names:
                read_at[name] = read_ns
            self.held_read_ns = None

    def readable_fields(self) -> set[str]:
        self.release_held()
        return GpuLedger.readable_fields(self)


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


@dataclass(frozen=True, slots=True)
class WorkloadProcessFigures:
    """Host figures of one workload's processes (the registered process and its descendants)."""

    resident_bytes: int
    cpu_seconds: float
    locked_bytes: int
    pinned_bytes: int


@direct_slot_init
@dataclass(frozen=True, slots=True)
class GpuFigures:
    """What a snapshot exports of one GPU, every value as it is exported: a figure that is None (or a
    mapping entry that is missing) is a series that is absent, never zero.

    Counters are totals since the agent started (they never go down between snapshots) and are present
    while their fields are still read: a field unreadable for over ``FIELD_LOST_AFTER_NS`` takes them out
    (and into ``lost_fields``); they stay present while the GPU is lost. Gauges are the newest sample's
    values, present while the GPU is up and the driver gives them. Exporters read only these figures: how
    the ledger decides what is present (its ``seen`` series, read times, the newest sample) is its own.
    """

    info: GpuInfo
    up: bool  # the GPU answered at the newest sample
    # -- counters
    energy_joules: float | None  # joules, from the hardware counter, kept monotonic across driver resets
    unattributed_energy_joules: float | None  # joules charged to no workload; present exactly with energy
    pcie_transmit_bytes: float | None
    pcie_receive_bytes: float | None
    nvlink_transmit_bytes: float | None  # all links
    nvlink_receive_bytes: float | None
    ecc_corrected_errors: float | None  # volatile ECC errors since the agent started
    ecc_uncorrected_errors: float | None
    busy_seconds: Mapping[str, float]  # engine -> busy seconds, engines still read, first read first
    utilization_histograms: Mapping[str, Histogram]  # engine -> per-sample ratios, same engines and order
    throttle_seconds: Mapping[str, float]  # clock-event reason -> seconds the clocks were held back
    lost_fields: tuple[str, ...]  # fields once read and now unreadable (sorted)
    # -- gauges of the newest sample (None while the GPU is lost)
    power_watts: float | None
    power_average_watts: float | None
    power_limit_watts: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    memory_reserved_bytes: float | None
    sm_occupancy_ratio: float | None
    sm_clock_hertz: float | None
    memory_clock_hertz: float | None
    temperature_gpu_celsius: float | None
    temperature_memory_celsius: float | None
    throttle_reasons_active: tuple[str, ...]  # clock-event reasons active now, sorted
    mig_instances: tuple[MigInstance, ...]


def _export_figures(gpu: GpuLedger) -> GpuFigures:
    """The exported figures of a snapshot's ``GpuLedger`` (``GpuLedger.copy()``, whose ``seen`` holds the
    counter series still read; a live record's does not). Its mappings are the copy's own, not copied
    again: a snapshot is read, never written."""
    seen = gpu.seen
    has_energy = "energy" in seen
    has_ecc = "ecc" in seen
    s = gpu.last if gpu.up else None
    return GpuFigures(
        gpu.info,
        gpu.up,
        gpu.energy.total if has_energy else None,
        gpu.unattributed_energy_joules if has_energy else None,
        gpu.pcie_transmit.total if "pcie_transmit" in seen else None,
        gpu.pcie_receive.total if "pcie_receive" in seen else None,
        gpu.nvlink_transmit.total if "nvlink_transmit" in seen else None,
        gpu.nvlink_receive.total if "nvlink_receive" in seen else None,
        gpu.ecc_corrected.total if has_ecc else None,
        gpu.ecc_uncorrected.total if has_ecc else None,
        gpu.busy_seconds,
        gpu.histograms,
        gpu.throttle_seconds,
        gpu.lost_fields,
        *(_gauge_values(s) if s is not None else _NO_GAUGES),
        tuple(sorted(s.throttle_reasons or ())) if s is not None else (),
        tuple(s.mig_instances or ()) if s is not None else (),
    )


_NO_GAUGES = (None,) * len(_GAUGE_FIELDS)
# _export_figures passes _gauge_values by position: the gauge fields must be _GAUGE_FIELDS, in that order.
_FIGURE_FIELDS = tuple(f.name for f in fields(GpuFigures))
assert _FIGURE_FIELDS[_FIGURE_FIELDS.index(_GAUGE_FIELDS[0]):][:len(_GAUGE_FIELDS)] == _GAUGE_FIELDS


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """A consistent copy of the ledger for one scrape or report."""

    backend: str | None
    simulated: bool
    # The ledger's own record of each GPU, by index (counters with their raw readings, cursors, the
    # series seen): what tests and in-process readers inspect.
    gpus: list[GpuLedger]
    # The same GPUs as exported (present values only): what the exporters read.
    gpu_figures: tuple[GpuFigures, ...]
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
    # Owner attribution (issue 13): None while it is off, and then nothing of it is exported.
    attribution: AttributionFigures | None = None


# ---------------------------------------------------------------------------------------------------------
# Owner attribution (issue 13; the model is agent/attribution.py, its rules docs/attribution.md). Off unless
# the ledger is given an ``OwnerAttribution``: then ``record_gpus`` takes one more branch per tick (not per
# GPU), and every other path is as it was.

# An owner's series labels: (owner_kind, namespace, pod, container, group). These tuples are the
# accumulator's keys, so two processes of one owner (different command names) are one owner.
OwnerKey = tuple[str, str, str, str, str]
OWNER_LABEL_NAMES: tuple[str, ...] = ("owner_kind", "namespace", "pod", "container", "group")
OTHER_OWNER_LABELS: OwnerKey = ("other", "", "", "", "")
WORKLOAD_OWNER_KIND = "workload"  # a workload registered through the accounting API: group = its name
ATTRIBUTION_OK = "ok"  # wattledger_attribution_status's reason while attribution works
# How long a GPU's resolved process list is kept while the backend hands the same tuple again: the
# resolver's own answers change on its own cadence (the kubelet is asked every few seconds), and NVML's
# list is refreshed about once a second anyway (probes/nvml.py), which this matches.
OWNER_RESOLVE_AGAIN_NS = NS_PER_S


def workload_owner(name: str) -> OwnerKey:
    """The owner key of a registered workload."""
    return (WORKLOAD_OWNER_KIND, "", "", "", name)


@dataclass(frozen=True, slots=True)
class OwnerFigures:
    """What one owner's series export: a keyed owner, or the "other" bucket (``OTHER_OWNER_LABELS``)."""

    labels: OwnerKey
    command: str  # the command name of its first process seen ("" for workloads and "other")
    energy_joules: float  # counter: joules charged since it got its series
    busy_seconds: float  # counter: seconds of GPU busy time charged to it, summed over GPUs
    gpu_memory_bytes: int | None  # bytes its processes hold now, summed over the GPUs that are up; None: unknown
    gpus: int  # GPUs (up now) whose newest interval it held


@dataclass(frozen=True, slots=True, order=True)
class IdleAllocation:
    """GPUs the kubelet allocated to one container (of one resource) whose pod runs no process on a GPU."""

    namespace: str
    pod: str
    container: str
    resource: str  # e.g. "nvidia.com/gpu", "nvidia.com/mig-1g.10gb"
    devices: int  # device ids allocated (a time-sliced or MPS replica counts as one)


@dataclass(frozen=True, slots=True)
class AttributionFigures:
    """A snapshot's owner attribution. ``owners`` sorted by labels, "other" last.

    ``unattributed_energy_joules`` (gpu index -> J) replaces the ledger's own unattributed figure when
    attribution is on: the GPU's energy counter less what its owners were charged, so that
    ``sum(owner energy) + sum(unattributed) == sum(GPU energy)`` on every read, until an owner leaves the
    exposition (dropped after the retention, or demoted into "other": its series stops, as
    docs/attribution.md explains, and Prometheus keeps what it scraped)."""

    owners: tuple[OwnerFigures, ...]
    unattributed_energy_joules: Mapping[int, float]
    status_reason: str  # ATTRIBUTION_OK, or one line saying why owners cannot be found
    # Who holds idle GPUs: the kubelet's allocations on this node whose pod had no process on a GPU lately
    # (``ProcOwnerResolver.pods_without_processes``), sorted; () off Kubernetes.
    idle_allocations: tuple[IdleAllocation, ...] = ()

    @property
    def working(self) -> bool:
        return self.status_reason == ATTRIBUTION_OK


class _ResolvedProcesses:
    """One GPU's process list with each pid's owner, resolved on the sampler thread outside the lock."""

    __slots__ = ("processes", "resolved_ns", "activities", "owner_of", "commands")

    def __init__(self, processes: object, resolved_ns: int, activities: tuple[ProcessActivity, ...],
                 owner_of: dict[int, OwnerKey | None], commands: dict[OwnerKey, str]):
        self.processes = processes  # the sample's tuple itself: the same object again needs no work
        self.resolved_ns = resolved_ns
        self.activities = activities
        self.owner_of = owner_of
        self.commands = commands


_NOTHING_RESOLVED = _ResolvedProcesses(None, 0, (), {}, {})


class OwnerAttribution:
    """Feeds ``AttributionAccumulator`` from the ledger, one GPU interval at a time, and builds the owners'
    exported figures.

    ``resolver``: an ``agent.owners.OwnerResolver`` (``resolve(pid, gpu_uuid=...)`` -> labels with
    ``kind, namespace, pod, container, group, command``, or None; ``refresh(now_ns)`` every tick; an
    optional ``status()``, one line when owners cannot be found), or None when no pid can be placed (a
    replay: its pids are the recording machine's). ``unavailable_reason``: one line for
    ``wattledger_attribution_status`` when attribution cannot work at all.

    Threads: ``prepare`` runs on the sampler thread before the ledger's lock is taken (the resolver's slow
    work never holds up a scrape); ``record``, ``declare_pids``, ``reset`` and ``figures`` run under it."""

    def __init__(self, resolver: object | None, max_owners: int, retention_ns: int,
                 unavailable_reason: str | None = None):
        self._resolver = resolver
        self._max_owners = max_owners
        self._retention_ns = retention_ns
        self._unavailable_reason = unavailable_reason
        # The resolver's last failures (one line each), cleared when the same call works again: its
        # refresh at the last tick, and its resolve for each GPU's newest process list.
        self._refresh_error: str | None = None
        self._resolve_errors: dict[int, str | None] = {}
        self._pending: dict[int, _ResolvedProcesses] = {}
        self._declared_pids: dict[str, frozenset[int]] = {}
        self._idle_allocations: tuple[IdleAllocation, ...] = ()  # replaced whole by prepare (one store)
        self.reset()

    def reset(self) -> None:
        """A new device list (``Ledger.set_devices``): the GPUs' energy counters start again, so do the
        owners' totals (a counter reset, which ``rate()`` handles)."""
        self._accumulator = AttributionAccumulator(self._max_owners, self._retention_ns)
        self._resolved: dict[int, _ResolvedProcesses] = {}
        self._pending.clear()
        self._latest: dict[int, list[OwnerUsage]] = {}  # gpu -> the owners of its newest interval
        self._held_pids: dict[int, frozenset[int]] = {}  # gpu -> pids listed at its previous sample
        self._commands: dict[OwnerKey, str] = {}
        self._exported_unattributed: dict[int, float] = {}

    # -- sampler thread, outside the ledger's lock

    def prepare(self, samples: Sequence[GpuSample], now_ns: int) -> None:
        """The resolver's tick, and the owners of every process list that is new (or old enough to ask
        again). Never raises: a failing resolver places no one and says so in the status."""
        resolver = self._resolver
        if resolver is not None:
            try:
                resolver.refresh(now_ns)
                self._refresh_error = None
            except Exception as err:  # noqa: BLE001 - the sampler must go on whatever the resolver does
                self._refresh_error = bounded_line(f"owner resolver failed: {type(err).__name__}: {err}")
            self._idle_allocations = _idle_allocations(resolver)
        for sample in samples:
            if not sample.up:
                continue
            cached = self._resolved.get(sample.index, _NOTHING_RESOLVED)
            if cached.processes is sample.processes and now_ns - cached.resolved_ns < OWNER_RESOLVE_AGAIN_NS:
                continue
            self._pending[sample.index] = self._resolve(sample.index, sample.uuid, sample.processes, now_ns)

    def _resolve(self, index: int, gpu_uuid: str, processes: tuple | None, now_ns: int) -> _ResolvedProcesses:
        activities, owner_of, commands = [], {}, {}
        self._resolve_errors[index] = None
        for process in processes or ():
            activities.append(ProcessActivity(process.pid, process.sm_utilization_ratio, process.memory_used_bytes))
            labels = self._owner_labels(index, process.pid, gpu_uuid)
            key = None if labels is None else (labels.kind, labels.namespace, labels.pod, labels.container,
                                               labels.group)
            owner_of[process.pid] = key
            if key is not None:
                commands.setdefault(key, labels.command)
        return _ResolvedProcesses(processes, now_ns, tuple(activities), owner_of, commands)

    def _owner_labels(self, index: int, pid: int, gpu_uuid: str):
        if self._resolver is None:
            return None
        try:
            return self._resolver.resolve(pid, gpu_uuid=gpu_uuid)
        except Exception as err:  # noqa: BLE001 - as in prepare: that pid is placed nowhere
            self._resolve_errors[index] = bounded_line(f"owner resolver failed: {type(err).__name__}: {err}")
            return None

    # -- under the ledger's lock

    def declare_pids(self, declared: dict[str, frozenset[int]]) -> None:
        """The pids of each registered workload (its process and the descendants the host probe sees)."""
        self._declared_pids = declared

    def record(self, state: GpuLedger, sample: GpuSample, energy_since_ns: int | None, energy_total: float,
               previous_ns: int | None, stretches: GpuRunStretches) -> None:
        """One sample the ledger has just recorded into ``state``; the arguments after it are ``state``'s
        energy cursor, energy total and previous up sample time from before it. Charges the interval since
        the previous energy reading (docs/attribution.md, "What the wiring needs")."""
        index = sample.index
        pending = self._pending.pop(index, None)
        if pending is not None:
            self._resolved[index] = pending
            for key, command in pending.commands.items():
                self._commands.setdefault(key, command)
        if state.last is not sample:
            return  # not recorded (no newer than the last one)
        end_ns = sample.monotonic_ns
        if energy_since_ns is not None and state.energy_since_ns != energy_since_ns:
            start_ns, energy = energy_since_ns, state.energy.total - energy_total
            # As _account decides: consecutive up samples, each with energy, or a gap nobody measured.
            observed = previous_ns == energy_since_ns
        elif previous_ns is not None:  # no energy reading this sample: its owners are seen, nothing is charged
            start_ns, energy, observed = previous_ns, None, True
        else:
            return  # the energy counter's baseline, or the first sample back from a loss without energy
        resolved = self._resolved.get(index, _NOTHING_RESOLVED)
        activities = resolved.activities
        if not observed:
            # Across a gap, only what held the GPU on both sides of it: a process listed now may have
            # started at any time in the gap, whose power profile nobody knows.
            before = self._held_pids.get(index, frozenset())
            activities = tuple(a for a in activities if a.pid in before)
        self._held_pids[index] = frozenset(resolved.owner_of)
        declared = self._declared_owners(stretches, start_ns, end_ns, observed)
        usages = owner_usages(activities, declared, resolved.owner_of.get)
        busy = _ratio(sample.utilization_gpu_ratio) if observed and energy is not None else None
        self._accumulator.add_interval(index, start_ns, end_ns, energy, busy, usages)
        self._latest[index] = usages

    def _declared_owners(self, stretches: GpuRunStretches, start_ns: int, end_ns: int,
                         observed: bool) -> list[DeclaredOwner]:
        """The registered workloads holding the GPU in [start_ns, end_ns): with their run stretches, or,
        across a gap, those that held it throughout (as ``_charge`` does for workload energy)."""
        clipped = clip_run_stretches(stretches, start_ns, end_ns)
        if not clipped:
            return []
        pids = self._declared_pids
        if not observed:
            return [DeclaredOwner(workload_owner(name), pids.get(name, frozenset()))
                    for name in _held_throughout(clipped, start_ns, end_ns)]
        spans: dict[str, list[tuple[int, int]]] = {}
        for name, lo, hi in clipped:
            spans.setdefault(name, []).append((lo, hi))
        return [DeclaredOwner(workload_owner(name), pids.get(name, frozenset()), tuple(pieces))
                for name, pieces in spans.items()]

    def figures(self, now_ns: int, gpus: Sequence[GpuLedger]) -> AttributionFigures:
        """The exported figures as of now (one accumulator read: call once per snapshot). ``gpus``: the
        snapshot's copies, for which GPUs are up and their energy totals."""
        read = self._accumulator.snapshot(now_ns)
        keyed = {o.key for o in read.owners if o.key is not OTHER_OWNER}
        memory, held = self._holdings(gpus, keyed)
        rows: dict[OwnerKey, list] = {}  # labels -> [command, joules, busy seconds, memory, gpus]
        for totals in read.owners:
            labels = OTHER_OWNER_LABELS if totals.key is OTHER_OWNER else totals.key
            row = rows.get(labels)
            if row is None:  # (a resolved owner whose labels are "other"'s adds into it: one series each)
                row = rows[labels] = [self._commands.get(totals.key, ""), 0.0, 0.0, None, 0]
            row[1] += totals.energy_joules
            row[2] += totals.busy_seconds
            if totals.key in memory:
                row[3] = (row[3] or 0) + memory[totals.key]
            elif row[3] is None and totals.key not in held:
                row[3] = 0  # known to hold nothing now: it holds no GPU that is up
            row[4] += held.get(totals.key, 0)
        owners = tuple(OwnerFigures(labels, *row) for labels, row in
                       sorted(rows.items(), key=lambda item: (item[0] == OTHER_OWNER_LABELS, item[0])))
        return AttributionFigures(owners, self._unattributed(read, gpus), self._status_reason(),
                                  self._idle_allocations)

    def _holdings(self, gpus: Sequence[GpuLedger], keyed: set) -> tuple[dict, dict]:
        """(key -> bytes held now, key -> GPUs held now) over the GPUs that are up; owners without a key
        of their own count as ``OTHER_OWNER``. An owner whose memory is unknown on every GPU it holds is
        not in the first."""
        memory: dict[object, int] = {}
        held: dict[object, int] = {}
        for gpu in gpus:
            if not gpu.up:
                continue
            here = set()
            for usage in self._latest.get(gpu.info.index, ()):
                key = usage.key if usage.key in keyed else OTHER_OWNER
                if key not in here:
                    here.add(key)
                    held[key] = held.get(key, 0) + 1
                if usage.memory_bytes is not None and usage.memory_bytes >= 0:
                    memory[key] = memory.get(key, 0) + usage.memory_bytes
        return memory, held

    def _unattributed(self, read: AttributionSnapshot, gpus: Sequence[GpuLedger]) -> dict[int, float]:
        """Each GPU's energy counter less what its owners were charged (exact, in quanta), kept from going
        down by a float rounding of the difference."""
        out = {}
        for gpu in gpus:
            index = gpu.info.index
            charged = read.counted_energy_quanta.get(index, 0) - read.unattributed_energy_quanta.get(index, 0)
            value = max(self._exported_unattributed.get(index, 0.0), gpu.energy.total - quanta_joules(charged))
            self._exported_unattributed[index] = out[index] = value
        return out

    def _status_reason(self) -> str:
        if self._unavailable_reason:
            return bounded_line(self._unavailable_reason)
        failure = self._refresh_error or next((e for e in self._resolve_errors.values() if e), None)
        if failure:
            return failure
        status = getattr(self._resolver, "status", None)
        text = status() if callable(status) else None
        return bounded_line(text) if text else ATTRIBUTION_OK


def _idle_allocations(resolver: object) -> tuple[IdleAllocation, ...]:
    """The resolver's pods holding GPUs without a process on them (a resolver without a kubelet has none);
    a failing call gives none rather than stopping the tick."""
    listed = getattr(resolver, "pods_without_processes", None)
    if not callable(listed):
        return ()
    try:
        allocations = listed()
    except Exception:  # noqa: BLE001 - the same resolver's refresh error is already in the status
        return ()
    return tuple(sorted(IdleAllocation(a.namespace, a.pod, a.container, a.resource_name, len(a.device_ids))
                        for a in allocations))


class Ledger:
    """Keeps the integrated series. Written by the sampler thread, read by any number of scrapers."""

    def __init__(self, accounting: Accounting | None = None, clock_ns: Callable[[], int] = time.monotonic_ns,
                 attribution: OwnerAttribution | None = None):
        self._accounting = accounting
        self._attribution = attribution
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._backend: str | None = None
        self._simulated = False
        self._gpus: dict[int, _LiveGpuLedger] = {}
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
        # The accounting's run stretches per GPU, and the generation they were copied at (see record_gpus).
        self._stretches: dict[int, GpuRunStretches] = {}
        self._stretches_generation: int | None = None
        # Registered workloads' pids (attribution only): the accounting's, and the host probe's descendants.
        self._workload_pids: dict[str, int] = {}
        self._workload_descendants: dict[int, frozenset[int]] = {}

    @property
    def attribution_enabled(self) -> bool:
        return self._attribution is not None

    def mig_uuids(self) -> set[str]:
        """The MIG instances' UUIDs in the GPUs' newest samples (the kubelet names MIG devices by them)."""
        with self._lock:
            return {m.uuid for g in self._gpus.values() if g.last is not None for m in g.last.mig_instances or ()}

    # -- writes (sampler thread) ----------------------------------------------------------------

    def set_devices(self, backend: str | None, simulated: bool, infos: Sequence[GpuInfo]) -> None:
        with self._lock:
            self._backend = backend
            self._simulated = simulated
            self._gpus = {info.index: _LiveGpuLedger(info) for info in infos}
            self._stretches_generation = None  # the new records learn their stretches at the next tick
            if self._attribution is not None:
                self._attribution.reset()

    def record_gpus(self, samples: Sequence[GpuSample]) -> None:
        attribution = self._attribution
        if attribution is not None:
            attribution.prepare(samples, self._clock_ns())
        with self._lock:
            accounting = self._accounting
            if accounting is not None and accounting.run_stretches_generation != self._stretches_generation:
                # The workloads' run stretches, read again only after they change (a start, a stop, a
                # forget): not under the accounting's lock once per GPU and sample.
                self._stretches_generation, self._stretches = accounting.run_stretches()
                for index, state in self._gpus.items():
                    state.set_run_stretches(self._stretches.get(index, NO_RUN_STRETCHES))
                if attribution is not None:
                    self._workload_pids = accounting.pids()
                    self._declare_workload_pids()
            gpus = self._gpus
            if attribution is None:
                for sample in samples:
                    state = gpus.get(sample.index)
                    if state is not None:
                        self._record_gpu(state, sample)
            else:
                self._record_gpus_attributed(attribution, samples)
            self._last_record_ns = self._clock_ns()
            self._records += 1
            if accounting is not None and self._records % 100 == 0:
                # Run stretches are needed back to the oldest interval still to be charged: a GPU that is
                # lost (or whose energy is unreadable) keeps its interval open across the gap.
                cursors = [t for g in gpus.values() for t in (g.energy_since_ns, g.active_since_ns)
                           if t is not None]
                if cursors:
                    accounting.forget_intervals_before(min(cursors))

    def _record_gpus_attributed(self, attribution: OwnerAttribution, samples: Sequence[GpuSample]) -> None:
        """``_record_gpu`` for each sample, then its interval to the owner attribution (with the cursors
        from before the sample, which ``_record_gpu`` moves)."""
        gpus = self._gpus
        for sample in samples:
            state = gpus.get(sample.index)
            if state is None:
                continue
            before = (state.energy_since_ns, state.energy.total, state.previous_ns)
            self._record_gpu(state, sample)
            if sample.up:
                attribution.record(state, sample, *before, self._stretches.get(sample.index, NO_RUN_STRETCHES))

    def _declare_workload_pids(self) -> None:
        """Each registered workload's pids, for the attribution: its process and the descendants the host
        probe reports (a GPU process is often a child of the registered one)."""
        descendants = self._workload_descendants
        self._attribution.declare_pids({
            name: frozenset({pid}) | descendants.get(pid, frozenset()) for name, pid in self._workload_pids.items()})

    def _record_gpu(self, state: _LiveGpuLedger, sample: GpuSample) -> None:
        """One sample into its GPU's series.

        What every sample does is written out in this one function, common cases first (a call costs as
        much as several of its lines; 8 GPUs at 100 Hz make this the agent's hottest code): each inlined
        case computes what its general helper does, with the same operations in the same order, and
        tests/test_tick_fast_paths.py checks them against those helpers."""
        if not sample.up:
            # Busy-time integration restarts when the device returns: no ratio is known for the gap. The
            # energy counter and workload time keep their cursors: the gap is charged when it returns.
            state.up = False
            state.previous_ns = None
            return
        now_ns = sample.monotonic_ns
        last = state.last
        if last is not None and now_ns <= last.monotonic_ns:
            return  # a sample no newer than the last one carries nothing new
        previous_ns = state.previous_ns
        read_at = state.read_at_ns
        if previous_ns is None and last is not None:
            # Back from a loss: the grace before a field counts as lost starts again now, so a field that
            # needs two samples (GPM) does not flap out of the exposition. Fields lost before stay lost.
            for name in state.readable_fields():
                read_at[name] = now_ns
        dt = (now_ns - previous_ns) / NS_PER_S if previous_ns is not None else None
        state.up = True
        state.last = sample
        state.previous_ns = now_ns
        # The same watched fields as the held run's samples: their read times (and counter keys in
        # ``seen``) need no writing, unless one of them is refused (see _LiveGpuLedger).
        present = _fields_present(sample)
        held = present == state.held_present
        if not held:
            state.release_held()
        refused: list[str] = []  # watched fields present but not accepted
        seen = state.seen

        # Counters. HardwareCounter.update, inlined for a reading that is a float (energy) or an int or
        # float (the others) >= 0 in float range; any other reading goes through it.
        energy_increase = None
        raw = sample.energy_joules
        if raw is not None:
            energy = state.energy
            previous = energy._previous
            if type(raw) is float and 0.0 <= raw < _INF and previous is not None and raw >= previous:
                energy_increase = raw - previous
                energy._previous = raw
                energy.total += energy_increase
            else:
                energy_increase = energy.update(raw)
            if energy_increase is None:
                refused.append("energy_joules")
            elif not held:
                read_at["energy_joules"] = now_ns
                seen.add("energy")
        for slot, raw in zip(state.field_counter_slots, _field_counter_values(sample)):
            if raw is None:
                continue
            last_raw = slot.raw
            if raw is last_raw or (type(raw) is int and type(last_raw) is int and raw == last_raw):
                # The reading it took last time (ECC counts, idle PCIe or NVLink bytes): no increase, and
                # float() of it is the previous value already. Nothing moves.
                if not held:
                    read_at[slot.name] = now_ns
                continue
            counter = slot.counter
            kind = type(raw)
            if kind is int and 0 <= raw <= _LARGEST_FLOAT_INT:
                value = float(raw)
            elif kind is float and 0.0 <= raw < _INF:
                value = raw
            else:
                if counter.update(raw) is None:
                    refused.append(slot.name)
                    continue
                value = None  # (counted)
            if value is not None:
                previous = counter._previous
                if previous is None:
                    counter._previous = value
                elif value >= previous:
                    counter.total += value - previous
                    counter._previous = value
                else:
                    increase, counter._previous = counter._on_decrease(previous, value)
                    counter.total += increase
            slot.raw = raw
            if not held:
                read_at[slot.name] = now_ns
                seen.add(slot.key)
        if not held:
            # Gauges are watched only for lost_fields: what counts is that the sample has them.
            for name, value in zip(_GAUGE_FIELDS, _gauge_values(sample)):
                if value is not None:
                    read_at[name] = now_ns

        # Engines: a histogram of ratios and busy seconds each. (_ratio's answer for the common case, a
        # float in [0, 1], without the call; Histogram.observe inlined: the ratio is at most 1.0, the last
        # bound, so its index is a bucket.)
        busy_seconds = state.busy_seconds
        for (engine, attribute, histogram), raw in zip(state.engine_slots, _engine_values(sample)):
            if raw is None:
                continue
            if type(raw) is float and 0.0 <= raw <= 1.0:
                ratio = raw
            else:
                ratio = _ratio(raw)
                if ratio is None:
                    refused.append(attribute)
                    continue
            if histogram is None:
                histogram = state.add_engine(engine)
            if not held:
                read_at[attribute] = now_ns
            bucket = bisect_left(UTILIZATION_BUCKETS, ratio)
            histogram.bucket_counts[bucket] += 1
            histogram.count += 1
            # Bucket 0 holds the ratio 0.0 only (or -0.0), which adds nothing to the sum or the busy
            # seconds: neither is ever -0.0 (both start at 0.0 and add only ratios >= 0 and dt > 0).
            if bucket:
                histogram.total += ratio
                if dt is not None:
                    # The ratio describes the interval that just ended: integrate it over that interval.
                    busy_seconds[engine] += ratio * dt

        # Throttle seconds per reason: the driver's own counter where it has one, else integrated from the
        # active reasons. Both add increases to one total, so switching source never lowers it.
        totals = state.throttle_seconds
        driver_counted: list[str] | tuple = ()  # reasons whose driver counter took this sample's reading
        if sample.throttle_seconds:
            driver_counted = []
            slots = state.throttle_slots
            for reason, seconds in sample.throttle_seconds.items():
                slot = slots.get(reason)
                if slot is None:
                    slot = state.add_throttle_counter(reason)
                if seconds is slot.raw:  # the reading it took last time: an increase of 0.0, which the
                    driver_counted.append(reason)  # total (never -0.0) would not show
                    read_at[slot.name] = now_ns
                    continue
                increase = slot.counter.update(seconds)
                if increase is not None:
                    slot.raw = seconds
                    driver_counted.append(reason)
                    read_at[slot.name] = now_ns
                    totals[reason] = totals.get(reason, 0.0) + increase
        if sample.throttle_reasons is not None:
            if not held:
                read_at["throttle_reasons"] = now_ns
            for reason in sample.throttle_reasons:
                if reason not in totals:
                    totals[reason] = 0.0
                if dt is not None and reason not in driver_counted:
                    totals[reason] += dt

        # Workload time and energy: _account, inlined for its common case, with its arithmetic: one
        # workload holds the GPU (none stopped there lately), and this sample's energy covers the interval
        # since the previous sample, where the active time starts too.
        since_ns = state.active_since_ns
        holder = state.sole_holder
        if (holder is None or energy_increase is None or since_ns is None or since_ns != previous_ns
                or state.energy_since_ns != since_ns):
            self._account(state, previous_ns, now_ns, energy_increase)
        else:
            state.active_since_ns = state.energy_since_ns = now_ns
            begin_ns, key = holder
            lo_ns = begin_ns if begin_ns > since_ns else since_ns
            if lo_ns >= now_ns:  # it started after this interval: nobody held the GPU
                state.unattributed_energy_joules += energy_increase
            else:
                workload_active = self._workload_active
                workload_active[key] = workload_active.get(key, 0.0) + (now_ns - lo_ns) / NS_PER_S
                if energy_increase == 0.0:
                    state.unattributed_energy_joules += energy_increase
                else:
                    span_ns, held_ns = now_ns - since_ns, now_ns - lo_ns
                    workload_energy = self._workload_energy
                    workload_energy[key] = (
                        workload_energy.get(key, 0.0) + energy_increase * float(held_ns) / span_ns)
                    # (span_ns >= held_ns: _charge's max(0, ...) gives the same int.)
                    state.unattributed_energy_joules += energy_increase * (span_ns - held_ns) / span_ns

        if not refused:
            if held:
                state.held_read_ns = now_ns
            else:
                state.hold(present, now_ns)
        elif held:  # the run stops short of this sample for the refused fields only
            state.release_held()
            for name in state.held_names:
                if name not in refused:
                    read_at[name] = now_ns

    def _account(self, state: GpuLedger, previous_ns: int | None, now_ns: int, energy_increase: float | None) -> None:
        """Charges workload active time up to ``now_ns``, and the energy increase over the interval since
        the previous energy reading; energy no workload gets is the GPU's unattributed energy."""
        gpu = state.info.index
        active_since, state.active_since_ns = state.active_since_ns, now_ns
        # The stretches this GPU's workloads ran, as of this tick (``record_gpus`` keeps the copy current).
        gpu_stretches = self._stretches.get(gpu, NO_RUN_STRETCHES)
        stretches: list[tuple[str, int, int]] = []
        if active_since is not None:
            stretches = clip_run_stretches(gpu_stretches, active_since, now_ns)
            if stretches:
                workload_active = self._workload_active
                for name, lo, hi in stretches:
                    key = (name, gpu)
                    workload_active[key] = workload_active.get(key, 0.0) + (hi - lo) / NS_PER_S
        if energy_increase is None:
            return  # no energy reading this sample: the next one covers this interval too
        energy_since, state.energy_since_ns = state.energy_since_ns, now_ns
        if energy_since is None:
            return  # the first reading is the counter's baseline
        if energy_since != active_since:
            stretches = clip_run_stretches(gpu_stretches, energy_since, now_ns)
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
        weights, covered_ns = time_shares(stretches)  # one O(n log n) sweep: cheap with many workloads
        workload_energy = self._workload_energy
        for name, weight_ns in weights.items():
            key = (name, gpu)
            workload_energy[key] = workload_energy.get(key, 0.0) + energy_joules * weight_ns / span_ns
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
            if self._attribution is not None:
                self._workload_pids = pids
                descendants: dict[int, set[int]] = {}
                for process in sample.processes:
                    if process.root_pid is not None:
                        descendants.setdefault(process.root_pid, set()).add(process.pid)
                self._workload_descendants = {root: frozenset(p) for root, p in descendants.items()}
                self._declare_workload_pids()
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
        core_busy = host.cpu_core_busy
        for core, seconds in zip(_core_ids(sample), sample.cpu_busy_seconds_per_core or ()):
            counter = core_busy.get(core)
            if counter is None:  # (not setdefault: that would build a counter per core and read)
                counter = core_busy[core] = KernelCounter()
            if counter.update(seconds) is not None:
                cores_read.add(core)
        host.cores_read = frozenset(cores_read)  # an offline core's series is absent until it returns
        zones_read = set()
        for zone, joules in (sample.rapl_energy_joules or {}).items():
            if host.rapl.setdefault(zone, RebasingCounter()).update(joules) is not None:
                zones_read.add(zone)
        host.zones_read = frozenset(zones_read)

    def record_probe(self, name: str, success: bool, duration_seconds: float, error: str | None = None) -> None:
        with self._lock:
            stats = self._probes.get(name)
            if stats is None:  # (not setdefault: that would build one every tick)
                stats = self._probes[name] = ProbeStats()
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
            attribution = None
            if self._attribution is not None:
                attribution = self._attribution.figures(self._clock_ns(), gpus)
            copied = dict(
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
                attribution=attribution,
            )
        # The exported figures come from this snapshot's own copies, so outside the lock (the sampler
        # waits for none of it) and at scrape time (the per-sample path never pays for them).
        gpu_figures = tuple(map(_export_figures, gpus))
        if attribution is not None:
            gpu_figures = _with_owner_unattributed(gpu_figures, attribution)
        return LedgerSnapshot(gpu_figures=gpu_figures, **copied)


def _with_owner_unattributed(figures: tuple[GpuFigures, ...],
                             attribution: AttributionFigures) -> tuple[GpuFigures, ...]:
    """With attribution on, a GPU's unattributed energy is what no owner was charged (registered workloads
    are owners), present exactly where its energy is."""
    unattributed = attribution.unattributed_energy_joules
    return tuple(
        replace(gpu, unattributed_energy_joules=unattributed.get(gpu.info.index, gpu.energy_joules))
        if gpu.energy_joules is not None else gpu
        for gpu in figures)
