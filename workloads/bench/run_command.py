"""``wattledger run [options] -- CMD ARGS...``: profile any command as one workload.

The same measurement session as ``wattledger bench`` (``session.py``: an in-process agent and its run
directory, ``workloads/bench/rundata.py``) watches the GPUs while the command runs; ``summary.json`` is of
kind "run", with one regime, named after the workload (default "command"). It imports no torch: the
``bench`` extra is enough. The phases:

1. an idle baseline (``--idle``, default 6 s, so that the window between energy-counter ticks is at least
   the 5 s the analysis asks for; 0 skips it, and the dynamic figures with it);
2. phase ``NAME``: the command starts with the agent's base URL in ``WATTLEDGER_AGENT_URL`` and the
   workload name in ``WATTLEDGER_WORKLOAD``; the agent accounts every GPU to that workload for as long as
   the command runs, and watches its processes (the command and its descendants) for CPU and memory.
   Tokens come from the command itself (``POST $WATTLEDGER_AGENT_URL/v1/tokens`` with ``{"workload":
   $WATTLEDGER_WORKLOAD, "kind": "generated", "count": N}``; spans through ``/v1/spans`` drive the mock
   GPU), or from a serving engine's Prometheus endpoint with ``--tokens-from URL``
   (``workloads/bench/token_sources.py``). Use one or the other: both add to the same counts. The phase's
   ``token_source`` in the summary says how the engine was read; ``lower_bound: true`` there (with
   ``lower_bound_reasons``) means the engine's counters could not rule out missed tokens (a failed first
   read while the engine already held counts, a restart while reads were failing), so the token figure may
   be low and joules per token high; without it, the count is within one poll interval of the engine's.
3. the summary is computed and printed; the exit status is the command's (128+N when a signal N ended it).

SIGINT and SIGTERM are passed on to the command and the run is marked partial. A SIGINT typed at the
terminal already reached the command (same process group), so it is not sent a second time.

Failures before the command starts print one line: bad usage exits 2, a command that is not found 127,
one that cannot be executed 126, an agent that cannot start 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wattledger.agent.config import DEFAULT_NAME_PATTERN
from wattledger.workloads.cli_args import EXIT_FAILED, EXIT_USAGE, UsageParser, duration_arg

if TYPE_CHECKING:  # the session (and the agent behind it) is imported only when a command is profiled
    from wattledger.workloads.bench.session import MeasurementSession, SessionOptions

_duration = duration_arg(allow_zero=True)

PROG = "wattledger run"
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
ENV_AGENT_URL = "WATTLEDGER_AGENT_URL"
ENV_WORKLOAD = "WATTLEDGER_WORKLOAD"
TOKEN_POLL_SECONDS = 1.0


def _name(text: str) -> str:
    if not re.fullmatch(DEFAULT_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"workload name must match {DEFAULT_NAME_PATTERN!r}, got {text!r}")
    if text == "idle":
        raise argparse.ArgumentTypeError("'idle' is the name of the baseline phase; choose another")
    return text


@dataclass
class RunCommandOptions:
    command: list[str]
    name: str = "command"
    backend: str = "auto"
    mock_gpus: int = 1
    interval_s: float = 0.05
    idle_s: float = 6.0
    output_dir: Path = Path("runs")
    address: str = "127.0.0.1"
    port: int = 0
    tokens_from: str | None = None
    tokens_engine: str = "auto"
    json_output: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def session_options(self) -> SessionOptions:
        from wattledger.workloads.bench.session import SessionOptions

        return SessionOptions(output_dir=self.output_dir, backend=self.backend, mock_gpus=self.mock_gpus,
                              interval_s=self.interval_s, address=self.address, port=self.port)


@dataclass
class RunResult:
    run_dir: Path | None
    summary: dict | None
    exit_code: int
    status: str


def make_parser() -> argparse.ArgumentParser:
    from wattledger.workloads.bench.economics import add_pricing_arguments
    from wattledger.workloads.bench.token_sources import ENGINE_CHOICES

    parser = UsageParser(prog=PROG, usage=f"{PROG} [options] -- CMD [ARGS...]",
                     description="Run a command and measure what its GPUs did meanwhile: utilization, energy, "
                     "joules per token and cost, written to a run directory like `wattledger bench`. The "
                     f"command finds the agent at ${ENV_AGENT_URL} and its workload name in ${ENV_WORKLOAD}, "
                     "and may report tokens there (POST /v1/tokens); --tokens-from reads them from a serving "
                     "engine's /metrics instead. Exits with the command's status.")
    parser.add_argument("--name", type=_name, default="command", help="workload name (default command)")
    parser.add_argument("--backend", choices=["auto", "nvml", "mock"], default="auto",
                        help="GPU backend: auto = NVML when it initialises, else the mock (SIMULATED)")
    parser.add_argument("--mock-gpus", type=int, default=1, help="simulated GPUs (default 1)")
    parser.add_argument("--interval", type=_duration, default=0.05, help="sampling interval (default 50ms)")
    parser.add_argument("--idle", type=_duration, default=6.0,
                        help="idle baseline before the command (default 6s: the baseline check wants a 5 s window "
                        "between energy-counter ticks; 0 skips it)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="parent of the run directory (default runs)")
    parser.add_argument("--address", default="127.0.0.1", help="where the agent serves /metrics and the "
                        "accounting API during the run (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="agent port (default: any free port)")
    parser.add_argument("--tokens-from", metavar="URL", default=None,
                        help="a serving engine's Prometheus endpoint to read token counters from "
                        "(vLLM, SGLang, TGI), e.g. http://127.0.0.1:8000/metrics")
    parser.add_argument("--tokens-engine", choices=ENGINE_CHOICES, default=None,
                        help="which engine's counters to read (default auto: detected from the metric names)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on the last line of stdout (progress on stderr)")
    add_pricing_arguments(parser)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(options, command): the command is everything after the first ``--``; None when there is none."""
    if "--" not in argv:
        return list(argv), None
    at = argv.index("--")
    return list(argv[:at]), list(argv[at + 1:])


def resolve_command(command: list[str], env_path: str | None = None) -> tuple[str | None, int, str]:
    """(path, exit code, reason): the executable the command names, or None with 127/126 and why not."""
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        if not os.path.exists(program):
            return None, EXIT_NOT_FOUND, "no such file"
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            return None, EXIT_NOT_EXECUTABLE, "permission denied (not an executable file)"
        return program, 0, ""
    found = shutil.which(program, path=env_path)
    if found is None:
        return None, EXIT_NOT_FOUND, "command not found"
    return found, 0, ""


def _exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: -N (killed by signal N) -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _terminal_delivered_sigint() -> bool:
    """True when we are the terminal's foreground process group: a typed Ctrl-C reached the child too."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Signals:
    """SIGINT/SIGTERM: set ``stop``, remember the first signal, pass each on to the child once it runs."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (embedded use): none then
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        self.stop.set()
        child = self.child
        if child is None or child.poll() is not None:
            return
        if signum == signal.SIGINT and _terminal_delivered_sigint():
            return
        try:
            child.send_signal(signum)
        except OSError:  # exited meanwhile
            pass


class _ProcessWatch:
    """The command's process figures from the agent while it runs (they leave the ledger when it exits)."""

    def __init__(self, agent, name: str):
        self._agent, self._name = agent, name
        self.cpu_seconds: float | None = None
        self.peak_resident_bytes: int | None = None
        self.peak_pinned_bytes: int | None = None

    def update(self) -> None:
        figures = self._agent.workload_figures(self._name).processes
        if figures is None:
            return
        self.cpu_seconds = figures.cpu_seconds
        self.peak_resident_bytes = max(self.peak_resident_bytes or 0, figures.resident_bytes)
        self.peak_pinned_bytes = max(self.peak_pinned_bytes or 0, figures.pinned_bytes)

    def figures(self) -> dict:
        return {"cpu_seconds_last_sampled": self.cpu_seconds, "peak_resident_bytes": self.peak_resident_bytes,
                "peak_pinned_bytes": self.peak_pinned_bytes,
                "note": "the command and its descendants, as the host probe last saw them before the command ended"}


def _whole_phase_figures(agent, name: str) -> dict:
    """What the agent's ledger attributed to the workload over the whole phase (no window cut)."""
    figures = agent.workload_figures(name)
    energy, active = figures.energy_joules_by_gpu, figures.active_seconds_by_gpu
    return {
        "energy_joules": sum(energy.values()) if energy else None,
        "energy_joules_by_gpu": {str(gpu): joules for gpu, joules in sorted(energy.items())},
        "gpu_seconds": sum(active.values()) if active else None,
        "tokens": dict(figures.tokens),
    }


@dataclass
class _Child:
    """The profiled command once it ran: how it ended and when (host monotonic ns)."""

    started_ns: int
    ended_ns: int
    exit_code: int
    returncode: int | None = None  # None: it could not be started
    processes: _ProcessWatch | None = None


def run_command(options: RunCommandOptions, pricing, signals: _Signals, say, warn) -> RunResult:
    """Profile ``options.command``; ``say``/``warn`` print one line to the progress/error stream."""
    from wattledger.agent.daemon import ServerStartError
    from wattledger.workloads.bench.session import MeasurementSession, SessionError

    env = {**os.environ, **options.extra_env}
    executable, code, reason = resolve_command(options.command, env.get("PATH", os.defpath))
    if executable is None:
        warn(f"{PROG}: cannot start {options.command[0]!r}: {reason} (exit {code})")
        return RunResult(None, None, code, "not started")
    try:
        session = MeasurementSession.open(options.session_options(), require_devices=True)
    except SessionError as err:
        warn(f"{PROG}: error: {err}")
        return RunResult(None, None, EXIT_FAILED, "not started")
    settings = _settings(options, session)
    session.record_run_start(settings, kind="run")
    try:
        session.start()
    except ServerStartError as err:
        warn(f"{PROG}: error: {err}")
        return RunResult(session.run_dir, None, EXIT_FAILED, "partial")
    _say_what_runs(options, session, say)
    exit_code, status = EXIT_FAILED, "complete"
    try:
        if options.idle_s > 0 and not signals.stop.is_set():
            say(f"{PROG}: idle baseline, {options.idle_s:g} s")
            session.event("phase_start", phase="idle")
            signals.stop.wait(options.idle_s)
            session.event("phase_end", phase="idle", workload_summary={})
        if signals.stop.is_set():
            status, exit_code = "partial", 128 + (signals.received or signal.SIGINT)
        else:
            exit_code, started = _profile_phase(session, options, env, signals, warn)
            if signals.stop.is_set() or not started:
                status = "partial"
    finally:
        _end_child(signals)
        session.close(status, exit_code=exit_code)
    return _publish(session, pricing, settings, options.name, exit_code, status, warn)


def _settings(options: RunCommandOptions, session: MeasurementSession) -> dict:
    """The run's settings, as run_start records them and the summary repeats them."""
    from wattledger.workloads.bench.session import versions

    command = options.command
    return {
        "workloads": [options.name], "command": list(command), "command_line": shlex.join(command),
        "idle_s": options.idle_s, "sampling_interval_seconds": options.interval_s, "backend": options.backend,
        "mock_gpus": options.mock_gpus if session.agent.gpu_backend_name == "mock" else None, "gpus": session.gpus,
        "tokens_from": options.tokens_from, "tokens_engine": options.tokens_engine if options.tokens_from else None,
        "versions": versions(),
    }


def _say_what_runs(options: RunCommandOptions, session: MeasurementSession, say) -> None:
    label = "SIMULATED (mock GPU): " if session.simulated else ""
    shown = " ".join(shlex.join(options.command).split())
    shown = shown if len(shown) <= 100 else shown[:97] + "..."
    say(f"{PROG}: {label}profiling `{shown}` as workload {options.name!r} on {len(session.gpus)} x "
        f"{session.agent.devices()[0].model_name}; agent at {session.base_url}; run directory {session.run_dir}")
    for note in session.notes:
        say(f"{PROG}: {note}")


def _profile_phase(session: MeasurementSession, options: RunCommandOptions, env: dict, signals: _Signals,
                   warn) -> tuple[int, bool]:
    """The command's phase, from phase_start to phase_end: the command runs (its tokens counted, from
    itself or ``--tokens-from``), the ledger catches up, its summary is recorded. Returns (the exit code,
    whether the command started at all)."""
    name = options.name
    session.event("phase_start", phase=name, command=list(options.command))
    poller = _start_token_poller(options, session.agent, warn)
    try:
        child = _run_child(session, options, {**env, ENV_AGENT_URL: session.base_url, ENV_WORKLOAD: name},
                           signals, poller, warn)
    finally:
        if poller is not None and poller.running:
            poller.stop()
    session.drain()
    summary = {"command": list(options.command), "exit_code": child.exit_code, "returncode": child.returncode,
               "wall_seconds": (child.ended_ns - child.started_ns) / 1e9,
               "interrupted": signals.received is not None, "whole_phase": _whole_phase_figures(session.agent, name)}
    if child.processes is not None:
        summary["processes"] = child.processes.figures()
    if child.returncode is not None and child.returncode < 0:
        summary["signal"] = signal.Signals(-child.returncode).name
    if poller is not None:
        summary["token_source"] = poller.summary()
        if poller.counters.lower_bound:  # joules per token is then an upper bound: say so where it is read
            warn(f"{PROG}: token counts from {options.tokens_from} are a lower bound: "
                 f"{poller.counters.lower_bound_reasons[0]}")
    # Stamped when the command ended (written now, once the ledger has caught up).
    session.event("phase_end", phase=name, workload_summary=summary, monotonic_ns=child.ended_ns)
    return child.exit_code, child.returncode is not None


def _start_token_poller(options: RunCommandOptions, agent, warn):
    """With ``--tokens-from``: a running poller adding the engine's tokens to the workload, each of its reads
    shown in the agent's probe self-metrics as probe ``engine``; else None."""
    from wattledger.workloads.bench.token_sources import ENGINE_PROBE, TokenPoller, TokenScraper

    if not options.tokens_from:
        return None
    poller = TokenPoller(TokenScraper(options.tokens_from, options.tokens_engine), agent.accounting_api(),
                         options.name, TOKEN_POLL_SECONDS, on_recover=lambda m: warn(f"{PROG}: {m}"),
                         on_error=lambda m: warn(f"{PROG}: token source: {m} (retrying every "
                                                 f"{TOKEN_POLL_SECONDS:g} s)"),
                         on_read=lambda *read: agent.record_probe(ENGINE_PROBE, *read))
    poller.start()
    return poller


def _run_child(session: MeasurementSession, options: RunCommandOptions, env: dict, signals: _Signals, poller,
               warn) -> _Child:
    """Start the command, account every GPU to the workload while it runs, wait for it; a command that
    cannot be started is a ``_Child`` with no returncode (127 or 126)."""
    sys.stdout.flush()
    sys.stderr.flush()
    started_ns = time.monotonic_ns()
    try:
        child = subprocess.Popen(options.command, env=env)
    except OSError as err:
        code = EXIT_NOT_FOUND if isinstance(err, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        warn(f"{PROG}: cannot start {options.command[0]!r}: {err.strerror or err} (exit {code})")
        return _Child(started_ns, started_ns, code)
    signals.child = child
    api = session.agent.accounting_api()
    # This loop waits on the child and stops the workload at its exact exit time, so the agent's own exit
    # check (which would also refuse a child that exited at once) is off.
    api.start(options.name, session.gpus, pid=child.pid, at_ns=started_ns, ends_with_process=False)
    if signals.received is not None:  # a signal came before the child could be told: tell it now
        try:
            child.send_signal(signals.received)
        except OSError:
            pass
    processes = _ProcessWatch(session.agent, options.name)
    while True:
        try:
            returncode = child.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            processes.update()
    ended_ns = time.monotonic_ns()
    signals.child = None
    if poller is not None:
        poller.stop()  # its last reading counts the tokens up to the end, inside the workload's run
    api.stop(options.name, at_ns=ended_ns)
    return _Child(started_ns, ended_ns, _exit_status(returncode), returncode, processes)


def _end_child(signals: _Signals) -> None:
    """Only after an unexpected error: do not leave the command running."""
    child = signals.child
    if child is not None and child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _publish(session: MeasurementSession, pricing, settings: dict, name: str, exit_code: int, status: str,
             warn) -> RunResult:
    """``runs/latest`` and the outputs; a summary that cannot be built is one line, the status kept."""
    try:
        summary = session.publish(pricing, settings, kind="run", regimes=(name,))
    except Exception as err:  # noqa: BLE001 - the measurement is on disk; say so in one line, keep the status
        warn(f"{PROG}: error: could not build the summary ({type(err).__name__}: {err}); the raw files are in "
             f"{session.run_dir}: `wattledger report {session.run_dir}` builds it again")
        return RunResult(session.run_dir, None, exit_code or EXIT_FAILED, status)
    return RunResult(session.run_dir, summary, exit_code, status)


def run_main(argv: list[str]) -> int:
    """``wattledger run [options] -- CMD ARGS...``; returns the exit status."""
    option_args, command = split_command(argv)
    parser = make_parser()
    args = parser.parse_args(option_args)
    from wattledger.workloads.bench.economics import pricing_from_args
    from wattledger.workloads.bench.session import json_default
    from wattledger.workloads.bench.token_sources import check_url

    try:
        if not command:
            raise ValueError("give the command to profile after --: wattledger run [options] -- CMD [ARGS...]")
        pricing = pricing_from_args(args)
        if not 1 <= args.mock_gpus <= 64:
            raise ValueError("--mock-gpus must be 1-64")
        if args.interval < 0.01:
            raise ValueError("--interval must be at least 10ms")
        if not 0 <= args.port <= 65535:
            raise ValueError("--port must be 0-65535")
        if args.tokens_from is not None:
            check_url(args.tokens_from)
        elif args.tokens_engine is not None:
            raise ValueError("--tokens-engine needs --tokens-from URL")
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from rich.console import Console

    progress = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=progress, flush=True)

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = RunCommandOptions(
        command=command, name=args.name, backend=args.backend, mock_gpus=args.mock_gpus, interval_s=args.interval,
        idle_s=args.idle, output_dir=args.output, address=args.address, port=args.port,
        tokens_from=args.tokens_from, tokens_engine=args.tokens_engine or "auto", json_output=args.json)
    signals = _Signals()
    signals.install()
    try:
        result = run_command(options, pricing, signals, say, warn)
    except (OSError, ValueError) as err:
        warn(f"{PROG}: error: {err}")
        return EXIT_FAILED
    finally:
        signals.restore()
    if result.summary is None:
        return result.exit_code
    if args.json:
        record = {"run_dir": str(result.run_dir.resolve()), "exit_code": result.exit_code, "summary": result.summary}
        print(json.dumps(record, default=json_default), flush=True)
    else:
        from wattledger.workloads.bench.table import print_table

        # Not a terminal (a pipe, a log file): rich would cut the table to 80 columns.
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
        print_table(result.summary, console)
        console.print(f"wrote {result.run_dir}/summary.json and {result.run_dir}/report.html", markup=False,
                      highlight=False, soft_wrap=True)
    return result.exit_code


