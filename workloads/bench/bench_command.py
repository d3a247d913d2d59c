"""``wattledger bench``: measure what training, chat serving and agentic sessions cost on this machine.

One process: the agent's sampler runs in-process (serving /metrics, so a Prometheus can watch), an idle
baseline is measured, then each regime's workload runs in turn with a cooldown between. Everything is
recorded into a run directory as it happens (``workloads/bench/rundata.py``); at the end, or when interrupted,
``analysis.summarize`` turns the raw files into ``summary.json`` and ``report.render_report`` into
``report.html``. Without an NVIDIA GPU the mock GPU stands in, driven by the workloads' spans, and every
output says SIMULATED on its first line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent
from wattledger.agent.span_activity import SpanActivitySource
from wattledger.probes.mock import MockGpuBackend
from wattledger.exporters.jsonl import JsonlRecorder, JsonlWriter

REGIMES = ("training", "chat", "agentic")
# The span-driven mock simulates time t once t is this old (its lag): a span counts by its own timestamps
# if it reaches the mock within the lag of its start. Training announces each step when it starts (never
# late: its steps took up to 1.02 s beside 6 busy processes on 2 cores); chat and agentic steps reach the
# mock when they end, and took at most about 0.6 s there. Later spans are counted ("late spans" in the
# run's checks), never silently lost.
MOCK_DELAY_SECONDS = 1.0


@dataclass
class BenchOptions:
    workloads: tuple[str, ...] = REGIMES
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

    def resolved(self, has_cuda: bool) -> dict:
        quick = self.quick
        return {
            "preset": self.preset or ("tiny" if quick or not has_cuda else "1b"),
            "duration_s": self.duration_s or (20.0 if quick else 60.0),
            "idle_s": self.idle_s if self.idle_s is not None else (8.0 if quick else 10.0),
            "cooldown_s": self.cooldown_s if self.cooldown_s is not None else (2.0 if quick else 10.0),
        }


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


def _rapl_status(agent: Agent) -> list[dict]:
    """The host probe's RAPL entries (readable or why not), so the summary can say why it has no CPU energy."""
    if agent.host is None:
        return [{"name": "rapl", "supported": False, "reason": "no host probe"}]
    return [{"name": st.name, "supported": st.supported, "reason": st.reason} for st in agent.host.field_status()
            if st.name == "rapl" or st.name.startswith("rapl:")]


class RunRecorder:
    """Writes the raw files of a run directory while the run goes on."""

    def __init__(self, run_dir: Path, agent: Agent):
        run_dir.mkdir(parents=True, exist_ok=False)
        self.run_dir = run_dir
        self.agent = agent
        gpu = agent.gpu
        self.samples = JsonlRecorder(run_dir / "samples.jsonl", gpu.name if gpu else None, agent.simulated,
                                     gpu.devices() if gpu else [], agent.config.interval_seconds)
        self.spans = JsonlWriter(run_dir / "spans.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl", flush_interval_seconds=0.0)
        agent.sampler.add_sink(self._on_tick)
        agent.accounting.add_span_listener(lambda span: self.spans.write(span.to_json()))

    def _on_tick(self, gpu_samples, host_sample) -> None:
        self.samples.write_samples(gpu_samples, host_sample)
        counts = {f"{name}/{kind}": n for (name, kind), n in self.agent.accounting.tokens().items()}
        extra = [{"type": "tokens", "monotonic_ns": time.monotonic_ns(), "counts": counts}]
        if isinstance(self.agent.gpu, MockGpuBackend) and gpu_samples:
            # Ground truth at the simulated time the samples were taken (tests compare against it).
            extra.append({"type": "truth", "monotonic_ns": gpu_samples[0].monotonic_ns, "energy_joules": [
                self.agent.gpu.true_energy_joules(i) for i in range(len(gpu_samples))]})
        self.samples.write_records(extra)

    def event(self, type_: str, **fields) -> None:
        self.events.write({"type": type_, "monotonic_ns": time.monotonic_ns(), **self._mock_lateness(), **fields})

    def _mock_lateness(self) -> dict:
        """The span-driven mock's late spans so far (cumulative; a phase's are its phase_end's less its
        phase_start's), and its lag. Empty when the GPU is not the span-driven mock."""
        gpu = self.agent.gpu
        source = gpu.activity_source if isinstance(gpu, MockGpuBackend) else None
        if not isinstance(source, SpanActivitySource):
            return {}
        late = source.late()
        return {"mock_late_spans": late.spans, "mock_late_span_seconds": late.seconds,
                "mock_lag_seconds": gpu.lag_seconds}

    def close(self) -> None:
        self.samples.close()
        self.spans.close()
        self.events.close()


def new_run_dir(output_dir: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output_dir / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = output_dir / f"{stamp}-{suffix}"
    return path


def point_latest(run_dir: Path) -> None:
    """``runs/latest`` -> the newest run (replaced atomically)."""
    link = run_dir.parent / "latest"
    temporary = run_dir.parent / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name)
    os.replace(temporary, link)


def _versions() -> dict:
    import torch

    from wattledger.agent.version import VERSION

    return {"wattledger": VERSION, "python": platform.python_version(), "torch": torch.__version__}


def build_outputs(run_dir: Path, pricing, settings: dict | None = None, kind: str = "bench",
                  regimes=REGIMES) -> dict:
    """Raw files -> Parquet tables, summary.json and report.html. Used at the end and by ``report``."""
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.report import render_report
    from wattledger.workloads.bench.rundata import load_run, write_parquet

    run = load_run(run_dir)
    write_parquet(run)
    summary = summarize(run, pricing, kind=kind, regimes=regimes, settings=settings)
    temporary = run_dir / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2, default=_json_default))
    os.replace(temporary, run_dir / "summary.json")
    render_report(run, summary, run_dir / "report.html")
    return summary


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class LiveState:
    """What the progress display shows; written by the bench loop, read by the display thread."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.phase = "starting"
        self.phase_started = time.monotonic()
        self.phase_seconds = 0.0
        self.last_tokens: tuple[float, int] | None = None

    def figures(self) -> tuple[float | None, float | None]:
        snapshot = self.agent.ledger.snapshot()
        powers = [g.last.power_watts for g in snapshot.gpus if g.up and g.last and g.last.power_watts is not None]
        total = sum(n for (name, kind), n in snapshot.workload_tokens.items() if name == self.phase)
        now = time.monotonic()
        rate = None
        if self.last_tokens is not None and now > self.last_tokens[0]:
            rate = (total - self.last_tokens[1]) / (now - self.last_tokens[0])
        self.last_tokens = (now, total)
        return (sum(powers) if powers else None), rate


def run_bench(options: BenchOptions, stop: threading.Event, pricing, console) -> tuple[Path, dict]:
    """Run the benchmark; returns the run directory and its summary (partial if ``stop`` was set)."""
    import torch

    from wattledger.workloads import agentic, chat, training
    from wattledger.workloads.common import RunOptions, configure_cpu_threads
    from wattledger.workloads.reporter import AccountingReporter

    settings = options.resolved(torch.cuda.is_available())
    agent_config = build_config({
        "backend": options.backend, "mock_gpus": options.mock_gpus, "mock_delay": MOCK_DELAY_SECONDS,
        "interval": options.interval_s, "address": options.address, "port": options.port,
    }, {})
    agent = Agent(agent_config)
    if agent.gpu is None:
        agent.stop()
        raise ValueError("; ".join(agent.notes) or "no GPU backend could be opened")
    run_dir = new_run_dir(options.output_dir)
    recorder = RunRecorder(run_dir, agent)
    simulated = agent.simulated
    for note in agent.notes:
        console.print(f"wattledger: {note}", markup=False, highlight=False)
    modules = {"training": training, "chat": chat, "agentic": agentic}
    all_settings = {**settings, "workloads": list(options.workloads), "device": options.device,
                    "sampling_interval_seconds": options.interval_s, "quick": options.quick,
                    "seed": options.seed, "versions": _versions()}
    recorder.event("run_start", wall_time=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   backend=agent.gpu.name if agent.gpu else None, simulated=simulated, settings=all_settings,
                   host={"hostname": socket.gethostname(), "machine": platform.machine(),
                         "cpus": os.cpu_count()}, rapl=_rapl_status(agent))
    state = LiveState(agent)
    agent.start()
    console.print(f"wattledger bench: metrics at {agent.metrics_url}; run directory {run_dir}", markup=False,
                  highlight=False)
    display = _Display(state, console)
    display.start()
    status = "complete"
    try:
        plan = [("idle", settings["idle_s"])] + [(name, settings["duration_s"]) for name in options.workloads]
        for number, (phase, seconds) in enumerate(plan):
            if stop.is_set():
                break
            state.phase, state.phase_started, state.phase_seconds = phase, time.monotonic(), seconds
            recorder.event("phase_start", phase=phase, planned_seconds=seconds)
            summary = {}
            if phase == "idle":
                stop.wait(seconds)
            else:
                run_options = RunOptions(preset=settings["preset"], duration_s=seconds, device=options.device,
                                         seed=options.seed, gpus=[g.index for g in agent.gpu.devices()] or [0])
                configure_cpu_threads(run_options)
                reporter = AccountingReporter(agent.accounting, phase, run_options.gpus)
                reporter.start(pid=os.getpid())
                module = modules[phase]
                try:
                    summary = module.run(module_default_config(module), run_options, reporter, stop)
                finally:
                    reporter.stop()
            # A workload returns early when stop is set, so a set flag here means the phase was cut short.
            interrupted = _stop_fields(stop) if stop.is_set() else {}
            recorder.event("phase_end", phase=phase, workload_summary=_compact(summary),
                           interrupted=bool(interrupted), **interrupted)
            if number < len(plan) - 1 and not stop.is_set():
                state.phase, state.phase_started, state.phase_seconds = "cooldown", time.monotonic(), settings["cooldown_s"]
                stop.wait(settings["cooldown_s"])
        if stop.is_set():
            status = "partial"
        # The span-driven mock simulates a little behind: let its samples cover the last phase.
        time.sleep(MOCK_DELAY_SECONDS + 3 * options.interval_s)
    finally:
        display.stop()
        recorder.event("run_end", status=status)
        agent.stop()
        recorder.close()
    point_latest(run_dir)
    summary = build_outputs(run_dir, pricing, all_settings, regimes=tuple(options.workloads))
    return run_dir, summary


def module_default_config(module):
    """Each workload's config with its defaults (the bench measures the regimes as shipped), its log lines
    off: the progress line and the summary table speak for the run."""
    for name in ("TrainingConfig", "ChatConfig", "AgenticConfig"):
        if hasattr(module, name):
            config = getattr(module, name)()
            if hasattr(config, "log_every"):
                config.log_every = 0
            return config
    raise ValueError(f"{module.__name__} has no config class")


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
