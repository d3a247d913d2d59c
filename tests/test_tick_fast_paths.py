"""The sampler tick's fast paths give exactly what the straightforward code gives, over random inputs.

- GpuSample and the other frozen sample classes are built by ``direct_slot_init``'s __init__ (each slot
  stored through its descriptor): every field must be the very object the dataclass's own __init__
  stores, for any arguments, passed by position or keyword, and a bad call must fail as it fails there.
- The ledger reads a sample's fields in groups through functions that spell the attributes out: each
  must return its name tuple's fields in that order.
- ``HardwareCounter.update`` takes common readings without calling ``_reading``, and the ledger takes
  common ratios without calling ``_ratio`` and counts histograms inline: totals, previous readings,
  bucket counts, sums and busy seconds must equal a straightforward model built on ``_reading``,
  ``_ratio`` and ``Histogram.observe``, to the bit.
- The mock keeps each stretch's power figures instead of computing the model again per sample: its
  power, clock and throttle reasons must equal the model evaluated afresh.

The tick trace (tests/test_tick_trace_golden.py) checks a whole scripted run against the code before
these paths.
"""

from __future__ import annotations

import dataclasses
import math
from operator import attrgetter
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.agent import ledger as ledger_module
from wattledger.agent.accounting import Accounting, AccountingError, clip_run_stretches
from wattledger.agent.ledger import (
    ENGINES,
    HardwareCounter,
    Histogram,
    KernelCounter,
    Ledger,
    RebasingCounter,
    _ratio,
    _reading,
)
from wattledger.probes.activity import Activity, ScriptedTimeline, flatten
from wattledger.probes.base import DATACLASS_INITS, GpuInfo, GpuSample, direct_slot_init
from wattledger.probes.mock import MockGpuBackend, power_demand_watts

# Any value a field might be handed (the classes do not check types), NaN included: identity, not
# equality, is what the comparison uses.
any_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
    st.frozensets(st.sampled_from(["gpu_idle", "sw_power_cap", "hw_slowdown"])),
    st.dictionaries(st.text(max_size=3), st.floats(), max_size=2), st.tuples(st.integers()),
)
FAST_CLASSES = sorted(DATACLASS_INITS, key=lambda cls: cls.__name__)


def test_every_frozen_sample_class_has_the_direct_init():
    names = {cls.__name__ for cls in FAST_CLASSES}
    assert {"GpuSample", "HostSample", "ProcessSample", "GpuInfo", "Activity", "ActivitySegment"} <= names
    for cls in FAST_CLASSES:
        assert cls.__init__ is not DATACLASS_INITS[cls]


@st.composite
def construction(draw):
    """(class, positional arguments, keyword arguments): the required fields always, some defaulted
    ones, split at a random point between position and keyword."""
    cls = draw(st.sampled_from(FAST_CLASSES))
    fields = dataclasses.fields(cls)
    chosen = [f for f in fields if f.default is dataclasses.MISSING or draw(st.booleans())]
    values = {f.name: draw(any_value) for f in chosen}
    # Positional only for a leading run of fields with nothing skipped before it.
    leading = 0
    for f in fields:
        if f.name not in values:
            break
        leading += 1
    split = draw(st.integers(0, leading))
    positional = [values.pop(f.name) for f in fields[:split]]
    return cls, positional, values


@settings(max_examples=300, deadline=None)
@given(construction())
def test_the_direct_init_stores_what_the_dataclass_init_stores(case):
    cls, positional, keywords = case
    fast = cls(*positional, **keywords)
    reference = object.__new__(cls)
    DATACLASS_INITS[cls](reference, *positional, **keywords)
    for f in dataclasses.fields(cls):
        assert getattr(fast, f.name) is getattr(reference, f.name), f.name
    assert repr(fast) == repr(reference)
    assert fast == reference  # (the same objects, so NaN fields compare equal too)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fast, dataclasses.fields(cls)[0].name, 1)


GPU_SAMPLE_FIELDS = len(dataclasses.fields(GpuSample))


@pytest.mark.parametrize("args, kwargs", [
    ((), {}),  # required fields missing
    ((0, "GPU-x"), {}),
    ((0, "GPU-x", 1), {"no_such_field": 2}),
    (tuple(range(GPU_SAMPLE_FIELDS + 1)), {}),  # one positional too many
    ((0, "GPU-x", 1), {"index": 0}),  # a field twice
])
def test_a_bad_call_fails_as_it_fails_with_the_dataclass_init(args, kwargs):
    with pytest.raises(TypeError) as fast:
        GpuSample(*args, **kwargs)
    with pytest.raises(TypeError) as reference:
        DATACLASS_INITS[GpuSample](object.__new__(GpuSample), *args, **kwargs)
    assert str(fast.value) == str(reference.value)


def test_direct_slot_init_refuses_classes_it_would_build_differently():
    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        x: list = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithPostInit:
        x: int

        def __post_init__(self):
            pass

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    for cls in (NotFrozen, WithFactory, WithPostInit, NoSlots):
        with pytest.raises(TypeError):
            direct_slot_init(cls)


def _distinct_sample() -> GpuSample:
    """A sample whose every field holds a value no other field holds."""
    values = {f.name: float(n) + 0.5 for n, f in enumerate(dataclasses.fields(GpuSample))}
    values.update(index=0, uuid="GPU-distinct", monotonic_ns=7)
    return GpuSample(**values)


def test_the_ledger_field_group_readers_follow_their_name_tuples():
    sample = _distinct_sample()
    assert ledger_module._engine_values(sample) == attrgetter(*ledger_module._ENGINE_ATTRIBUTES)(sample)
    assert ledger_module._gauge_values(sample) == attrgetter(*ledger_module._GAUGE_FIELDS)(sample)
    field_names = [name for _, name, _ in ledger_module._FIELD_COUNTERS]
    assert ledger_module._field_counter_values(sample) == attrgetter(*field_names)(sample)
    state = ledger_module.GpuLedger(GpuInfo(0, "GPU-distinct", "m", "d", None, None))
    counters = ledger_module._field_counters(state)
    attributes = [attribute for _, _, attribute in ledger_module._FIELD_COUNTERS]
    assert all(a is b for a, b in zip(counters, attrgetter(*attributes)(state), strict=True))
    assert len(set(map(id, counters))) == len(counters)


# Readings of every kind a driver or a kernel gives: common floats and ints, and garbage.
raw_reading = st.one_of(
    st.floats(min_value=0, max_value=1e15), st.integers(min_value=0, max_value=2**80),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 10**400, True, False, None, "3"]),
    st.floats(), st.integers(),
)


class StraightforwardCounter:
    """HardwareCounter's rule written plainly on ``_reading``, for one counter kind's ``_on_decrease``."""

    def __init__(self, kind: type[HardwareCounter]):
        self.on_decrease = kind._on_decrease
        self.total, self.previous = 0.0, None

    def update(self, raw):
        value = _reading(raw)
        if value is None:
            return None
        if self.previous is None:
            self.previous = value
            return 0.0
        if value >= self.previous:
            increase, self.previous = value - self.previous, value
        else:
            increase, self.previous = self.on_decrease(self.previous, value)
        self.total += increase
        return increase


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([HardwareCounter, KernelCounter, RebasingCounter]), st.lists(raw_reading, max_size=30))
def test_counter_fast_path_matches_the_straightforward_rule(kind, readings):
    fast, plain = kind(), StraightforwardCounter(kind)
    for raw in readings:
        assert repr(fast.update(raw)) == repr(plain.update(raw))
        assert repr(fast.total) == repr(plain.total) and repr(fast._previous) == repr(plain.previous)


raw_ratio = st.one_of(
    st.floats(min_value=0, max_value=1), st.sampled_from([0.0, 1.0, 0.1, 0.25, 0.99, -0.0]),
    st.sampled_from([None, math.nan, math.inf, -math.inf, -0.5, 1.5, True, 0, 1, 2]), st.floats(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10**9), st.tuples(*[raw_ratio] * len(ENGINES))), min_size=1, max_size=25))
def test_engine_fast_path_matches_ratio_and_observe(steps):
    """Histograms and busy seconds from the ledger equal those of _ratio + Histogram.observe + ratio x dt."""
    info = GpuInfo(0, "GPU-p", "m", "d", None, None)
    ledger = Ledger(None, clock_ns=lambda: 0)
    ledger.set_devices("fake", True, [info])
    histograms: dict[str, Histogram] = {}
    busy: dict[str, float] = {}
    now_ns, previous_ns = 0, None
    for step_ns, ratios in steps:
        now_ns += step_ns
        sample = GpuSample(0, "GPU-p", now_ns, **dict(zip(ledger_module._ENGINE_ATTRIBUTES, ratios)))
        ledger.record_gpus([sample])
        dt = (now_ns - previous_ns) / NS_PER_S if previous_ns is not None else None
        previous_ns = now_ns
        for engine, raw in zip(ENGINES, ratios):
            ratio = _ratio(raw)
            if ratio is None:
                continue
            if engine not in histograms:
                histograms[engine], busy[engine] = Histogram(), 0.0
            histograms[engine].observe(ratio)
            if dt is not None:
                busy[engine] += ratio * dt
    state = ledger._gpus[0]
    assert list(state.histograms) == list(histograms)
    for engine, expected in histograms.items():
        got = state.histograms[engine]
        assert got.bucket_counts == expected.bucket_counts and got.count == expected.count
        assert repr(got.total) == repr(expected.total)
        assert repr(state.busy_seconds[engine]) == repr(busy[engine])


activity = st.builds(
    Activity,
    gpu=st.sampled_from([0.0, 0.3, 1.0]), sm=st.floats(0, 1), tensor=st.floats(0, 1), dram=st.floats(0, 1),
    pcie_transmit_bytes_per_second=st.floats(0, 1e10), pcie_receive_bytes_per_second=st.floats(0, 1e10),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400), activity), min_size=1, max_size=6),
       st.floats(150, 700), st.integers(1, 30))
def test_mock_power_figures_equal_the_model_evaluated_afresh(pieces, limit_watts, samples):
    """power, SM clock and throttle reasons of every sample equal the power model applied to the
    activity the device is in, as the mock computed them before it kept them per stretch."""
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns())
    t_ms = 0
    for gap_ms, length_ms, act in pieces:
        t_ms += gap_ms
        timeline.add(t_ms / 1000, (t_ms + length_ms) / 1000, act)
        t_ms += length_ms
    mock = MockGpuBackend(1, activity=timeline, clock_ns=clock.ns, power_limit_watts=limit_watts)
    spec = mock.spec
    for _ in range(samples):
        clock.advance(t_ms / 1000 / samples)
        sample = mock.sample()[0]
        current = mock._gpus[0].current_activity()
        demand = power_demand_watts(spec, current)
        assert sample.power_watts == min(demand, limit_watts)
        capped = demand > limit_watts
        reasons = set()
        if current.gpu == 0.0:
            reasons.add("gpu_idle")
        if capped:
            reasons.add("sw_power_cap")
        assert sample.throttle_reasons == frozenset(reasons)
        if current.gpu == 0.0:
            assert sample.sm_clock_hertz == spec.sm_clock_idle_hertz
        elif capped:
            headroom = (limit_watts - spec.idle_power_watts) / (demand - spec.idle_power_watts)
            assert sample.sm_clock_hertz == (
                spec.sm_clock_idle_hertz + (spec.sm_clock_max_hertz - spec.sm_clock_idle_hertz) * headroom)
        else:
            assert sample.sm_clock_hertz == spec.sm_clock_max_hertz


# -- the ledger's per-sample shortcuts, against the same ledger with each one switched off ------------

# Values a watched field takes in the scenarios below: mostly ordinary readings, a few kept as shared
# objects (so that a reading repeats as the very same object, as small ints and unchanged attributes do),
# and the garbage a driver may return.
SHARED_FLOAT, SHARED_INT = 12.5, 10**12
reading_value = st.one_of(
    st.sampled_from([None, 0, 3, SHARED_INT, SHARED_FLOAT, 0.0, -0.0, 1.0, 0.5]),
    st.floats(min_value=0, max_value=1e6), st.integers(0, 10**15),
    st.sampled_from([math.nan, -1.0, math.inf, True, "7"]),
)
WATCHED = ledger_module._WATCHED_FIELDS


@st.composite
def gpu_scenario(draw):
    """A run of samples for 2 GPUs (a base reading of every watched field, changed a few fields at a time,
    so the same set of fields recurs as on a real device) with workload starts and stops in between."""
    base = {name: draw(reading_value) for name in WATCHED if name != "throttle_reasons"}
    steps = []
    for _ in range(draw(st.integers(1, 30))):
        changes = draw(st.dictionaries(st.sampled_from(WATCHED[:-1]), reading_value, max_size=3))
        base = {**base, **changes}
        steps.append({
            "dt_ns": draw(st.sampled_from([100_000_000, 100_000_000, 10_000_000, 0, 250_000_000, 1_500_000_000])),
            "gpu": draw(st.sampled_from([0, 1, None])),  # None: both
            "up": draw(st.sampled_from([True, True, True, False])),
            "fields": dict(base),
            "throttle_seconds": draw(st.sampled_from(["none", "empty", "shared", "fresh", "garbage"])),
            "throttle_reasons": draw(st.sampled_from(
                [None, frozenset(), frozenset({"gpu_idle"}), frozenset({"gpu_idle", "sw_power_cap"})])),
            "event": draw(st.sampled_from([None, None, None, ("start", "a", (0,)), ("start", "b", (0, 1)),
                                          ("stop", "a"), ("stop", "b")])),
        })
    return steps


def replay(steps) -> list:
    """Every snapshot figure after each step of ``steps`` (see gpu_scenario), exactly."""
    from test_tick_trace_golden import canonical

    clock = FakeClock()
    accounting = Accounting([0, 1], clock_ns=clock.ns)
    ledger = Ledger(accounting, clock_ns=clock.ns)
    infos = [GpuInfo(i, f"GPU-{i}", "m", "d", None, None) for i in (0, 1)]
    ledger.set_devices("fake", True, infos)
    throttle_shared = 4.25
    figures = []
    for step in steps:
        event = step["event"]
        try:
            if event is not None and event[0] == "start":
                accounting.start(event[1], list(event[2]))
            elif event is not None:
                accounting.stop(event[1])
        except AccountingError:
            pass  # already running, or not running
        clock.now_ns += step["dt_ns"]
        throttle = {"none": None, "empty": {}, "shared": {"sw_power_cap": throttle_shared},
                    "fresh": {"sw_power_cap": clock.now_ns / 1e12},
                    "garbage": {"sw_power_cap": math.nan}}[step["throttle_seconds"]]
        samples = [GpuSample(index=i, uuid=f"GPU-{i}", monotonic_ns=clock.now_ns, up=step["up"],
                             throttle_seconds=throttle, throttle_reasons=step["throttle_reasons"],
                             **step["fields"])
                   for i in (0, 1) if step["gpu"] in (None, i)]
        ledger.record_gpus(samples)
        snapshot = ledger.snapshot()
        figures.append(canonical({"gpus": snapshot.gpus, "energy": snapshot.workload_energy_joules,
                                  "active": snapshot.workload_active_seconds}))
    return figures


class _NeverTheSame:
    """A ``_CounterSlot.raw`` that no reading is: every reading goes through the counter."""

    def __get__(self, slot, owner=None):
        return object()

    def __set__(self, slot, value):
        pass


@settings(max_examples=120, deadline=None)
@given(gpu_scenario())
def test_the_ledger_shortcuts_give_what_the_general_path_gives(steps):
    """Held read times, the sole-holder accounting and the repeated-reading skip change no figure: the
    ledger without them (read times written per field, every interval through _account, every reading
    through its counter) gives the same snapshots, to the bit."""
    fast = replay(steps)
    with mock.patch.object(ledger_module._LiveGpuLedger, "hold", lambda self, present, read_ns: None), \
            mock.patch.object(ledger_module._LiveGpuLedger, "set_run_stretches",
                              lambda self, stretches: setattr(self, "sole_holder", None)), \
            mock.patch.object(ledger_module._CounterSlot, "raw", _NeverTheSame()):
        general = replay(steps)
    assert fast == general


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["energy_joules", "pcie_transmit_bytes", "ecc_corrected_errors"]),
                          raw_reading), min_size=1, max_size=30))
def test_the_ledger_counts_readings_as_the_straightforward_counter_rule(readings):
    """The ledger's inlined counter update (energy, and the field counters) equals HardwareCounter's rule
    written plainly on _reading, totals and previous readings to the bit."""
    ledger = Ledger(None, clock_ns=lambda: 0)
    ledger.set_devices("fake", True, [GpuInfo(0, "GPU-c", "m", "d", None, None)])
    plain = {name: StraightforwardCounter(HardwareCounter) for name, _ in readings}
    now_ns = 0
    for name, raw in readings:
        now_ns += 1000
        ledger.record_gpus([GpuSample(0, "GPU-c", now_ns, **{name: raw})])
        plain[name].update(raw)
    state = ledger._gpus[0]
    counters = {"energy_joules": state.energy, "pcie_transmit_bytes": state.pcie_transmit,
                "ecc_corrected_errors": state.ecc_corrected}
    for name, expected in plain.items():
        got = counters[name]
        assert repr(got.total) == repr(expected.total) and repr(got._previous) == repr(expected.previous)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "stop", "forget", "trim"]), st.sampled_from(["a", "b", "c"]),
                          st.sampled_from([(0,), (1,), (0, 1)]), st.integers(0, 5 * NS_PER_S)), max_size=25),
       st.lists(st.tuples(st.integers(0, 10 * NS_PER_S), st.integers(0, 10 * NS_PER_S)), min_size=1, max_size=5))
def test_the_accountings_stretch_copy_clips_as_running_on_and_its_generation_moves(operations, windows):
    """``clip_run_stretches`` of ``run_stretches()`` equals ``running_on`` for any window after any
    operations, and the generation moves whenever the stretches do (so a copy kept while it stays put
    is current)."""
    clock = FakeClock(0)
    accounting = Accounting([0, 1], clock_ns=clock.ns)
    for op, name, gpus, advance_ns in operations:
        clock.now_ns += advance_ns
        before = accounting.run_stretches()
        try:
            if op == "start":
                accounting.start(name, list(gpus))
            elif op == "stop":
                accounting.stop(name)
            elif op == "forget":
                accounting.forget(name)
            else:
                accounting.forget_intervals_before(clock.now_ns - NS_PER_S)
        except AccountingError:
            pass
        after = accounting.run_stretches()
        assert (after[0] == before[0]) == (after[1] == before[1])
        for start_ns, end_ns in windows:
            for gpu in (0, 1):
                clipped = clip_run_stretches(after[1][gpu], start_ns, end_ns)
                assert clipped == accounting.running_on(gpu, start_ns, end_ns)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 10), activity,
                          st.sampled_from([None, (0,), (1,), (0, 1)])), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 30), st.integers(1, 10)), min_size=1, max_size=6))
def test_a_scripted_timeline_answers_every_gpu_as_its_own_query_would(entries, windows):
    """A window asked again for another GPU (reused when every activity in it covers every GPU) gives
    what flattening that GPU's activities gives."""
    timeline = ScriptedTimeline(0)
    for start_s, length_s, act, gpus in entries:
        timeline.add(start_s, start_s + length_s, act, gpus)
    for start_s, length_s in windows:
        start_ns, end_ns = start_s * NS_PER_S, (start_s + length_s) * NS_PER_S
        for gpu in (0, 1, 0):
            expected = flatten(((s, e, a) for s, e, a, gpus in timeline._entries if gpus is None or gpu in gpus),
                               start_ns, end_ns)
            assert timeline.segments(gpu, start_ns, end_ns) == expected
