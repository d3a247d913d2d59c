"""The analysis's results, typed: what the report, the economics and the closing table read.

``summary.json`` (docs/summary.schema.json) is their serialised form. ``to_json()`` writes exactly its
objects, same keys in the same order; ``from_json()`` reads one back (``wattledger report`` and the report
page take a summary either way). Reading back is lenient on purpose: a summary can be partial (an
interrupted run), hand-made (the tests' fixture) or older, so a missing figure becomes None, a missing
table or list becomes empty, and whatever is not a number where a number belongs becomes None. The report
then says "n/a" rather than failing.

Units are in the field names: seconds, joules, watts, bytes, ratios 0..1, US dollars.

Stdlib only: the economics (pure arithmetic, no pandas) builds its result from these types too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from wattledger.workloads.registry import REGIMES

SCHEMA_VERSION = 1
# The token kinds a regime's counts cover, in summary.json's order. The agent's accounting keeps the same
# list; the bench may not import it (the layer rule allows only the agent's client API).
TOKEN_KINDS: tuple[str, ...] = ("prompt", "generated", "trained")


def per_unit_keys() -> tuple[str, ...]:
    """The per-unit energy figures (joules per request, per session...), one per registry record that has
    one, in registry order: every regime's summary carries each (None where it does not apply)."""
    return tuple(dict.fromkeys(regime.per_unit.summary_key for regime in REGIMES.values()
                               if regime.per_unit is not None))


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (numpy scalars included), else None: None,
    bools, strings, NaN and infinities are not figures."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _read_number(value: Any) -> Any:
    """A number read back from JSON, unchanged (an int stays an int, so a summary reads back to itself),
    or None when it is not a finite number."""
    return value if finite(value) is not None else None


def _read_mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _read_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _read_numbers(value: Any) -> dict[str, Any]:
    """A table of name -> number, entries that are not numbers left out."""
    return {str(k): v for k, v in _read_mapping(value).items() if finite(v) is not None}


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_indices(value: Any) -> tuple[int, ...] | None:
    """A list of GPU indices read back; None when absent or not a list of non-negative integers."""
    if not isinstance(value, list) or not all(_is_index(v) for v in value):
        return None
    return tuple(value)


def _json_or_none(record) -> Any:
    return record.to_json() if record is not None else None


class _Figures:
    """A record of plain figures: to_json writes its fields in order; from_json reads each as a number."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any):
        data = _read_mapping(data)
        return cls(**{f.name: _read_number(data.get(f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class Check:
    """One validity check: its name, whether it passed, and what was seen (in words)."""

    check: str
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "passed": self.passed, "detail": self.detail}

    @classmethod
    def from_json(cls, data: Mapping) -> Check:
        return cls(str(data.get("check", "?")), data.get("passed") is True, str(data.get("detail", "")))


def _read_checks(value: Any) -> tuple[Check, ...]:
    return tuple(Check.from_json(c) for c in value if isinstance(c, Mapping)) if isinstance(value, list) else ()


@dataclass(frozen=True)
class PhaseTiming:
    """How long a phase was planned to run and ran (s), whether it finished, and what stopped it if not
    ("SIGTERM", "SIGINT", "killed (no phase_end)")."""

    planned_seconds: float | None
    ran_seconds: float | None
    finished: bool
    stopped_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {"planned_seconds": self.planned_seconds, "ran_seconds": self.ran_seconds,
                "finished": self.finished, "stopped_by": self.stopped_by}

    @classmethod
    def from_json(cls, data: Any) -> PhaseTiming | None:
        if not isinstance(data, Mapping):
            return None
        stopped_by = data.get("stopped_by")
        return cls(_read_number(data.get("planned_seconds")), _read_number(data.get("ran_seconds")),
                   data.get("finished", True) is not False, str(stopped_by) if stopped_by is not None else None)


@dataclass(frozen=True)
class Window:
    """The steady-state window the figures cover, in seconds since the run started, and what was left out."""

    start_seconds: float | None
    end_seconds: float | None
    exclusions: str | None

    def to_json(self) -> dict[str, Any]:
        return {"start_seconds": self.start_seconds, "end_seconds": self.end_seconds, "exclusions": self.exclusions}

    @classmethod
    def from_json(cls, data: Any) -> Window | None:
        if not isinstance(data, Mapping):
            return None
        return cls(_read_number(data.get("start_seconds")), _read_number(data.get("end_seconds")),
                   _read_text(data.get("exclusions")))


@dataclass(frozen=True)
class UtilizationStats(_Figures):
    """GPU utilization over the window (ratios 0..1); ``idle_fraction``: the share of samples at 0."""

    mean: float | None = None
    p50: float | None = None
    p99: float | None = None
    idle_fraction: float | None = None


@dataclass(frozen=True)
class PowerStats(_Figures):
    """GPU power over the window (W, all GPUs): the mean from the counter, the p99 of instant samples."""

    mean: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class EnergyDetail:
    """The window's energy besides the gross figure (J), its cross-check, RAPL per zone (J), the whole
    phase's counter energy (J), and the GPU temperature over the phase (°C)."""

    dynamic_joules: float | None = None
    integrated_power_joules: float | None = None
    counter_vs_integrated_divergence: float | None = None
    rapl_joules: Mapping[str, float] = field(default_factory=dict)
    whole_phase_joules: float | None = None
    temperature_p99_celsius: float | None = None
    temperature_max_celsius: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: dict(self.rapl_joules) if f.name == "rapl_joules" else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any) -> EnergyDetail | None:
        if not isinstance(data, Mapping):
            return None
        return cls(**{f.name: _read_numbers(data.get(f.name)) if f.name == "rapl_joules"
                      else _read_number(data.get(f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class MemoryPeaks(_Figures):
    """Peaks over the phase (bytes): HBM, the whole machine's used memory, the workload's RSS and pinned."""

    gpu_peak_bytes: float | None = None
    host_peak_bytes: float | None = None
    workload_host_rss_peak_bytes: float | None = None
    host_pinned_peak_bytes: float | None = None


@dataclass(frozen=True)
class TokenCounts:
    """Tokens counted over the window, by kind."""

    prompt: int = 0
    generated: int = 0
    trained: int = 0

    def of(self, kind: str) -> int:
        return getattr(self, kind) if kind in TOKEN_KINDS else 0

    def to_json(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in TOKEN_KINDS}

    @classmethod
    def from_json(cls, data: Any) -> TokenCounts:
        data = _read_mapping(data)
        return cls(**{kind: _read_number(data.get(kind)) or 0 for kind in TOKEN_KINDS})


@dataclass(frozen=True)
class GrossDynamic(_Figures):
    """Joules per token: gross (all energy in the window) and dynamic (above the idle baseline)."""

    gross: float | None = None
    dynamic: float | None = None


@dataclass(frozen=True)
class JoulesPerToken:
    """Joules per token of the main kind, gross and dynamic, and the same for every kind produced."""

    gross: float | None = None
    dynamic: float | None = None
    by_kind: Mapping[str, GrossDynamic] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"gross": self.gross, "dynamic": self.dynamic,
                "by_kind": {kind: value.to_json() for kind, value in self.by_kind.items()}}

    @classmethod
    def from_json(cls, data: Any) -> JoulesPerToken:
        data = _read_mapping(data)
        by_kind = {str(k): GrossDynamic.from_json(v) for k, v in _read_mapping(data.get("by_kind")).items()}
        return cls(_read_number(data.get("gross")), _read_number(data.get("dynamic")), by_kind)


@dataclass(frozen=True)
class CostPerMillionTokens(_Figures):
    """USD per million main-kind tokens at the measured utilization, and at full load."""

    measured: float | None = None
    full_load: float | None = None


@dataclass(frozen=True)
class CostPoint:
    """One point of a cost curve: USD per million tokens were the GPUs busy ``utilization`` (0..1) of the time."""

    utilization: float
    usd_per_million_tokens: float

    def to_json(self) -> dict[str, float]:
        return {"utilization": self.utilization, "usd_per_million_tokens": self.usd_per_million_tokens}


def _read_curve(value: Any) -> tuple[CostPoint, ...] | None:
    if not isinstance(value, list):
        return None
    points = [(_read_number(p.get("utilization")), _read_number(p.get("usd_per_million_tokens")))
              for p in value if isinstance(p, Mapping)]
    return tuple(CostPoint(u, c) for u, c in points if u is not None and c is not None)


@dataclass(frozen=True)
class CostBreakdown:
    """The intermediate figures of a regime's economics (not written to summary.json). The last four are
    None until the utilization is known (the full-load model needs it)."""

    gpus: int
    window_seconds: float
    tokens: float
    measured_energy_kwh: float
    facility_energy_kwh: float
    pue: float
    gpu_cost_usd: float
    energy_cost_usd: float
    gross_joules_per_token: float
    utilization_mean: float | None
    idle_power_watts_used: float | None = None
    tokens_per_busy_second: float | None = None
    dynamic_joules_per_token: float | None = None
    full_load_joules_per_token: float | None = None


@dataclass(frozen=True)
class RegimeEconomics:
    """Cost per million tokens, its energy share and CO2 for one regime (economics.regime_economics), the
    cost curve over utilization, the intermediate figures, and ``note``: why a figure is None, or what was
    assumed (None if nothing)."""

    cost_usd_per_million_tokens: CostPerMillionTokens = field(default_factory=CostPerMillionTokens)
    energy_share_of_cost: float | None = None
    co2_grams_per_million_tokens: float | None = None
    cost_curve: tuple[CostPoint, ...] | None = None
    breakdown: CostBreakdown | None = None
    note: str | None = None

    def curve_json(self) -> list[dict[str, float]] | None:
        return [p.to_json() for p in self.cost_curve] if self.cost_curve is not None else None

    @classmethod
    def from_json(cls, regime: Mapping, economics: Any) -> RegimeEconomics:
        """From a regime's summary and its entry in summary.json's ``economics`` (the cost curve)."""
        return cls(CostPerMillionTokens.from_json(regime.get("cost_usd_per_million_tokens")),
                   _read_number(regime.get("energy_share_of_cost")),
                   _read_number(regime.get("co2_grams_per_million_tokens")),
                   _read_curve(_read_mapping(economics).get("cost_curve")))


@dataclass(frozen=True)
class MockTruth(_Figures):
    """The simulator's exact energy over the window (J) and per main-kind token (mock backend only)."""

    energy_joules: float | None = None
    joules_per_token: float | None = None


@dataclass(frozen=True)
class RegimeResult:
    """One measured regime: the figures of its steady-state window, its phase, and its validity checks.

    ``per_unit_joules``: joules per request, per session... keyed by the summary field (``per_unit_keys()``);
    ``not_available``: figure name -> why it is None or empty; ``workload``: the workload's own summary,
    as it reported it (free-form: TTFT, MFU, spill...)."""

    duration_seconds: float | None = None
    phase_seconds: float | None = None
    phase: PhaseTiming | None = None
    window: Window | None = None
    gpu_utilization: UtilizationStats = field(default_factory=UtilizationStats)
    activity: Mapping[str, float | None] = field(default_factory=dict)
    power_watts: PowerStats = field(default_factory=PowerStats)
    energy_joules: float | None = None
    energy: EnergyDetail | None = None
    memory: MemoryPeaks | None = None
    tokens: TokenCounts = field(default_factory=TokenCounts)
    tokens_per_second: Mapping[str, float] = field(default_factory=dict)
    main_token_kind: str | None = None
    joules_per_token: JoulesPerToken = field(default_factory=JoulesPerToken)
    per_unit_joules: Mapping[str, float | None] = field(default_factory=dict)
    workload: Any = field(default_factory=dict)
    validity: tuple[Check, ...] = ()
    not_available: Mapping[str, str] = field(default_factory=dict)
    economics: RegimeEconomics = field(default_factory=RegimeEconomics)
    mock_truth: MockTruth | None = None
    gpus: tuple[int, ...] | None = None
    gpu_attribution: str | None = None
    idle_power_watts: float | None = None
    # On the mock with simulated timing (issue 14): the workload's ``simulated_device`` (the GPU, timing and
    # computed models, how far the CPU fell behind, the calibration's sources); None otherwise.
    simulated_device: Mapping[str, Any] | None = None

    @property
    def main_kind(self) -> str | None:
        """The main token kind; for a summary that does not say, the first kind it counted any of."""
        if self.main_token_kind:
            return self.main_token_kind
        return next((kind for kind in ("trained", "generated", "prompt") if self.tokens.of(kind) > 0), None)

    def to_json(self) -> dict[str, Any]:
        registered = per_unit_keys()
        keys = registered + tuple(k for k in self.per_unit_joules if k not in registered)
        out = {
            "duration_seconds": self.duration_seconds,
            "phase_seconds": self.phase_seconds,
            "phase": _json_or_none(self.phase),
            "window": _json_or_none(self.window),
            "gpu_utilization": self.gpu_utilization.to_json(),
            "activity": dict(self.activity),
            "power_watts": self.power_watts.to_json(),
            "energy_joules": self.energy_joules,
            "energy": _json_or_none(self.energy),
            "memory": _json_or_none(self.memory),
            "tokens": self.tokens.to_json(),
            "tokens_per_second": dict(self.tokens_per_second),
            "main_token_kind": self.main_token_kind,
            "joules_per_token": self.joules_per_token.to_json(),
            **{key: self.per_unit_joules.get(key) for key in keys},
            "workload": self.workload,
            "validity": [check.to_json() for check in self.validity],
            "not_available": dict(self.not_available),
            "cost_usd_per_million_tokens": self.economics.cost_usd_per_million_tokens.to_json(),
            "energy_share_of_cost": self.economics.energy_share_of_cost,
            "co2_grams_per_million_tokens": self.economics.co2_grams_per_million_tokens,
            "gpus": list(self.gpus) if self.gpus is not None else None,
            "gpu_attribution": self.gpu_attribution,
            "idle_power_watts": self.idle_power_watts,
        }
        for key in ("phase", "window", "energy", "memory"):  # objects in the schema: absent, never null
            if out[key] is None:
                del out[key]
        if self.mock_truth is not None:
            out["mock_truth"] = self.mock_truth.to_json()
        if self.simulated_device is not None:
            out["simulated_device"] = dict(self.simulated_device)
        return out

    @classmethod
    def from_json(cls, data: Mapping, economics: Any = None) -> RegimeResult:
        """A regime's summary, with its entry of summary.json's ``economics`` (the cost curve)."""
        tokens_per_second = data.get("tokens_per_second")
        main_kind = _read_text(data.get("main_token_kind"))
        if finite(tokens_per_second) is not None and main_kind:  # an older summary: the main kind's rate alone
            tokens_per_second = {main_kind: tokens_per_second}
        mock_truth = data.get("mock_truth")
        return cls(
            duration_seconds=_read_number(data.get("duration_seconds")),
            phase_seconds=_read_number(data.get("phase_seconds")),
            phase=PhaseTiming.from_json(data.get("phase")),
            window=Window.from_json(data.get("window")),
            gpu_utilization=UtilizationStats.from_json(data.get("gpu_utilization")),
            activity={str(k): _read_number(v) for k, v in _read_mapping(data.get("activity")).items()},
            power_watts=PowerStats.from_json(data.get("power_watts")),
            energy_joules=_read_number(data.get("energy_joules")),
            energy=EnergyDetail.from_json(data.get("energy")),
            memory=MemoryPeaks.from_json(data["memory"]) if isinstance(data.get("memory"), Mapping) else None,
            tokens=TokenCounts.from_json(data.get("tokens")),
            tokens_per_second=_read_numbers(tokens_per_second),
            main_token_kind=main_kind,
            joules_per_token=JoulesPerToken.from_json(data.get("joules_per_token")),
            per_unit_joules={key: _read_number(data.get(key)) for key in per_unit_keys() if key in data},
            workload=data.get("workload") if isinstance(data.get("workload"), Mapping) else None,
            validity=_read_checks(data.get("validity")),
            not_available={str(k): v for k, v in _read_mapping(data.get("not_available")).items()
                           if isinstance(v, str)},
            economics=RegimeEconomics.from_json(data, economics),
            mock_truth=MockTruth.from_json(mock_truth) if isinstance(mock_truth, Mapping) else None,
            simulated_device=(dict(data["simulated_device"]) if isinstance(data.get("simulated_device"), Mapping)
                              else None),
            gpus=_read_indices(data.get("gpus")),
            gpu_attribution=_read_text(data.get("gpu_attribution")),
            idle_power_watts=_read_number(data.get("idle_power_watts")),
        )


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of the run: identity, driver, power limit (W, at the end of the run) and memory (bytes)."""

    index: int | None = None
    uuid: str | None = None
    model_name: str | None = None
    driver_version: str | None = None
    power_limit_watts: float | None = None
    memory_total_bytes: int | None = None
    simulated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> GpuInfo:
        index = data.get("index")
        return cls(index if isinstance(index, int) and not isinstance(index, bool) else None,
                   _read_text(data.get("uuid")), _read_text(data.get("model_name")),
                   _read_text(data.get("driver_version")), _read_number(data.get("power_limit_watts")),
                   _read_number(data.get("memory_total_bytes")), bool(data.get("simulated")))


@dataclass(frozen=True)
class IdleBaseline:
    """An idle baseline: mean GPU power (W, all GPUs) over its window (s), its energy (J), its phase (None
    when no idle phase was measured), each GPU's own mean power (W, by NVML index: what a workload on some
    of the GPUs is charged as idle), and whether this process held a CUDA context while it was measured
    (None: not recorded, a run from before it was)."""

    power_watts: float | None = None
    duration_seconds: float | None = None
    energy_joules: float | None = None
    phase: PhaseTiming | None = None
    per_gpu_watts: Mapping[int, float] = field(default_factory=dict)
    cuda_context_held: bool | None = None
    cuda_context_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"power_watts": self.power_watts, "duration_seconds": self.duration_seconds,
               "energy_joules": self.energy_joules}
        if self.phase is not None:
            out["phase"] = self.phase.to_json()
        out["per_gpu_watts"] = {str(index): watts for index, watts in self.per_gpu_watts.items()}
        out["cuda_context_held"] = self.cuda_context_held
        out["cuda_context_note"] = self.cuda_context_note
        return out

    @classmethod
    def from_json(cls, data: Any) -> IdleBaseline:
        data = _read_mapping(data)
        per_gpu = {int(k): v for k, v in _read_numbers(data.get("per_gpu_watts")).items() if k.isdigit()}
        held = data.get("cuda_context_held")
        return cls(_read_number(data.get("power_watts")), _read_number(data.get("duration_seconds")),
                   _read_number(data.get("energy_joules")), PhaseTiming.from_json(data.get("phase")), per_gpu,
                   held if isinstance(held, bool) else None, _read_text(data.get("cuda_context_note")))


@dataclass(frozen=True)
class FailedRegime:
    """A regime whose workload raised (an OOM, a CUDA error...): the bench went on without it. ``reason``:
    the exception's type and the first line of its message; ``phase``: how long it ran before failing."""

    regime: str
    reason: str
    phase: PhaseTiming | None = None

    def to_json(self) -> dict[str, Any]:
        return {"regime": self.regime, "reason": self.reason, "phase": _json_or_none(self.phase)}

    @classmethod
    def from_json(cls, data: Mapping) -> FailedRegime:
        return cls(str(data.get("regime", "?")), str(data.get("reason", "")), PhaseTiming.from_json(data.get("phase")))


@dataclass(frozen=True)
class RunSummary:
    """A whole run: what it was, on which GPUs, its idle baselines (``idle`` before the regimes: the one the
    dynamic figures subtract; ``idle_end`` after them, None when not measured), each regime, the regimes
    that failed, the run-wide checks, and the pricing inputs (``pricing``: economics.pricing_record's table,
    read back as given).

    ``kind``, ``status`` and ``simulated`` are None when a summary read back does not say."""

    kind: str | None = None
    status: str | None = None
    backend: str | None = None
    simulated: bool | None = None
    created: str | None = None
    host: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    gpus: tuple[GpuInfo, ...] = ()
    idle: IdleBaseline = field(default_factory=IdleBaseline)
    regimes: Mapping[str, RegimeResult] = field(default_factory=dict)
    validity: tuple[Check, ...] = ()
    pricing: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    idle_end: IdleBaseline | None = None
    failed_regimes: tuple[FailedRegime, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """summary.json's object (docs/summary.schema.json)."""
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "status": self.status,
            "backend": self.backend,
            "simulated": self.simulated,
            "created": self.created,
            "host": self.host,
            "settings": self.settings,
            "gpus": [gpu.to_json() for gpu in self.gpus],
            "idle": self.idle.to_json(),
            **({"idle_end": self.idle_end.to_json()} if self.idle_end is not None else {}),
            "regimes": {name: regime.to_json() for name, regime in self.regimes.items()},
            "failed_regimes": [failed.to_json() for failed in self.failed_regimes],
            "validity": [check.to_json() for check in self.validity],
            "pricing": self.pricing,
            "economics": {name: {"cost_curve": regime.economics.curve_json()} for name, regime in self.regimes.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> RunSummary:
        """A summary.json object read back; anything missing or malformed reads as unknown (see the module)."""
        data = _read_mapping(data)
        economics = _read_mapping(data.get("economics"))
        regimes = {str(name): RegimeResult.from_json(regime, economics.get(name))
                   for name, regime in _read_mapping(data.get("regimes")).items() if isinstance(regime, Mapping)}
        gpus = data.get("gpus") if isinstance(data.get("gpus"), list) else []
        failed = data.get("failed_regimes") if isinstance(data.get("failed_regimes"), list) else []
        version = data.get("schema_version")
        return cls(
            kind=_read_text(data.get("kind")), status=_read_text(data.get("status")),
            backend=_read_text(data.get("backend")),
            simulated=bool(data["simulated"]) if "simulated" in data else None,
            created=_read_text(data.get("created")), host=_read_mapping(data.get("host")),
            settings=_read_mapping(data.get("settings")),
            gpus=tuple(GpuInfo.from_json(g) for g in gpus if isinstance(g, Mapping)),
            idle=IdleBaseline.from_json(data.get("idle")), regimes=regimes,
            validity=_read_checks(data.get("validity")), pricing=_read_mapping(data.get("pricing")),
            schema_version=version if isinstance(version, int) else SCHEMA_VERSION,
            idle_end=IdleBaseline.from_json(data["idle_end"]) if isinstance(data.get("idle_end"), Mapping) else None,
            failed_regimes=tuple(FailedRegime.from_json(f) for f in failed if isinstance(f, Mapping)),
        )


def as_summary(summary: Any) -> RunSummary:
    """A :class:`RunSummary` as it is, or one read back from a summary.json object (anything else: empty)."""
    return summary if isinstance(summary, RunSummary) else RunSummary.from_json(summary)
