"""Cost per token, full-load cost, cost curve, CO2 and pricing inputs (workloads/bench/economics.py)."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wattledger.workloads.bench.economics import (
    COST_CURVE_UTILIZATIONS,
    PRICING_FIELDS,
    SOURCES,
    Pricing,
    add_pricing_arguments,
    gpu_cost_usd_per_second,
    load_pricing,
    pricing_from_args,
    pricing_record,
    regime_economics,
)
from wattledger.workloads.bench.results import CostPerMillionTokens

SIMPLE = Pricing(gpu_hour_usd=2.0, electricity_usd_per_kwh=0.10, pue=1.5, grid_carbon_g_per_kwh=400.0)


def econ(pricing=SIMPLE, gpus=1, window=3600.0, energy=3.6e6, tokens=1e6, utilization=1.0, idle=0.0):
    return regime_economics(pricing, gpus, window, energy, tokens, utilization, idle)


# ---------------------------------------------------------------- hand-computed cases


def test_measured_cost_hand_computed():
    # $2/GPU-hour for 1 h = $2; 1 kWh * PUE 1.5 * $0.10 = $0.15; over 1e6 tokens -> $2.15 per Mtok.
    r = econ()
    assert r.cost_usd_per_million_tokens.measured == pytest.approx(2.15, rel=1e-12)
    assert r.energy_share_of_cost == pytest.approx(0.15 / 2.15, rel=1e-12)
    # 1 kWh * 1.5 * 400 g = 600 g over 1e6 tokens.
    assert r.co2_grams_per_million_tokens == pytest.approx(600.0, rel=1e-12)
    assert r.breakdown.measured_energy_kwh == pytest.approx(1.0)
    assert r.breakdown.facility_energy_kwh == pytest.approx(1.5)
    assert r.note is None


def test_gpu_count_multiplies_gpu_cost_only():
    r = econ(gpus=4)
    # 4 GPUs * $2 + $0.15 energy (energy is the measured total, already summed over GPUs).
    assert r.cost_usd_per_million_tokens.measured == pytest.approx(8.15, rel=1e-12)


def test_full_load_hand_computed():
    # utilization 0.5: busy rate 1e6 / 1800 s; idle 100 W; dynamic J/token = (3.6e6 - 100*3600)/1e6 = 3.24;
    # full-load J/token = 3.24 + 100 / (1e6/1800) = 3.42; GPU $/Mtok = 2/3600 * 1800 = 1.0;
    # energy $/Mtok = 3.42 / 3.6e6 * 1.5 * 0.10 * 1e6 = 0.1425.
    r = econ(utilization=0.5, idle=100.0)
    assert r.cost_usd_per_million_tokens.measured == pytest.approx(2.15, rel=1e-12)
    assert r.cost_usd_per_million_tokens.full_load == pytest.approx(1.1425, rel=1e-12)
    b = r.breakdown
    assert b.tokens_per_busy_second == pytest.approx(1e6 / 1800)
    assert b.dynamic_joules_per_token == pytest.approx(3.24)
    assert b.full_load_joules_per_token == pytest.approx(3.42)


@pytest.mark.parametrize("utilization", [0.05, 0.3, 0.5, 0.9])
def test_full_load_below_measured_when_utilization_below_one(utilization):
    r = econ(utilization=utilization, idle=80.0)
    cost = r.cost_usd_per_million_tokens
    assert cost.full_load < cost.measured


@pytest.mark.parametrize("idle", [0.0, 60.0, 250.0, None])
def test_full_load_equals_measured_at_full_utilization(idle):
    r = econ(utilization=1.0, idle=idle)
    cost = r.cost_usd_per_million_tokens
    assert cost.full_load == pytest.approx(cost.measured, rel=1e-12)


def test_cost_curve_decreasing_and_passes_through_measured():
    r = econ(utilization=0.5, idle=100.0)
    curve = r.cost_curve
    assert [p.utilization for p in curve] == list(COST_CURVE_UTILIZATIONS)
    assert curve[0].utilization == 0.05 and curve[-1].utilization == 1.0 and len(curve) == 20
    values = [p.usd_per_million_tokens for p in curve]
    assert all(a > b for a, b in itertools.pairwise(values))
    at_half = next(p for p in curve if p.utilization == 0.5)
    assert at_half.usd_per_million_tokens == pytest.approx(r.cost_usd_per_million_tokens.measured, rel=1e-12)
    assert curve[-1].usd_per_million_tokens == pytest.approx(r.cost_usd_per_million_tokens.full_load)


def test_idle_above_mean_power_is_capped_and_noted():
    # mean power is 1000 W; an idle baseline of 1500 W cannot hold over this window.
    r = econ(utilization=0.4, idle=1500.0)
    assert r.breakdown.idle_power_watts_used == pytest.approx(1000.0)
    assert r.breakdown.dynamic_joules_per_token == 0.0
    assert "capped" in r.note
    cost = r.cost_usd_per_million_tokens
    assert cost.full_load < cost.measured


def test_no_idle_baseline_counts_all_energy_dynamic():
    r = econ(utilization=0.5, idle=None)
    assert r.breakdown.dynamic_joules_per_token == pytest.approx(3.6)
    assert "idle" in r.note


# ---------------------------------------------------------------- None, not zero


@pytest.mark.parametrize("tokens", [0, 0.0, None])
def test_no_tokens_gives_none_with_note(tokens):
    r = econ(tokens=tokens)
    assert r.cost_usd_per_million_tokens == CostPerMillionTokens(measured=None, full_load=None)
    assert r.energy_share_of_cost is None and r.co2_grams_per_million_tokens is None
    assert r.cost_curve is None
    assert "token" in r.note


@pytest.mark.parametrize("utilization", [0, 0.0, None])
def test_no_utilization_gives_none_full_load_with_note(utilization):
    r = econ(utilization=utilization)
    assert r.cost_usd_per_million_tokens.full_load is None
    assert r.cost_curve is None
    assert "utilization" in r.note
    # what needs no utilization is still there
    assert r.cost_usd_per_million_tokens.measured == pytest.approx(2.15)


def test_no_energy_or_empty_window_gives_none():
    for kwargs in ({"energy": None}, {"window": 0.0}):
        r = econ(**kwargs)
        assert r.cost_usd_per_million_tokens.measured is None
        assert r.note


def test_no_carbon_figure_gives_none_co2():
    r = econ(pricing=Pricing(gpu_hour_usd=2.0, grid_carbon_g_per_kwh=None))
    assert r.co2_grams_per_million_tokens is None
    assert "carbon" in r.note


@pytest.mark.parametrize("kwargs", [{"utilization": 1.5}, {"utilization": -0.1}, {"energy": -1.0},
                                    {"tokens": -5}, {"window": float("nan")}, {"gpus": -1}])
def test_bad_regime_inputs_raise(kwargs):
    with pytest.raises(ValueError):
        econ(**kwargs)


# ---------------------------------------------------------------- GPU cost, PUE


def test_amortisation_arithmetic():
    p = Pricing(gpu_hour_usd=None, gpu_purchase_usd=30000.0, amortisation_years=4.0, hosting_usd_per_gpu_hour=0.5)
    per_hour = 30000.0 / (4.0 * 8766.0) + 0.5
    assert p.gpu_cost_model == "amortised"
    assert p.gpu_cost_usd_per_gpu_hour == pytest.approx(per_hour)
    assert gpu_cost_usd_per_second(p, 8) == pytest.approx(8 * per_hour / 3600.0)
    # hourly price wins when both are given
    both = Pricing(gpu_hour_usd=3.0, gpu_purchase_usd=30000.0)
    assert both.gpu_cost_model == "hourly"
    assert gpu_cost_usd_per_second(both, 2) == pytest.approx(2 * 3.0 / 3600.0)


def test_pue_never_changes_measured_joules():
    def at(pue):
        pricing = Pricing(gpu_hour_usd=2.0, electricity_usd_per_kwh=0.1, pue=pue)
        return econ(pricing=pricing, utilization=0.5, idle=100.0)

    low, high = at(1.0), at(2.0)
    for key in ("measured_energy_kwh", "gross_joules_per_token", "dynamic_joules_per_token",
                "full_load_joules_per_token"):
        assert getattr(low.breakdown, key) == getattr(high.breakdown, key)
    assert high.breakdown.facility_energy_kwh == pytest.approx(2 * low.breakdown.facility_energy_kwh)
    # cost and CO2 do change: energy cost doubles, GPU cost does not
    assert high.breakdown.energy_cost_usd == pytest.approx(2 * low.breakdown.energy_cost_usd)
    assert high.breakdown.gpu_cost_usd == low.breakdown.gpu_cost_usd
    assert high.co2_grams_per_million_tokens == pytest.approx(2 * low.co2_grams_per_million_tokens)


def test_inputs_are_not_mutated():
    p = Pricing()
    before = copy.deepcopy(p)
    econ(pricing=p, utilization=0.5, idle=100.0)
    assert p == before


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gpu_hour_usd": -1.0}, "gpu_hour_usd"),
        ({"gpu_purchase_usd": -5.0}, "gpu_purchase_usd"),
        ({"electricity_usd_per_kwh": -0.1}, "electricity_usd_per_kwh"),
        ({"pue": 0.9}, "pue"),
        ({"amortisation_years": 0.0}, "amortisation_years"),
        ({"amortisation_years": -2.0}, "amortisation_years"),
        ({"hosting_usd_per_gpu_hour": -1.0}, "hosting_usd_per_gpu_hour"),
        ({"grid_carbon_g_per_kwh": -3.0}, "grid_carbon_g_per_kwh"),
        ({"pue": float("inf")}, "pue"),
        ({"pue": True}, "pue"),
        ({"electricity_usd_per_kwh": "cheap"}, "electricity_usd_per_kwh"),
        ({"gpu_hour_usd": None, "gpu_purchase_usd": None}, "gpu_purchase_usd"),
    ],
)
def test_validation_errors_are_one_line_and_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        load_pricing(**kwargs)
    message = str(info.value)
    assert field in message and "\n" not in message
    with pytest.raises(ValueError):
        Pricing(**kwargs)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'gpu_hour'") as info:
        load_pricing(gpu_hour=2.0)
    assert "\n" not in str(info.value)
    path = tmp_path / "p.toml"
    path.write_text("pue = 1.2\nelectricity = 0.3\n")
    with pytest.raises(ValueError, match="'electricity'") as info:
        load_pricing(str(path))
    assert "\n" not in str(info.value)


def test_file_that_is_not_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('{"pue": 1.2}\n')
    with pytest.raises(ValueError, match="not valid TOML") as info:
        load_pricing(str(path))
    assert "\n" not in str(info.value)
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00pue")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_pricing(str(binary))
    with pytest.raises(ValueError, match="cannot read"):
        load_pricing(str(tmp_path / "missing.toml"))


# ---------------------------------------------------------------- layering


def test_defaults_have_sources_for_every_field():
    p = load_pricing()
    assert p == Pricing()
    assert set(SOURCES) == set(PRICING_FIELDS)
    assert all(p.sources[name] for name in PRICING_FIELDS)
    assert p.pue == 1.58 and "Uptime" in p.sources["pue"]
    assert "assumption" in p.sources["amortisation_years"]


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        "[pricing]\n"
        "gpu_hour_usd = 2\n"
        "pue = 1.2\n"
        "electricity_usd_per_kwh = 0.08\n"
        "[pricing.sources]\n"
        "gpu_hour_usd = 'our contract, 2026'\n"
    )
    from_file = load_pricing(str(path))
    assert from_file.gpu_hour_usd == 2.0 and isinstance(from_file.gpu_hour_usd, float)
    assert from_file.pue == 1.2 and from_file.electricity_usd_per_kwh == 0.08
    assert from_file.grid_carbon_g_per_kwh == Pricing().grid_carbon_g_per_kwh  # default kept
    assert from_file.sources["gpu_hour_usd"].startswith("our contract, 2026")
    assert str(path) in from_file.sources["pue"]
    assert from_file.sources["grid_carbon_g_per_kwh"] == SOURCES["grid_carbon_g_per_kwh"]

    both = load_pricing(str(path), pue=1.1)
    assert both.pue == 1.1  # override beats file
    assert both.gpu_hour_usd == 2.0  # file beats default
    assert both.sources["pue"] == "set by overrides"


def test_top_level_keys_work_and_duplicates_are_errors(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("pue = 1.3\n[sources]\npue = 'site survey'\n")
    p = load_pricing(str(path))
    assert p.pue == 1.3 and p.sources["pue"].startswith("site survey")
    path.write_text("pue = 1.3\n[pricing]\npue = 1.4\n")
    with pytest.raises(ValueError, match="pue"):
        load_pricing(str(path))


def test_purchase_figures_select_the_amortised_model(tmp_path):
    path = tmp_path / "own.toml"
    path.write_text("gpu_purchase_usd = 26280\namortisation_years = 3\n")
    p = load_pricing(str(path))
    assert p.gpu_hour_usd is None and p.gpu_cost_model == "amortised"
    assert p.gpu_cost_usd_per_gpu_hour == pytest.approx(26280 / (3 * 8766))
    # a later layer's hourly price switches back
    assert load_pricing(str(path), gpu_hour_usd=2.5).gpu_cost_usd_per_gpu_hour == 2.5
    # "none" clears the hourly price and falls back to the default purchase price
    q = load_pricing(gpu_hour_usd="none")
    assert q.gpu_cost_usd_per_gpu_hour == pytest.approx(30000 / (4 * 8766))
    assert load_pricing(grid_carbon_g_per_kwh=None).grid_carbon_g_per_kwh is None
    with pytest.raises(ValueError, match="pue"):
        load_pricing(pue="none")


def test_command_line_flags(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("pue = 1.2\nelectricity_usd_per_kwh = 0.2\n")
    parser = argparse.ArgumentParser()
    add_pricing_arguments(parser)
    args = parser.parse_args(["--pricing", str(path), "--pue", "1.4", "--gpu-hour-usd", "2.5",
                              "--carbon-g-per-kwh", "none"])
    p = pricing_from_args(args)
    assert p.pue == 1.4 and p.electricity_usd_per_kwh == 0.2 and p.gpu_hour_usd == 2.5
    assert p.grid_carbon_g_per_kwh is None
    assert p.sources["pue"] == "command line --pue"
    assert str(path) in p.sources["electricity_usd_per_kwh"]
    assert pricing_from_args(parser.parse_args([])) == Pricing()
    amortised = pricing_from_args(parser.parse_args(["--gpu-purchase-usd", "20000", "--amortisation-years", "5"]))
    assert amortised.gpu_cost_usd_per_gpu_hour == pytest.approx(20000 / (5 * 8766))
    with pytest.raises(SystemExit):
        parser.parse_args(["--pue", "high"])
    with pytest.raises(ValueError, match="pue"):
        pricing_from_args(parser.parse_args(["--pue", "0.5"]))


def test_pricing_record():
    rec = pricing_record(Pricing(gpu_hour_usd=None, gpu_purchase_usd=8766.0, amortisation_years=1.0))
    assert rec["gpu_cost_model"] == "amortised"
    assert rec["gpu_cost_usd_per_gpu_hour"] == pytest.approx(1.0)
    for name in PRICING_FIELDS:
        assert name in rec
    assert set(rec["sources"]) >= set(PRICING_FIELDS)
    assert "measured" in " ".join(rec["formulas"])
    assert any("PUE" in note for note in rec["notes"])
    json.dumps(rec)  # goes into summary.json as is


# ---------------------------------------------------------------- properties

positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    gpu_hour=positive, electricity=st.floats(0, 10), pue=st.floats(1.0, 3.0), carbon=st.floats(0, 2000),
    gpus=st.integers(1, 64), window=positive, energy=st.floats(0, 1e12), tokens=st.integers(1, 10**12),
    utilization=st.floats(1e-3, 1.0), idle=st.floats(0, 1e5),
)
def test_property_figures_finite_nonnegative_and_linear_in_gpu_price(
    gpu_hour, electricity, pue, carbon, gpus, window, energy, tokens, utilization, idle
):
    pricing = Pricing(gpu_hour_usd=gpu_hour, electricity_usd_per_kwh=electricity, pue=pue, grid_carbon_g_per_kwh=carbon)
    r = regime_economics(pricing, gpus, window, energy, tokens, utilization, idle)
    figures = [
        r.cost_usd_per_million_tokens.measured,
        r.cost_usd_per_million_tokens.full_load,
        r.energy_share_of_cost,
        r.co2_grams_per_million_tokens,
        *(p.usd_per_million_tokens for p in r.cost_curve),
        *(v for v in asdict(r.breakdown).values() if isinstance(v, float)),
    ]
    for value in figures:
        assert value is not None and math.isfinite(value) and value >= 0
    assert r.energy_share_of_cost <= 1.0
    cost = r.cost_usd_per_million_tokens
    assert cost.full_load <= cost.measured * (1 + 1e-9)
    curve = [p.usd_per_million_tokens for p in r.cost_curve]
    assert all(a >= b * (1 - 1e-12) for a, b in itertools.pairwise(curve))

    # cost is affine in the GPU price: the GPU part scales, the energy part stays put
    doubled = regime_economics(
        Pricing(gpu_hour_usd=2 * gpu_hour, electricity_usd_per_kwh=electricity, pue=pue, grid_carbon_g_per_kwh=carbon),
        gpus, window, energy, tokens, utilization, idle,
    )
    for key in ("measured", "full_load"):
        base = getattr(r.cost_usd_per_million_tokens, key)
        gpu_part = base - _energy_part(r, key, pricing)
        assert getattr(doubled.cost_usd_per_million_tokens, key) == pytest.approx(base + gpu_part, rel=1e-9, abs=1e-12)
    # and linear when energy is free
    free = regime_economics(Pricing(gpu_hour_usd=gpu_hour, electricity_usd_per_kwh=0.0), gpus, window, energy,
                            tokens, utilization, idle)
    free3 = regime_economics(Pricing(gpu_hour_usd=3 * gpu_hour, electricity_usd_per_kwh=0.0), gpus, window, energy,
                             tokens, utilization, idle)
    assert free3.cost_usd_per_million_tokens.measured == pytest.approx(
        3 * free.cost_usd_per_million_tokens.measured, rel=1e-12)
    assert free3.cost_usd_per_million_tokens.full_load == pytest.approx(
        3 * free.cost_usd_per_million_tokens.full_load, rel=1e-12)


def _energy_part(r, key, pricing):
    b = r.breakdown
    joules = b.gross_joules_per_token if key == "measured" else b.full_load_joules_per_token
    return joules / 3.6e6 * pricing.pue * pricing.electricity_usd_per_kwh * 1e6


def test_direct_construction_does_not_keep_default_sources():
    p = Pricing(gpu_hour_usd=None, pue=1.1)
    assert p.sources["gpu_hour_usd"] == "not given"
    assert p.sources["pue"] == "given directly (not the documented default)"
    assert p.sources["electricity_usd_per_kwh"] == SOURCES["electricity_usd_per_kwh"]
    assert Pricing().sources == SOURCES
