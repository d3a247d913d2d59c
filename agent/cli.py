"""The ``wattledger`` command: ``agent`` (the daemon), ``devices``, ``--version``.

Expected failures (bad flags, a port in use, an unreadable config) print one line and exit with
status 2 (bad usage) or 1 (could not run); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from wattledger.agent import version
from wattledger.agent.config import (
    BACKENDS,
    DEFAULT_PORT,
    EXIT_FAILED,
    EXIT_USAGE,
    AgentConfig,
    ConfigError,
    UsageParser,
    build_config,
)
from wattledger.probes.base import FieldStatus
from wattledger.probes.mock_presets import PRESETS



def _add_backend_flags(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # flags left out stay out, so the environment and config file can fill them
    parser.add_argument("--backend", choices=BACKENDS, default=s,
                        help="GPU backend: auto = NVML; on a machine with no NVIDIA driver the mock, on a GPU "
                             "node whose NVML fails NVML retried with backoff; nvml = exit 1 if NVML fails "
                             "(default auto)")
    parser.add_argument("--mock-gpus", type=int, default=s, help="number of simulated GPUs (default 1)")
    parser.add_argument("--mock-preset", choices=sorted(PRESETS), default=s,
                        help="simulated GPU model (default h100-sxm-80gb)")
    parser.add_argument("--mock-fault", dest="mock_faults", action="append", default=s, metavar="FAULT",
                        help="scheduled fault for the mock, e.g. gpu_lost:gpu=0:at=10:until=20, "
                             "energy_reset:at=30, field_unsupported:field=power_watts:at=5, init_failure")
    parser.add_argument("--mock-processes", default=s, metavar="FILE",
                        help="scripted compute processes for the mock (--backend mock): a JSON list of "
                             '{"gpu", "pid", "sm_share", "memory_bytes", "labels"} objects, e.g. labels '
                             '{"namespace": "llm", "pod": "vllm-0"}; what --attribution charges')
    parser.add_argument("--mock-delay", default=s, metavar="DURATION",
                        help="how far the span-driven mock runs behind the clock, so spans reported when they "
                             "end are known in time (default 1s)")
    parser.add_argument("--replay", default=s, metavar="FILE", help="play a recorded sample file")
    parser.add_argument("--replay-speed", type=float, default=s, help="replay speed factor (default 1)")
    parser.add_argument("--replay-loop", action="store_true", default=s, help="start the replay again at its end")
    parser.add_argument("--interval", default=s, help="sampling interval, e.g. 100ms (default 100ms, min 10ms)")
    parser.add_argument("--host-interval", default=s, help="host probe interval (default 500ms; never faster "
                        "than --interval): CPU and RAPL are counters and lose nothing when read less often")
    parser.add_argument("--path.procfs", dest="procfs", default=s, help="procfs root (default /proc)")
    parser.add_argument("--path.sysfs", dest="sysfs", default=s, help="sysfs root (default /sys)")
    parser.add_argument("--config", dest="config_file", default=os.environ.get("WATTLEDGER_CONFIG"),
                        metavar="FILE.toml", help="settings file; flags and WATTLEDGER_* variables override it")


def make_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="wattledger", description="GPU node telemetry: utilization that counts what "
                     "happens between scrapes, energy and joules per token per workload.")
    parser.add_argument("--version", action="version", version=f"wattledger {version.VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageParser)

    agent = commands.add_parser("agent", help="run the telemetry daemon (Prometheus /metrics and accounting API)")
    s = argparse.SUPPRESS
    agent.add_argument("--address", default=s, help="listen address (default 0.0.0.0)")
    agent.add_argument("--port", type=int, default=s, help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one)")
    agent.add_argument("--record", default=s, metavar="FILE", help="also write raw samples and spans as JSON lines")
    agent.add_argument("--token", default=s, help="bearer token that lets non-loopback clients write "
                       "(prefer WATTLEDGER_TOKEN: flags show in ps)")
    agent.add_argument("--max-workloads", type=int, default=s, help="most workloads accepted (default 64)")
    agent.add_argument("--attribution", action="store_true", default=s,
                       help="per-owner series: who used each GPU (pods, systemd units, commands); on Kubernetes "
                            "needs hostPID and the kubelet's pod-resources socket (default off)")
    agent.add_argument("--attribution-max-owners", type=int, default=s,
                       help='owners with series of their own (default 50; the rest: owner_kind="other")')
    agent.add_argument("--attribution-retention", default=s, metavar="DURATION",
                       help="how long an owner that left keeps its series (default 10m, at least 1m)")
    agent.add_argument("--kubelet-socket", default=s, metavar="PATH",
                       help='the kubelet pod-resources socket (default '
                            '/var/lib/kubelet/pod-resources/kubelet.sock; "" = none)')
    agent.add_argument("--engine", dest="engines", action="append", default=s, metavar="URL",
                       help="a serving engine's /metrics (vLLM, SGLang, TGI), e.g. http://127.0.0.1:8000/metrics: "
                            "its tokens are charged to the owner of the process listening on that port, as "
                            "wattledger_owner_tokens_total (off Kubernetes; needs --attribution; repeatable)")
    agent.add_argument("--engine-interval", default=s, metavar="DURATION",
                       help="how often each --engine is read (default 5s)")
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=s)
    _add_backend_flags(agent)

    # Only named here: their options live in the modules of HEAVY_COMMANDS (main() hands the whole command
    # line over before this parser sees it).
    commands.add_parser("workload", help="run one bundled workload alone (`wattledger workload --help` lists "
                        "them); workloads extra (torch)", add_help=False)
    commands.add_parser("bench", help="measure each regime's utilization, joules per token and cost; write a "
                        "report (workloads extra)", add_help=False)
    commands.add_parser("report", help="rebuild summary.json and report.html from a run directory (bench extra)",
                        add_help=False)
    commands.add_parser("run", help="profile any command: wattledger run -- CMD ... (bench extra, no torch)",
                        add_help=False)

    devices = commands.add_parser("devices", help="list GPUs and which fields and probes work on each; on a "
                                  "machine without a GPU say so and exit 1 (--backend mock lists simulated GPUs)")
    devices.add_argument("--json", action="store_true", help="print one JSON object")
    _add_backend_flags(devices)
    return parser


def _config_from(args: argparse.Namespace) -> AgentConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", "json")}
    return build_config(flags, os.environ, args.config_file)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _probe_failure(err: Exception) -> int:
    """One line for a backend that cannot open: exit 2 when the user's input is at fault (a replay file
    that cannot be played), 1 when the machine is (NVML would not initialise)."""
    from wattledger.probes.replay import ReplayFileError

    print(f"wattledger: {err}", file=sys.stderr)
    return EXIT_USAGE if isinstance(err, ReplayFileError) else EXIT_FAILED


def run_agent(config: AgentConfig) -> int:
    from wattledger.agent.daemon import Agent
    from wattledger.agent.http_api import ServerStartError
    from wattledger.probes.base import ProbeUnavailable

    _setup_logging(config.log_level)
    try:
        agent = Agent(config)
    except ProbeUnavailable as err:
        return _probe_failure(err)
    except ConfigError as err:  # the --mock-processes file changed between validation and start
        print(f"wattledger: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # e.g. the --record file cannot be created
        print(f"wattledger: cannot start: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    for note in agent.notes:
        print(f"wattledger: {note}", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except ServerStartError as err:
        agent.stop()
        print(f"wattledger: {err}", file=sys.stderr)
        return EXIT_FAILED
    prefix = "SIMULATED " if agent.simulated else ""
    print(f"wattledger {version.VERSION}: {prefix}metrics at {agent.metrics_url} "
          f"(sampling every {config.interval_seconds * 1000:g} ms; Ctrl-C stops)", flush=True)
    while not stop.wait(0.5):
        if agent.sampler.fatal_error is not None:
            agent.stop()
            print(f"wattledger: sampler stopped: {agent.sampler.fatal_error}; exiting so the supervisor "
                  "restarts the agent", file=sys.stderr)
            return EXIT_FAILED
    agent.stop()
    print("wattledger: stopped", flush=True)
    return 0


def _status_text(status: FieldStatus) -> str:
    return "ok" if status.supported else f"not available: {status.reason}"


def _no_gpu_found(mock, notes: list[str], as_json: bool) -> int:
    """``devices`` with the default backend on a machine without a GPU: say so and exit 1, rather than list
    the mock that ``auto`` falls back to (a script must not read a simulated H100 as this machine's GPU).
    The mock is listed only when asked for by name (``--backend mock``)."""
    mock.close()
    # The fallback's note reads "<why NVML did not open>; using the mock GPU backend instead ...".
    why = next((n.split("; using the mock")[0] for n in notes if "; using the mock" in n), "NVML did not open")
    line = (f"wattledger: no GPU found ({why}); `wattledger devices --backend mock` lists simulated GPUs "
            "instead")
    if as_json:
        print(json.dumps({"gpus": [], "simulated": False, "no_gpu": why, "notes": notes}, indent=2))
    print(line, file=sys.stderr)
    return EXIT_FAILED


def run_devices(config: AgentConfig, as_json: bool) -> int:
    from wattledger.agent.daemon import open_gpu_backend
    from wattledger.probes.base import ProbeUnavailable
    from wattledger.probes.host import open_host_backend

    _setup_logging("warning")
    try:
        opened = open_gpu_backend(config, retry_nvml=False)  # one reading: no waiting for NVML
    except ProbeUnavailable as err:
        return _probe_failure(err)
    except ConfigError as err:  # as in run_agent
        print(f"wattledger: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    gpu = opened.backend
    if config.backend == "auto" and gpu is not None and gpu.name == "mock":
        return _no_gpu_found(gpu, opened.notes, as_json)
    report: dict = {"notes": opened.notes, "simulated": bool(gpu and gpu.simulated), "gpus": [], "host": []}
    if gpu is not None:
        gpu.sample()
        time.sleep(min(0.2, config.interval_seconds * 2))  # GPM and windowed fields need two samples
        samples = {s.index: s for s in gpu.sample()}
        for info in gpu.devices():
            sample = samples.get(info.index)
            report["gpus"].append({
                "index": info.index, "uuid": info.uuid, "model_name": info.model_name,
                "driver_version": info.driver_version, "memory_total_bytes": info.memory_total_bytes,
                "power_limit_default_watts": info.power_limit_default_watts, "simulated": info.simulated,
                "pci_bus_id": info.pci_bus_id, "mig_enabled": info.mig_enabled,
                "up": bool(sample and sample.up),
                "fields": {st.name: {"supported": st.supported, "reason": st.reason}
                           for st in gpu.field_status(info.index)},
            })
        gpu.close()
    try:
        host = open_host_backend(config.procfs, config.sysfs)
        host.sample()
        report["host"] = [{"name": st.name, "supported": st.supported, "reason": st.reason}
                          for st in host.field_status()]
        host.close()
    except ProbeUnavailable as err:
        report["notes"].append(f"no host data: {err}")
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    for note in report["notes"]:
        print(f"wattledger: {note}")
    if not report["gpus"]:
        print("no GPUs")
    for g in report["gpus"]:
        label = " [SIMULATED]" if g["simulated"] else ""
        memory = f"{g['memory_total_bytes'] / 2**30:.1f} GiB" if g["memory_total_bytes"] else "memory unknown"
        limit = f"{g['power_limit_default_watts']:g} W" if g["power_limit_default_watts"] else "limit unknown"
        print(f"GPU {g['index']}: {g['model_name']}{label}  {g['uuid']}")
        print(f"  driver {g['driver_version']}, {memory}, power limit {limit}, bus {g['pci_bus_id']}, "
              f"MIG {'on' if g['mig_enabled'] else 'off'}, {'up' if g['up'] else 'DOWN'}")
        for name, st in g["fields"].items():
            print(f"    {name:38s} {_status_text(FieldStatus(name, st['supported'], st['reason']))}")
    if report["host"]:
        print("host:")
        for st in report["host"]:
            print(f"    {st['name']:38s} {_status_text(FieldStatus(st['name'], st['supported'], st['reason']))}")
    return 0


@dataclass(frozen=True)
class HeavyCommand:
    """A command that runs the regimes or the measurement: imported only when it runs, never by the agent.
    ``extra`` is the pyproject extra that installs ``packages`` (what it imports beyond the agent's own)."""

    module: str
    function: str
    extra: str
    packages: tuple[str, ...]


# pyproject's extras: [bench] is the measurement (run, report); [workloads] adds torch for the regimes.
BENCH_PACKAGES = ("numpy", "pandas", "pyarrow", "matplotlib", "rich")
INSTALL = {"bench": "pip install 'wattledger[bench]'",
           "workloads": "pip install torch==2.13.0 'wattledger[workloads]'"}  # torch first: see pyproject
HEAVY_COMMANDS = {
    "workload": HeavyCommand("wattledger.workloads.cli", "main", "workloads", ("torch", "numpy")),
    "bench": HeavyCommand("wattledger.workloads.bench.cli", "bench_main", "workloads",
                          ("torch", *BENCH_PACKAGES)),
    "report": HeavyCommand("wattledger.workloads.bench.cli", "report_main", "bench", BENCH_PACKAGES),
    "run": HeavyCommand("wattledger.workloads.bench.run_command", "run_main", "bench", BENCH_PACKAGES),
}


def _importable(package: str) -> bool:
    """Whether ``import package`` can work, without importing it (None in sys.modules: blocked)."""
    import importlib.util

    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def run_heavy(name: str, argv: list[str]) -> int:
    """Hand the command line over to a heavy command; without its extra, one line naming what to install."""
    import importlib

    heavy = HEAVY_COMMANDS[name]
    missing = [package for package in heavy.packages if not _importable(package)]
    try:
        if missing:
            raise ImportError(f"no {', '.join(missing)}")
        command = getattr(importlib.import_module(heavy.module), heavy.function)
    except ImportError as err:
        print(f"wattledger: error: '{name}' needs the {heavy.extra} extra ({err}); install with: "
              f"{INSTALL[heavy.extra]}", file=sys.stderr)
        return EXIT_USAGE
    return command(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in HEAVY_COMMANDS:
        return run_heavy(argv[0], argv[1:])
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        config = _config_from(args)
    except ConfigError as err:
        print(f"wattledger: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "agent":
        return run_agent(config)
    return run_devices(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
