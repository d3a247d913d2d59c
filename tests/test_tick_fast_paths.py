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

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.agent import ledger as ledger_module
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
from wattledger.probes.activity import ScriptedTimeline
from wattledger.probes.base import DATACLASS_INITS, Activity, GpuInfo, GpuSample, direct_slot_init
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
