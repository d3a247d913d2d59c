"""Who used the GPU: splits each GPU interval's energy and busy time among its owners, so that it adds up.

Issue 13, item 3. A pure model: no I/O, no clock, no locks; times are passed in (monotonic ns), energies
are joules, ratios are 0..1. The rules, and why each is what it is, are in docs/attribution.md.

- ``attribute_interval``: one GPU, one interval [start_ns, end_ns): the GPU's energy increase (J), its busy
  ratio, and the owners holding it (``OwnerUsage``: activity share from NVML's per-process utilization,
  GPU memory held, the stretches it held the GPU) -> each owner's energy (J) and busy seconds, and the
  unattributed energy. ``sum(owner energy) + unattributed == energy`` exactly, in any summation order:
  every part is a whole multiple of ``math.ulp(energy)`` (see ``_exact_parts``).
- ``owner_usages``: processes (pid, share, memory) and registered workloads (an owner whose pid set is
  declared) -> one ``OwnerUsage`` per owner; a pid a workload declared is that workload's, never also a
  discovered owner's.
- ``AttributionAccumulator``: totals over many intervals and GPUs (owner key -> energy, busy seconds, last
  seen), a cap on owners with keys of their own (the rest fold into ``OTHER_OWNER``, with hysteresis) and a
  retention time after which an owner not seen is dropped. Totals are kept as integer multiples of
  ``ENERGY_QUANTUM_JOULES``, so the identity holds exactly on every read too: keyed owners + other +
  retired (dropped or demoted owners' totals, which leave the exposition) + unattributed == counted.

What the wiring (``OwnerAttribution`` in agent/ledger.py) gives it: per GPU per tick, the energy increase the
ledger already computes (None while the GPU is lost: that interval is charged to no one and not counted), the
busy ratio over the same interval (``utilization_gpu`` or the busy-seconds delta / interval), the processes
with their shares (``GpuProcess`` records, probes/nvml_processes.py) mapped to owner keys (agent/owners.py:
the cgroup owner, the kubelet's pod), and the run stretches of registered workloads (``clip_run_stretches``)
as ``held_spans_ns``. ``snapshot(now_ns)`` is called once per scrape, under the ledger's lock; the exposition
renders keyed owners and ``OTHER_OWNER`` (labelled with a value no real owner can have) and never ``retired``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000

# Accumulated energies are integers of this many joules. Why this size: six orders of magnitude finer than
# the finest energy counter the agent reads (NVML's nvmlDeviceGetTotalEnergyConsumption counts millijoules,
# NVML API reference, "Device Queries"; RAPL's energy unit is 2^-ESU J, 61 us J with ESU=14, Intel SDM vol. 4
# MSR_RAPL_POWER_UNIT), so quantising loses nothing any counter resolves; a power of two, so that an integer
# count below 2^53 converts to float joules exactly.
ENERGY_QUANTUM_JOULES = 2.0 ** -30


class _OtherOwner:
    """The one bucket owners beyond the cap fold into; a sentinel, so that no real key (a command named
    "other") can collide with it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OTHER_OWNER"


OTHER_OWNER = _OtherOwner()

# Which rule charged an interval (``IntervalAttribution.rule``), for tests and debugging.
RULE_NOT_HELD = "not_held"  # nobody held the GPU: all unattributed
RULE_EXCLUSIVE = "exclusive"  # one owner: all of the time it held the GPU
RULE_BY_ACTIVITY = "by_activity"  # shared: active part by activity shares, idle part by memory held
RULE_BY_HOLDING = "by_holding"  # shared, no activity share known: all of it by memory held


@dataclass(frozen=True, slots=True)
class OwnerUsage:
    """One owner's use of one GPU over one interval.

    ``activity_share``: the SM share of the owner's processes over the interval (0..1, NVML per-process
    utilization), None when unknown. ``memory_bytes``: GPU memory its processes hold, None when unknown.
    ``held_spans_ns``: the [lo, hi) stretches it held the GPU (a registered workload's run stretches), None
    for the whole interval (a process in the process list)."""

    key: Hashable
    activity_share: float | None = None
    memory_bytes: int | None = None
    held_spans_ns: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class IntervalAttribution:
    """One GPU interval split: owner key -> joules and busy seconds (owners that held the GPU only), and
    what nobody is charged. ``sum(owner_energy_joules.values()) + unattributed_energy_joules`` is the
    interval's energy exactly."""

    owner_energy_joules: Mapping[Hashable, float]
    owner_busy_seconds: Mapping[Hashable, float]
    unattributed_energy_joules: float
    unattributed_busy_seconds: float
    rule: str


@dataclass(frozen=True, slots=True)
class ProcessActivity:
    """A compute process on one GPU over one interval (from NVML: a ``GpuProcess`` record's shares)."""

    pid: int
    activity_share: float | None = None  # SM share, 0..1
    memory_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class DeclaredOwner:
    """A workload registered through the accounting API on one GPU: an owner whose pids are declared."""

    key: Hashable
    pids: frozenset[int] = frozenset()
    held_spans_ns: tuple[tuple[int, int], ...] | None = None  # its run stretches, clipped to the interval
    memory_bytes: int | None = None  # memory it declared (``Accounting.set_memory``), if any


# ---------------------------------------------------------------------------------------------------------
# Input checks: an owner's figures come from NVML samples that are not synchronised with the device's
# counters, so a share a little above 1 or a ratio a little off is data, clamped; a negative or non-finite
# energy is a caller's bug.

def _clamped_ratio(value: float | None) -> float | None:
    """``value`` clamped to [0, 1]; None (and NaN) stay unknown."""
    if value is None or value != value:
        return None
    return min(1.0, max(0.0, float(value)))


def _known_memory(value: int | None) -> int | None:
    """Memory in bytes, None when unknown or negative (NVML's "not available" reads as a huge or -1)."""
    if value is None or value < 0:
        return None
    return int(value)


def _check_energy(energy_joules: float) -> float:
    energy = float(energy_joules)
    if not math.isfinite(energy) or energy < 0.0:
        raise ValueError(f"an interval's energy increase must be finite and >= 0 J, not {energy_joules!r}")
    return energy


# ---------------------------------------------------------------------------------------------------------
# Merging owners

def _add_known(a: float | None, b: float | None) -> float | None:
    """Sum of the known values; None only when neither is known."""
    if a is None:
        return b
    return a if b is None else a + b


def _merged_spans(a: tuple[tuple[int, int], ...] | None,
                  b: tuple[tuple[int, int], ...] | None) -> tuple[tuple[int, int], ...] | None:
    """Union of two held-span sets; None (the whole interval) absorbs the other."""
    if a is None or b is None:
        return None
    return a + b


def merge_usages(usages: Iterable[OwnerUsage]) -> list[OwnerUsage]:
    """One ``OwnerUsage`` per key, first-seen order. Entries with the same key are different processes of
    one owner: their known shares and memory add (the share capped at 1 later), their held spans unite
    (a process in the process list held the whole interval: that is direct evidence, where a run stretch
    is only what was declared)."""
    merged: dict[Hashable, OwnerUsage] = {}
    for usage in usages:
        seen = merged.get(usage.key)
        if seen is None:
            merged[usage.key] = usage
            continue
        merged[usage.key] = OwnerUsage(
            usage.key,
            _add_known(_clamped_ratio(seen.activity_share), _clamped_ratio(usage.activity_share)),
            _add_known(_known_memory(seen.memory_bytes), _known_memory(usage.memory_bytes)),
            _merged_spans(seen.held_spans_ns, usage.held_spans_ns))
    return list(merged.values())


def owner_usages(processes: Iterable[ProcessActivity], declared: Sequence[DeclaredOwner],
                 owner_of_pid: Callable[[int], Hashable | None]) -> list[OwnerUsage]:
    """The owners of one GPU over one interval.

    A pid a registered workload declared belongs to that workload (the first one declaring it), which then
    carries the process's NVML share and memory: the declaration names the owner, NVML measures it, and the
    process is never also a discovered owner (no double charge). Other pids go to ``owner_of_pid`` (pod,
    systemd unit or command name); a pid it cannot place (None: e.g. a PID namespace the agent cannot see)
    is charged to no one, so its activity ends up unattributed. A registered workload with no process on
    the GPU is still an owner for its run stretches."""
    declared_by_pid: dict[int, Hashable] = {}
    usages: list[OwnerUsage] = []
    for owner in declared:
        for pid in sorted(owner.pids):
            declared_by_pid.setdefault(pid, owner.key)
        usages.append(OwnerUsage(owner.key, None, owner.memory_bytes, owner.held_spans_ns))
    for process in processes:
        key = declared_by_pid.get(process.pid)
        if key is None:
            key = owner_of_pid(process.pid)
            if key is None:
                continue
        usages.append(OwnerUsage(key, process.activity_share, process.memory_bytes))
    return merge_usages(usages)


# ---------------------------------------------------------------------------------------------------------
# One interval

def _held_union(spans: tuple[tuple[int, int], ...] | None, start_ns: int, end_ns: int) -> list[tuple[int, int]]:
    """``spans`` clipped to [start_ns, end_ns) and merged into disjoint, sorted pieces."""
    if spans is None:
        return [(start_ns, end_ns)]
    pieces = sorted((max(lo, start_ns), min(hi, end_ns)) for lo, hi in spans)
    union: list[tuple[int, int]] = []
    for lo, hi in pieces:
        if hi <= lo:
            continue
        if union and lo <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], hi))
        else:
            union.append((lo, hi))
    return union


def _holding_weights(memory: list[int | None]) -> list[float]:
    """How the holders of one instant split its idle energy: by memory held when every holder's memory is
    known and not all zero, else equally (no better evidence of who keeps the GPU powered)."""
    if all(m is not None for m in memory):
        total = sum(memory)  # type: ignore[arg-type]
        if total > 0:
            return [m / total for m in memory]  # type: ignore[operator]
    return [1.0 / len(memory)] * len(memory)


def _holding_fractions(held: list[list[tuple[int, int]]], memory: list[int | None],
                       start_ns: int, end_ns: int) -> list[float]:
    """Each holder's fraction of the interval's holding: at every instant the holders then split it by
    ``_holding_weights``; instants nobody held belong to no one. The fractions sum to the held share of
    the interval (<= 1). One sweep over the span edges; O(edges x holders), and one step in the common case
    where every owner held the whole interval."""
    span_ns = end_ns - start_ns
    edges = sorted({start_ns, end_ns} | {t for pieces in held for piece in pieces for t in piece})
    fractions = [0.0] * len(held)
    for lo, hi in zip(edges, edges[1:]):
        present = [i for i, pieces in enumerate(held) if any(a <= lo and hi <= b for a, b in pieces)]
        if not present:
            continue
        weights = _holding_weights([memory[i] for i in present])
        for i, weight in zip(present, weights):
            fractions[i] += weight * (hi - lo) / span_ns
    return fractions


def _activity_fractions(shares: list[float | None], busy_ratio: float) -> list[float]:
    """Each owner's fraction of the GPU's busy time. Shares summing above the busy ratio are normalised
    (NVML's per-process samples are not synchronised with the device's busy counter, so the device's
    figure is the authority on how busy it was); below it, each owner gets its share and the rest of the
    busy time is no known owner's."""
    known = sum(s for s in shares if s is not None)
    if busy_ratio <= 0.0 or known <= 0.0:
        return [0.0] * len(shares)
    # Divided, not multiplied by a reciprocal: 1 / a subnormal share sum overflows to inf.
    divisor = known if known > busy_ratio else busy_ratio
    return [(s or 0.0) / divisor for s in shares]


def _exact_parts(energy: float, raw_parts: list[float]) -> tuple[list[float], float]:
    """``raw_parts`` (each >= 0, summing to about ``energy`` or less) rounded down to whole multiples of
    ``math.ulp(energy)``, and the remainder. Every partial sum is then a multiple of that ulp no larger than
    ``energy``, so it is representable: the parts plus the remainder add up to ``energy`` exactly, in any
    order. (A plain ``energy - fsum(parts)`` does not: rounding the remainder can land on a tie.)"""
    if energy == 0.0:
        return [0.0] * len(raw_parts), 0.0
    quantum = math.ulp(energy)
    whole = int(energy / quantum)  # exact: a power-of-two scaling of a float
    counts = [math.floor(max(0.0, raw) / quantum) for raw in raw_parts]
    excess = sum(counts) - whole  # > 0 only from float error in the raw split: take it off the largest
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if excess <= 0:
            break
        taken = min(excess, counts[i])
        counts[i] -= taken
        excess -= taken
    return [c * quantum for c in counts], (whole - sum(counts)) * quantum


def _interval_busy_ratio(busy_ratio: float | None, shares: list[float | None]) -> float | None:
    """The device's busy ratio; without it, the owners' known shares (capped at 1) as the best estimate."""
    busy = _clamped_ratio(busy_ratio)
    if busy is not None:
        return busy
    known = [s for s in shares if s is not None]
    return min(1.0, sum(known)) if known else None


def attribute_interval(start_ns: int, end_ns: int, energy_joules: float, busy_ratio: float | None,
                       owners: Iterable[OwnerUsage]) -> IntervalAttribution:
    """Splits one GPU interval [start_ns, end_ns) (monotonic ns) among its owners (docs/attribution.md).

    ``energy_joules``: the GPU's energy increase over the interval (>= 0). ``busy_ratio``: the fraction of
    the interval the GPU was busy (0..1, clamped), or None. Owners with the same key are merged
    (``merge_usages``); owners whose held spans miss the interval are not holders."""
    if end_ns <= start_ns:
        raise ValueError(f"an interval must end after it starts, not [{start_ns}, {end_ns})")
    energy = _check_energy(energy_joules)
    span_s = (end_ns - start_ns) / NS_PER_S
    holders, held = [], []
    for usage in merge_usages(owners):
        pieces = _held_union(usage.held_spans_ns, start_ns, end_ns)
        if pieces:
            holders.append(usage)
            held.append(pieces)
    if not holders:
        return IntervalAttribution({}, {}, energy, 0.0, RULE_NOT_HELD)
    shares = [_clamped_ratio(u.activity_share) for u in holders]
    busy = _interval_busy_ratio(busy_ratio, shares)
    busy_s = span_s * busy if busy is not None else 0.0
    holding = _holding_fractions(held, [_known_memory(u.memory_bytes) for u in holders], start_ns, end_ns)
    if len(holders) == 1 or busy is None or all(s is None for s in shares):
        # One owner: the device's whole activity is its contexts' (NVML lists every context), so all the
        # time it held the GPU is its own. No activity known: who held it (and how much memory) is all
        # there is to go on, for the active part as for the idle one.
        raw_energy = [energy * f for f in holding]
        raw_busy = [busy_s * f for f in holding]
        rule = RULE_EXCLUSIVE if len(holders) == 1 else RULE_BY_HOLDING
    else:
        active = _activity_fractions(shares, busy)
        idle_energy = energy * (1.0 - busy)
        raw_energy = [energy * busy * a + idle_energy * h for a, h in zip(active, holding)]
        raw_busy = [busy_s * a for a in active]
        rule = RULE_BY_ACTIVITY
    parts, unattributed = _exact_parts(energy, raw_energy)
    keys = [u.key for u in holders]
    return IntervalAttribution(dict(zip(keys, parts)), dict(zip(keys, raw_busy)), unattributed,
                               max(0.0, busy_s - math.fsum(raw_busy)), rule)


# ---------------------------------------------------------------------------------------------------------
# Over many intervals and GPUs

def energy_quanta(joules: float) -> int:
    """Joules as whole ``ENERGY_QUANTUM_JOULES`` (rounded to nearest)."""
    return round(joules / ENERGY_QUANTUM_JOULES)


def quanta_joules(quanta: int) -> float:
    """Whole quanta as joules (exact below 2^53 quanta, about 8.4 MJ)."""
    return quanta * ENERGY_QUANTUM_JOULES


@dataclass(slots=True)
class _OwnerRecord:
    order: int  # first-seen order: breaks ranking ties, so the cap is deterministic
    last_seen_ns: int
    keyed: bool
    lifetime_quanta: int = 0  # everything charged since first seen, keyed or folded: ranks for the cap
    exposed_quanta: int = 0  # charged since it got its key (what its series shows)
    exposed_busy_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class OwnerTotals:
    """An exposed owner's counters: energy since its key was given, busy seconds, last seen (ns)."""

    key: Hashable
    energy_quanta: int
    busy_seconds: float
    last_seen_ns: int | None  # None for ``OTHER_OWNER``

    @property
    def energy_joules(self) -> float:
        return quanta_joules(self.energy_quanta)


@dataclass(frozen=True, slots=True)
class AttributionSnapshot:
    """What one read (scrape) sees. ``owners`` are the keyed owners in the order they got their key, then
    ``OTHER_OWNER``. Identity, exact in quanta: sum(owners) + retired + sum(unattributed) == sum(counted)."""

    owners: tuple[OwnerTotals, ...]
    retired_energy_quanta: int  # totals of owners that left the exposition (dropped, or folded into other)
    unattributed_energy_quanta: Mapping[Hashable, int]  # gpu -> quanta charged to no one
    counted_energy_quanta: Mapping[Hashable, int]  # gpu -> quanta of every interval with a known energy

    def identity_residual_quanta(self) -> int:
        """Counted minus everything charged: 0 on every read."""
        charged = sum(o.energy_quanta for o in self.owners) + self.retired_energy_quanta
        return sum(self.counted_energy_quanta.values()) - charged - sum(self.unattributed_energy_quanta.values())


@dataclass(slots=True)
class _Bucket:
    quanta: int = 0
    busy_seconds: float = 0.0


@dataclass(slots=True)
class AttributionAccumulator:
    """Owner totals over many intervals and GPUs, with at most ``owner_cap`` owners keyed (the rest in
    ``OTHER_OWNER``) and owners unseen for over ``retention_ns`` dropped. A new owner gets a free key at
    once; keys are taken away (dropped, demoted) only in ``snapshot``, after the read, so a series never
    loses charges that no read showed.

    ``promotion_margin_ratio``: a folded owner takes the key of the smallest keyed one only when its
    lifetime energy is larger by this ratio; two owners of equal power would otherwise swap at every read,
    and each swap ends one series and starts another."""

    owner_cap: int
    retention_ns: int
    promotion_margin_ratio: float = 0.25
    _owners: dict[Hashable, _OwnerRecord] = field(default_factory=dict, init=False, repr=False)
    _other: _Bucket = field(default_factory=_Bucket, init=False, repr=False)
    _retired: _Bucket = field(default_factory=_Bucket, init=False, repr=False)
    _unattributed: dict[Hashable, int] = field(default_factory=dict, init=False, repr=False)
    _counted: dict[Hashable, int] = field(default_factory=dict, init=False, repr=False)
    _next_order: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.owner_cap < 0 or self.retention_ns <= 0 or self.promotion_margin_ratio < 0:
            raise ValueError("owner_cap >= 0, retention_ns > 0 and promotion_margin_ratio >= 0 are required")

    def _record(self, key: Hashable, seen_ns: int) -> _OwnerRecord:
        record = self._owners.get(key)
        if record is None:
            keyed = sum(r.keyed for r in self._owners.values()) < self.owner_cap
            record = self._owners[key] = _OwnerRecord(self._next_order, seen_ns, keyed)
            self._next_order += 1
        record.last_seen_ns = max(record.last_seen_ns, seen_ns)
        return record

    def add_interval(self, gpu: Hashable, start_ns: int, end_ns: int, energy_joules: float | None,
                     busy_ratio: float | None, owners: Sequence[OwnerUsage]) -> IntervalAttribution | None:
        """Charges one GPU interval. ``energy_joules`` None (the GPU was lost): nothing charged or counted,
        though its owners count as seen (the process list said they hold it)."""
        self._counted.setdefault(gpu, 0)
        self._unattributed.setdefault(gpu, 0)
        if energy_joules is None:
            for usage in owners:
                if _held_union(usage.held_spans_ns, start_ns, end_ns):
                    self._record(usage.key, end_ns)
            return None
        split = attribute_interval(start_ns, end_ns, energy_joules, busy_ratio, owners)
        whole = energy_quanta(_check_energy(energy_joules))
        charged = 0
        for key, joules in split.owner_energy_joules.items():
            # Rounded down, so the charges never exceed the interval's whole quanta.
            quanta = math.floor(joules / ENERGY_QUANTUM_JOULES)
            charged += quanta
            self._charge(self._record(key, end_ns), quanta, split.owner_busy_seconds[key])
        self._counted[gpu] += whole
        self._unattributed[gpu] += whole - charged
        return split

    def _charge(self, record: _OwnerRecord, quanta: int, busy_seconds: float) -> None:
        record.lifetime_quanta += quanta
        if record.keyed:
            record.exposed_quanta += quanta
            record.exposed_busy_seconds += busy_seconds
        else:
            self._other.quanta += quanta
            self._other.busy_seconds += busy_seconds

    def snapshot(self, now_ns: int) -> AttributionSnapshot:
        """The totals as of now, then the key changes for the next read: owners unseen for over the
        retention dropped, and the cap's ranking applied."""
        keyed = sorted((r.order, key) for key, r in self._owners.items() if r.keyed)
        owners = [OwnerTotals(key, self._owners[key].exposed_quanta, self._owners[key].exposed_busy_seconds,
                              self._owners[key].last_seen_ns) for _, key in keyed]
        owners.append(OwnerTotals(OTHER_OWNER, self._other.quanta, self._other.busy_seconds, None))
        snapshot = AttributionSnapshot(tuple(owners), self._retired.quanta, dict(self._unattributed),
                                       dict(self._counted))
        self._drop_unseen(now_ns)
        self._rebalance()
        return snapshot

    def _retire(self, record: _OwnerRecord) -> None:
        """Its series leaves the exposition; Prometheus keeps what it scraped, so its total goes here."""
        if record.keyed:
            self._retired.quanta += record.exposed_quanta
            self._retired.busy_seconds += record.exposed_busy_seconds
        record.keyed, record.exposed_quanta, record.exposed_busy_seconds = False, 0, 0.0

    def _drop_unseen(self, now_ns: int) -> None:
        for key in [k for k, r in self._owners.items() if now_ns - r.last_seen_ns > self.retention_ns]:
            self._retire(self._owners.pop(key))

    def _rebalance(self) -> None:
        """Fills free keys with the largest folded owners, then swaps a folded owner in for the smallest
        keyed one while it leads by the margin. Ranking: lifetime energy, ties by first seen."""
        rank = lambda key: (-self._owners[key].lifetime_quanta, self._owners[key].order)  # noqa: E731
        folded = sorted((k for k, r in self._owners.items() if not r.keyed), key=rank)
        keyed = sorted((k for k, r in self._owners.items() if r.keyed), key=rank)
        while folded and len(keyed) < self.owner_cap:
            key = folded.pop(0)
            self._owners[key].keyed = True
            keyed.append(key)
        keyed.sort(key=rank)
        while folded and keyed:
            challenger, weakest = self._owners[folded[0]], self._owners[keyed[-1]]
            if challenger.lifetime_quanta <= weakest.lifetime_quanta * (1.0 + self.promotion_margin_ratio):
                break
            self._retire(weakest)
            challenger.keyed = True
            keyed[-1], folded[0] = folded[0], keyed[-1]
            keyed.sort(key=rank)
            folded.sort(key=rank)
