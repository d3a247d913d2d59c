"""``wattledger workload NAME``: run one regime of the registry alone and print its summary.

The agent's command hands ``workload`` over to this module, so torch is imported only when a workload
runs: the daemon never loads it. The regimes, their one-line help and their modules come from
``workloads/registry.py``; only the regime named on the command line is imported (its flags are its own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from wattledger.agent.config import ConfigError, check_token
from wattledger.workloads import registry
from wattledger.workloads.cli_args import EXIT_FAILED, EXIT_USAGE, UsageParser, duration_arg

_duration = duration_arg(allow_zero=False)


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of GPU indices: {text!r}") from None
    if not gpus or any(g < 0 for g in gpus):
        raise argparse.ArgumentTypeError(f"not a list of GPU indices: {text!r}")
    return gpus


def make_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the regime flags of ``selected`` only (importing just that regime), or of every
    regime when ``selected`` is None."""
    parser = UsageParser(prog="wattledger workload", description="Run one bundled workload and print its summary.")
    commands = parser.add_subparsers(dest="workload", metavar="WORKLOAD", parser_class=UsageParser, required=True)
    for name, regime in registry.REGIMES.items():
        sub = commands.add_parser(name, help=regime.summary)
        sub.add_argument("--preset", default="tiny", choices=["tiny", "125m", "1b", "8b"], help="model shape")
        sub.add_argument("--duration", type=_duration, default=30.0, help="how long to run, e.g. 30s, 2m")
        sub.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--compile", action="store_true", help="torch.compile the hot step (CUDA graphs on GPU)")
        sub.add_argument("--gpus", type=_gpu_list, default=None,
                         help="GPU indices to report to the agent (default: the CUDA device's, or 0)")
        sub.add_argument("--agent", metavar="URL", help="report tokens and spans to a running agent, e.g. "
                         "http://127.0.0.1:9478")
        sub.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        if selected is None or name == selected:
            regime.load().add_arguments(sub)
    return parser


def _default_gpus(device: str) -> list[int]:
    if device.startswith("cuda:"):
        return [int(device.split(":", 1)[1])]
    return [0]


def _print_summary(summary: dict, prefix: str = "") -> None:
    for key, value in summary.items():
        if isinstance(value, dict):
            _print_summary(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            continue  # per-request and per-step records: --json has them
        else:
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"  {prefix}{key:<{max(1, 34 - len(prefix))}} {shown}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser(selected=argv[0] if argv else None).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from wattledger.agent.client import AgentClientError
    from wattledger.workloads.common import RunOptions, configure_cpu_threads
    from wattledger.workloads.reporter import make_reporter

    module = registry.regime(args.workload).load()
    try:
        config = module.config_from_args(args)
        options = RunOptions(preset=args.preset, duration_s=args.duration, device=args.device, seed=args.seed,
                             compile=args.compile, gpus=args.gpus or _default_gpus(args.device))
        options.resolve()
        configure_cpu_threads(options)
    except ValueError as err:
        print(f"wattledger workload: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    token = os.environ.get("WATTLEDGER_TOKEN")
    try:
        if token is not None:
            token = check_token(token)  # the agent refuses the same tokens: say so now rather than as a 401 later
    except ConfigError as err:
        print(f"wattledger workload: error: WATTLEDGER_TOKEN: {err}", file=sys.stderr)
        return EXIT_USAGE
    reporter = make_reporter(args.workload, options.gpus, agent_url=args.agent, token=token)
    stop = threading.Event()
    # SIGINT/SIGTERM end the run with a summary; the previous handlers come back afterwards (an embedding
    # process, a test).
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            reporter.start(pid=os.getpid())
        except AgentClientError as err:
            print(f"wattledger workload: cannot report to the agent at {args.agent}: {err}", file=sys.stderr)
            return EXIT_FAILED
        try:
            summary = module.run(config, options, reporter, stop)
        finally:
            reporter.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    summary["interrupted"] = stop.is_set()
    if args.agent:
        summary["reported_to"] = args.agent
    if args.json:
        print(json.dumps(summary))
    else:
        where = f"reported to {args.agent}" if args.agent else "not reported to an agent"
        print(f"wattledger workload {args.workload}: preset {args.preset} on {summary.get('device')}, {where}")
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
