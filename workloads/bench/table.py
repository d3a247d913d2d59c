"""The closing table ``wattledger bench``, ``run`` and ``report`` print: one row per regime (a regime whose
workload failed: a "FAILED" row), a legend, then every failed check under its regime (a failed regime's
reason among the run's)."""

from __future__ import annotations

import sys

from wattledger.workloads.bench.results import Check, RegimeResult, RunSummary, as_summary
from wattledger.workloads.registry import REGIMES


def _main_kinds_legend() -> str:
    """Each regime's main token kind, from the registry: "training: trained, chat and agentic: generated"."""
    by_kind: dict[str, list[str]] = {}
    for regime in REGIMES.values():
        by_kind.setdefault(regime.main_token_kind, []).append(regime.name)
    groups = [(", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + f": {kind}"
              for kind, names in by_kind.items()]
    return ", ".join(groups)


# The closing table's columns: (header, legend entry). Short headers so the table fits 80 columns; the
# legend line under the table says what each stands for.
TABLE_COLUMNS = (
    ("regime", None),
    ("util", "util = mean GPU utilization"),
    ("idle", "idle = share of samples at 0 %"),
    ("W", "W = mean power"),
    ("tok/s", f"tok/s = main-kind tokens per second ({_main_kinds_legend()})"),
    ("J/tok", "J/tok = joules per token, gross"),
    ("J/dyn", "J/dyn = the same above the idle baseline"),
    ("$/Mtok", "$/Mtok = USD per million tokens at the measured utilization"),
    ("$/Mfull", "$/Mfull = the same at full load"),
    ("checks", "checks = validity checks passed"),
)
TABLE_WIDTH = 80


def _fmt(value, spec=",.3g", unit=""):
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _regime_row(name: str, r: RegimeResult) -> list[str]:
    passed = sum(c.passed for c in r.validity)
    cost = r.economics.cost_usd_per_million_tokens
    return [name, _fmt(r.gpu_utilization.mean, ".2f"), _fmt(r.gpu_utilization.idle_fraction, ".2f"),
            _fmt(r.power_watts.mean, ".0f"), _fmt(r.tokens_per_second.get(r.main_kind), ",.0f"),
            _fmt(r.joules_per_token.gross, ".3g"), _fmt(r.joules_per_token.dynamic, ".3g"),
            _fmt(cost.measured, ",.2f"), _fmt(cost.full_load, ",.2f"), f"{passed}/{len(r.validity)}"]


def _failed_row(name: str) -> list[str]:
    """A regime whose workload raised: no figures (its reason is under the table, with the run's checks)."""
    return [name, "FAILED", *["-"] * (len(TABLE_COLUMNS) - 2)]


def _idle_text(summary: RunSummary) -> str:
    """The idle baselines: before the regimes (what the dynamic figures subtract) and, when measured, after."""
    text = f"idle baseline {_fmt(summary.idle.power_watts, '.1f', ' W')}"
    if summary.idle_end is not None:
        text += f" (after the regimes {_fmt(summary.idle_end.power_watts, '.1f', ' W')})"
    return text


def _timing_text(summary: RunSummary) -> str | None:
    """The regimes' clock on simulated timing (issue 14): "SIMULATED timing: H100 SXM device time of 8b
    work (training: 1b), tiny computed on the CPU"; None when no regime ran on it."""
    simulated = {name: r.simulated_device for name, r in summary.regimes.items() if r.simulated_device}
    if not simulated:
        return None
    timings = [sim.get("timing_preset", "?") for sim in simulated.values()]
    usual = max(set(timings), key=timings.count)
    others = ", ".join(f"{name}: {sim.get('timing_preset', '?')}" for name, sim in simulated.items()
                       if sim.get("timing_preset", "?") != usual)
    first = next(iter(simulated.values()))
    return (f"SIMULATED timing: {first.get('device', '?')} device time of {usual} work"
            + (f" ({others})" if others else "") + f", {first.get('computed_preset', '?')} computed on the CPU")


def _say(console, text: str, indent: int = 0, hanging: int = 4) -> None:
    """One line, wrapped to the console's width (at most TABLE_WIDTH when it is not a terminal), continuation
    lines indented, so a long check detail never runs past the table's edge."""
    import textwrap

    width = min(console.width, TABLE_WIDTH) if not console.is_terminal else console.width
    lines = textwrap.wrap(text, width=max(20, width), initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + hanging), break_on_hyphens=False) or [""]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def failed_checks(summary: RunSummary) -> list[tuple[str, list[Check], int]]:
    """(scope, failed checks, checks in that scope) per regime in table order, then the run-wide ones
    ("run"); scopes where every check passed left out."""
    scopes = [(name, r.validity) for name, r in summary.regimes.items()] + [("run", summary.validity)]
    return [(scope, failed, len(checks)) for scope, checks in scopes
            if (failed := [c for c in checks if not c.passed])]


def print_table(summary: RunSummary | dict, console) -> None:
    """The summary (typed, or summary.json's object) as a table that fits 80 columns, a legend line, then
    every failed check under its regime (the first line says SIMULATED when it is)."""
    from rich import box
    from rich.table import Table

    summary = as_summary(summary)
    label = "SIMULATED (mock GPU): " if summary.simulated else ""
    gpus = summary.gpus
    model = gpus[0].model_name if gpus else "no GPU"
    _say(console, f"{label}wattledger {summary.kind} {summary.status}")
    _say(console, f"{len(gpus)} x {model}, {_idle_text(summary)}")
    timing = _timing_text(summary)
    if timing:
        _say(console, timing)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    for header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "regime" else "right", no_wrap=True)
    for name, r in summary.regimes.items():
        table.add_row(*_regime_row(name, r))
    for failed in summary.failed_regimes:
        table.add_row(*_failed_row(failed.regime))
    console.print(table)
    shown = [legend for header, legend in TABLE_COLUMNS if legend]
    _say(console, "; ".join(shown) + ".", hanging=0)
    for scope, failed, total in failed_checks(summary):
        _say(console, f"{scope}: {len(failed)} of {total} checks failed")
        for check in failed:
            _say(console, f"- {check.check}: {check.detail}", indent=2)


def console(file=None):
    """A rich console for the closing table: the terminal's width on a terminal, else 80 columns (the
    table is made to fit them); long lines (paths) are not folded."""
    from rich.console import Console

    stream = file if file is not None else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=file, highlight=False, soft_wrap=True, width=None if tty else TABLE_WIDTH)
