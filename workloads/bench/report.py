"""The run report: one self-contained HTML page (``report.html``) and its figures as PNG files.

``render_report(run, summary, out_path)`` draws the figures from the run's raw tables (``RunData``) and
the tables from ``summary``: the analysis's typed ``RunSummary`` (workloads/bench/results.py), or a
summary.json object, which is read back into one. Regimes come in the registry's order
(workloads/registry.py), then any other phase; each in its record's colour. The page needs nothing outside
itself: inline CSS, no scripts, figures embedded as base64 PNG ``<img>`` with alt text. The same figures
are saved under ``run.run_dir / "figures"``:

Every time-series figure has one axis, seconds since the run started, and shades the steady-state window
each regime's figures come from (its ``RegimeResult.window``); titles say SIMULATED on the mock.

- ``utilization_by_regime.png``: one panel per regime, stacked on that shared axis: GPU utilization during
  the regime's phase (raw samples plus a rolling mean);
- ``activity_by_regime.png``: the same panels for SM, tensor and DRAM activity (GPM fields);
- ``power_timeline.png``: GPU power over the whole run, phases (idle baseline included) shaded; below it
  the host CPU power from RAPL when the host's counters were readable;
- ``memory.png``: HBM used; host memory: the workload processes' RSS (and pinned bytes when any) beside the
  whole machine's used memory;
- ``joules_per_token.png``: joules per token, gross and dynamic, per regime;
- ``cost_curves.png``: dollars per million tokens against utilization, each regime's measured point marked.

Partial data is expected (an interrupted run, a regime that never ran, a probe that reported nothing): a
figure with nothing to draw is replaced by a line saying why, and a missing number reads "n/a".

Matplotlib draws through ``matplotlib.figure.Figure`` (the Agg canvas), never pyplot, so no global
backend state is touched; it is imported only when a report is rendered. The daemon never imports this
module.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from wattledger.workloads.bench.results import (
    EnergyDetail,
    GpuInfo,
    MemoryPeaks,
    RegimeResult,
    RunSummary,
    as_summary,
    finite,
)
from wattledger.workloads.bench.rundata import NS_PER_S, RunData
from wattledger.workloads.registry import COMMAND_COLOR, REGIMES

# Colours of phases that are neither a registry regime nor a profiled command, taken in turn.
OTHER_COLORS = ("#a83a5a", "#5a6b7d", "#8c6d1f", "#3a8c8c")
IDLE_PHASE = "idle"  # the baseline phase (analysis.idle_baseline), never a regime
IDLE_END_PHASE = "idle_end"  # the closing baseline, after the regimes (analysis.IDLE_END_PHASE)
IDLE_PHASES = (IDLE_PHASE, IDLE_END_PHASE)
IDLE_PHASE_COLOR = "#8a8a8a"
GB = 1e9
FIGURE_DPI = 110
FIGURE_FILES = {
    "utilization": "utilization_by_regime.png",
    "activity": "activity_by_regime.png",
    "power": "power_timeline.png",
    "memory": "memory.png",
    "joules_per_token": "joules_per_token.png",
    "cost": "cost_curves.png",
}


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float  # seconds since the run started
    end_s: float
    finished: bool  # False: no phase_end (the run was interrupted during it)


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    alt: str
    png: bytes | None  # None: nothing to draw
    note: str  # caption, or why there is no figure
    mpl: Any = field(default=None, compare=False, repr=False)  # the matplotlib Figure drawn (tests read its axes)


# -- helpers: numbers ------------------------------------------------------------------------------------

def _workload_figure(regime: RegimeResult, *keys: str) -> Any:
    """A figure of the workload's own summary (free-form, each regime its own: TTFT, MFU, spill...), or None."""
    value = regime.workload
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _sig(value: float, digits: int = 3) -> str:
    """``digits`` significant figures, thousands separated, no exponent for everyday magnitudes."""
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    if abs(value) < 1e-4:
        return f"{value:.{digits - 1}e}"
    return f"{value:,.{decimals}f}"


def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    number = finite(value)
    if number is None:
        return "n/a"
    return f"{_sig(number, digits)}{(' ' + unit) if unit else ''}"


def fmt_percent(value: Any, digits: int = 1) -> str:
    number = finite(value)
    return "n/a" if number is None else f"{number * 100:.{digits}f} %"


def fmt_usd(value: Any) -> str:
    number = finite(value)
    return "n/a" if number is None else f"${_sig(number, 3)}"


def fmt_bytes(value: Any) -> str:
    number = finite(value)
    if number is None:
        return "n/a"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(number) >= size:
            return f"{_sig(number / size, 3)} {unit}"
    return f"{number:.0f} B"


def fmt_energy(value: Any) -> str:
    number = finite(value)
    if number is None:
        return "n/a"
    if abs(number) >= 1e6:
        return f"{_sig(number / 1e6, 3)} MJ"
    if abs(number) >= 1e3:
        return f"{_sig(number / 1e3, 3)} kJ"
    return f"{_sig(number, 3)} J"


def fmt_seconds(value: Any) -> str:
    number = finite(value)
    if number is None:
        return "n/a"
    if abs(number) < 1:
        return f"{_sig(number * 1000, 3)} ms"
    if abs(number) >= 120:
        return f"{number / 60:.1f} min"
    return f"{_sig(number, 3)} s"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# -- helpers: the run's tables -----------------------------------------------------------------------------

def phases_of(run: RunData) -> list[Phase]:
    """Phases from phase_start/phase_end events; one left open ends where the run's data ends."""
    def seconds(event: dict) -> float | None:
        ns = event.get("monotonic_ns")
        return (ns - run.origin_ns) / NS_PER_S if isinstance(ns, int) else None

    last = _data_end(run)
    end_event = run.event("run_end")
    if end_event is not None and seconds(end_event) is not None:
        last = max(last, seconds(end_event))
    open_: dict[str, float] = {}
    out: list[Phase] = []
    for event in run.events:
        kind, name, at = event.get("type"), event.get("phase"), seconds(event)
        if name is None or at is None:
            continue
        if kind == "phase_start":
            open_[str(name)] = at
        elif kind == "phase_end" and str(name) in open_:
            out.append(Phase(str(name), open_.pop(str(name)), at, True))
    out += [Phase(name, start, max(start, last), False) for name, start in open_.items()]
    return sorted(out, key=lambda p: p.start_s)


def _data_end(run: RunData) -> float:
    ends = [float(frame["t"].max()) for frame in (run.gpu, run.host) if not frame.empty and "t" in frame]
    return max(ends, default=0.0)


def _interval(run: RunData) -> float:
    value = finite(run.header.get("interval_seconds"))
    if value and value > 0:
        return value
    if not run.gpu.empty and "index" in run.gpu:
        first = run.gpu[run.gpu["index"] == run.gpu["index"].iloc[0]]["t"].diff().median()
        if finite(first):
            return float(first)
    return 1.0


def per_tick(run: RunData, column: str, how: str = "mean") -> pd.DataFrame:
    """GPU samples of ``column`` combined across GPUs per sampling tick: columns t and value."""
    frame = run.gpu
    if frame.empty or column not in frame or "t" not in frame:
        return pd.DataFrame({"t": [], "value": []})
    frame = frame[["t", column]].assign(value=pd.to_numeric(frame[column], errors="coerce"))
    if "index" in run.gpu and run.gpu["index"].nunique() > 1:
        tick = (frame["t"] / _interval(run)).round().rename("tick")
        grouped = frame.groupby(tick)
        value = grouped["value"].sum(min_count=1) if how == "sum" else grouped["value"].mean()
        frame = pd.DataFrame({"t": grouped["t"].mean(), "value": value}).reset_index(drop=True)
    return frame[["t", "value"]].dropna().sort_values("t").reset_index(drop=True)


# The regimes the report shows, in its order, each with its colour: regime name -> colour (hex).
RegimeColors = dict[str, str]


def _regime_names(summary: RunSummary, phases: list[Phase]) -> RegimeColors:
    """Regimes in the summary, then phases that ran but have no summary entry (an interrupted phase): a
    registry regime's, or in a profiled command's run any phase but the idle baseline. Registry regimes
    come first, in registry order, then the others as they came; each with its colour."""
    names = list(summary.regimes)
    for phase in phases:
        is_regime = phase.name in REGIMES or (summary.kind == "run" and phase.name not in IDLE_PHASES)
        if is_regime and phase.name not in names:
            names.append(phase.name)
    rank = {name: i for i, name in enumerate(REGIMES)}
    ordered = sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))
    return _regime_colors(ordered, profiled_command=summary.kind == "run")


def _regime_colors(names: list[str], profiled_command: bool) -> RegimeColors:
    """A registry regime in its record's colour; a profiled command's phase in COMMAND_COLOR; any other
    name takes OTHER_COLORS in turn."""
    colors, others = {}, 0
    for name in names:
        if name in REGIMES:
            colors[name] = REGIMES[name].color
        elif profiled_command:
            colors[name] = COMMAND_COLOR
        else:
            colors[name] = OTHER_COLORS[others % len(OTHER_COLORS)]
            others += 1
    return colors


def _color(name: str, names: RegimeColors) -> str:
    return names.get(name, IDLE_PHASE_COLOR)


def _simulated(run: RunData, summary: RunSummary) -> bool:
    """What the summary says, else what the recording's header says."""
    return summary.simulated if summary.simulated is not None else run.simulated


# -- figures -----------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global backend state
    axes = fig.subplots(rows, 1, sharex=True) if rows > 1 else fig.subplots()
    for ax in (axes if rows > 1 else [axes]):
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, facecolor="white")
    return buffer.getvalue()


def _legend_above(ax, handles=None, ncols=None) -> None:
    """The legend in one row above the plot's top right, clear of the data."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=ncols or len(handles),
                  frameon=False, fontsize=9, borderaxespad=0.2, handlelength=1.8, columnspacing=1.2)


def _shade_phases(ax, phases: list[Phase], names: RegimeColors, label: bool) -> None:
    for phase in phases:
        color = _color(phase.name, names)
        ax.axvspan(phase.start_s, phase.end_s, color=color, alpha=0.10, linewidth=0)
        if label:
            text = phase.name if phase.finished else f"{phase.name} (cut short)"
            ax.text((phase.start_s + phase.end_s) / 2, 0.985, text, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8.5, color=color, fontweight="bold")


def _sim_title(title: str, simulated: bool) -> str:
    """A figure title that says SIMULATED when the figures came from the mock GPU (saved PNGs travel alone)."""
    return f"{title} (SIMULATED: mock GPU)" if simulated else title


def steady_windows(summary: RunSummary, names) -> dict[str, tuple[float, float]]:
    """regime -> (start, end) of the steady-state window its figures come from, seconds since run start."""
    out = {}
    for name in names:
        window = summary.regimes[name].window if name in summary.regimes else None
        start, end = (finite(window.start_seconds), finite(window.end_seconds)) if window else (None, None)
        if start is not None and end is not None and end > start:
            out[name] = (start, end)
    return out


def _shade_window(ax, window: tuple[float, float] | None, color: str, label: bool) -> None:
    """The steady-state window a regime's figures come from, shaded and hatched on its panel."""
    if window is None:
        return
    ax.axvspan(window[0], window[1], facecolor=color, alpha=0.16, edgecolor=color, hatch="//", linewidth=0,
               label="steady-state window (the summary's figures)" if label else None)


def _regime_panels(run: RunData, summary: RunSummary, phases: list[Phase], names: RegimeColors, title: str,
                   draw, ylabel: str, height_per_panel: float = 1.75):
    """One panel per regime, stacked on one shared axis of seconds since the run started. ``draw(ax, phase,
    color)`` plots the regime's data and returns whether there was any. Each panel shades its phase and its
    steady-state window. Returns (figure, drawn regime names), or (None, []) when no panel had data."""
    regime_phases = [p for p in phases if p.name in names]
    if not regime_phases:
        return None, []
    fig, axes = _new_figure(10, 0.9 + height_per_panel * len(regime_phases), rows=len(regime_phases))
    axes = list(axes) if len(regime_phases) > 1 else [axes]
    windows = steady_windows(summary, names)
    drawn = []
    end = max([_data_end(run)] + [p.end_s for p in phases])
    for ax, phase in zip(axes, regime_phases):
        color = _color(phase.name, names)
        ax.axvspan(phase.start_s, phase.end_s, color=color, alpha=0.06, linewidth=0)
        _shade_window(ax, windows.get(phase.name), color, label=ax is axes[0])
        if draw(ax, phase, color):
            drawn.append(phase.name)
        else:
            ax.text(0.5, 0.5, f"n/a: no samples in the {phase.name} phase", transform=ax.transAxes, ha="center",
                    color="#666666")
        state = "" if phase.finished else " (cut short)"
        ax.text(0.005, 0.96, f"{phase.name}{state}", transform=ax.transAxes, ha="left", va="top", fontsize=9.5,
                color=color, fontweight="bold")
        ax.set_ylabel(ylabel, fontsize=8.5)
        ax.set_xlim(0, end)
    axes[-1].set_xlabel("seconds since the run started")
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)  # above the legend row, clear of it
    if not drawn:
        return None, []
    return fig, drawn


def _window_text(summary: RunSummary, names) -> str:
    windows = steady_windows(summary, names)
    return "; ".join(f"{n} {a:.1f}-{b:.1f} s" for n, (a, b) in windows.items()) or "none in the summary"


def figure_utilization(run: RunData, summary: RunSummary, phases: list[Phase], names: RegimeColors) -> Figure:
    simulated = _simulated(run, summary)
    title = _sim_title("GPU utilization by regime", simulated)
    # NVML's utilization where the board reports it, else GPM's SM activity.
    column = next((c for c in ("utilization_gpu_ratio", "sm_activity_ratio")
                   if c in run.gpu and run.gpu[c].notna().any()), "utilization_gpu_ratio")
    util = per_tick(run, column)
    if util.empty or not any(p.name in names for p in phases):
        why = "no GPU utilization samples" if util.empty else "no regime phases in events.jsonl"
        return Figure("utilization", title, title, None, f"n/a: {why}")
    window = max(3, round(2.0 / _interval(run)))

    def draw(ax, phase: Phase, color: str) -> bool:
        part = util[(util["t"] >= phase.start_s) & (util["t"] < phase.end_s)]
        if part.empty:
            return False
        ax.plot(part["t"], part["value"] * 100, color=color, linewidth=0.8, alpha=0.85)
        smooth = part["value"].rolling(window, center=True, min_periods=1).mean()
        ax.plot(part["t"], smooth * 100, color=color, linewidth=2.4, alpha=0.35)
        ax.set_ylim(-3, 108)
        return True

    gpus = run.gpu["index"].nunique() if "index" in run.gpu else 1
    fig, drawn = _regime_panels(run, summary, phases, names, title, draw,
                                "utilization %" + (f"\n(mean of {gpus} GPUs)" if gpus > 1 else ""))
    if fig is None:
        return Figure("utilization", title, title, None, "n/a: no samples inside the regime phases")
    _legend_above(fig.axes[0])
    alt = (f"{len(drawn)} stacked line charts, one per regime ({', '.join(drawn)}), sharing one axis of seconds "
           f"since the run started: GPU utilization (%) during each regime's phase, with the steady-state window "
           f"its figures come from shaded ({_window_text(summary, drawn)}).")
    note = (f"One panel per regime, one time axis. Thin lines: every sample ({column}); thick faint lines: "
            f"{window}-sample rolling mean; hatched: the steady-state window the summary's figures come from. "
            "Training should be flat, chat spiky, agentic broken by tool calls.")
    return Figure("utilization", title, alt, _png(fig), note, fig)


ACTIVITY_FIELDS = (("sm_activity_ratio", "SM", "#1b7837"), ("tensor_activity_ratio", "tensor", "#762a83"),
                   ("dram_activity_ratio", "DRAM", "#e08214"))


def figure_activity(run: RunData, summary: RunSummary, phases: list[Phase], names: RegimeColors) -> Figure:
    simulated = _simulated(run, summary)
    title = _sim_title("SM, tensor and DRAM activity by regime", simulated)
    series = {label: (per_tick(run, column), color) for column, label, color in ACTIVITY_FIELDS}
    series = {label: value for label, value in series.items() if not value[0].empty}
    if not series:
        return Figure("activity", title, title, None, "n/a: the GPUs reported no SM, tensor or DRAM activity "
                      "(GPM fields need a Hopper-or-newer GPU, or DCGM profiling metrics)")

    def draw(ax, phase: Phase, _color_unused: str) -> bool:
        any_data = False
        for label, (frame, color) in series.items():
            part = frame[(frame["t"] >= phase.start_s) & (frame["t"] < phase.end_s)]
            if not part.empty:
                ax.plot(part["t"], part["value"] * 100, color=color, linewidth=0.9, label=label)
                any_data = True
        ax.set_ylim(-3, 108)
        return any_data

    fig, drawn = _regime_panels(run, summary, phases, names, title, draw, "activity %")
    if fig is None:
        return Figure("activity", title, title, None, "n/a: no activity samples inside the regime phases")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    _legend_above(fig.axes[0], list(unique.values()))
    means = []
    for name in drawn:
        activity = summary.regimes[name].activity if name in summary.regimes else {}
        parts = [f"{label} {fmt_percent(activity.get(key))}" for key, label in
                 (("sm", "SM"), ("tensor", "tensor"), ("dram", "DRAM")) if key in activity]
        if parts:
            means.append(f"{name}: " + ", ".join(parts))
    alt = (f"{len(drawn)} stacked line charts, one per regime ({', '.join(drawn)}), sharing one axis of seconds "
           f"since the run started: {', '.join(series)} activity (%) during each regime's phase; steady-state "
           "windows shaded." + (" Window means: " + "; ".join(means) + "." if means else ""))
    note = ("Share of time the SMs were busy, the tensor cores were busy, and DRAM was being read or written "
            "(NVML GPM fields). Window means: " + ("; ".join(means) if means else "n/a") + ".")
    return Figure("activity", title, alt, _png(fig), note, fig)


def rapl_power(run: RunData) -> dict[str, pd.DataFrame]:
    """zone -> (t, watts) from the host's RAPL energy counters, differenced between host samples (the
    running totals only grow, so a negative step, a reader restart, is dropped)."""
    out = {}
    host = run.host
    for column in (c for c in host.columns if c.startswith("rapl_") and c.endswith("_joules")):
        frame = host[["t", column]].dropna().sort_values("t")
        if len(frame) < 2:
            continue
        dt = frame["t"].diff()
        watts = frame[column].diff() / dt
        keep = (dt > 0) & (watts >= 0)
        part = pd.DataFrame({"t": frame["t"][keep], "value": watts[keep]})
        if not part.empty:
            out[column.removeprefix("rapl_").removesuffix("_joules")] = part
    return out


def _rapl_reason(run: RunData, summary: RunSummary) -> str:
    """Why a run has no RAPL energy, from the summary or the host probe's status at run start."""
    for regime in summary.regimes.values():
        reason = regime.not_available.get("rapl_joules")
        if reason is not None:
            return reason
    reasons = [e.get("reason") for e in (run.event("run_start") or {}).get("rapl") or []
               if isinstance(e, dict) and not e.get("supported") and e.get("reason")]
    return "RAPL not readable on this host: " + "; ".join(reasons) if reasons else "no RAPL counters recorded"


def figure_power(run: RunData, summary: RunSummary, phases: list[Phase], names: RegimeColors) -> Figure:
    simulated = _simulated(run, summary)
    title = _sim_title("GPU power over the run", simulated)
    power = per_tick(run, "power_watts", how="sum")
    if power.empty:
        return Figure("power", title, title, None, "n/a: no GPU power samples")
    rapl = rapl_power(run)
    fig, axes = _new_figure(10, 5.6 if rapl else 4.0, rows=2 if rapl else 1)
    ax = axes[0] if rapl else axes
    _shade_phases(ax, phases, names, label=True)
    windows = steady_windows(summary, names)
    for name, window in windows.items():
        _shade_window(ax, window, _color(name, names), label=name == next(iter(windows)))
    gpus = run.gpu["index"].nunique() if "index" in run.gpu else 1
    ax.plot(power["t"], power["value"], color="#222222", linewidth=1.0,
            label="GPU power, all GPUs" if gpus > 1 else "GPU power")
    idle_w = finite(summary.idle.power_watts)
    if idle_w is not None:
        ax.axhline(idle_w, color=IDLE_PHASE_COLOR, linestyle="--", linewidth=1.1,
                   label=f"idle baseline {idle_w:.0f} W")
    limits = [finite(g.power_limit_watts) for g in summary.gpus]
    if limits and all(v is not None for v in limits):
        ax.axhline(sum(limits), color="#b03030", linestyle=":", linewidth=1.1,
                   label=f"power limit {sum(limits):.0f} W")
    top = max(float(power["value"].max()), sum(v for v in limits if v) if limits else 0.0)
    ax.set_ylim(0, top * 1.15)
    ax.set_xlim(0, max(power["t"].max(), max((p.end_s for p in phases), default=0)))
    ax.set_ylabel("GPU power (W" + (f", sum of {gpus} GPUs)" if gpus > 1 else ")"))
    # The title above the legend row: this legend is too long to share a line with it.
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    _legend_above(ax)
    if rapl:
        bottom = axes[1]
        _shade_phases(bottom, phases, names, label=False)
        for (zone, frame), color in zip(rapl.items(), ("#8c2d04", "#2166ac", "#cc4c02", "#4393c3")):
            bottom.plot(frame["t"], frame["value"], color=color, linewidth=1.0, label=f"RAPL {zone}")
        bottom.set_ylabel("host CPU power (W)")
        bottom.set_ylim(bottom=0)
        _legend_above(bottom)
    (axes[1] if rapl else ax).set_xlabel("seconds since the run started")
    phase_list = ", ".join(f"{p.name} {p.start_s:.0f}-{p.end_s:.0f} s" for p in phases) or "none recorded"
    alt = (f"Line chart: GPU power (W) against seconds since the run started; shaded phases: {phase_list}; "
           f"hatched steady-state windows: {_window_text(summary, names)}"
           + (f"; below, host CPU power from RAPL ({', '.join(rapl)})." if rapl else "."))
    note = "Shaded bands are the phases (idle baseline included), from events.jsonl; hatched: steady-state windows. "
    note += (f"Below: host CPU power from the RAPL energy counters ({', '.join(rapl)})." if rapl
             else f"Host CPU energy: n/a ({_rapl_reason(run, summary)}).")
    return Figure("power", title, alt, _png(fig), note, fig)


def _host_column(run: RunData, column: str, positive: bool = False) -> pd.DataFrame:
    host = run.host
    if host.empty or column not in host:
        return pd.DataFrame()
    frame = host[["t", column]].dropna()
    return frame if not positive or (not frame.empty and float(frame[column].max()) > 0) else pd.DataFrame()


def figure_memory(run: RunData, summary: RunSummary, phases: list[Phase], names: RegimeColors) -> Figure:
    simulated = _simulated(run, summary)
    title = _sim_title("GPU memory (HBM) and host memory used", simulated)
    hbm = per_tick(run, "memory_used_bytes", how="sum")
    total = per_tick(run, "memory_total_bytes", how="sum")
    machine = _host_column(run, "memory_used_bytes")
    workload_rss = _host_column(run, "process_rss_bytes", positive=True)
    pinned = _host_column(run, "process_pinned_bytes", positive=True)
    if hbm.empty and machine.empty and workload_rss.empty:
        return Figure("memory", title, title, None, "n/a: no GPU or host memory samples")
    fig, (top, bottom) = _new_figure(10, 5.2, rows=2)
    for ax in (top, bottom):
        _shade_phases(ax, phases, names, label=ax is top)
    if not hbm.empty:
        top.plot(hbm["t"], hbm["value"] / GB, color="#6a3d9a", linewidth=1.2, label="HBM used")
        if not total.empty:
            top.axhline(float(total["value"].max()) / GB, color="#6a3d9a", linestyle=":", linewidth=1,
                        label=f"HBM total {float(total['value'].max()) / GB:.0f} GB")
        top.set_ylim(0, max(float(hbm["value"].max()), float(total["value"].max()) if not total.empty else 0)
                     / GB * 1.2)
        _legend_above(top)
    else:
        top.text(0.5, 0.5, "n/a: no HBM samples", transform=top.transAxes, ha="center", color="#666666")
    gpus = run.gpu["index"].nunique() if "index" in run.gpu else 1
    top.set_ylabel("HBM (GB" + (f", {gpus} GPUs)" if gpus > 1 else ")"))
    top.set_title(title, loc="left", fontsize=11)
    peaks = [0.0]
    if not workload_rss.empty:
        bottom.plot(workload_rss["t"], workload_rss["process_rss_bytes"] / GB, color="#b15928", linewidth=1.4,
                    label="workload processes' RSS")
        peaks.append(float(workload_rss["process_rss_bytes"].max()))
    if not pinned.empty:
        bottom.plot(pinned["t"], pinned["process_pinned_bytes"] / GB, color="#e31a1c", linewidth=1.2,
                    linestyle="--", label="pinned by the workload")
        peaks.append(float(pinned["process_pinned_bytes"].max()))
    if not machine.empty:
        bottom.plot(machine["t"], machine["memory_used_bytes"] / GB, color="#999999", linewidth=1.0,
                    linestyle=":", label="whole machine, all processes")
        peaks.append(float(machine["memory_used_bytes"].max()))
    if max(peaks) > 0:
        bottom.set_ylim(0, max(peaks) / GB * 1.25)
        _legend_above(bottom)
    else:
        bottom.text(0.5, 0.5, "n/a: no host memory samples", transform=bottom.transAxes, ha="center",
                    color="#666666")
    bottom.set_ylabel("host memory (GB)")
    bottom.set_xlabel("seconds since the run started")
    bottom.set_xlim(left=0)
    alt = ("Two line charts against seconds since the run started: GPU HBM used (GB) above; below, host memory "
           "(GB): the workload processes' resident memory" + (", what they pinned" if not pinned.empty else "")
           + ", and the whole machine's used memory for comparison; phases shaded.")
    note = ("GB are 10^9 bytes. Host memory: the workload processes' RSS (in `wattledger bench` the bench process "
            "itself, agent included), and dotted, the whole machine's used memory (every process on it)."
            + (" Pinned: VmPin of the workload processes." if not pinned.empty else ""))
    return Figure("memory", title, alt, _png(fig), note, fig)


def figure_joules_per_token(summary: RunSummary, names: RegimeColors) -> Figure:
    title = _sim_title("Joules per token, gross and dynamic", bool(summary.simulated))
    rows = []
    for name in names:
        regime = summary.regimes.get(name)
        if regime is None:
            continue
        jpt = regime.joules_per_token
        rows.append((name, regime.main_kind, finite(jpt.gross), finite(jpt.dynamic)))
    if not any(g is not None or d is not None for _, _, g, d in rows):
        return Figure("joules_per_token", title, title, None, "n/a: no joules-per-token figures")
    fig, ax = _new_figure(7.5, 3.8)
    width = 0.36
    values = [v for _, _, g, d in rows for v in (g, d) if v is not None]
    top = max(values) if values else 1.0
    for i, (name, kind, gross, dynamic) in enumerate(rows):
        color = _color(name, names)
        for offset, value, hatch, alpha in ((-width / 2, gross, None, 0.9), (width / 2, dynamic, "///", 0.45)):
            if value is None:
                ax.text(i + offset, top * 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#666666")
                continue
            ax.bar(i + offset, value, width, color=color, alpha=alpha, hatch=hatch, edgecolor=color)
            ax.text(i + offset, value, _sig(value, 3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{name}\n({kind or 'n/a'} tokens)" for name, kind, _, _ in rows])
    ax.set_ylabel("joules per token")
    ax.set_ylim(0, top * 1.18)
    ax.set_xlim(-0.6, len(rows) - 0.4)  # keep a slot for a regime whose bars are n/a
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="#777777", alpha=0.9, label="gross (all energy)"),
                       Patch(facecolor="#777777", alpha=0.45, hatch="///", label="dynamic (above idle)")],
              loc="upper left", fontsize=9)
    ax.set_title(title, loc="left", fontsize=11)
    parts = [f"{name} ({kind} tokens): gross {fmt(g, 'J')}, dynamic {fmt(d, 'J')}" for name, kind, g, d in rows]
    alt = "Grouped bar chart of joules per token: " + "; ".join(parts) + "."
    return Figure("joules_per_token", title, alt, _png(fig),
                  "Per token of the regime's main kind. Dynamic subtracts the idle baseline's power over the window.")


def _cost_curve(regime: RegimeResult) -> list[tuple[float, float]]:
    """(utilization, USD per million tokens) of the regime's cost curve, positive costs only, in order."""
    return sorted((p.utilization, p.usd_per_million_tokens) for p in regime.economics.cost_curve or ()
                  if p.usd_per_million_tokens > 0)


def figure_cost(summary: RunSummary, names: RegimeColors) -> Figure:
    title = _sim_title("Cost per million tokens against GPU utilization", bool(summary.simulated))
    series = []
    for name in names:
        regime = summary.regimes.get(name, RegimeResult())
        curve = _cost_curve(regime)
        cost = regime.economics.cost_usd_per_million_tokens
        measured, at, full = finite(cost.measured), finite(regime.gpu_utilization.mean), finite(cost.full_load)
        point = (at, measured) if at is not None and measured is not None and measured > 0 else None
        if not curve and full is not None and full > 0:
            curve = [(1.0, full)]  # no curve: the full-load figure is its point at 100 %
        if curve or point:
            series.append((name, curve, point, regime.main_kind))
    if not series:
        return Figure("cost", title, title, None, "n/a: no cost curves or measured costs in the summary")
    fig, ax = _new_figure(8.5, 4.2)
    costs = [c for _, curve, point, _ in series for c in [c for _, c in curve] + ([point[1]] if point else [])]
    from matplotlib.lines import Line2D

    handles = []
    for name, curve, point, kind in series:
        color = _color(name, names)
        if len(curve) == 1:
            ax.plot(curve[0][0] * 100, curve[0][1], marker="D", markersize=7, markerfacecolor="white", color=color,
                    linestyle="none")
        elif curve:
            ax.plot([u * 100 for u, _ in curve], [c for _, c in curve], color=color, linewidth=1.6)
        if point:
            ax.plot(point[0] * 100, point[1], marker="o", markersize=8, color=color, markeredgecolor="black",
                    linestyle="none")
        # The measured figure goes in the legend, not beside the dot, where it could sit on another curve.
        label = f"{name}, per M {kind or ''} tokens"
        label += f": measured {fmt_usd(point[1])} at {point[0] * 100:.0f} %" if point else ": no measured point"
        if len(curve) == 1:
            label += f"; full load {fmt_usd(curve[0][1])} (◇)"
        handles.append(Line2D([], [], color=color, linewidth=1.6 if len(curve) > 1 else 0,
                              marker="o" if point else "D" if curve else None,
                              markersize=7, markeredgecolor="black", label=label.replace("$", r"\$")))
    if costs and max(costs) / min(costs) > 20:
        ax.set_yscale("log")
        ax.set_ylim(min(costs) / 2, max(costs) * 6)
    else:
        ax.set_ylim(0, max(costs) * 1.25)
    ax.set_xlim(0, 105)
    ax.set_xlabel("GPU utilization (%)")
    ax.set_ylabel("USD per million tokens")
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(handles=handles, loc="upper right", fontsize=9, frameon=True, framealpha=0.9, edgecolor="#dddddd")
    parts = [f"{name}: " + (f"curve of {len(curve)} points" if len(curve) > 1 else "no curve")
             + (f", measured {fmt_usd(point[1])} at {point[0] * 100:.0f} % utilization" if point else "")
             for name, curve, point, _ in series]
    alt = "Line chart of USD per million tokens against GPU utilization (%); " + "; ".join(parts) + "."
    missing = [n for n, curve, _, _ in series if len(curve) < 2]
    note = "Dots: the measured cost at the regime's mean utilization."
    if missing:
        note += f" No cost curve for {', '.join(missing)}."
    return Figure("cost", title, alt, _png(fig), note)


# -- tables ------------------------------------------------------------------------------------------------

# One regime's cell of a table row; a regime that was not measured is None (its cell says so).
Regimes = dict[str, "RegimeResult | None"]


def _row(r: Regimes, label: str, cell: Callable[[RegimeResult], str]) -> tuple[str, list[str]]:
    return label, [cell(reg) if reg is not None else "not measured" for reg in r.values()]


def _only(r: Regimes, regime: str, cell: Callable[[RegimeResult], str]) -> list[str]:
    """Cells for a figure that only one regime has: '—' for the others."""
    return [cell(reg) if n == regime and reg else ("not measured" if reg is None else "—") for n, reg in r.items()]


def _measured(r: Regimes) -> list[RegimeResult]:
    return [reg for reg in r.values() if reg is not None]


def _memory_of(reg: RegimeResult) -> MemoryPeaks:
    return reg.memory or MemoryPeaks()


def _energy_of(reg: RegimeResult) -> EnergyDetail:
    return reg.energy or EnergyDetail()


def _tokens_per_second_cell(reg: RegimeResult) -> str:
    kind = reg.main_kind
    tps = finite(reg.tokens_per_second.get(kind)) if kind else None
    if tps is None and kind:  # a summary without rates: the counts over the window's length
        duration = finite(reg.duration_seconds)
        tps = reg.tokens.of(kind) / duration if duration else None
    return f"{fmt(tps)} {kind}/s" if tps is not None else "n/a"


def _tokens_cell(reg: RegimeResult) -> str:
    parts = [f"{_sig(reg.tokens.of(k), 4)} {k}" for k in ("trained", "prompt", "generated") if reg.tokens.of(k)]
    return ", ".join(parts) or "n/a"


def _phase_ran_cell(reg: RegimeResult) -> str:
    timing = reg.phase
    ran = finite(timing.ran_seconds) if timing else None
    if ran is None:
        return fmt_seconds(reg.phase_seconds)
    planned = finite(timing.planned_seconds)
    text = f"{fmt_seconds(ran)} of {fmt_seconds(planned)} planned" if planned is not None else fmt_seconds(ran)
    return text + ("" if timing.finished else f" (cut short: {timing.stopped_by})")


def _activity_cell(reg: RegimeResult) -> str:
    values = reg.activity
    return " / ".join(fmt_percent(values.get(k)) for k in ("sm", "tensor", "dram")) if values else "n/a"


def _rapl_cell(reg: RegimeResult) -> str:
    zones = _energy_of(reg).rapl_joules
    if zones:
        ordered = sorted(zones.items(), key=lambda item: (not item[0].startswith("package"), item[0]))
        return ", ".join(f"{zone} {fmt_energy(j)}" for zone, j in ordered)
    return "n/a (see below the table)" if reg.not_available.get("rapl_joules") else "n/a"


def _per_unit_cell(reg: RegimeResult, key: str, unit_name: str) -> str:
    """Joules per request or session, or why there is none."""
    value = finite(reg.per_unit_joules.get(key))
    if value is not None:
        return f"{fmt_energy(value)} per {unit_name}"
    reason = reg.not_available.get(key)
    return f"n/a: {reason}" if reason else "n/a"


# How the bench found a regime's GPUs (its phase_start's gpu_attribution), in words.
ATTRIBUTION_WORDS = {"uuid": "its CUDA device, by UUID", "mock": "mock GPU standing in for its device",
                     "cpu": "ran on the CPU", "unmatched": "UUID not found: every GPU, an upper bound",
                     "no-devices": "NVML listed none yet"}


def _gpus_cell(reg: RegimeResult) -> str:
    """The GPUs a regime was charged for (NVML indices) and how they were found."""
    if reg.gpus is None:
        return "every GPU (not recorded)"
    how = ATTRIBUTION_WORDS.get(reg.gpu_attribution or "", reg.gpu_attribution or "not recorded")
    return f"{', '.join(map(str, reg.gpus))} ({how})"


def _gpu_rows(r: Regimes) -> list:
    """The GPU group: the GPUs charged, how long the phase ran, the window, utilization, power, activity,
    memory, temperature."""
    rows: list = [
        "GPU",
        _row(r, "GPUs charged", _gpus_cell),
        _row(r, "phase ran", _phase_ran_cell),
        _row(r, "steady-state window", lambda reg: fmt_seconds(reg.duration_seconds)),
        _row(r, "utilization mean", lambda reg: fmt_percent(reg.gpu_utilization.mean)),
        _row(r, "utilization p50 / p99", lambda reg: f"{fmt_percent(reg.gpu_utilization.p50)} / "
                                                     f"{fmt_percent(reg.gpu_utilization.p99)}"),
        _row(r, "idle fraction", lambda reg: fmt_percent(reg.gpu_utilization.idle_fraction)),
        _row(r, "power mean / p99", lambda reg: f"{fmt(reg.power_watts.mean, 'W')} / {fmt(reg.power_watts.p99, 'W')}"),
    ]
    measured = _measured(r)
    if any(reg.activity for reg in measured):
        rows.append(_row(r, "SM / tensor / DRAM activity (window mean)", _activity_cell))
    if any(reg.memory is not None for reg in measured):
        rows.append(_row(r, "peak HBM used", lambda reg: fmt_bytes(_memory_of(reg).gpu_peak_bytes)))
        if any(finite(_memory_of(reg).workload_host_rss_peak_bytes) for reg in measured):
            rows.append(_row(r, "peak host memory of the workload (RSS)",
                             lambda reg: fmt_bytes(_memory_of(reg).workload_host_rss_peak_bytes)))
        rows.append(_row(r, "peak host memory used, whole machine",
                         lambda reg: fmt_bytes(_memory_of(reg).host_peak_bytes)))
        if any(finite(_memory_of(reg).host_pinned_peak_bytes) for reg in measured):
            rows.append(_row(r, "peak host memory pinned by the workload",
                             lambda reg: fmt_bytes(_memory_of(reg).host_pinned_peak_bytes)))
    temperatures = [(finite(_energy_of(reg).temperature_p99_celsius), finite(_energy_of(reg).temperature_max_celsius))
                    for reg in measured]
    if any(p is not None for p, _ in temperatures):
        rows.append(_row(r, "GPU temperature p99 / max",
                         lambda reg: f"{fmt(_energy_of(reg).temperature_p99_celsius, '°C')} / "
                                     f"{fmt(_energy_of(reg).temperature_max_celsius, '°C')}"))
    elif any(m is not None for _, m in temperatures):  # a summary from before p99 was kept apart: it was the p99
        rows.append(_row(r, "GPU temperature p99", lambda reg: fmt(_energy_of(reg).temperature_max_celsius, "°C")))
    return rows


def _per_unit_rows(r: Regimes) -> list:
    """J per request, per session...: one row for each registry regime shown that has a per-unit figure."""
    rows = []
    for regime in REGIMES.values():
        spec = regime.per_unit
        if spec is None or regime.name not in r:
            continue
        scope = regime.name if spec.from_tokens else f"{regime.name}, whole phase"
        rows.append((f"J/{spec.unit} ({scope})",
                     _only(r, regime.name, lambda reg, spec=spec: _per_unit_cell(reg, spec.summary_key, spec.unit))))
    return rows


def _energy_rows(r: Regimes) -> list:
    """The energy group: window energy, tokens, rates, joules per token and per unit, RAPL, the mock's truth."""
    rows: list = [
        "Energy and tokens",
        _row(r, "energy", lambda reg: fmt_energy(reg.energy_joules)),
        _row(r, "tokens", _tokens_cell),
        _row(r, "tokens/s (main kind)", _tokens_per_second_cell),
        _row(r, "J/token gross", lambda reg: fmt(reg.joules_per_token.gross, "J")),
        _row(r, "J/token dynamic (above idle)", lambda reg: fmt(reg.joules_per_token.dynamic, "J")),
        _row(r, "idle power subtracted (its GPUs)", lambda reg: fmt(reg.idle_power_watts, "W")),
        *_per_unit_rows(r),
        _row(r, "host CPU energy (RAPL, window)", _rapl_cell),
    ]
    if any(reg.mock_truth is not None for reg in _measured(r)):
        rows.append(_row(r, "simulator truth: energy, J/token",
                         lambda reg: f"{fmt_energy(reg.mock_truth.energy_joules if reg.mock_truth else None)}, "
                                     f"{fmt(reg.mock_truth.joules_per_token if reg.mock_truth else None, 'J')}"))
    return rows


def _cost_rows(r: Regimes) -> list:
    def cost(reg: RegimeResult):
        return reg.economics.cost_usd_per_million_tokens

    return [
        "Cost and carbon",
        _row(r, "$/M tokens measured", lambda reg: fmt_usd(cost(reg).measured)),
        _row(r, "$/M tokens at full load", lambda reg: fmt_usd(cost(reg).full_load)),
        _row(r, "energy share of cost", lambda reg: fmt_percent(reg.economics.energy_share_of_cost)),
        _row(r, "CO₂ per M tokens", lambda reg: fmt(reg.economics.co2_grams_per_million_tokens, "g")),
    ]


def _workload_cell(*keys: str, form=fmt) -> Callable[[RegimeResult], str]:
    return lambda reg: form(_workload_figure(reg, *keys))


def _p50_p99_seconds(key: str) -> Callable[[RegimeResult], str]:
    return lambda reg: (f"{fmt_seconds(_workload_figure(reg, key, 'p50'))} / "
                        f"{fmt_seconds(_workload_figure(reg, key, 'p99'))}")


# The workloads' headline figures: (label, cell, the workload summary's key that must be there).
WORKLOAD_HEADLINES = (
    ("TTFT p50 / p99", _p50_p99_seconds("ttft_seconds"), "ttft_seconds"),
    ("TPOT p50 / p99", _p50_p99_seconds("tpot_seconds"), "tpot_seconds"),
    ("tool-time share (per session)", _workload_cell("tool_time_share", "per_session_mean", form=fmt_percent),
     "tool_time_share"),
    ("spilled to host", _workload_cell("spill", "spilled_bytes", form=fmt_bytes), "spill"),
    ("MFU", _workload_cell("mfu", form=fmt_percent), "mfu"),
    ("goodput", _workload_cell("goodput", form=fmt_percent), "goodput"),
)


def _workload_rows(r: Regimes) -> list:
    """The workloads' own figures, a row for each that at least one regime reported ('—' for the others)."""
    rows = []
    for label, cell, key in WORKLOAD_HEADLINES:
        present = [reg is not None and isinstance(reg.workload, dict) and key in reg.workload for reg in r.values()]
        if any(present):
            rows.append((label, [cell(reg) if has else "—" for reg, has in zip(r.values(), present)]))
    return ["Workload's own figures", *rows] if rows else []


def _regime_rows(summary: RunSummary, names) -> list[tuple[str, list[str]] | str]:
    """Rows of the per-regime table: (label, one cell per regime), or a group heading."""
    r = {name: summary.regimes.get(name) for name in names}
    return [*_gpu_rows(r), *_energy_rows(r), *_cost_rows(r), *_workload_rows(r)]


def _regime_notes(summary: RunSummary, names) -> str:
    """Reasons shared by every regime (RAPL unreadable on the host), said once under the table, not per cell."""
    reasons = []
    for name in names:
        reason = summary.regimes[name].not_available.get("rapl_joules") if name in summary.regimes else None
        if reason is not None and reason not in reasons:
            reasons.append(reason)
    if not reasons:
        return ""
    return "<ul class='notes'>" + "".join(f"<li>Host CPU energy (RAPL): {_esc(r)}</li>" for r in reasons) + "</ul>"


# What the report says of the simulated device's calibration (SimulatedDevice.describe()), in this order.
_CALIBRATION_FIGURES = (("compute_efficiency", "compute efficiency (of dense bf16 peak)", "", 1),
                        ("bandwidth_efficiency", "bandwidth efficiency (of datasheet HBM)", "", 1),
                        ("overhead_s", "overhead per step", "ms", 1e3),
                        ("peak_bf16_flops", "dense bf16 peak", "TFLOP/s", 1e-12),
                        ("hbm_bytes_per_s", "HBM bandwidth", "TB/s", 1e-12),
                        ("power_limit_watts", "power limit", "W", 1), ("idle_power_watts", "idle power", "W", 1))


def _simulated_device_note(summary: RunSummary, names) -> str:
    """The "Simulated device" note (issue 14): the GPU the regimes' time is simulated on, each regime's timing
    and computed models, and the calibration with its sources; empty when no regime ran on simulated time."""
    simulated = [(name, summary.regimes[name].simulated_device) for name in names
                 if name in summary.regimes and summary.regimes[name].simulated_device]
    if not simulated:
        return ""
    first = simulated[0][1]
    # The same device for every regime: the calibration of the first regime that reports it.
    calibration = next((sim["calibration"] for _, sim in simulated if isinstance(sim.get("calibration"), dict)), {})
    rows = []
    for name, sim in simulated:
        timing = f"{sim.get('timing_preset', 'n/a')}" + (f" ({sim['timing_note']})" if sim.get("timing_note") else "")
        shapes = f"; {sim['shapes']}" if sim.get("shapes") else ""
        rows.append(f"<li><b>{_esc(name)}</b>: timing model {_esc(timing)}, computed model "
                    f"{_esc(sim.get('computed_preset', 'n/a'))}{_esc(shapes)}; the CPU fell at most "
                    f"{_esc(fmt(sim.get('max_lag_seconds'), 's'))} behind</li>")
    figures = [f"{label} {fmt(calibration[key] * scale, unit)}" for key, label, unit, scale in _CALIBRATION_FIGURES
               if isinstance(calibration.get(key), (int, float))]
    sources = calibration.get("sources")
    source_items = (sources.items() if isinstance(sources, dict)
                    else enumerate(sources) if isinstance(sources, list) else ())
    source_html = "".join(f"<li>{_esc(key)}: {_esc(text)}</li>" for key, text in source_items)
    return (f"<div class='note sim' id='simulated-device'><h3>Simulated device (SIMULATED)</h3>"
            f"<p>SIMULATED: every regime's device time and activity are those of "
            f"{_esc(first.get('device', 'n/a'))} running the timing model's work (a calibrated roofline, "
            f"workloads/device_time.py); the CPU ran the computed model for the tokens and the control flow.</p>"
            f"<ul class='notes'>{''.join(rows)}</ul>"
            + (f"<p>Calibration: {_esc('; '.join(figures))}.</p>" if figures else "")
            + (f"<p>Sources:</p><ul class='notes'>{source_html}</ul>" if source_html else "") + "</div>")


def _cell_class(cell: str) -> str:
    """'na' for a missing figure; 'na wrap' for one that says why (a sentence, allowed to wrap)."""
    if cell in ("n/a", "not measured", "—"):
        return "na"
    return "na wrap" if cell.startswith("n/a: ") else ""


def _table(headers: list[str], rows: list, css: str = "") -> str:
    head = "".join(f"<th scope='col'>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        if isinstance(row, str):
            body.append(f"<tr class='group'><th colspan='{len(headers)}' scope='rowgroup'>{_esc(row)}</th></tr>")
        else:
            label, cells = row
            tds = "".join(f"<td class='{_cell_class(c)}'>{_esc(c)}</td>" for c in cells)
            body.append(f"<tr><th scope='row'>{_esc(label)}</th>{tds}</tr>")
    return (f"<div class='table-wrap'><table class='{css}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _header_gpus(run: RunData) -> list[GpuInfo]:
    """The GPUs the recording's header lists, with their default power limits (a summary without GPUs)."""
    return [GpuInfo.from_json(dict(g, power_limit_watts=g.get("power_limit_default_watts")))
            for g in run.header.get("gpus") or [] if isinstance(g, dict)]


def _gpu_table(summary: RunSummary, run: RunData) -> str:
    gpus = list(summary.gpus) or _header_gpus(run)
    if not gpus:
        return "<p class='na'>n/a: no GPU information in the summary or the recording.</p>"
    rows = []
    for g in gpus:
        rows.append((str(g.index) if g.index is not None else "?", [
            (g.model_name or "n/a") + (" (mock)" if g.simulated else ""),
            g.driver_version or "n/a",
            fmt(g.power_limit_watts, "W"),
            fmt_bytes(g.memory_total_bytes),
            g.uuid or "n/a",
        ]))
    return _table(["GPU", "model", "driver", "power limit", "memory", "UUID"], rows, "gpus")


def _plain(value: Any) -> str:
    """An input as given: numbers without padding zeros, anything else as text."""
    number = finite(value)
    if number is not None:
        return f"{number:,.6g}" if abs(number) < 1e6 else f"{number:,.0f}"
    return "n/a" if value is None else str(value)


def _pricing_table(summary: RunSummary) -> str:
    """Pricing inputs with their sources, then the formulas and notes when the summary has them.

    Reads the shape economics.pricing_record writes (inputs as plain keys, a ``sources`` map, ``formulas``,
    ``notes``) and tolerates others: ``KEY_source`` siblings, or ``{value, unit, source}`` per input.
    """
    pricing = summary.pricing
    if not pricing:
        return "<p class='na'>n/a: no pricing inputs in the summary.</p>"
    sources = {k.removesuffix("_source"): v for k, v in pricing.items() if k.endswith("_source")}
    if isinstance(pricing.get("sources"), dict):
        sources.update(pricing["sources"])
    rows = []
    for key, value in pricing.items():
        if key.endswith("_source") or key in ("sources", "formulas", "notes"):
            continue
        unit, source = "", sources.get(key)
        if isinstance(value, dict):
            extra = {k: v for k, v in value.items() if k not in ("value", "unit", "source")}
            if "value" in value:
                shown = _plain(value["value"])
            else:  # no single value: show every entry
                shown, extra = ", ".join(f"{k} {_plain(v)}" for k, v in extra.items()) or "n/a", {}
            unit = str(value.get("unit") or "")
            source = value.get("source") or source
            if extra:
                source = f"{source or 'not stated'}; " + ", ".join(f"{k}: {_plain(v)}" for k, v in extra.items())
        elif isinstance(value, list):
            shown = ", ".join(_plain(v) for v in value) or "n/a"
        else:
            shown = _plain(value)
        rows.append((key, [f"{shown} {unit}".strip(), str(source) if source else "—"]))
    out = _table(["input", "value", "source"], rows, "pricing")
    formulas = pricing.get("formulas")
    if isinstance(formulas, dict) and formulas:
        out += "<h3>Formulas</h3>" + _table(["figure", "formula"],
                                             [(k, [str(v)]) for k, v in formulas.items()], "formulas")
    notes = pricing.get("notes")
    if isinstance(notes, list) and notes:
        out += "<ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
    return out


def _validity_table(summary: RunSummary, names) -> tuple[str, int, int]:
    checks = [("run", c) for c in summary.validity]
    for name in names:
        if name in summary.regimes:
            checks += [(name, c) for c in summary.regimes[name].validity]
    if not checks:
        return "<p class='na'>n/a: the summary lists no validity checks.</p>", 0, 0
    body = []
    for scope, check in checks:
        badge = "<span class='pass'>PASS</span>" if check.passed else "<span class='fail'>FAIL</span>"
        body.append(f"<tr class='{'ok' if check.passed else 'bad'}'><td>{_esc(scope)}</td><td>{_esc(check.check)}"
                    f"</td><td>{badge}</td><td>{_esc(check.detail)}</td></tr>")
    passed = sum(1 for _, c in checks if c.passed)
    table = ("<div class='table-wrap'><table class='validity'><thead><tr><th scope='col'>scope</th>"
             "<th scope='col'>check</th><th scope='col'>result</th><th scope='col'>detail</th></tr></thead>"
             f"<tbody>{''.join(body)}</tbody></table></div>")
    return table, passed, len(checks)


# -- the page ----------------------------------------------------------------------------------------------

CSS = """
:root { --ink: #1d2330; --muted: #5c6675; --line: #d9dee5; --bg: #f6f7f9; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 0 24px 48px; }
.banner { padding: 10px 24px; font-weight: 700; letter-spacing: .02em; font-size: 16px; }
.banner p { max-width: 1132px; margin: 0 auto; }
.banner.sim { background: #fff3c4; color: #6b4e00; border-bottom: 2px solid #e0b300; }
.banner.partial { background: #fde2e1; color: #8a1c17; border-bottom: 2px solid #d2453d; }
header { padding: 20px 0 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 14px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; margin: 0; }
.facts div { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.facts dt { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.facts dd { margin: 2px 0 0; font-size: 16px; font-weight: 600; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 12px; text-align: left; border-bottom: 1px solid #eceff3; vertical-align: top; }
thead th { background: #eef1f5; font-weight: 600; white-space: nowrap; }
tbody th { font-weight: 500; color: var(--muted); white-space: nowrap; }
table.regimes td { white-space: nowrap; }
table.regimes td.wrap { white-space: normal; min-width: 14em; font-size: 13px; }
tr.group th { background: #f7f8fa; color: var(--ink); font-weight: 700; font-size: 13px;
              text-transform: uppercase; letter-spacing: .04em; }
td.na { color: #9aa1ab; }
table.gpus td:last-child, table.formulas td, table.pricing tbody th, table.formulas tbody th {
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
table.pricing td:first-child { white-space: nowrap; }
table.formulas td { white-space: normal; overflow-wrap: anywhere; }
table.pricing tbody th, table.formulas tbody th { color: var(--ink); }
h3 { font-size: 15px; margin: 18px 0 8px; }
figure.missing h3 { margin-top: 0; }
ul.notes { color: var(--muted); font-size: 13.5px; margin: 10px 0 0; padding-left: 20px; }
.pass, .fail { display: inline-block; min-width: 44px; text-align: center; border-radius: 4px; padding: 0 6px;
               font-size: 12px; font-weight: 700; }
.pass { background: #dff3e4; color: #1d6b32; }
.fail { background: #fbe0de; color: #a3221b; }
tr.bad td { background: #fff8f7; }
figure { margin: 0 0 22px; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px; }
figure img { display: block; width: 100%; height: auto; max-width: 1100px; margin: 0 auto; }
figure.narrow img { max-width: 900px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
p.na { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 36px; }
"""


def _figure_html(figure: Figure, narrow: bool = False) -> str:
    if figure.png is None:
        return (f"<figure class='missing' id='fig-{figure.key}'><h3>{_esc(figure.title)}</h3>"
                f"<p class='na'>{_esc(figure.note)}</p></figure>")
    data = base64.b64encode(figure.png).decode("ascii")
    css = " class='narrow'" if narrow else ""
    return (f"<figure id='fig-{figure.key}'{css}>"
            f"<img src='data:image/png;base64,{data}' alt='{_esc(figure.alt)}'>"
            f"<figcaption>{_esc(figure.note)}</figcaption></figure>")


def _when(created: Any) -> str:
    if not isinstance(created, str) or not created:
        return "n/a"
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return created
    zone = " UTC" if moment.utcoffset() == timedelta(0) else moment.strftime(" %z") if moment.tzinfo else ""
    return moment.strftime("%Y-%m-%d %H:%M:%S") + zone


def _facts(run: RunData, summary: RunSummary, names, phases: list[Phase], checks: tuple[int, int]) -> str:
    gpus = list(summary.gpus) or _header_gpus(run)
    models: dict[str, int] = {}
    for g in gpus:
        models[g.model_name or "?"] = models.get(g.model_name or "?", 0) + 1
    gpu_text = ", ".join(f"{n} × {m}" for m, n in models.items()) or "n/a"
    drivers = sorted({g.driver_version for g in gpus if g.driver_version})
    regimes = summary.regimes
    energies = [finite(regime.energy_joules) for regime in regimes.values()]
    total_energy = sum(e for e in energies if e is not None) if any(e is not None for e in energies) else None
    length = max([_data_end(run)] + [p.end_s for p in phases])
    settings = summary.settings
    passed, total = checks
    facts = [
        ("kind", f"{summary.kind or 'n/a'} · {summary.status or 'n/a'}"),
        ("started", _when(summary.created)),
        ("backend", str(summary.backend or run.header.get("backend") or "n/a")
         + (" (simulated)" if summary.simulated else "")),
        ("GPUs", gpu_text),
        ("driver", ", ".join(drivers) or "n/a"),
        ("preset · device", f"{settings.get('preset', 'n/a')} · {settings.get('device', 'n/a')}"),
        ("run length", fmt_seconds(length) if length else "n/a"),
        ("regimes measured", ", ".join(n for n in names if n in regimes) or "none"),
        ("idle power before · after", f"{fmt(summary.idle.power_watts, 'W')} · "
         f"{fmt(summary.idle_end.power_watts if summary.idle_end else None, 'W')}"),
        ("regimes failed", ", ".join(f.regime for f in summary.failed_regimes) or "none"),
        ("energy in windows", fmt_energy(total_energy)),
        ("validity checks", f"{passed} of {total} passed" if total else "n/a"),
    ]
    return "<dl class='facts'>" + "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>" for k, v in facts) \
        + "</dl>"


def _partial_banners(summary: RunSummary) -> list[str]:
    """The banners of a run that is not complete: the regimes that failed (each with its reason), and an
    interruption (a partial run whose regimes did not all fail)."""
    banners = []
    failed = summary.failed_regimes
    if failed:
        listed = "; ".join(f"{f.regime}: {f.reason}" for f in failed)
        banners.append(f"<div class='banner partial' role='alert'><p>FAILED regime{'s' if len(failed) > 1 else ''}: "
                       f"{_esc(listed)}. The report holds the regimes that finished (status: "
                       f"{_esc(summary.status or 'n/a')}).</p></div>")
    interrupted = any(r.phase is not None and not r.phase.finished for r in summary.regimes.values())
    if summary.status == "partial" and (interrupted or not failed):
        banners.append("<div class='banner partial' role='alert'><p>PARTIAL run: it was interrupted, so this "
                       "report holds only what was measured up to then (status: partial).</p></div>")
    return banners


def _failed_html(summary: RunSummary) -> str:
    """The regimes whose workload raised, under the regime table: the reason and how long each ran."""
    if not summary.failed_regimes:
        return ""
    items = []
    for failed in summary.failed_regimes:
        ran = finite(failed.phase.ran_seconds) if failed.phase else None
        after = f" after {fmt_seconds(ran)}" if ran is not None else ""
        items.append(f"<li><strong>{_esc(failed.regime)}</strong> failed{_esc(after)}: {_esc(failed.reason)} "
                     "(traceback in events.jsonl, its phase_end)</li>")
    return f"<h3>Failed regimes</h3><ul class='notes failed'>{''.join(items)}</ul>"


def build_figures(run: RunData, summary: RunSummary | dict) -> list[Figure]:
    """Every figure of the report, drawn (or, with nothing to draw, the line saying why)."""
    summary = as_summary(summary)
    phases = phases_of(run)
    names = _regime_names(summary, phases)
    return [
        figure_utilization(run, summary, phases, names),
        figure_activity(run, summary, phases, names),
        figure_power(run, summary, phases, names),
        figure_memory(run, summary, phases, names),
        figure_joules_per_token(summary, names),
        figure_cost(summary, names),
    ]


def render_report(run: RunData, summary: RunSummary | dict, out_path: Path) -> Path:
    """Write the report page to ``out_path`` and each figure to ``run.run_dir/figures/*.png``.

    Returns ``out_path``. Everything missing from ``run`` or ``summary`` shows as "n/a" or a line saying
    what is missing; nothing here raises for partial data.
    """
    out_path = Path(out_path)
    summary = as_summary(summary)
    phases = phases_of(run)
    names = _regime_names(summary, phases)
    figures = {f.key: f for f in build_figures(run, summary)}
    figure_dir = run.run_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for key, figure in figures.items():
        if figure.png is not None:
            (figure_dir / FIGURE_FILES[key]).write_bytes(figure.png)

    simulated = _simulated(run, summary)
    partial = summary.status == "partial"
    kind = summary.kind or "bench"
    title = f"wattledger {kind} report"
    if partial:
        title = f"PARTIAL · {title}"
    if simulated:
        title = f"SIMULATED (mock GPU) · {title}"
    validity_html, passed, total = _validity_table(summary, names)

    banners = []
    if simulated:
        banners.append("<div class='banner sim' role='note'><p>SIMULATED (mock GPU): every figure on this page "
                       "comes from the simulator, not from a real GPU.</p></div>")
    banners += _partial_banners(summary)
    failed_names = {f.regime for f in summary.failed_regimes}
    regimes_measured = [n for n in names if n in summary.regimes]
    not_measured = [n for n in names if n not in regimes_measured and n not in failed_names]
    subtitle = f"Run directory {run.run_dir.name}"
    if not_measured:
        subtitle += f" · no summary for {', '.join(not_measured)} (phase cut short or not run)"
    regime_table = (_table(["", *names], _regime_rows(summary, names), "regimes") + _regime_notes(summary, names)
                    + _simulated_device_note(summary, names)
                    if names else "<p class='na'>n/a: no regime was measured.</p>") + _failed_html(summary)
    body = f"""
<header>
<h1>{_esc(title)}</h1>
<p class="subtitle">{_esc(subtitle)}</p>
{_facts(run, summary, names, phases, (passed, total))}
</header>
<section id="regimes"><h2>Regimes</h2>
{regime_table}
</section>
<section id="figures"><h2>Utilization, activity, power and memory</h2>
{_figure_html(figures['utilization'])}
{_figure_html(figures['activity'])}
{_figure_html(figures['power'])}
{_figure_html(figures['memory'])}
<h2>Energy and cost per token</h2>
{_figure_html(figures['joules_per_token'], narrow=True)}
{_figure_html(figures['cost'], narrow=True)}
</section>
<section id="gpus"><h2>GPUs, driver and power limit</h2>
{_gpu_table(summary, run)}
</section>
<section id="pricing"><h2>Pricing inputs</h2>
{_pricing_table(summary)}
</section>
<section id="validity"><h2>Validity checks ({passed} of {total} passed)</h2>
{validity_html}
</section>
<footer>Energy from the GPUs' energy counters; gross counts all energy in a regime's steady-state window, dynamic
only what lies above the idle baseline. Figures saved beside this page under figures/.</footer>
"""
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<link rel='icon' href='data:,'><title>{_esc(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(banners)}<main>{body}</main></body></html>\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path
