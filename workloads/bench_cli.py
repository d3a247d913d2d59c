"""``wattledger bench`` and ``wattledger report``: the command lines, the printed table, the signals."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from wattledger.workloads.cli_args import EXIT_FAILED, EXIT_USAGE, UsageParser, duration_arg, port_arg

_duration = duration_arg(allow_zero=True)





def _workloads(text: str) -> tuple[str, ...]:
    from wattledger.workloads.bench import REGIMES

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in REGIMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(REGIMES)} (comma separated), got {text!r}")
    return names


# The closing table's columns: (header, legend entry). Short headers so the table fits 80 columns; the
# legend line under the table says what each stands for.
TABLE_COLUMNS = (
    ("regime", None),
    ("util", "util = mean GPU utilization"),
    ("idle", "idle = share of samples at 0 %"),
    ("W", "W = mean power"),
    ("tok/s", "tok/s = main-kind tokens per second (training: trained, chat and agentic: generated)"),
    ("J/tok", "J/tok = joules per token, gross"),
    ("J/dyn", "J/dyn = the same above the idle baseline"),
    ("$/Mtok", "$/Mtok = USD per million tokens at the measured utilization"),
    ("$/Mfull", "$/Mfull = the same at full load"),
    ("checks", "checks = validity checks passed"),
)
TABLE_WIDTH = 80


def _fmt(value, spec=",.3g", unit=""):
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _regime_row(name: str, r: dict) -> list[str]:
    kind = r["main_token_kind"]
    passed = sum(c["passed"] for c in r["validity"])
    return [name, _fmt(r["gpu_utilization"]["mean"], ".2f"), _fmt(r["gpu_utilization"]["idle_fraction"], ".2f"),
            _fmt(r["power_watts"]["mean"], ".0f"), _fmt(r["tokens_per_second"].get(kind), ",.0f"),
            _fmt(r["joules_per_token"]["gross"], ".3g"), _fmt(r["joules_per_token"]["dynamic"], ".3g"),
            _fmt(r["cost_usd_per_million_tokens"]["measured"], ",.2f"),
            _fmt(r["cost_usd_per_million_tokens"]["full_load"], ",.2f"), f"{passed}/{len(r['validity'])}"]


def _say(console, text: str, indent: int = 0, hanging: int = 4) -> None:
    """One line, wrapped to the console's width (at most TABLE_WIDTH when it is not a terminal), continuation
    lines indented, so a long check detail never runs past the table's edge."""
    import textwrap

    width = min(console.width, TABLE_WIDTH) if not console.is_terminal else console.width
    lines = textwrap.wrap(text, width=max(20, width), initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + hanging), break_on_hyphens=False) or [""]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def failed_checks(summary: dict) -> list[tuple[str, list[dict]]]:
    """(scope, failed checks) per regime in table order, then the run-wide ones ("run"); empty scopes left out."""
    scopes = [(name, r["validity"]) for name, r in summary["regimes"].items()] + [("run", summary["validity"])]
    return [(scope, failed) for scope, checks in scopes if (failed := [c for c in checks if not c["passed"]])]


def print_table(summary: dict, console) -> None:
    """The summary as a table that fits 80 columns, a legend line, then every failed check under its regime
    (the first line says SIMULATED when it is)."""
    from rich import box
    from rich.table import Table

    label = "SIMULATED (mock GPU): " if summary["simulated"] else ""
    gpus = summary["gpus"]
    model = gpus[0]["model_name"] if gpus else "no GPU"
    _say(console, f"{label}wattledger {summary['kind']} {summary['status']}")
    _say(console, f"{len(gpus)} x {model}, idle baseline {_fmt(summary['idle']['power_watts'], '.1f', ' W')}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    for header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "regime" else "right", no_wrap=True)
    for name, r in summary["regimes"].items():
        table.add_row(*_regime_row(name, r))
    console.print(table)
    shown = [legend for header, legend in TABLE_COLUMNS if legend]
    _say(console, "; ".join(shown) + ".", hanging=0)
    for scope, failed in failed_checks(summary):
        total = len(summary["validity"] if scope == "run" else summary["regimes"][scope]["validity"])
        _say(console, f"{scope}: {len(failed)} of {total} checks failed")
        for check in failed:
            _say(console, f"- {check['check']}: {check['detail']}", indent=2)


def _console(file=None):
    """A rich console for the closing table: the terminal's width on a terminal, else 80 columns (the
    table is made to fit them); long lines (paths) are not folded."""
    from rich.console import Console

    stream = file if file is not None else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=file, highlight=False, soft_wrap=True, width=None if tty else TABLE_WIDTH)


def bench_main(argv: list[str]) -> int:
    from wattledger.workloads.economics import add_pricing_arguments

    parser = UsageParser(prog="wattledger bench", description="Measure each regime's utilization, joules per token "
                     "and cost on this machine, and write a report.")
    parser.add_argument("--quick", action="store_true", help="tiny preset, about 20 s per regime (CPU, CI)")
    parser.add_argument("--workloads", type=_workloads, default=None, help="comma-separated subset of "
                        "training,chat,agentic (default all)")
    parser.add_argument("--preset", choices=["tiny", "125m", "1b", "8b"], default=None,
                        help="model shape (default 1b on a GPU, tiny otherwise)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--duration", type=_duration, default=None, help="per regime (default 60s; 20s quick)")
    parser.add_argument("--idle", type=_duration, default=None, help="idle baseline (default 10s; 8s quick)")
    parser.add_argument("--cooldown", type=_duration, default=None, help="between phases (default 10s; 2s quick)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="parent of the run directory")
    parser.add_argument("--backend", choices=["auto", "nvml", "mock"], default="auto")
    parser.add_argument("--mock-gpus", type=int, default=1)
    parser.add_argument("--address", default="127.0.0.1", help="where /metrics is served during the run")
    parser.add_argument("--port", type=port_arg, default=0, help="port for /metrics (default: any free port)")
    parser.add_argument("--interval", type=_duration, default=0.05, help="sampling interval (default 50ms)")
    parser.add_argument("--seed", type=int, default=0)
    add_pricing_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    from wattledger.workloads.bench import BenchOptions, run_bench
    from wattledger.workloads.economics import pricing_from_args

    try:
        pricing = pricing_from_args(args)
        if args.duration is not None and args.duration < 6:
            raise ValueError("--duration must be at least 6s: the steady-state window needs 5 s")
        if not 1 <= args.mock_gpus <= 64:
            raise ValueError("--mock-gpus must be 1-64")
        if args.interval < 0.01:
            raise ValueError("--interval must be at least 10ms")
    except ValueError as err:
        print(f"wattledger bench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    options = BenchOptions(
        workloads=args.workloads or ("training", "chat", "agentic"), preset=args.preset, device=args.device,
        duration_s=args.duration, idle_s=args.idle, cooldown_s=args.cooldown, quick=args.quick,
        output_dir=args.output, address=args.address, port=args.port, interval_s=args.interval,
        backend=args.backend, mock_gpus=args.mock_gpus, seed=args.seed)
    from wattledger.workloads.bench import StopRequest

    stop = StopRequest()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.request(signal.Signals(signum).name)  # the phase it cuts records "SIGTERM" / "SIGINT"

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    console = _console()
    try:
        run_dir, summary = run_bench(options, stop, pricing, console)
    except (OSError, ValueError) as err:
        print(f"wattledger bench: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print_table(summary, console)
    console.print(f"wrote {run_dir}/summary.json and {run_dir}/report.html", markup=False, highlight=False)
    return 0


def report_main(argv: list[str]) -> int:
    from wattledger.workloads.economics import add_pricing_arguments

    parser = UsageParser(prog="wattledger report", description="Rebuild summary.json and report.html from a run "
                     "directory's raw files (also after an interrupted or killed run).")
    parser.add_argument("run_dir", type=Path)
    add_pricing_arguments(parser)
    args = parser.parse_args(argv)

    from wattledger.workloads.bench import build_outputs
    from wattledger.workloads.economics import pricing_from_args
    from wattledger.workloads.rundata import load_run

    try:
        pricing = pricing_from_args(args)
        run = load_run(args.run_dir)
    except ValueError as err:
        print(f"wattledger report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    start = run.event("run_start") or {}
    kind = start.get("kind", "bench")
    regimes = tuple(start.get("settings", {}).get("workloads") or ("training", "chat", "agentic"))
    try:
        summary = build_outputs(args.run_dir, pricing, kind=kind, regimes=regimes)
    except OSError as err:  # e.g. a run directory on a read-only mount
        print(f"wattledger report: error: cannot write into {args.run_dir}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED
    console = _console()
    print_table(summary, console)
    console.print(f"wrote {args.run_dir}/summary.json and {args.run_dir}/report.html", markup=False, highlight=False)
    return 0
