"""The measurement rules of ``workloads/bench/analysis.py``, table by table, without running a benchmark.

Each regime's figures come from: the steady-state window (the phase less ramp-up and drain, at least
5 s); the energy counter differenced over it (resets, zero deltas, a single tick, the window's edges
moved onto the counter's ticks); the idle baseline subtracted for the dynamic figures; and a validity
list with one check per rule. The runs here are built sample by sample on a fake timeline, so every
expected figure is worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")

from wattledger.workloads.bench.analysis import (  # noqa: E402
    MIN_WINDOW_SECONDS,
    counter_energy,
    idle_baseline,
    regime_summary,
    steady_window,
    window_energy,
)
from wattledger.workloads.bench.economics import load_pricing  # noqa: E402
from wattledger.workloads.bench.results import RegimeResult  # noqa: E402
from wattledger.workloads.bench.rundata import RunData  # noqa: E402
from wattledger.workloads.registry import REGIMES, PerUnitEnergy, Regime  # noqa: E402

S = 1_000_000_000
MS = 1_000_000
ORIGIN = 1_000 * S


# -- the steady-state window --------------------------------------------------------------------------------


@pytest.mark.parametrize("phase_s, ramp_s, drain_s", [
    (60.0, 6.0, 3.0),  # long phase: 10% ramp-up, 5% drain
    (20.0, 2.0, 1.0),
    (10.0, 1.0, 0.5),  # the floors (1 s, 0.5 s) apply below 10 s; 8.5 s left
    (8.0, 1.0, 0.5),  # floors still fit: 6.5 s left >= 5.5 s
    (7.0, 1.0, 0.5),  # exactly 5.5 s left: no shrinking yet
    (6.5, 2 / 3, 1 / 3),  # too short for the floors: the 1 s spare split 2:1, window 5.5 s
    (5.5, 0.0, 0.0),  # no spare at all: the whole phase
    (3.0, 0.0, 0.0),  # shorter than the minimum: the whole phase (the window-length check then fails)
])
def test_steady_window_excludes_ramp_up_and_drain_but_keeps_five_seconds(phase_s, ramp_s, drain_s):
    start = ORIGIN
    end = start + round(phase_s * S)
    lo, hi, words = steady_window(start, end)
    assert (lo - start) / S == pytest.approx(ramp_s, abs=1e-9)
    assert (end - hi) / S == pytest.approx(drain_s, abs=1e-9)
    assert f"ramp-up {ramp_s:.1f} s and drain {drain_s:.1f} s excluded" == words
    if phase_s >= MIN_WINDOW_SECONDS + 0.5:
        assert (hi - lo) / S >= MIN_WINDOW_SECONDS + 0.5 - 1e-9


# -- counter differencing -------------------------------------------------------------------------------------


def gpu_frame(readings: list[tuple[float, float | None]], index: int = 0, power: float | None = None) -> pd.DataFrame:
    """GPU samples from (seconds since ORIGIN, energy counter J or None), as RunData.gpu holds them."""
    return pd.DataFrame({
        "monotonic_ns": [ORIGIN + round(t * S) for t, _ in readings],
        "index": [index] * len(readings),
        "energy_joules": [e for _, e in readings],
        "power_watts": [power] * len(readings),
    })


def ticking(watts: float, seconds: float, sample_s: float = 0.05, tick_s: float = 0.1, offset_j: float = 0.0,
            start_s: float = 0.0) -> list[tuple[float, float]]:
    """A counter that updates every ``tick_s`` (to the energy at that tick), sampled every ``sample_s``."""
    sample_us, tick_us = round(sample_s * 1e6), round(tick_s * 1e6)  # integers: no float floor surprises
    readings = []
    for i in range(round(seconds / sample_s) + 1):
        ticks = i * sample_us // tick_us
        readings.append((start_s + i * sample_us / 1e6, offset_j + watts * ticks * tick_us / 1e6))
    return readings


@pytest.mark.parametrize("name, readings, window_s, expected", [
    # 100 W, ticks every 100 ms, samples every 50 ms. Window [0.12, 0.88] s: the ticks seen inside are the
    # samples at 0.2 ... 0.8 s; each tick's time is the midpoint of the sample that showed it and the one
    # before (0.175 s, 0.775 s), so 60 J over exactly 0.6 s.
    ("steady", ticking(100.0, 1.0), (0.12, 0.88), {"joules": 60.0, "start_s": 0.175, "end_s": 0.775, "changes": 7}),
    # A window edge on a sample that shows a tick: that tick counts, its edge is the midpoint before it.
    ("edges on ticks", ticking(100.0, 1.0), (0.2, 0.8), {"joules": 60.0, "start_s": 0.175, "end_s": 0.775,
                                                          "changes": 7}),
    # A driver reload inside the window: the counter restarts near 0; the reading after the reset counts
    # as the energy since it (5 J), never as a negative delta.
    ("reset inside", [(0.0, 100.0), (0.1, 110.0), (0.2, 120.0), (0.3, 5.0), (0.4, 15.0), (0.5, 25.0), (0.6, 25.0)],
     (0.05, 0.55), {"joules": 10.0 + 5.0 + 10.0 + 10.0, "start_s": 0.05, "end_s": 0.45, "changes": 5}),
    # A counter that does not move in the window: no energy figure at all (not "0 J").
    ("zero delta", [(0.0, 500.0), (0.1, 500.0), (0.2, 500.0), (0.3, 500.0)], (0.0, 0.3),
     {"joules": None, "start_s": 0.0, "end_s": 0.3, "changes": 0}),
    # One tick in the window: no interval to difference over; 0 J with one change (the resolution check
    # then fails the regime).
    ("single tick", [(0.0, 500.0), (0.1, 500.0), (0.2, 510.0), (0.3, 510.0)], (0.0, 0.3),
     {"joules": 0.0, "start_s": 0.0, "end_s": 0.3, "changes": 1}),
    # Fewer than two readings: nothing to difference.
    ("one reading", [(0.0, 500.0)], (0.0, 1.0), {"joules": None, "start_s": 0.0, "end_s": 1.0, "changes": 0}),
    # Missing readings (a lost field) are skipped, not read as zero.
    ("gaps", [(0.0, 0.0), (0.1, None), (0.2, 20.0), (0.3, None), (0.4, 40.0), (0.5, 50.0)], (0.1, 0.5),
     {"joules": 30.0, "start_s": 0.1, "end_s": 0.45, "changes": 3}),
], ids=lambda value: value if isinstance(value, str) else "")
def test_counter_energy(name, readings, window_s, expected):
    got = counter_energy(gpu_frame(readings), ORIGIN + round(window_s[0] * S), ORIGIN + round(window_s[1] * S))
    if expected["joules"] is None:
        assert got["joules"] is None
    else:
        assert got["joules"] == pytest.approx(expected["joules"])
    assert (got["start_ns"] - ORIGIN) / S == pytest.approx(expected["start_s"], abs=1e-9)
    assert (got["end_ns"] - ORIGIN) / S == pytest.approx(expected["end_s"], abs=1e-9)
    assert got["changes"] == expected["changes"]


def test_counter_energy_and_its_window_cover_the_same_power():
    # Whatever the window, the snapped edges make energy / snapped length the true power (to one tick).
    readings = ticking(250.0, 20.0)
    for lo, hi in [(0.03, 19.97), (1.234, 7.891), (5.0, 5.5), (0.5, 10.05)]:
        got = counter_energy(gpu_frame(readings), ORIGIN + round(lo * S), ORIGIN + round(hi * S))
        seconds = (got["end_ns"] - got["start_ns"]) / S
        assert got["joules"] / seconds == pytest.approx(250.0, rel=1e-9), (lo, hi)
        # Each edge sits half a sample before the first (last) sample in the window that showed a tick.
        assert lo - 0.025 <= (got["start_ns"] - ORIGIN) / S <= lo + 0.1 - 0.025, (lo, got)
        assert hi - 0.1 - 0.025 - 0.05 <= (got["end_ns"] - ORIGIN) / S <= hi - 0.025, (hi, got)


# -- runs built sample by sample -------------------------------------------------------------------------------


def make_run(phases: dict[str, tuple[float, float]], watts, tokens_per_s: dict[str, float] | None = None,
             instant_watts=None, truth_scale: float | None = None, gpus: int = 1, interrupted: tuple = (),
             sample_s: float = 0.05, tick_s: float = 0.1) -> RunData:
    """A RunData with 50 ms GPU samples and a 100 ms energy counter.

    ``watts(t)`` is the power at t seconds (the counter integrates it tick by tick); ``instant_watts(t)``
    is what the instant-power field reads (default: the same); ``tokens_per_s`` the cumulative token
    rates per "workload/kind" while that workload's phase runs; ``truth_scale`` writes a mock truth
    counter of that multiple of the real energy.
    """
    end_s = max(stop for _, stop in phases.values()) + 1.0
    instant_watts = instant_watts or watts
    rows, token_rows, truth_rows = [], [], []
    energy = [1.0e6 * (g + 1) for g in range(gpus)]
    tick_energy = list(energy)
    counted = dict.fromkeys(tokens_per_s or {}, 0.0)
    steps = round(end_s / sample_s)
    next_tick = tick_s
    for i in range(steps + 1):
        t = i * sample_s
        if i:
            for g in range(gpus):
                energy[g] += watts(t) * sample_s
            for column, rate in (tokens_per_s or {}).items():
                start, stop = phases[column.split("/")[0]]
                if start < t <= stop:
                    counted[column] += rate * sample_s
        if t + 1e-9 >= next_tick:
            tick_energy = list(energy)
            next_tick += tick_s
        for g in range(gpus):
            rows.append({"monotonic_ns": ORIGIN + round(t * S) + g * 1000, "index": g,
                         "energy_joules": tick_energy[g], "power_watts": instant_watts(t),
                         "utilization_gpu_ratio": 1.0})
        token_rows.append({"monotonic_ns": ORIGIN + round(t * S) + 700, **{k: round(v) for k, v in counted.items()}})
        if truth_scale is not None:
            truth_rows.append({"monotonic_ns": ORIGIN + round(t * S) + 800,
                               **{str(g): (energy[g] - 1.0e6 * (g + 1)) * truth_scale for g in range(gpus)}})
    events = [{"type": "run_start", "monotonic_ns": ORIGIN, "kind": "bench"}]
    for name, (start, stop) in phases.items():
        events.append({"type": "phase_start", "phase": name, "monotonic_ns": ORIGIN + round(start * S),
                       "planned_seconds": stop - start})
        end = {"type": "phase_end", "phase": name, "monotonic_ns": ORIGIN + round(stop * S), "workload_summary": {}}
        if name in interrupted:
            end.update(interrupted=True, stop_reason="SIGINT", stop_requested_ns=ORIGIN + round(stop * S))
        events.append(end)
    return RunData(run_dir=Path("."), header={"simulated": truth_scale is not None}, events=events,
                   gpu=pd.DataFrame(rows), host=pd.DataFrame({"monotonic_ns": pd.Series(dtype="int64")}),
                   tokens=pd.DataFrame(token_rows), truth=pd.DataFrame(truth_rows),
                   spans=pd.DataFrame(columns=["workload", "kind", "start_ns", "end_ns"]), origin_ns=ORIGIN)


def constant(watts: float):
    return lambda t: watts


def stepped(idle_w: float, busy_w: float, busy_from_s: float, busy_to_s: float):
    return lambda t: busy_w if busy_from_s < t <= busy_to_s else idle_w


PRICING = load_pricing()


def checks(summary: RegimeResult) -> dict[str, bool]:
    return {c.check: c.passed for c in summary.validity}


def test_window_energy_sums_gpus_over_the_reference_gpus_window():
    run = make_run({"training": (1.0, 21.0)}, constant(300.0), gpus=2)
    got = window_energy(run, ORIGIN + 3 * S, ORIGIN + 19 * S)
    seconds = (got["end_ns"] - got["start_ns"]) / S
    assert got["joules"] == pytest.approx(2 * 300.0 * seconds, rel=1e-6)
    assert got["integrated_joules"] == pytest.approx(got["joules"], rel=1e-3)
    assert set(got["per_gpu"]) == {0, 1}


def test_idle_baseline_is_counter_energy_over_its_window():
    run = make_run({"idle": (0.0, 10.0)}, constant(70.0))
    idle, idle_checks = idle_baseline(run)
    assert idle.power_watts == pytest.approx(70.0, rel=1e-9)
    assert idle.duration_seconds >= MIN_WINDOW_SECONDS
    assert {c.check: c.passed for c in idle_checks}["idle baseline"] is True


@pytest.mark.parametrize("phases, why", [
    ({"training": (0.0, 20.0)}, "no idle phase was measured"),
    ({"idle": (0.0, 3.0)}, "s window, 70.0 W"),  # too short (2.9 s once snapped): measured, but the check fails
])
def test_idle_baseline_fails_its_check_when_missing_or_short(phases, why):
    idle, idle_checks = idle_baseline(make_run(phases, constant(70.0)))
    check = next(c for c in idle_checks if c.check == "idle baseline")
    assert check.passed is False and why in check.detail


def test_idle_subtraction_gives_the_dynamic_energy_per_token():
    # 70 W idle, 370 W while training at 1000 tokens/s: gross 0.37 J/token, dynamic 0.30 J/token.
    run = make_run({"idle": (0.0, 10.0), "training": (11.0, 41.0)}, stepped(70.0, 370.0, 11.0, 41.0),
                   tokens_per_s={"training/trained": 1000.0})
    idle_w = idle_baseline(run)[0].power_watts
    summary = regime_summary(run, "training", idle_w, PRICING, gpus=1)
    seconds = summary.duration_seconds
    assert summary.energy_joules == pytest.approx(370.0 * seconds, rel=1e-6)
    assert summary.energy.dynamic_joules == pytest.approx((370.0 - 70.0) * seconds, rel=1e-6)
    assert summary.joules_per_token.gross == pytest.approx(0.37, rel=0.01)
    assert summary.joules_per_token.dynamic == pytest.approx(0.30, rel=0.01)
    assert all(checks(summary).values()), summary.validity


def test_without_an_idle_baseline_there_is_no_dynamic_figure():
    run = make_run({"training": (1.0, 31.0)}, constant(370.0), tokens_per_s={"training/trained": 1000.0})
    summary = regime_summary(run, "training", None, PRICING, gpus=1)
    assert summary.energy_joules > 0 and summary.energy.dynamic_joules is None
    assert summary.joules_per_token.dynamic is None


# -- each validity check ------------------------------------------------------------------------------------------

GOOD = dict(phases={"training": (1.0, 31.0)}, watts=constant(300.0), tokens_per_s={"training/trained": 1000.0})


@pytest.mark.parametrize("change, failing", [
    ({}, None),
    ({"phases": {"training": (1.0, 4.0)}}, "window length"),  # a 3 s phase: no 5 s window
    # The counter never moves: no energy, so nothing to cross-check instant power against either.
    ({"watts": constant(0.0)}, {"counter resolution", "counter vs integrated power"}),
    ({"tokens_per_s": {"training/trained": 0.0}}, "tokens counted"),
    ({"instant_watts": constant(360.0)}, "counter vs integrated power"),  # +20 %: over the 10 % limit
    ({"interrupted": ("training",)}, "phase finished"),
    ({"truth_scale": 1.02}, "mock ground truth"),  # the counter reads 2 % off the simulator's truth
])
def test_each_validity_check_fails_on_its_own_fault(change, failing):
    run = make_run(**{**GOOD, **change})
    summary = regime_summary(run, "training", 70.0, PRICING, gpus=1)
    results = checks(summary)
    assert {"window length", "counter resolution", "phase finished", "tokens counted",
            "counter vs integrated power"} <= set(results)
    failed = {name for name, passed in results.items() if not passed}
    expected = set() if failing is None else {failing} if isinstance(failing, str) else failing
    assert failed == expected, summary.validity


def test_the_mock_truth_check_passes_within_one_percent():
    summary = regime_summary(make_run(**GOOD, truth_scale=1.004), "training", 70.0, PRICING, gpus=1)
    assert checks(summary)["mock ground truth"] is True
    assert summary.mock_truth.energy_joules == pytest.approx(summary.energy_joules * 1.004, rel=1e-3)


# -- what the regime registry decides: main token kind, per-unit energy --------------------------------------


TOY_PER_UNIT = PerUnitEnergy("joules_per_episode", "episode", "episodes_completed", None, from_tokens=True)


@pytest.fixture
def toy_regime(monkeypatch):
    """A fourth regime, registered for one test: its record alone decides its main kind and per-unit figure."""
    toy = Regime("toy", "nowhere.toy", "ToyConfig", "a toy regime", "prompt", "#123456", TOY_PER_UNIT)
    monkeypatch.setitem(REGIMES, "toy", toy)
    return toy


def _with_workload_summary(run: RunData, name: str, workload: dict) -> RunData:
    run.event("phase_end", phase=name)["workload_summary"] = workload
    return run


def test_a_registered_regime_gets_its_main_kind_and_per_unit_energy_from_its_record(toy_regime):
    # It produces more generated than prompt tokens, but its record says prompt is what it is quoted for.
    run = make_run({"idle": (0.0, 10.0), "toy": (11.0, 41.0)}, stepped(70.0, 370.0, 11.0, 41.0),
                   tokens_per_s={"toy/prompt": 500.0, "toy/generated": 2000.0})
    _with_workload_summary(run, "toy", {"episodes_completed": 50, "tokens": {"prompt": 15_000}})
    result = regime_summary(run, "toy", 70.0, PRICING, gpus=1)
    assert result.main_token_kind == "prompt"
    assert result.joules_per_token.gross == result.joules_per_token.by_kind["prompt"].gross
    expected = result.joules_per_token.gross * 15_000 / 50  # J per prompt token x prompt tokens per episode
    assert result.per_unit_joules["joules_per_episode"] == pytest.approx(expected)
    written = result.to_json()
    assert written["joules_per_episode"] == pytest.approx(expected)
    assert written["joules_per_request"] is None and written["joules_per_session"] is None  # others' figures
    assert RegimeResult.from_json(written).to_json() == written


@pytest.mark.parametrize("workload, why", [
    ({}, "the toy workload reported no summary"),
    ({"tokens": {"prompt": 10}}, "the toy workload's summary has no episode count"),
    ({"episodes_completed": 0, "tokens": {"prompt": 10}}, "no toy episode completed during the phase"),
])
def test_a_registered_regime_says_why_it_has_no_per_unit_figure(toy_regime, workload, why):
    run = make_run({"toy": (1.0, 31.0)}, constant(300.0), tokens_per_s={"toy/prompt": 1000.0})
    _with_workload_summary(run, "toy", workload)
    result = regime_summary(run, "toy", 70.0, PRICING, gpus=1)
    assert result.per_unit_joules["joules_per_episode"] is None
    assert result.not_available["joules_per_episode"] == why


def test_a_profiled_command_not_in_the_registry_is_quoted_for_the_kind_it_produced_most():
    run = make_run({"idle": (0.0, 10.0), "my-server": (11.0, 41.0)}, stepped(70.0, 370.0, 11.0, 41.0),
                   tokens_per_s={"my-server/prompt": 3000.0, "my-server/generated": 800.0})
    result = regime_summary(run, "my-server", 70.0, PRICING, gpus=1)
    assert "my-server" not in REGIMES
    assert result.main_token_kind == "prompt"
    assert result.tokens.prompt == pytest.approx(3000.0 * result.duration_seconds, rel=0.01)
    assert result.per_unit_joules == {} and set(result.not_available) == {"rapl_joules"}
    assert all(checks(result).values()), result.validity
