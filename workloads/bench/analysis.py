"""From a run directory's raw samples to ``summary.json``: the measurement rules, applied.

For each regime (the numbers in brackets are the rules of docs/measurement.md):

- the steady-state window: the phase less its ramp-up and drain, at least 5 s [2, 4];
- energy from the hardware counters differenced over the window, summed over GPUs [1, 7]; the window's
  edges are moved to where the counters actually ticked (they advance about every 100 ms), so the energy
  and the token counts cover the same stretch of time [3];
- a zero counter delta is flagged, never read as zero energy [2];
- counter energy cross-checked against integrated instant power, the divergence reported [9];
- the idle baseline subtracted for the dynamic figures; gross and dynamic both reported [8]. It is measured
  before the regimes, with this process's CUDA context held on a GPU (``cuda_context_held``), and again
  after them (``idle_end``, a drift check): the dynamic figures subtract the first (see ``analyse``);
- each regime is charged only the GPUs it ran on (the ``gpus`` of its phase_start: NVML indices the bench
  matched to the workload's CUDA devices by UUID); the other GPUs' energy is no regime's. A run recorded
  before that (no ``gpus``) charges every GPU, as it did then;
- a regime whose workload raised is left out of the figures and listed, with its reason, in
  ``failed_regimes``;
- joules per token for every kind the regime produced, and per request / per session [5];
- RAPL CPU package and DRAM energy reported separately where readable [7];
- cost and CO2 from a separately labelled pricing model (PUE never enters the measured joules) [11].

What a regime is quoted for (its main token kind, its per-unit energy) comes from its record in
workloads/registry.py; a phase the registry does not know (a ``wattledger run`` workload) is quoted for the
kind it produced most of. :func:`analyse` returns the typed results (workloads/bench/results.py);
:func:`summarize` is the same, serialised: ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from wattledger.workloads.bench.rundata import NS_PER_S, RunData
from wattledger.workloads.bench.results import (
    SCHEMA_VERSION,
    TOKEN_KINDS,
    Check,
    EnergyDetail,
    FailedRegime,
    GpuInfo,
    GrossDynamic,
    IdleBaseline,
    JoulesPerToken,
    MemoryPeaks,
    MockTruth,
    PhaseTiming,
    PowerStats,
    RegimeResult,
    RunSummary,
    TokenCounts,
    UtilizationStats,
    Window,
    finite,
)
from wattledger.workloads.registry import DEFAULT_REGIMES, REGIMES, PerUnitEnergy

__all__ = ["IDLE_END_PHASE", "IDLE_PHASE", "MIN_WINDOW_SECONDS", "SCHEMA_VERSION", "analyse", "counter_energy",
           "failed_regimes", "idle_baseline", "idle_drift_check", "idle_power_of", "late_spans_check",
           "phase_timing", "phases", "regime_gpus", "regime_summary", "run_gpu_indices", "steady_window",
           "summarize", "window_energy"]

MIN_WINDOW_SECONDS = 5.0
# Counter vs integrated instant power. Instant power sampled every 50 ms misses bursts shorter than that
# (decode steps take milliseconds), which the counter does not: bursty regimes diverge by a few percent.
MAX_DIVERGENCE = 0.10
# A profiled command's main token kind is the kind it produced most of; ties go to the first here.
COMMAND_KIND_PREFERENCE = ("generated", "prompt", "trained")
# The simulator's exact energy is known: the counter must land within this of it.
MOCK_TRUTH_TOLERANCE = 0.01
# On simulated timing (issue 14): the CPU ran the regime's steps at least as fast as the simulated device.
KEPT_UP_CHECK = "CPU kept up with the simulated device"
# The idle baselines: before the regimes (the one the dynamic figures subtract) and after them.
IDLE_PHASE = "idle"
IDLE_END_PHASE = "idle_end"
# The closing baseline is a drift check, not what the dynamic figures subtract, so it is kept short (half
# the opening one); 2 s still holds 20 updates of an NVML energy counter that advances every 100 ms or
# faster, enough for a mean power.
MIN_END_IDLE_SECONDS = 2.0
# Idle power after the regimes against before them. Warm silicon leaks more and a GPU can hold raised
# clocks for a while after load, so some rise is expected; beyond this the opening baseline misstates the
# idle power the regimes ran beside, and with it the dynamic figures.
MAX_IDLE_DRIFT = 0.10


def _check(check: str, passed: bool, detail: str) -> Check:
    return Check(check, bool(passed), detail)


def phases(run: RunData) -> dict[str, tuple[int, int, bool]]:
    """phase -> (start ns, end ns, finished). An unfinished phase ends at the last sample; a phase is
    finished only when it has a phase_end that does not say it was interrupted (a stopped workload returns
    early and its phase_end is still written) or that it failed (its workload raised)."""
    last_ns = int(run.gpu["monotonic_ns"].max()) if not run.gpu.empty else run.origin_ns
    out = {}
    for event in run.events:
        if event.get("type") == "phase_start":
            name = event["phase"]
            end = run.event("phase_end", phase=name)
            finished = end is not None and not end.get("interrupted", False) and not end.get("failed", False)
            out[name] = (int(event["monotonic_ns"]), int(end["monotonic_ns"]) if end else last_ns, finished)
    return out


def phase_timing(run: RunData, name: str) -> PhaseTiming | None:
    """How long a phase was planned to run and how long it ran, in seconds, and whether it finished.

    ``ran_seconds`` runs from phase_start to the moment a stop was asked for (an interrupted phase), to
    phase_end (a finished one), or to the last sample (no phase_end: the process was killed). The planned
    length counts the workload's own work only, so a finished phase runs a little longer than planned (model
    setup). ``stopped_by``: "SIGTERM", "SIGINT", "killed (no phase_end)", "failed" (the workload raised),
    or None when it finished.
    """
    start = run.event("phase_start", phase=name)
    if start is None:
        return None
    start_ns = int(start["monotonic_ns"])
    end_ns, finished = phases(run)[name][1:]
    end = run.event("phase_end", phase=name)
    stopped_by = None
    if end is None:
        stopped_by = "killed (no phase_end)"
    elif end.get("failed"):
        stopped_by = "failed"
    elif end.get("interrupted"):
        stopped_by = str(end.get("stop_reason") or "stop requested")
        requested = end.get("stop_requested_ns")
        if isinstance(requested, int) and start_ns <= requested <= end_ns:
            end_ns = requested
    planned = start.get("planned_seconds")
    return PhaseTiming(float(planned) if planned is not None else None, (end_ns - start_ns) / NS_PER_S, finished,
                       stopped_by)


def _finished_check(timing: PhaseTiming, check: str = "phase finished") -> Check:
    """The "phase finished" check, saying how long an interrupted phase ran of its plan."""
    if timing.finished:
        return _check(check, True, "the phase ran to its end")
    planned = f" of the planned {timing.planned_seconds:g} s" if timing.planned_seconds is not None else ""
    return _check(check, False, f"interrupted ({timing.stopped_by}) after {timing.ran_seconds:.1f} s"
                  f"{planned}: figures cover only what was measured")


def steady_window(start_ns: int, end_ns: int) -> tuple[int, int, str]:
    """The phase less ramp-up (10%, at least 1 s) and drain (5%, at least 0.5 s), kept >= 5 s if possible."""
    length = end_ns - start_ns
    ramp = max(NS_PER_S, length // 10)
    drain = max(NS_PER_S // 2, length // 20)
    # Aim a little above the 5 s minimum: moving the edges onto counter ticks shortens the window slightly.
    wanted = int((MIN_WINDOW_SECONDS + 0.5) * NS_PER_S)
    if length - ramp - drain < wanted:
        # Short phase: give up exclusions before giving up the 5 s minimum.
        spare = max(0, length - wanted)
        ramp, drain = spare * 2 // 3, spare // 3
    return start_ns + ramp, end_ns - drain, f"ramp-up {ramp / NS_PER_S:.1f} s and drain {drain / NS_PER_S:.1f} s excluded"


def counter_energy(samples: pd.DataFrame, start_ns: int, end_ns: int) -> dict:
    """Energy of one GPU's counter over [start, end], with the edges moved to where the counter ticked.

    The counter holds the energy at its last update; the first sample that shows a new value saw an update
    somewhere since the sample before it, so the midpoint of those two samples is the edge's time (error at
    most half a sampling interval). Resets (driver reloads) count the new reading as energy since the reset.
    """
    series = samples[samples["energy_joules"].notna()][["monotonic_ns", "energy_joules"]].to_numpy()
    if len(series) < 2:
        return {"joules": None, "start_ns": start_ns, "end_ns": end_ns, "changes": 0}
    times, values = series[:, 0].astype(np.int64), series[:, 1].astype(float)
    changed = np.flatnonzero(np.diff(values) != 0) + 1  # indices whose value differs from the one before
    inside = changed[(times[changed] >= start_ns) & (times[changed] <= end_ns)]
    if len(inside) < 2:
        return {"joules": 0.0 if len(inside) else None, "start_ns": start_ns, "end_ns": end_ns,
                "changes": int(len(inside))}
    first, last = int(inside[0]), int(inside[-1])
    deltas = np.diff(values[first:last + 1])
    joules = float(np.where(deltas >= 0, deltas, values[first + 1:last + 1]).sum())
    edge_start = (int(times[first - 1]) + int(times[first])) // 2
    edge_end = (int(times[last - 1]) + int(times[last])) // 2
    return {"joules": joules, "start_ns": edge_start, "end_ns": edge_end, "changes": int(len(inside))}


def _interpolate(frame: pd.DataFrame, column: str, at_ns: int) -> float | None:
    if frame.empty or column not in frame:
        return None
    times = frame["monotonic_ns"].to_numpy(dtype=np.int64)
    if at_ns < times[0] or at_ns > times[-1]:
        return None
    return float(np.interp(at_ns, times, frame[column].to_numpy(dtype=float)))


def _between(frame: pd.DataFrame, start_ns: int, end_ns: int) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[(frame["monotonic_ns"] >= start_ns) & (frame["monotonic_ns"] <= end_ns)]


def _stats(values: pd.Series) -> dict:
    values = values.dropna()
    if values.empty:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(values.mean()), "p50": float(values.quantile(0.5)), "p99": float(values.quantile(0.99))}


def _integrated_power_joules(samples: pd.DataFrame, start_ns: int, end_ns: int) -> float | None:
    inside = _between(samples, start_ns, end_ns)
    inside = inside[inside["power_watts"].notna()] if "power_watts" in inside else inside.iloc[0:0]
    if len(inside) < 2:
        return None
    t = inside["monotonic_ns"].to_numpy(dtype=float) / NS_PER_S
    p = inside["power_watts"].to_numpy(dtype=float)
    joules = float(np.sum((p[1:] + p[:-1]) / 2 * np.diff(t)))
    return joules * (end_ns - start_ns) / NS_PER_S / (t[-1] - t[0])  # over the window's exact length


def _gpu_samples(run: RunData, gpus: Sequence[int] | None) -> pd.DataFrame:
    """The GPU samples of ``gpus`` (NVML indices), or of every GPU when None."""
    if gpus is None or run.gpu.empty or "index" not in run.gpu:
        return run.gpu
    return run.gpu[run.gpu["index"].isin(list(gpus))]


def window_energy(run: RunData, start_ns: int, end_ns: int, gpus: Sequence[int] | None = None) -> dict:
    """Counter energy of ``gpus`` (NVML indices; None: all GPUs) over a window, the window's effective
    edges, and the cross-checks."""
    samples_of_gpus = _gpu_samples(run, gpus)
    per_gpu = {}
    for index, samples in samples_of_gpus.groupby("index"):
        per_gpu[int(index)] = counter_energy(samples, start_ns, end_ns)
    reference = per_gpu.get(min(per_gpu)) if per_gpu else None
    if not reference or reference["joules"] is None:
        return {"joules": None, "start_ns": start_ns, "end_ns": end_ns, "per_gpu": per_gpu, "integrated_joules": None}
    edge_start, edge_end = reference["start_ns"], reference["end_ns"]
    seconds = (edge_end - edge_start) / NS_PER_S
    total = integrated = 0.0
    have_integrated = True
    for index, figures in per_gpu.items():
        if figures["joules"] is None:
            return {"joules": None, "start_ns": edge_start, "end_ns": edge_end, "per_gpu": per_gpu,
                    "integrated_joules": None}
        own = (figures["end_ns"] - figures["start_ns"]) / NS_PER_S
        # GPUs tick at slightly different moments: scale each to the reference window's length.
        total += figures["joules"] * (seconds / own if own > 0 else 1.0)
        part = _integrated_power_joules(samples_of_gpus[samples_of_gpus["index"] == index], edge_start, edge_end)
        if part is None:
            have_integrated = False
        else:
            integrated += part
    return {"joules": total, "start_ns": edge_start, "end_ns": edge_end, "per_gpu": per_gpu,
            "integrated_joules": integrated if have_integrated else None}


def _tokens(run: RunData, workload: str, start_ns: int, end_ns: int) -> TokenCounts:
    """Tokens of each kind the workload counted between the two instants (its cumulative counts, interpolated)."""
    out = {}
    for kind in TOKEN_KINDS:
        column = f"{workload}/{kind}"
        a, b = _interpolate(run.tokens, column, start_ns), _interpolate(run.tokens, column, end_ns)
        out[kind] = int(round(b - a)) if a is not None and b is not None else 0
    return TokenCounts(**out)


def _truth_joules(run: RunData, start_ns: int, end_ns: int, gpus: Sequence[int] | None = None) -> float | None:
    """The simulator's exact energy of ``gpus`` (None: all) between the two instants (J); None off the mock."""
    if run.truth.empty:
        return None
    total = 0.0
    wanted = None if gpus is None else {str(index) for index in gpus}
    for column in (c for c in run.truth.columns if c not in ("monotonic_ns", "t")
                   and (wanted is None or c in wanted)):
        a, b = _interpolate(run.truth, column, start_ns), _interpolate(run.truth, column, end_ns)
        if a is None or b is None:
            return None
        total += b - a
    return total


def _late_spans(run: RunData, name: str) -> Check | None:
    """The span-driven mock's "late spans" check for one phase: spans that reached the mock after it had
    simulated their time are activity it never simulated (see agent/span_activity.py). None when the run's
    events do not carry the mock's counts (real GPUs, older runs)."""
    start, end = run.event("phase_start", phase=name), run.event("phase_end", phase=name)
    if not start or not end or "mock_late_spans" not in start or "mock_late_spans" not in end:
        return None
    spans = end["mock_late_spans"] - start["mock_late_spans"]
    seconds = end["mock_late_span_seconds"] - start["mock_late_span_seconds"]
    lag = end.get("mock_lag_seconds")
    lag_text = f"{lag:g} s" if isinstance(lag, (int, float)) else "its"
    return _check("late spans", spans == 0,
                  f"every span reached the mock within {lag_text} lag" if spans == 0 else
                  f"{spans} span(s) reached the mock after {lag_text} lag: {seconds:.3f} s of activity not simulated")


def simulated_device_of(workload) -> Mapping | None:
    """The ``simulated_device`` key of a regime's workload summary (issue 14), or None: run on the CPU's
    own time, or on a real GPU."""
    simulated = workload.get("simulated_device") if isinstance(workload, Mapping) else None
    return simulated if isinstance(simulated, Mapping) else None


def _kept_up(run: RunData, name: str, simulated: Mapping | None) -> Check | None:
    """"CPU kept up with the simulated device": the workload's schedule (workloads/paced_clock.py) never
    fell half the mock's delay behind the wall clock. A span reaches the mock that much after its stamped
    time; past the mock's delay it is late and its activity is not simulated, so half of it leaves room
    for the reporter's own batching. None without simulated timing."""
    if simulated is None:
        return None
    from wattledger.workloads.bench.session import MOCK_DELAY_SECONDS

    end = run.event("phase_end", phase=name) or {}
    delay = finite(end.get("mock_lag_seconds"))
    delay = delay if delay is not None and delay > 0 else MOCK_DELAY_SECONDS
    lag = finite(simulated.get("max_lag_seconds"))
    limit = delay / 2
    if lag is None:
        return _check(KEPT_UP_CHECK, False, "the workload did not report how far it fell behind")
    lagging = finite(simulated.get("lagging_seconds")) or 0.0
    return _check(KEPT_UP_CHECK, lag < limit,
                  f"at most {lag:.3f} s behind the simulated device ({lagging:.1f} s of its time lagging); "
                  f"below half the mock's {delay:g} s delay ({limit:g} s) passes")


def late_spans_check(run: RunData, name: str) -> dict | None:
    """The "late spans" check of phase ``name`` as summary.json writes it, or None (see ``_late_spans``)."""
    check = _late_spans(run, name)
    return check.to_json() if check is not None else None


def _rapl(run: RunData, start_ns: int, end_ns: int) -> dict[str, float]:
    out = {}
    for column in (c for c in run.host.columns if c.startswith("rapl_")):
        a = _interpolate(run.host.dropna(subset=[column]), column, start_ns)
        b = _interpolate(run.host.dropna(subset=[column]), column, end_ns)
        if a is not None and b is not None:
            out[column.removeprefix("rapl_").removesuffix("_joules")] = b - a
    return out


def _per_gpu_watts(per_gpu: dict) -> dict[int, float]:
    """Each GPU's mean power over its own counter window (W): its joules over its own edges."""
    out = {}
    for index, figures in per_gpu.items():
        seconds = (figures["end_ns"] - figures["start_ns"]) / NS_PER_S
        if figures["joules"] is not None and seconds > 0:
            out[int(index)] = figures["joules"] / seconds
    return out


def _context_fields(run: RunData, phase: str) -> tuple[bool | None, str | None]:
    """Whether this process held a CUDA context during the idle phase, and why not (its phase_start)."""
    start = run.event("phase_start", phase=phase) or {}
    held = start.get("cuda_context_held")
    note = start.get("cuda_context_note")
    return (held if isinstance(held, bool) else None), (note if isinstance(note, str) else None)


def idle_baseline(run: RunData, phase: str = IDLE_PHASE) -> tuple[IdleBaseline, list[Check]]:
    """An idle phase's mean GPU power (W, all GPUs, and each GPU's own) from the counter over its steady
    window, and its checks. ``phase``: the opening baseline (``idle``, the one the dynamic figures
    subtract; at least MIN_WINDOW_SECONDS) or the closing one (``idle_end``, at least MIN_END_IDLE_SECONDS)."""
    opening = phase == IDLE_PHASE
    name = "idle baseline" if opening else "closing idle baseline"
    bounds = phases(run).get(phase)
    if bounds is None:
        why = "no idle phase was measured: dynamic figures are not available" if opening else \
            "no idle phase after the regimes was measured"
        return IdleBaseline(), [_check(name, False, why)]
    start, end = steady_window(bounds[0], bounds[1])[:2]
    energy = window_energy(run, start, end)
    seconds = (energy["end_ns"] - energy["start_ns"]) / NS_PER_S
    timing = phase_timing(run, phase)
    held, note = _context_fields(run, phase)
    finished = [_finished_check(timing, f"{'idle' if opening else 'closing idle'} phase finished")]
    if energy["joules"] is None or seconds <= 0:
        return IdleBaseline(None, seconds, None, timing, {}, held, note), [
            _check(name, False, "the energy counter did not move during the idle phase"), *finished]
    power = energy["joules"] / seconds
    minimum = MIN_WINDOW_SECONDS if opening else MIN_END_IDLE_SECONDS
    context = "" if held is None else (", CUDA context held" if held
                                       else f", no CUDA context ({note or 'not created'})")
    checks = [_check(name, seconds >= minimum, f"{seconds:.1f} s window, {power:.1f} W on "
                     f"{run.gpu['index'].nunique()} GPU(s) (at least {minimum:g} s wanted){context}"), *finished]
    return IdleBaseline(power, seconds, energy["joules"], timing, _per_gpu_watts(energy["per_gpu"]), held, note), checks


def idle_drift_check(opening: IdleBaseline, closing: IdleBaseline) -> Check | None:
    """The closing idle baseline against the opening one (relative difference of their mean power); None
    when either is missing."""
    before, after = finite(opening.power_watts), finite(closing.power_watts)
    if before is None or after is None or before <= 0:
        return None
    drift = (after - before) / before
    return _check("idle drift", abs(drift) <= MAX_IDLE_DRIFT,
                  f"idle power after the regimes {after:.1f} W vs {before:.1f} W before ({100 * drift:+.1f}%, limit "
                  f"{100 * MAX_IDLE_DRIFT:.0f}%); the dynamic figures subtract the one before")


def regime_gpus(run: RunData, name: str) -> tuple[tuple[int, ...], str | None]:
    """The GPUs (NVML indices) regime ``name`` is charged for, and how the bench found them ("uuid",
    "mock", ...): its phase_start's ``gpus``, or every GPU of the run (and None) when the phase_start does
    not say (a run recorded before attribution, or ``wattledger run``)."""
    start = run.event("phase_start", phase=name) or {}
    gpus, attribution = start.get("gpus"), start.get("gpu_attribution")
    if isinstance(gpus, list) and gpus and all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        return tuple(sorted(gpus)), attribution if isinstance(attribution, str) else None
    return run_gpu_indices(run), None


def run_gpu_indices(run: RunData) -> tuple[int, ...]:
    """Every GPU the run sampled (NVML indices), in order."""
    return tuple(sorted(int(i) for i in run.gpu["index"].unique())) if "index" in run.gpu else ()


def idle_power_of(idle: IdleBaseline, gpus: Sequence[int], all_gpus: Sequence[int]) -> float | None:
    """The idle baseline of ``gpus`` together (W): the whole baseline when they are every GPU of the run,
    else the sum of their own idle powers (None if one of them has none)."""
    if set(gpus) == set(all_gpus):
        return idle.power_watts
    powers = [idle.per_gpu_watts.get(index) for index in gpus]
    return sum(powers) if powers and all(p is not None for p in powers) else None


def failed_regimes(run: RunData, names: Sequence[str]) -> tuple[FailedRegime, ...]:
    """The regimes among ``names`` whose phase_end says the workload failed, with the reason it gave."""
    out = []
    for name in names:
        end = run.event("phase_end", phase=name)
        if end is not None and end.get("failed"):
            out.append(FailedRegime(name, str(end.get("failure_reason") or "the workload raised"),
                                    phase_timing(run, name)))
    return tuple(out)


def _peak(frame: pd.DataFrame, column: str, positive: bool = False) -> float | None:
    """The column's maximum; None when absent (or, with ``positive``, when nothing above 0 was seen)."""
    if column not in frame:
        return None
    peak = finite(frame[column].max())
    return None if positive and not peak else peak


def _temperature(samples: pd.DataFrame) -> tuple[float | None, float | None]:
    """GPU temperature over the phase (°C): p99 (what a sustained load reaches) and the single highest sample."""
    column = samples.get("temperature_gpu_celsius", pd.Series(dtype=float)).dropna()
    return _stats(column)["p99"], float(column.max()) if not column.empty else None


def _main_token_kind(name: str, tokens: TokenCounts) -> str:
    """A regime's main kind is in its registry record; a profiled command's is whatever kind it produced most of."""
    if name in REGIMES:
        return REGIMES[name].main_token_kind
    return max(COMMAND_KIND_PREFERENCE, key=tokens.of)


def _per_unit_energy(spec: PerUnitEnergy, name: str, workload: dict, main_kind: str,
                     joules_per_token: float | None, whole_phase_joules: float | None,
                     timing: PhaseTiming, phase_seconds: float) -> tuple[float | None, str | None]:
    """Joules per unit of the regime's work (a chat request, an agentic session), or None and why not (in
    words). ``spec.from_tokens``: joules per main token x the workload's main tokens per completed unit;
    else the whole phase's counter energy over the completed units."""
    cut = "" if timing.finished else f" (the phase was cut short after {timing.ran_seconds:.1f} s)"
    completed = workload.get(spec.count_key)
    if not workload:
        return None, f"the {name} workload reported no summary" + cut
    if completed is None:
        counts = "counts" if spec.started_key else "count"  # started and completed, or completed alone
        return None, f"the {name} workload's summary has no {spec.unit} {counts}"
    if completed == 0:
        if spec.started_key is None:
            return None, f"no {name} {spec.unit} completed during the phase" + cut
        started = workload.get(spec.started_key)
        seconds = workload.get("duration_seconds", phase_seconds)
        return None, (f"none of the {started or 0} {spec.unit}s finished within the {seconds:.0f} s phase" + cut
                      + ("" if cut else f": {spec.unit}s outlast it (a longer --duration lets some finish)"))
    if spec.from_tokens:
        main_tokens = (workload.get("tokens") or {}).get(main_kind)
        if joules_per_token is None or not main_tokens:
            return None, f"no joules per {main_kind} token in the steady-state window"
        return joules_per_token * main_tokens / completed, None
    if not whole_phase_joules:
        return None, "the energy counter did not cover the phase"
    return whole_phase_joules / completed, None


def _rapl_missing_reason(run: RunData) -> str:
    """Why a regime has no RAPL energy: the host probe's reasons at run start, or that no counter was sampled."""
    reasons = [e.get("reason") for e in (run.event("run_start") or {}).get("rapl") or []
               if isinstance(e, dict) and not e.get("supported") and e.get("reason")]
    return ("RAPL not readable on this host: " + "; ".join(reasons) if reasons
            else "no RAPL counters in the host samples")


def _regime_window(run: RunData, name: str, start_ns: int, end_ns: int) -> tuple[int, int, str]:
    """The phase's steady-state window (ns) and what it leaves out. Ramp-up counts from the workload's first
    activity: model building and imports before it are setup."""
    work_start = start_ns
    if not run.spans.empty and "workload" in run.spans:
        own = run.spans[(run.spans["workload"] == name) & (run.spans["start_ns"] >= start_ns)
                        & (run.spans["start_ns"] <= end_ns)]
        if not own.empty:
            work_start = int(own["start_ns"].min())
    window_start, window_end, exclusions = steady_window(work_start, end_ns)
    if work_start > start_ns:
        exclusions += f", after {(work_start - start_ns) / NS_PER_S:.1f} s of setup"
    return window_start, window_end, exclusions


def _window_checks(seconds: float, exclusions: str, energy: dict, timing: PhaseTiming, tokens: TokenCounts,
                   main_kind: str) -> tuple[list[Check], float | None]:
    """The regime's validity checks on its window, and the counter vs integrated power divergence (ratio)."""
    main_tokens = tokens.of(main_kind)
    checks = [
        _check("window length", seconds >= MIN_WINDOW_SECONDS, f"{seconds:.1f} s steady-state window ({exclusions})"),
        _check("counter resolution", all((g["changes"] or 0) >= 2 and (g["joules"] or 0) > 0
                                         for g in energy["per_gpu"].values()),
               "energy counters advanced on every GPU: " + ", ".join(
                   f"GPU {i}: {g['changes']} updates" for i, g in energy["per_gpu"].items())),
        _finished_check(timing),
        _check("tokens counted", main_tokens > 0, f"{main_tokens} {main_kind} tokens in the window"),
    ]
    gross, divergence = energy["joules"], None
    if gross and energy["integrated_joules"]:
        divergence = (energy["integrated_joules"] - gross) / gross
        checks.append(_check("counter vs integrated power", abs(divergence) <= MAX_DIVERGENCE,
                             f"integrated instant power differs from the counter by {100 * divergence:+.2f}% "
                             f"(limit {100 * MAX_DIVERGENCE:.0f}%)"))
    else:
        checks.append(_check("counter vs integrated power", False, "instant power or counter energy unavailable"))
    return checks, divergence


def _utilization(inside: pd.DataFrame) -> UtilizationStats:
    """GPU utilization over the window's samples (ratios); idle fraction: the share of samples at 0."""
    utilization = inside["utilization_gpu_ratio"].dropna() if "utilization_gpu_ratio" in inside else pd.Series()
    if utilization.empty:
        return UtilizationStats()
    return UtilizationStats(float(utilization.mean()), float(utilization.quantile(0.5)),
                            float(utilization.quantile(0.99)), float((utilization == 0).mean()))


def _memory(whole_phase: pd.DataFrame, host_phase: pd.DataFrame) -> MemoryPeaks:
    """Peaks over the phase: HBM; the machine's used memory (every process on the host) and the workload
    processes' own RSS and pinned memory."""
    return MemoryPeaks(_peak(whole_phase, "memory_used_bytes"), _peak(host_phase, "memory_used_bytes"),
                       _peak(host_phase, "process_rss_bytes", positive=True),
                       _peak(host_phase, "process_pinned_bytes"))


def _joules_per_token(gross: float | None, dynamic: float | None, tokens: TokenCounts,
                      main_kind: str) -> JoulesPerToken:
    """Gross and dynamic joules per token of every kind counted, the main kind's on top."""
    by_kind = {kind: GrossDynamic(gross / n if gross is not None else None, dynamic / n if dynamic is not None else None)
               for kind, n in tokens.to_json().items() if n > 0}
    main = by_kind.get(main_kind, GrossDynamic())
    return JoulesPerToken(main.gross, main.dynamic, by_kind)


def _mock_checks(run: RunData, name: str, a: int, b: int, gross: float | None,
                 main_tokens: int, gpus: Sequence[int] | None = None) -> tuple[MockTruth | None, list[Check]]:
    """The simulator's exact energy of ``gpus`` over the window (mock backend) and the checks against it:
    the measured energy within 1 % of it, and no span that reached the mock too late to be simulated."""
    checks, truth_figures = [], None
    truth = _truth_joules(run, a, b, gpus)
    if truth is not None:
        truth_figures = MockTruth(truth, truth / main_tokens if main_tokens else None)
        if gross is not None and truth > 0:
            error = (gross - truth) / truth
            checks.append(_check("mock ground truth", abs(error) <= MOCK_TRUTH_TOLERANCE,
                                 f"measured energy is {100 * error:+.3f}% from the simulator's exact energy"))
    late = _late_spans(run, name)
    if late is not None:
        checks.append(late)
    return truth_figures, checks


def regime_summary(run: RunData, name: str, idle_power_watts: float | None, pricing, gpus: int) -> RegimeResult | None:
    """The figures of regime (phase) ``name`` over its steady-state window; None when it has no phase_start.

    Only the GPUs the regime is charged for count (``regime_gpus``: energy, utilization, activity, power,
    memory, temperature). ``idle_power_watts``: the idle baseline of those GPUs together, None if not
    measured; ``gpus``: how many GPUs the economics pays for."""
    from wattledger.workloads.bench.economics import regime_economics

    phase = phases(run).get(name)
    if phase is None:
        return None
    start_ns, end_ns, _ = phase
    timing = phase_timing(run, name)
    charged, attribution = regime_gpus(run, name)
    window_start, window_end, exclusions = _regime_window(run, name, start_ns, end_ns)
    energy = window_energy(run, window_start, window_end, charged)
    a, b = energy["start_ns"], energy["end_ns"]
    seconds = (b - a) / NS_PER_S
    phase_seconds = (end_ns - start_ns) / NS_PER_S
    samples = _gpu_samples(run, charged)
    inside, whole_phase = _between(samples, a, b), _between(samples, start_ns, end_ns)
    tokens = _tokens(run, name, a, b)
    main_kind = _main_token_kind(name, tokens)
    gross = energy["joules"]
    dynamic = gross - idle_power_watts * seconds if gross is not None and idle_power_watts is not None else None
    joules_per_token = _joules_per_token(gross, dynamic, tokens, main_kind)
    workload = (run.event("phase_end", phase=name) or {}).get("workload_summary", {})
    utilization = _utilization(inside)
    checks, divergence = _window_checks(seconds, exclusions, energy, timing, tokens, main_kind)
    temperature_p99, temperature_max = _temperature(whole_phase)
    energy_detail = EnergyDetail(dynamic, energy["integrated_joules"], divergence, _rapl(run, a, b),
                                 window_energy(run, start_ns, end_ns, charged)["joules"], temperature_p99,
                                 temperature_max)
    per_unit, not_available = {}, {}
    spec = REGIMES[name].per_unit if name in REGIMES else None
    if spec is not None:
        value, why = _per_unit_energy(spec, name, workload or {}, main_kind, joules_per_token.gross,
                                      energy_detail.whole_phase_joules, timing, phase_seconds)
        per_unit[spec.summary_key] = value
        if why is not None:
            not_available[spec.summary_key] = why
    if not energy_detail.rapl_joules:
        not_available["rapl_joules"] = _rapl_missing_reason(run)
    mock_truth, mock_checks = _mock_checks(run, name, a, b, gross, tokens.of(main_kind), charged)
    simulated = simulated_device_of(workload)
    kept_up = _kept_up(run, name, simulated)
    if kept_up is not None:
        mock_checks.append(kept_up)
    return RegimeResult(
        duration_seconds=seconds, phase_seconds=phase_seconds, phase=timing,
        window=Window((a - run.origin_ns) / NS_PER_S, (b - run.origin_ns) / NS_PER_S, exclusions),
        gpu_utilization=utilization,
        activity={field.removesuffix("_activity_ratio"): _stats(inside[field])["mean"]
                  for field in ("sm_activity_ratio", "tensor_activity_ratio", "dram_activity_ratio")
                  if field in inside},
        power_watts=PowerStats(gross / seconds if gross is not None and seconds > 0 else None,
                               _stats(inside["power_watts"])["p99"] if "power_watts" in inside else None),
        energy_joules=gross, energy=energy_detail, memory=_memory(whole_phase, _between(run.host, start_ns, end_ns)),
        tokens=tokens, tokens_per_second={kind: n / seconds for kind, n in tokens.to_json().items() if seconds > 0},
        main_token_kind=main_kind, joules_per_token=joules_per_token, per_unit_joules=per_unit,
        workload=workload, validity=(*checks, *mock_checks), not_available=not_available,
        economics=regime_economics(pricing, gpus, seconds, gross, tokens.of(main_kind), utilization.mean,
                                   idle_power_watts),
        mock_truth=mock_truth, gpus=charged, gpu_attribution=attribution, idle_power_watts=idle_power_watts,
        simulated_device=dict(simulated) if simulated is not None else None,
    )


def _gpus(run: RunData) -> tuple[GpuInfo, ...]:
    """The run's GPUs from the samples' header, each with the power limit it ended the run at (W)."""
    limits = {}
    if not run.gpu.empty and "power_limit_watts" in run.gpu:
        limits = run.gpu.groupby("index")["power_limit_watts"].last().to_dict()
    return tuple(GpuInfo(g["index"], g["uuid"], g["model_name"], g["driver_version"],
                         finite(limits.get(g["index"], g.get("power_limit_default_watts"))),
                         g.get("memory_total_bytes"), bool(g.get("simulated")))
                 for g in run.header.get("gpus", []))


def _run_checks(run: RunData) -> list[Check]:
    """The run-wide checks besides the idle baseline: every GPU answered, and whether the GPUs were real."""
    checks = []
    if not run.gpu.empty and "up" in run.gpu:
        down = run.gpu[run.gpu["up"] == False]  # noqa: E712 - pandas element-wise comparison
        checks.append(_check("GPUs up", down.empty, "every GPU answered throughout" if down.empty
                             else f"{len(down)} samples from lost GPUs"))
    checks.append(_check("backend", not run.simulated, "real hardware counters (NVML)" if not run.simulated else
                         "SIMULATED: mock GPU; energy figures come from the simulator, not hardware"))
    return checks


def analyse(run: RunData, pricing, kind: str = "bench", regimes: Sequence[str] = DEFAULT_REGIMES,
            settings: dict | None = None) -> RunSummary:
    """The whole run, typed: ``analyse(...).to_json()`` is ``summary.json`` (docs/summary.schema.json).

    ``regimes``: the phases to summarise, registry regimes or any other name (a profiled command's phase);
    one that never started is left out, and one whose workload failed is listed in ``failed_regimes``
    instead.

    The dynamic figures subtract the opening idle baseline (``idle``), not the closing one (``idle_end``)
    nor their mean: the opening one is the longer measurement, it exists in every run that reached a
    regime (a run cut short or with a failed regime may never reach the end), and the closing one follows
    the last regime straight after a cooldown, so it carries that regime's thermal and clock tail. The
    "idle drift" check says when the two disagree enough to matter."""
    from wattledger.workloads.bench.economics import pricing_record

    start = run.event("run_start") or {}
    end = run.event("run_end")
    gpus = _gpus(run)
    idle, checks = idle_baseline(run)
    idle_end, end_checks = idle_baseline(run, IDLE_END_PHASE) if IDLE_END_PHASE in phases(run) else (None, [])
    drift = idle_drift_check(idle, idle_end) if idle_end is not None else None
    failed = failed_regimes(run, regimes)
    all_gpus = run_gpu_indices(run)
    results = {}
    for name in (n for n in regimes if n not in {f.regime for f in failed}):
        charged = regime_gpus(run, name)[0]
        result = regime_summary(run, name, idle_power_of(idle, charged, all_gpus), pricing, max(1, len(charged)))
        if result is not None:
            results[name] = result
    return RunSummary(
        kind=kind, status=(end or {}).get("status", "partial") if end else "partial",
        backend=run.header.get("backend") or "mock", simulated=run.simulated, created=start.get("wall_time", ""),
        host=start.get("host", {}), settings=settings if settings is not None else start.get("settings", {}),
        gpus=gpus, idle=idle, regimes=results,
        validity=(*checks, *end_checks, *([drift] if drift else []), *_run_checks(run), *_failure_checks(failed)),
        pricing=pricing_record(pricing), schema_version=SCHEMA_VERSION, idle_end=idle_end, failed_regimes=failed)


def _failure_checks(failed: Sequence[FailedRegime]) -> list[Check]:
    """One failed run-wide check per regime whose workload raised, so the closing table and the report's
    validity list show it beside the others."""
    return [_check("regime failed", False, f"{f.regime}: {f.reason}") for f in failed]


def summarize(run: RunData, pricing, kind: str = "bench", regimes: Sequence[str] = DEFAULT_REGIMES,
              settings: dict | None = None) -> dict:
    """The whole ``summary.json`` object (see docs/summary.schema.json): :func:`analyse`, serialised."""
    return analyse(run, pricing, kind=kind, regimes=regimes, settings=settings).to_json()
