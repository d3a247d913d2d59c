"""What a token costs: GPU time, facility energy and CO2 from a regime's measured joules and tokens.

Pure arithmetic on figures the benchmark has already measured; stdlib only (``tomllib`` for pricing files).

Inputs (:class:`Pricing`) come in three layers, later ones winning: the documented defaults below, a
TOML file (``--pricing FILE``), then explicit overrides (command-line flags). Every figure carries a
source string, and a figure replaced by a file or a flag has its source replaced too, so
``summary.json``'s ``pricing`` object always says where each number came from.

Facility overhead (PUE) is a separate, labelled estimate (docs/measurement.md, rule 11): it multiplies the
energy that is *paid for* and the CO2, never the measured joules, which this module only reads.

Default figures and where they come from (looked up in stored copies of public pages; the dates are
those of the pages, not of this code):

- GPU hour, ``gpu_hour_usd = 3.78``: Lambda's on-demand list price for 1x H100 SXM, $3.78/GPU-hour,
  as relayed by techbytes.app "Serverless GPU Pricing Matrix [2026 Developer Cheat Sheet]" (prices
  "verified on May 7, 2026 from official vendor pricing"). Lambda's own price page was not in the stored
  copies. For scale: pricegpu.pages.dev ("H100 vs A100 Cloud Pricing", early 2026) gives a typical
  on-demand range of $2.49-$3.99/hr for H100 SXM 80GB at specialist clouds; AWS p5.48xlarge at
  $98.32/hr for 8 GPUs is $12.29/GPU-hour (computespec.pages.dev, "Cloud GPU Pricing Explained").
- Purchase price, ``gpu_purchase_usd = 30000``: Raymond James estimate that an H100 sells for
  $25,000-$30,000, reported by Tae Kim (Barron's) and TechSpot, August 2023 (techspot.com/news/
  99839); the upper end is taken for the SXM part. Used only when no hourly price is given.
- Amortisation, ``amortisation_years = 4``: an assumption (no public source looked up).
- Hosting, ``hosting_usd_per_gpu_hour = 0``: an assumption; set it to include the server's share,
  networking, space and staff.
- Electricity, ``electricity_usd_per_kwh = 0.125``: US commercial-sector average 12.52 cents/kWh for
  March 2023 from EIA monthly data, as relayed by shrinkthatfootprint.com ("Commercial Vs Residential
  Electricity Rates Across the US - 2023"; the same site gives 12.31 for May 2023 and 13.10 for
  October 2023). EIA's own national annual table was not in the stored copies; its state table
  (Electric Power Annual 2023, released 17 Oct 2024, eia.gov/electricity/annual/secrev-map.php) gives
  e.g. Virginia commercial 8.95 and California 23.91 cents/kWh, so the site matters more than the
  average.
- PUE, ``pue = 1.58``: Uptime Institute industry average for 2023 (Uptime Intelligence Update 221,
  "Large data centers are mostly more efficient, analysis confirms", 23 Nov 2023: "In 2023, industry
  average PUE stood at 1.58"); the best hyperscale sites are about 1.1 (Google), per docs/measurement.md.
- Grid carbon, ``grid_carbon_g_per_kwh = 366``: EIA FAQ "How much carbon dioxide is produced per
  kilowatthour of U.S. electricity generation?" (eia.gov/tools/faqs/faq.php?id=74): in 2023 US
  utility-scale generation of about 4.18 trillion kWh emitted about 1.53 billion metric tons of CO2,
  "about 0.81 pounds ... per kWh"; 1,532 Mt / 4,183,271 GWh = 366 g/kWh. Generation-side average,
  without transmission losses.

Note on a rented GPU: a cloud hourly price normally already includes the provider's electricity and
cooling, so the energy term here is what that energy would cost at the given tariff, not an extra
bill; pass ``--electricity-usd-per-kwh 0`` to count the hourly price alone.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from wattledger.workloads.bench.results import CostBreakdown, CostPerMillionTokens, CostPoint, RegimeEconomics

JOULES_PER_KWH = 3.6e6
HOURS_PER_YEAR = 8766.0  # 365.25 days
TOKENS_PER_MILLION = 1e6
COST_CURVE_UTILIZATIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0

SOURCES: dict[str, str] = {
    "gpu_hour_usd": (
        "Lambda on-demand list price for 1x H100 SXM, $3.78/GPU-hour, as relayed by techbytes.app "
        "'Serverless GPU Pricing Matrix [2026 Developer Cheat Sheet]' (prices verified 2026-05-07); "
        "typical specialist-cloud range $2.49-$3.99 (pricegpu.pages.dev, early 2026); AWS p5.48xlarge "
        "$98.32/hr / 8 GPUs = $12.29"
    ),
    "gpu_purchase_usd": (
        "Raymond James estimate of the H100 selling price, $25,000-$30,000, reported by Barron's "
        "(Tae Kim) and TechSpot, Aug 2023 (techspot.com/news/99839); upper end taken for SXM"
    ),
    "amortisation_years": "assumption: 4 years (no public source looked up)",
    "hosting_usd_per_gpu_hour": "assumption: 0 (server share, networking, space, staff not included)",
    "electricity_usd_per_kwh": (
        "US commercial-sector average 12.52 cents/kWh, March 2023, EIA data as relayed by "
        "shrinkthatfootprint.com (12.31 in May 2023, 13.10 in Oct 2023); EIA Electric Power Annual 2023 "
        "state averages range from 7.38 (ND) to 39.03 (HI) cents/kWh commercial"
    ),
    "pue": (
        "Uptime Institute industry average PUE 1.58 for 2023 (Uptime Intelligence Update 221, "
        "23 Nov 2023); best hyperscale sites about 1.1 (Google)"
    ),
    "grid_carbon_g_per_kwh": (
        "EIA FAQ id=74: 2023 US utility-scale generation 4.18 trillion kWh, 1.53 billion metric tons "
        "CO2, 0.81 lb/kWh = 366 g/kWh (generation-side, no transmission losses)"
    ),
}

FORMULAS: dict[str, str] = {
    "gpu_cost_usd_per_gpu_hour": (
        "gpu_hour_usd if given, else gpu_purchase_usd / (amortisation_years * 8766) + hosting_usd_per_gpu_hour"
    ),
    "facility_energy_kwh": "energy_joules / 3.6e6 * pue  (measured joules are never scaled; PUE applies here only)",
    "cost_usd_per_million_tokens.measured": (
        "(gpus * gpu_cost_usd_per_gpu_hour * window_seconds / 3600 + facility_energy_kwh * "
        "electricity_usd_per_kwh) / tokens * 1e6"
    ),
    "tokens_per_busy_second": "tokens / (window_seconds * utilization_mean)",
    "dynamic_joules_per_token": "(energy_joules - idle_power_watts * window_seconds) / tokens",
    "joules_per_token_at_utilization(x)": "dynamic_joules_per_token + idle_power_watts / (tokens_per_busy_second * x)",
    "cost_usd_per_million_tokens_at_utilization(x)": (
        "(gpus * gpu_cost_usd_per_gpu_second / (tokens_per_busy_second * x) + "
        "joules_per_token_at_utilization(x) / 3.6e6 * pue * electricity_usd_per_kwh) * 1e6"
    ),
    "cost_usd_per_million_tokens.full_load": "cost_usd_per_million_tokens_at_utilization(1.0)",
    "energy_share_of_cost": "energy cost / (GPU cost + energy cost), at the measured utilization",
    "co2_grams_per_million_tokens": "facility_energy_kwh * grid_carbon_g_per_kwh / tokens * 1e6",
}

# Fields whose value may be None (absent); a file or flag gives None as the string "none".
_OPTIONAL = frozenset({"gpu_hour_usd", "gpu_purchase_usd", "grid_carbon_g_per_kwh"})
# Fields that only matter for the purchase (amortised) model: a layer that sets one of these without
# setting gpu_hour_usd switches to that model.
_OWNERSHIP = frozenset({"gpu_purchase_usd", "amortisation_years", "hosting_usd_per_gpu_hour"})


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False, optional: bool = False) -> None:
    if value is None:
        if optional:
            return
        raise ValueError(f"pricing: {name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"pricing: {name} must be a number, got {value!r}")  # noqa: TRY004 (one error type)
    if not math.isfinite(value):
        raise ValueError(f"pricing: {name} must be finite, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"pricing: {name} must be {relation} {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class Pricing:
    """The money and carbon inputs, per GPU where it says so; each default's source is in ``sources``.

    ``gpu_hour_usd`` (rent, per GPU) wins when given; otherwise the GPU costs
    ``gpu_purchase_usd / (amortisation_years * 8766 h) + hosting_usd_per_gpu_hour`` per hour.
    ``pue`` (>= 1) multiplies energy that is paid for and its CO2, never measured joules.
    ``grid_carbon_g_per_kwh`` None: no CO2 figure.
    """

    gpu_hour_usd: float | None = 3.78
    gpu_purchase_usd: float | None = 30000.0
    amortisation_years: float = 4.0
    hosting_usd_per_gpu_hour: float = 0.0
    electricity_usd_per_kwh: float = 0.125
    pue: float = 1.58
    grid_carbon_g_per_kwh: float | None = 366.0
    sources: dict[str, str] = field(default_factory=lambda: dict(SOURCES), hash=False)

    def __post_init__(self) -> None:
        _check_number("gpu_hour_usd", self.gpu_hour_usd, minimum=0.0, optional=True)
        _check_number("gpu_purchase_usd", self.gpu_purchase_usd, minimum=0.0, optional=True)
        _check_number("amortisation_years", self.amortisation_years, minimum=0.0, strict=True)
        _check_number("hosting_usd_per_gpu_hour", self.hosting_usd_per_gpu_hour, minimum=0.0)
        _check_number("electricity_usd_per_kwh", self.electricity_usd_per_kwh, minimum=0.0)
        _check_number("pue", self.pue, minimum=1.0)
        _check_number("grid_carbon_g_per_kwh", self.grid_carbon_g_per_kwh, minimum=0.0, optional=True)
        if self.gpu_hour_usd is None and self.gpu_purchase_usd is None:
            raise ValueError("pricing: gpu_hour_usd or gpu_purchase_usd is required (neither is given)")
        if not isinstance(self.sources, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.sources.items()
        ):
            raise ValueError("pricing: sources must be a table of strings")
        # A figure that is not the documented default must not keep the default's source text.
        sources = dict(self.sources)
        for f in fields(self):
            if f.name == "sources" or sources.get(f.name) != SOURCES.get(f.name):
                continue
            value = getattr(self, f.name)
            if value is None:
                sources[f.name] = "not given"
            elif value != f.default:
                sources[f.name] = "given directly (not the documented default)"
        object.__setattr__(self, "sources", sources)

    @property
    def gpu_cost_model(self) -> str:
        return "hourly" if self.gpu_hour_usd is not None else "amortised"

    @property
    def gpu_cost_usd_per_gpu_hour(self) -> float:
        if self.gpu_hour_usd is not None:
            return float(self.gpu_hour_usd)
        assert self.gpu_purchase_usd is not None  # __post_init__
        return self.gpu_purchase_usd / (self.amortisation_years * HOURS_PER_YEAR) + self.hosting_usd_per_gpu_hour


PRICING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Pricing) if f.name != "sources")


def _normalise_value(name: str, value: Any) -> Any:
    """"none" (any case) means absent for the optional fields; ints become floats."""
    if isinstance(value, str) and value.strip().lower() == "none":
        if name not in _OPTIONAL:
            raise ValueError(f"pricing: {name} cannot be none (only {', '.join(sorted(_OPTIONAL))} can)")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _apply_layer(values: dict[str, Any], sources: dict[str, str], layer: dict[str, Any], origin: str,
                 layer_sources: dict[str, str] | None = None, label: Any = None) -> None:
    """Merge one layer (a file's table or the overrides) into ``values`` and ``sources``, in place.

    A figure's source becomes the layer's own source text for it when the layer gives one, else
    ``label(key)`` (default "set by ORIGIN").
    """
    layer_sources = layer_sources or {}
    for key in list(layer) + list(layer_sources):
        if key not in PRICING_FIELDS:
            raise ValueError(f"pricing: unknown key {key!r} in {origin} (known: {', '.join(PRICING_FIELDS)})")
    for key, raw in layer.items():
        values[key] = _normalise_value(key, raw)
        sources[key] = layer_sources.get(key) or (label(key) if label else f"set by {origin}")
    if "gpu_hour_usd" not in layer and _OWNERSHIP & layer.keys():
        # A purchase figure without an hourly price in the same layer selects the amortised model.
        values["gpu_hour_usd"] = None
        sources["gpu_hour_usd"] = f"not used: {origin} gives ownership figures without an hourly price"
    for key, text in layer_sources.items():
        if key not in layer:
            sources[key] = text


def _read_toml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"pricing file {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ValueError(f"pricing file {path} is not valid TOML: {first}") from None
    except UnicodeDecodeError:
        raise ValueError(f"pricing file {path} is not valid TOML: not UTF-8 text") from None
    table: dict[str, Any] = {}
    nested = data.pop("pricing", None)
    if nested is not None and not isinstance(nested, dict):
        raise ValueError(f"pricing file {path}: 'pricing' must be a table, got {nested!r}")
    table.update(data)
    for key, value in (nested or {}).items():
        if key in table:
            raise ValueError(f"pricing file {path}: {key!r} is given both at top level and under [pricing]")
        table[key] = value
    file_sources = table.pop("sources", None) or {}
    if not isinstance(file_sources, dict) or not all(isinstance(v, str) for v in file_sources.values()):
        raise ValueError(f"pricing file {path}: 'sources' must be a table of strings")
    return table, file_sources


def load_pricing(path: str | None = None, **overrides: Any) -> Pricing:
    """Defaults, then the TOML file at ``path`` (keys as the field names, top level or under
    ``[pricing]``, with an optional ``[sources]`` / ``[pricing.sources]`` table of strings), then
    ``overrides`` (keyword per field; None or "none" clears an optional field; ``sources=`` a dict of
    source texts for the overridden figures).

    A layer that sets a purchase figure (gpu_purchase_usd, amortisation_years,
    hosting_usd_per_gpu_hour) without gpu_hour_usd switches to the amortised model. Any problem is a
    one-line ``ValueError`` naming the field or the file.
    """
    return _load(path, overrides, "overrides", None)


def _load(path: str | None, overrides: dict[str, Any], origin: str, label: Any) -> Pricing:
    defaults = Pricing()
    values: dict[str, Any] = {name: getattr(defaults, name) for name in PRICING_FIELDS}
    sources = dict(defaults.sources)
    if path is not None:
        table, file_sources = _read_toml(path)
        file_origin = f"pricing file {path}"
        file_sources = {k: f"{v} (from {file_origin})" for k, v in file_sources.items()}
        _apply_layer(values, sources, table, file_origin, file_sources)
    overrides = dict(overrides)
    override_sources = overrides.pop("sources", None)
    if override_sources is not None and not (
        isinstance(override_sources, dict) and all(isinstance(v, str) for v in override_sources.values())
    ):
        raise ValueError("pricing: the sources override must be a dict of strings")
    if overrides or override_sources:
        _apply_layer(values, sources, overrides, origin, override_sources, label)
    return Pricing(**values, sources=sources)


def gpu_cost_usd_per_second(pricing: Pricing, gpus: int) -> float:
    """What ``gpus`` GPUs cost per second of wall time: the hourly price, or purchase / (years * 8766 h)
    + hosting, times the GPU count, / 3600."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be a whole number >= 0, got {gpus!r}")
    return gpus * pricing.gpu_cost_usd_per_gpu_hour / 3600.0


def _usd_per_kwh_paid(pricing: Pricing) -> float:
    """Dollars per measured kWh once facility overhead is added (the measured kWh are not changed)."""
    return pricing.pue * pricing.electricity_usd_per_kwh


def _check_inputs(window_seconds, energy_joules, tokens, utilization_mean, idle_power_watts) -> None:
    """ValueError naming the first input that is not a finite number >= 0 (utilization: a ratio 0..1)."""
    for name, value in (("window_seconds", window_seconds), ("energy_joules", energy_joules),
                        ("tokens", tokens), ("idle_power_watts", idle_power_watts)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"economics: {name} must be a finite number >= 0, got {value!r}")
    if utilization_mean is not None and (
        isinstance(utilization_mean, bool) or not isinstance(utilization_mean, (int, float))
        or not math.isfinite(utilization_mean) or utilization_mean < 0 or utilization_mean > 1 + 1e-9
    ):
        raise ValueError(f"economics: utilization_mean must be a ratio in 0..1, got {utilization_mean!r}")


def _why_undefined(window_seconds, energy_joules, tokens) -> str | None:
    """Why no per-token figure can be computed at all, or None when it can."""
    if not tokens:
        return "no tokens in the window: per-token figures are undefined"
    if energy_joules is None:
        return "no energy measured for the window: cost and CO2 per token are undefined"
    if not window_seconds:
        return "empty window (0 s): per-token figures are undefined"
    return None


def _idle_power_used(idle_power_watts: float | None, mean_power_watts: float, notes: list[str]) -> float:
    """The idle power (W) the full-load model counts: none measured is 0 (all energy dynamic); one above the
    window's mean power is capped at it, so dynamic energy is never negative. Says so in ``notes``."""
    if idle_power_watts is None:
        notes.append("no idle baseline: all energy counted as dynamic")
        return 0.0
    if idle_power_watts > mean_power_watts:
        notes.append(f"idle power {idle_power_watts:g} W above the window's mean power {mean_power_watts:g} W: "
                     "capped at the mean")
        return mean_power_watts
    return float(idle_power_watts)


def regime_economics(pricing: Pricing, gpus: int, window_seconds: float | None, energy_joules: float | None,
                     tokens: float | None, utilization_mean: float | None,
                     idle_power_watts: float | None) -> RegimeEconomics:
    """Cost per million tokens, its energy share, and CO2 for one measured regime.

    Inputs: the steady-state window (s), the energy the regime's GPUs used over it (J, from the
    counters, summed over GPUs), the tokens counted over exactly that window (the regime's main token
    kind), the mean GPU utilization (0..1) over the window, and the idle power (W) of the same GPUs
    together (the idle baseline; None if it was not measured).

    Measured: ``(GPU cost over the window + energy_joules / 3.6e6 kWh * pue * price) / tokens * 1e6``.

    Full load, and the cost curve, use one model: the same hardware kept busy a fraction ``x`` of the
    time. Throughput is ``tokens_per_busy_second * x`` with ``tokens_per_busy_second = tokens /
    (window * utilization_mean)``; energy splits into a dynamic part that follows the tokens,
    ``dynamic energy per token = (energy - idle_power * window) / tokens``, and idle power paid for
    every second, so ``energy per token(x) = dynamic energy per token + idle_power / (tokens_per_busy_second * x)``;
    and GPU cost per token is ``GPU cost per second / (tokens_per_busy_second * x)``. At ``x =
    utilization_mean`` this gives the measured figure exactly; ``full_load`` is ``x = 1``; the cost
    curve evaluates ``x`` = 0.05, 0.10, ..., 1.0, showing what idle capacity costs. An idle power above
    the window's mean power (energy / window) is capped at that mean, so dynamic energy is never
    negative; without an idle baseline all energy counts as dynamic.

    PUE multiplies paid-for energy and CO2 only; ``energy_joules`` is not changed.

    Returns a :class:`RegimeEconomics`: ``cost_usd_per_million_tokens`` {measured, full_load},
    ``energy_share_of_cost``, ``co2_grams_per_million_tokens``, ``cost_curve``, ``breakdown`` (the
    intermediate figures) and ``note`` (why a figure is None, or what was assumed; None if nothing). A
    figure that cannot be computed (no tokens, no energy, utilization 0 or unknown) is None, never zero.
    """
    _check_inputs(window_seconds, energy_joules, tokens, utilization_mean, idle_power_watts)
    gpu_usd_per_s = gpu_cost_usd_per_second(pricing, gpus)
    undefined = _why_undefined(window_seconds, energy_joules, tokens)
    if undefined:
        return RegimeEconomics(note=undefined)
    notes: list[str] = []
    measured = _measured(pricing, gpus, gpu_usd_per_s, float(window_seconds), float(energy_joules), float(tokens),
                         utilization_mean, notes)
    if utilization_mean is None or utilization_mean <= 0:
        why = "unknown" if utilization_mean is None else "0"
        notes.append(f"GPU utilization {why}: full-load cost and the cost curve are undefined")
        return replace(measured, note="; ".join(notes))
    return _with_full_load(measured, pricing, gpu_usd_per_s, float(energy_joules), min(float(utilization_mean), 1.0),
                           idle_power_watts, notes)


def _measured(pricing: Pricing, gpus: int, gpu_usd_per_s: float, window: float, energy: float, tokens: float,
              utilization_mean: float | None, notes: list[str]) -> RegimeEconomics:
    """The figures at the measured utilization: cost per Mtok, its energy share, CO2 per Mtok."""
    measured_kwh = energy / JOULES_PER_KWH
    facility_kwh = measured_kwh * pricing.pue
    gpu_usd = gpu_usd_per_s * window
    energy_usd = measured_kwh * _usd_per_kwh_paid(pricing)
    total_usd = gpu_usd + energy_usd
    if total_usd <= 0:
        notes.append("GPU and energy prices are both zero: energy share undefined")
    co2 = None
    if pricing.grid_carbon_g_per_kwh is not None:
        co2 = facility_kwh * pricing.grid_carbon_g_per_kwh / tokens * TOKENS_PER_MILLION
    else:
        notes.append("no grid carbon figure: CO2 not computed")
    breakdown = CostBreakdown(
        gpus=gpus, window_seconds=window, tokens=tokens, measured_energy_kwh=measured_kwh,
        facility_energy_kwh=facility_kwh, pue=pricing.pue, gpu_cost_usd=gpu_usd, energy_cost_usd=energy_usd,
        gross_joules_per_token=energy / tokens, utilization_mean=utilization_mean)
    return RegimeEconomics(
        cost_usd_per_million_tokens=CostPerMillionTokens(measured=total_usd / tokens * TOKENS_PER_MILLION),
        energy_share_of_cost=energy_usd / total_usd if total_usd > 0 else None,
        co2_grams_per_million_tokens=co2, breakdown=breakdown)


def _with_full_load(measured: RegimeEconomics, pricing: Pricing, gpu_usd_per_s: float, energy: float,
                    utilization: float, idle_power_watts: float | None, notes: list[str]) -> RegimeEconomics:
    """The measured figures plus the full-load cost and the cost curve (the busy-fraction model above)."""
    b = measured.breakdown
    assert b is not None  # _measured always gives one
    idle = _idle_power_used(idle_power_watts, energy / b.window_seconds, notes)
    busy_rate = b.tokens / (b.window_seconds * utilization)
    dynamic_j = max(0.0, (energy - idle * b.window_seconds) / b.tokens)
    usd_per_kwh = _usd_per_kwh_paid(pricing)

    def usd_per_mtok(x: float) -> float:
        rate = busy_rate * x
        joules = dynamic_j + idle / rate
        return (gpu_usd_per_s / rate + joules / JOULES_PER_KWH * usd_per_kwh) * TOKENS_PER_MILLION

    return replace(
        measured,
        cost_usd_per_million_tokens=replace(measured.cost_usd_per_million_tokens, full_load=usd_per_mtok(1.0)),
        cost_curve=tuple(CostPoint(x, usd_per_mtok(x)) for x in COST_CURVE_UTILIZATIONS),
        breakdown=replace(b, idle_power_watts_used=idle, tokens_per_busy_second=busy_rate,
                          dynamic_joules_per_token=dynamic_j, full_load_joules_per_token=dynamic_j + idle / busy_rate),
        note="; ".join(notes) if notes else None)


def pricing_record(pricing: Pricing) -> dict[str, Any]:
    """The top-level ``pricing`` object of summary.json: inputs, sources, derived GPU cost, formulas."""
    inputs = {name: getattr(pricing, name) for name in PRICING_FIELDS}
    return {
        "currency": "USD",
        "gpu_cost_model": pricing.gpu_cost_model,
        **inputs,
        "gpu_cost_usd_per_gpu_hour": pricing.gpu_cost_usd_per_gpu_hour,
        "sources": dict(pricing.sources),
        "formulas": dict(FORMULAS),
        "notes": [
            (
                "PUE is a facility-overhead estimate applied to paid-for energy and CO2 only; "
                "measured joules never include it"
            ),
            (
                "a cloud hourly GPU price usually already includes electricity: the energy cost is then what "
                "that energy would cost at this tariff (set electricity_usd_per_kwh = 0 to count rent alone)"
            ),
        ],
    }


def _price_arg(text: str) -> float | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


_ARG_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("--gpu-hour-usd", "gpu_hour_usd", "rent per GPU-hour in USD ('none': use the purchase price)"),
    ("--gpu-purchase-usd", "gpu_purchase_usd", "purchase price per GPU in USD (amortised when no hourly price)"),
    ("--amortisation-years", "amortisation_years", "years over which the purchase price is spread"),
    ("--hosting-usd-per-gpu-hour", "hosting_usd_per_gpu_hour", "hosting overhead per GPU-hour when amortising"),
    ("--electricity-usd-per-kwh", "electricity_usd_per_kwh", "electricity tariff in USD per kWh"),
    ("--pue", "pue", "facility power usage effectiveness (>= 1.0); applied to cost and CO2, never to joules"),
    ("--carbon-g-per-kwh", "grid_carbon_g_per_kwh", "grid carbon intensity in g CO2 per kWh ('none': no CO2)"),
)


def add_pricing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pricing FILE.toml`` and one flag per figure; flags win over the file, the file over defaults."""
    group = parser.add_argument_group("pricing (cost per token and CO2)")
    group.add_argument("--pricing", metavar="FILE.toml", default=None,
                       help="TOML file of pricing figures (keys as in summary.json's pricing object)")
    for flag, dest, text in _ARG_FIELDS:
        group.add_argument(flag, dest=f"pricing_{dest}", type=_price_arg, default=None, metavar="X", help=text)


def pricing_from_args(args: argparse.Namespace) -> Pricing:
    """The :class:`Pricing` for parsed arguments (flags given override the file and the defaults)."""
    flags = {dest: flag for flag, dest, _ in _ARG_FIELDS}
    overrides = {
        dest: getattr(args, f"pricing_{dest}")
        for dest in flags
        if getattr(args, f"pricing_{dest}", None) is not None
    }
    return _load(getattr(args, "pricing", None), overrides, "the command line",
                 lambda key: f"command line {flags[key]}")


__all__ = [
    "COST_CURVE_UTILIZATIONS",
    "FORMULAS",
    "PRICING_FIELDS",
    "SOURCES",
    "Pricing",
    "add_pricing_arguments",
    "gpu_cost_usd_per_second",
    "load_pricing",
    "pricing_from_args",
    "pricing_record",
    "regime_economics",
]
