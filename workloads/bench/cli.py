"""``wattledger bench`` and ``wattledger report``: the command lines and the signals (the closing table is
``table.py``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from wattledger.workloads import registry
from wattledger.workloads.bench.table import console as _console, print_table
from wattledger.workloads.cli_args import EXIT_FAILED, EXIT_USAGE, UsageParser, duration_arg, port_arg

_duration = duration_arg(allow_zero=True)


def _workloads(text: str) -> tuple[str, ...]:
    """``--workloads training,chat``: names of regimes in the registry, in the order given."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in registry.REGIMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(registry.REGIMES)} (comma separated), "
                                         f"got {text!r}")
    return names


class _SignalsToStop:
    """SIGINT/SIGTERM request ``stop`` (the phase they cut records which) while the benchmark runs; the
    previous handlers come back afterwards (the command may run inside a longer-lived process)."""

    def __init__(self, stop) -> None:
        self._stop = stop
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop.request(signal.Signals(signum).name)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def bench_main(argv: list[str]) -> int:
    from wattledger.workloads.bench.economics import add_pricing_arguments

    parser = UsageParser(prog="wattledger bench", description="Measure each regime's utilization, joules per token "
                     "and cost on this machine, and write a report.")
    parser.add_argument("--quick", action="store_true", help="tiny preset, about 20 s per regime (CPU, CI)")
    parser.add_argument("--workloads", type=_workloads, default=None, help="comma-separated subset of "
                        f"{','.join(registry.DEFAULT_REGIMES)} (default all)")
    parser.add_argument("--preset", choices=["tiny", "125m", "1b", "8b"], default=None,
                        help="model shape (default 1b on a GPU, tiny otherwise)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--duration", type=_duration, default=None, help="per regime (default 60s; 20s quick)")
    parser.add_argument("--idle", type=_duration, default=None, help="idle baseline (default 10s; 8s quick)")
    parser.add_argument("--cooldown", type=_duration, default=None, help="between phases (default 10s; 2s quick)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="parent of the run directory")
    parser.add_argument("--backend", choices=["auto", "nvml", "mock"], default="auto")
    parser.add_argument("--mock-gpus", type=int, default=1)
    parser.add_argument("--cpu-timing", action="store_true", help="on the mock, time the regimes by this CPU's "
                        "own compute instead of the simulated GPU's (default: an H100's device time of 8b work)")
    parser.add_argument("--address", default="127.0.0.1", help="where /metrics is served during the run")
    parser.add_argument("--port", type=port_arg, default=0, help="port for /metrics (default: any free port)")
    parser.add_argument("--interval", type=_duration, default=0.05, help="sampling interval (default 50ms)")
    parser.add_argument("--seed", type=int, default=0)
    add_pricing_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    from wattledger.workloads.bench.bench_command import BenchOptions, StopRequest, run_bench
    from wattledger.workloads.bench.economics import pricing_from_args
    from wattledger.workloads.bench.session import SessionError

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
        workloads=args.workloads or registry.DEFAULT_REGIMES, preset=args.preset, device=args.device,
        duration_s=args.duration, idle_s=args.idle, cooldown_s=args.cooldown, quick=args.quick,
        output_dir=args.output, address=args.address, port=args.port, interval_s=args.interval,
        backend=args.backend, mock_gpus=args.mock_gpus, seed=args.seed, cpu_timing=args.cpu_timing)
    stop = StopRequest()
    console = _console()
    try:
        with _SignalsToStop(stop):
            run_dir, summary = run_bench(options, stop, pricing, console)
    except (OSError, ValueError, SessionError) as err:
        print(f"wattledger bench: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print_table(summary, console)
    console.print(f"wrote {run_dir}/summary.json and {run_dir}/report.html", markup=False, highlight=False)
    if summary.get("failed_regimes"):
        return EXIT_FAILED  # a regime failed: summary.json and report.html hold the ones that finished
    return 0


def report_main(argv: list[str]) -> int:
    from wattledger.workloads.bench.economics import add_pricing_arguments

    parser = UsageParser(prog="wattledger report", description="Rebuild summary.json and report.html from a run "
                     "directory's raw files (also after an interrupted or killed run).")
    parser.add_argument("run_dir", type=Path)
    add_pricing_arguments(parser)
    args = parser.parse_args(argv)

    from wattledger.workloads.bench.economics import pricing_from_args
    from wattledger.workloads.bench.rundata import load_run
    from wattledger.workloads.bench.session import build_outputs

    try:
        pricing = pricing_from_args(args)
        run = load_run(args.run_dir)
    except ValueError as err:
        print(f"wattledger report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    start = run.event("run_start") or {}
    kind = start.get("kind", "bench")
    regimes = tuple(start.get("settings", {}).get("workloads") or registry.DEFAULT_REGIMES)
    try:
        summary = build_outputs(args.run_dir, pricing, kind=kind, regimes=regimes)
    except OSError as err:  # e.g. a run directory on a read-only mount
        print(f"wattledger report: error: cannot write into {args.run_dir}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED
    console = _console()
    print_table(summary, console)
    console.print(f"wrote {args.run_dir}/summary.json and {args.run_dir}/report.html", markup=False, highlight=False)
    return 0
