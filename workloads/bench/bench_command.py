"""``wattledger bench``: measure what training, chat serving and agentic sessions cost on this machine.

One measurement session (``session.py``): the agent's sampler runs in-process (serving /metrics, so a
Prometheus can watch), an idle baseline is measured (with this process's CUDA context already created on
the workloads' device, so the baseline includes what a held context costs), then each regime of the
registry (``workloads/registry.py``) runs in turn at its defaults, with a cooldown between, and a second,
shorter idle baseline closes the run (``idle_end``: half the first; the dynamic figures subtract the
first, see ``analysis.analyse``). Everything is recorded into a run directory as it happens
(``workloads/bench/rundata.py``); at the end, or when interrupted, ``analysis.summarize`` turns the raw
files into ``summary.json`` and ``report.render_report`` into ``report.html``. Without an NVIDIA GPU the
mock GPU stands in, driven by the workloads' spans, and every output says SIMULATED on its first line.

Each workload is charged only the GPUs it runs on: its CUDA device's UUID matched to NVML's
(``session.attribute_gpus``); on the mock, mock GPU 0. A regime whose workload raises (an out-of-memory,
a CUDA error, any Exception; not KeyboardInterrupt) is recorded as failed with a one-line reason, its
CUDA memory released, and the bench goes on: the run's status is then "partial" and the summary lists it
in ``failed_regimes``.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from wattledger.workloads import registry
from wattledger.workloads.bench.session import MeasurementSession, SessionOptions, first_line, versions
from wattledger.workloads.reporter import AccountingReporter

IDLE_PHASE = "idle"  # the opening idle baseline (analysis.IDLE_PHASE)
IDLE_END_PHASE = "idle_end"  # the closing one (analysis.IDLE_END_PHASE)
IDLE_PHASES = (IDLE_PHASE, IDLE_END_PHASE)
# The closing idle baseline's length as a share of the opening one's: it is a drift check, not the figure
# the dynamic energy subtracts, so it stays short (4 s with --quick, 5 s by default).
END_IDLE_SHARE = 0.5
# Lines of a failed workload's traceback kept in its phase_end (the end of the stack says where it broke).
TRACEBACK_LINES = 30
# The model whose work sets the device time on the mock (issue 14): the CPU computes the bench's preset
# (tiny) for the tokens, the simulated GPU takes the time of an 8b model's steps (training: the largest
# shape that fits one GPU, workloads/training.py).
TIMING_PRESET = "8b"


@dataclass
class BenchOptions:
    workloads: tuple[str, ...] = registry.DEFAULT_REGIMES
    preset: str | None = None  # None: 1b on a GPU, tiny on CPU
    device: str = "auto"
    duration_s: float | None = None  # per regime; None: 60 s, or 20 s with quick
    idle_s: float | None = None  # None: 10 s, or 8 s with quick
    cooldown_s: float | None = None  # None: 10 s, or 2 s with quick
    quick: bool = False
    output_dir: Path = Path("runs")
    address: str = "127.0.0.1"
    port: int = 0  # 0: any free port (printed)
    interval_s: float = 0.05  # sampling: counter edges are located within half of it
    backend: str = "auto"
    mock_gpus: int = 1
    seed: int = 0
    pricing_file: str | None = None
    pricing_overrides: dict = field(default_factory=dict)
    # On the mock: False runs every regime on the simulated GPU's time (its preset's device time of
    # TIMING_PRESET's work, issue 14); True keeps the CPU's own time (--cpu-timing). Real GPUs: no effect.
    cpu_timing: bool = False

    def resolved(self, has_cuda: bool) -> dict:
        """The settings the bench runs with (seconds); ``end_idle_s``: the closing idle baseline, half the
        opening one (0: none)."""
        quick = self.quick
        idle_s = self.idle_s if self.idle_s is not None else (8.0 if quick else 10.0)
        return {
            "preset": self.preset or ("tiny" if quick or not has_cuda else "1b"),
            "duration_s": self.duration_s or (20.0 if quick else 60.0),
            "idle_s": idle_s,
            "end_idle_s": idle_s * END_IDLE_SHARE,
            "cooldown_s": self.cooldown_s if self.cooldown_s is not None else (2.0 if quick else 10.0),
        }

    def needs_cuda_check(self) -> bool:
        """Whether the default preset depends on a CUDA device (asking imports torch)."""
        return self.preset is None and not self.quick

    def session_options(self) -> SessionOptions:
        return SessionOptions(output_dir=self.output_dir, backend=self.backend, mock_gpus=self.mock_gpus,
                              interval_s=self.interval_s, address=self.address, port=self.port)


class StopRequest(threading.Event):
    """A stop flag that remembers why and when it was first set (``request``), so the run directory can
    say that a phase was interrupted, by what, and after how long. ``set()`` alone counts as a request with
    no reason (a test, or code that only has the event)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None
        self.requested_ns: int | None = None

    def request(self, reason: str) -> None:
        if self.requested_ns is None:  # a second Ctrl-C does not move the moment the run was cut
            self.reason, self.requested_ns = reason, time.monotonic_ns()
        self.set()


def _stop_fields(stop: threading.Event) -> dict:
    """What a phase_end event records about an interruption: the reason and the moment it was asked for
    (host monotonic ns), where the stop flag knows them."""
    return {"stop_reason": getattr(stop, "reason", None) or "stop requested",
            "stop_requested_ns": getattr(stop, "requested_ns", None) or time.monotonic_ns()}


class LiveState:
    """What the progress display shows; written by the bench loop, read by the display thread."""

    def __init__(self, agent):
        self.agent = agent
        self.phase = "starting"
        self.phase_started = time.monotonic()
        self.phase_seconds = 0.0
        self.last_tokens: tuple[float, int] | None = None

    def enter(self, phase: str, seconds: float) -> None:
        self.phase, self.phase_started, self.phase_seconds = phase, time.monotonic(), seconds

    def figures(self) -> tuple[float | None, float | None]:
        """(the GPUs' power in watts, the phase's tokens per second since the last call)."""
        total = sum(self.agent.workload_figures(self.phase).tokens.values())
        now = time.monotonic()
        rate = None
        if self.last_tokens is not None and now > self.last_tokens[0]:
            rate = (total - self.last_tokens[1]) / (now - self.last_tokens[0])
        self.last_tokens = (now, total)
        return self.agent.power_watts(), rate


def run_bench(options: BenchOptions, stop: threading.Event, pricing, console) -> tuple[Path, dict]:
    """Run the benchmark; returns the run directory and its summary (partial if ``stop`` was set or a
    regime failed). SessionError (one line) when there is no GPU backend, no run directory or no port."""
    regimes = [registry.regime(name) for name in options.workloads]
    for regime in regimes:
        regime.load()  # a regime's first import (torch: seconds) must not fall inside its measured phase
    settings = options.resolved(options.needs_cuda_check() and registry.cuda_available())
    session = MeasurementSession.open(options.session_options())
    all_settings = {**settings, "workloads": list(options.workloads), "device": options.device,
                    "sampling_interval_seconds": options.interval_s, "quick": options.quick,
                    "seed": options.seed, "versions": versions(), **timing_settings(session, options)}
    session.record_run_start(all_settings)
    say = _Say(console)
    for note in session.notes:
        say(note)
    state = LiveState(session.agent)
    session.start()
    console.print(f"wattledger bench: metrics at {session.metrics_url}; run directory {session.run_dir}",
                  markup=False, highlight=False)
    display = _Display(state, console)
    display.start()
    failed: list[str] = []
    try:
        context = _hold_cuda_context(session, options.device, say)
        plan = _plan(settings, regimes)
        for number, (phase, seconds) in enumerate(plan):
            if stop.is_set():
                break
            state.enter(phase, seconds)
            if not _measure_phase(session, phase, seconds, settings["preset"], options, stop, say, context):
                failed.append(phase)
            if number < len(plan) - 1 and not stop.is_set():
                state.enter("cooldown", settings["cooldown_s"])
                stop.wait(settings["cooldown_s"])
        session.drain()
    finally:
        display.stop()
        session.close("partial" if stop.is_set() or failed else "complete",
                      **({"failed_regimes": failed} if failed else {}))
    return session.run_dir, session.publish(pricing, all_settings, regimes=tuple(options.workloads))


def simulated_device_of(session: MeasurementSession, options: BenchOptions) -> str | None:
    """The mock preset whose device time the regimes run on, or None: on real GPUs, and with --cpu-timing."""
    return session.mock_preset if session.simulated and not options.cpu_timing else None


def timing_settings(session: MeasurementSession, options: BenchOptions) -> dict:
    """What run_start's settings record of the regimes' clock: "simulated" (with the GPU and the timing
    model) or "cpu" (the mock driven by the CPU's own time); nothing on real GPUs."""
    if not session.simulated:
        return {}
    device = simulated_device_of(session, options)
    if device is None:
        return {"timing": "cpu"}
    return {"timing": "simulated", "simulated_device": device, "timing_preset": TIMING_PRESET}


def _plan(settings: dict, regimes) -> list[tuple[str, float]]:
    """(phase, seconds) in order: the opening idle baseline, each regime, the closing idle baseline (left
    out when its length is 0)."""
    plan = [(IDLE_PHASE, settings["idle_s"])] + [(regime.name, settings["duration_s"]) for regime in regimes]
    if settings["end_idle_s"] > 0:
        plan.append((IDLE_END_PHASE, settings["end_idle_s"]))
    return plan


class _Say:
    """Prints "wattledger: ..." lines, each distinct line once (an attribution note would repeat per regime)."""

    def __init__(self, console):
        self.console = console
        self.said: set[str] = set()

    def __call__(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            self.console.print(f"wattledger: {text}", markup=False, highlight=False)


def _hold_cuda_context(session: MeasurementSession, device: str, say) -> dict:
    """Create this process's CUDA context on the workloads' device before the idle baseline, so the idle
    watts include what a held context costs (the regimes hold one throughout). Returns what the idle
    phases' phase_start records: ``cuda_context_held`` and, when it is not held, why. Skipped on the mock
    (it has no context cost) and when the workloads run on the CPU; a CUDA error is said, not raised (the
    regimes then fail on their own, each recorded)."""
    if session.simulated:
        return {"cuda_context_held": False, "cuda_context_note": "mock GPU: no CUDA context is created"}
    if not session.agent.devices():
        return {"cuda_context_held": False, "cuda_context_note": "NVML lists no GPU yet"}
    try:
        indices = registry.hold_cuda_context(device)
    except Exception as err:  # noqa: BLE001 - measure the idle baseline anyway, and say why
        reason = f"{type(err).__name__}: {first_line(err)}"
        say(f"cannot create a CUDA context on {device!r} before the idle baseline ({reason}): it is measured "
            "without one")
        return {"cuda_context_held": False, "cuda_context_note": f"creating it failed: {reason}"}
    if not indices:
        return {"cuda_context_held": False, "cuda_context_note": "the workloads run on the CPU"}
    return {"cuda_context_held": True, "cuda_devices": indices}


def _measure_phase(session: MeasurementSession, phase: str, seconds: float, preset: str, options: BenchOptions,
                   stop: threading.Event, say, context: dict) -> bool:
    """One phase between its phase_start and phase_end events: an idle baseline (a wait, with ``context``
    recorded), or a regime run at its defaults on the GPUs it is charged for, reporting in-process to the
    session's agent. False when the regime's workload raised (recorded as failed, said in one line)."""
    if phase in IDLE_PHASES:
        session.event("phase_start", phase=phase, planned_seconds=seconds, **context)
        stop.wait(seconds)
        session.event("phase_end", phase=phase, workload_summary={}, **_interruption(stop))
        return True
    attribution = session.attribute(options.device)
    if attribution.note:
        say(attribution.note)
    session.event("phase_start", phase=phase, planned_seconds=seconds, gpus=list(attribution.gpus),
                  gpu_attribution=attribution.method)
    summary, failure = _run_regime(session, phase, seconds, preset, options, stop, attribution.gpus)
    if failure:
        _release_cuda_memory()
        say(f"bench: the {phase} regime failed ({failure['failure_reason']}); going on without it")
    session.event("phase_end", phase=phase, workload_summary=_compact(summary), **_interruption(stop), **failure)
    return not failure


def _run_regime(session: MeasurementSession, phase: str, seconds: float, preset: str, options: BenchOptions,
                stop: threading.Event, gpus) -> tuple[dict, dict]:
    """The regime's workload, reporting on ``gpus``: (its summary, {}) or, when it raised, ({}, the failure's
    phase_end fields). The reporter is stopped either way."""
    reporter = AccountingReporter(session.agent.accounting_api(), phase, list(gpus))
    reporter.start(pid=os.getpid())
    try:
        return registry.regime(phase).run_as_benchmarked(
            reporter, stop, preset=preset, duration_s=seconds, device=options.device, seed=options.seed,
            gpus=list(gpus), simulated_device=simulated_device_of(session, options),
            timing_preset=TIMING_PRESET), {}
    except Exception as err:  # noqa: BLE001 - KeyboardInterrupt and SystemExit are not Exception: they stop the bench
        return {}, {"failed": True, "failure_reason": f"{type(err).__name__}: {first_line(err)}",
                    "failure_traceback": "".join(traceback.format_exception(err)[-TRACEBACK_LINES:])}
    finally:
        reporter.stop()


def _interruption(stop: threading.Event) -> dict:
    """A phase_end's ``interrupted`` and, when set, the stop's fields. A workload returns early when stop
    is set, so a set flag at the phase's end means the phase was cut short."""
    interrupted = _stop_fields(stop) if stop.is_set() else {}
    return {"interrupted": bool(interrupted), **interrupted}


def _release_cuda_memory() -> None:
    """After a failed regime: drop what its frames held (gc) and hand the CUDA caching allocator's free
    blocks back to the driver, so an out-of-memory in one regime does not starve the next. torch is used
    only if it is already loaded and has a CUDA context (this module never imports it)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _compact(summary: dict) -> dict:
    """The workload summary without per-request or per-step records (they stay in the workload's output)."""
    return {k: v for k, v in summary.items() if k not in ("requests", "steps_trace", "loss_log", "checkpoints")}


class _Display:
    """A rich live line: phase, elapsed, live power and tokens/s; refreshed by its own thread."""

    def __init__(self, state: LiveState, console):
        self.state = state
        self.console = console
        self._live = None

    def _render(self):
        from rich.text import Text

        s = self.state
        elapsed = time.monotonic() - s.phase_started
        power, rate = s.figures()
        simulated = "SIMULATED " if s.agent.simulated else ""
        power_text = f"{power:,.0f} W" if power is not None else "n/a"
        rate_text = f"{rate:,.0f} tok/s" if rate is not None and s.phase not in ("idle", "cooldown") else "-"
        return Text(f"{s.phase:>9}  {elapsed:5.1f}/{s.phase_seconds:.0f} s  {simulated}power {power_text}  "
                    f"{rate_text}")

    def start(self) -> None:
        from rich.live import Live

        if not self.console.is_terminal:
            return
        self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=2, transient=True)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
