"""The regimes wattledger ships, one record each: the only list of them in the code.

A regime is a module with the workload protocol (below) and a :class:`Regime` record in ``REGIMES``. The
workload command (``wattledger workload NAME``), the benchmark (``wattledger bench --workloads``), the
analysis (main token kind, per-unit energy) and the report (order, colour) all read this table, so a new
regime is one new module and one line here (``tests/test_regime_registry.py`` adds a toy one to prove it).

Importing this module imports no torch: a regime's module is imported only when :meth:`Regime.load` is
called, when the regime is about to run or its flags are about to be parsed, and torch itself only by the
calls that need it (:meth:`Regime.run_as_benchmarked`, :func:`cuda_available`, and the bench's two CUDA
questions: :func:`cuda_devices`, the device UUIDs it matches to NVML's, and :func:`hold_cuda_context`).
So the measurement (``workloads/bench/``) reaches every regime through this table and never imports one.

The workload protocol (what :meth:`Regime.load` returns)::

    add_arguments(parser)                       # the regime's own flags for `wattledger workload NAME`
    config_from_args(args) -> Config            # those flags as its config (ValueError: one-line usage error)
    run(config, options, reporter, stop) -> dict  # runs until options.duration_s or stop; its summary
    <config_class>()                            # the config with its defaults (what the benchmark runs)

``options`` is ``workloads.common.RunOptions`` (preset, duration_s, device, seed, compile, gpus, simulation);
``reporter`` a ``workloads.reporter.Reporter`` (tokens and spans go there, never to the agent directly);
``stop`` a ``threading.Event``: return early, with a summary of what ran, once it is set.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType, ModuleType


@dataclass(frozen=True)
class PerUnitEnergy:
    """A regime's energy per unit of work besides joules per token (a chat request, an agentic session).

    ``summary_key`` is the field of the regime's summary (``joules_per_request``); ``unit`` names one unit
    in the reasons the analysis gives when the figure is missing ("request", "session"); ``count_key`` is
    the workload summary's count of completed units, ``started_key`` that of started ones (None if the
    workload does not report it). ``from_tokens``: the figure is joules per main token x main tokens per
    unit (over the steady window), else the whole phase's energy over completed units."""

    summary_key: str
    unit: str
    count_key: str
    started_key: str | None
    from_tokens: bool


@dataclass(frozen=True)
class Regime:
    """One regime: what every command needs to know of it without importing it."""

    name: str
    module: str  # the import path of its module (workload protocol above)
    config_class: str  # the name of its config dataclass in that module
    summary: str  # one line, for --help and the report
    main_token_kind: str  # the token kind joules per token is quoted for: "trained" or "generated"
    color: str  # its colour in the report's figures (hex)
    per_unit: PerUnitEnergy | None = None
    # Config fields the benchmark sets (dataclasses.replace) only when the regime runs on a simulated
    # device's time (run_as_benchmarked with simulated_device): its load on a simulated GPU differs from
    # what suits the CPU's own time.
    simulated_overrides: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def load(self) -> ModuleType:
        """The regime's module (imports torch)."""
        return importlib.import_module(self.module)

    def default_config(self, quiet: bool = True):
        """The regime's config with its defaults, as the benchmark runs it; ``quiet`` turns its own log
        lines off (the benchmark's progress line and table speak for the run)."""
        config = getattr(self.load(), self.config_class)()
        if quiet and hasattr(config, "log_every"):
            config.log_every = 0
        return config

    def run_as_benchmarked(self, reporter, stop: threading.Event, *, preset: str, duration_s: float, device: str,
                           seed: int, gpus: Sequence[int], simulated_device: str | None = None,
                           timing_preset: str = "8b") -> dict:
        """Run the regime as the benchmark measures it: its default config (quiet), for ``duration_s``
        seconds or until ``stop``, reporting through ``reporter`` (already started). Returns its summary.
        ``simulated_device``: the mock preset whose device time the regime runs on, with ``timing_preset``
        the model whose work sets it (``workloads.common.SimulatedTiming``, issue 14); None: the CPU's time.

        The run options are the regimes' own type (``workloads.common``, which imports torch), built here
        so that the measurement never imports a regime module itself."""
        from wattledger.workloads.common import RunOptions, SimulatedTiming, configure_cpu_threads

        simulation = (SimulatedTiming(device=simulated_device, timing_preset=timing_preset)
                      if simulated_device is not None else None)
        options = RunOptions(preset=preset, duration_s=duration_s, device=device, seed=seed, gpus=list(gpus),
                             simulation=simulation)
        configure_cpu_threads(options)
        config = self.default_config()
        if simulation is not None and self.simulated_overrides:
            config = replace(config, **self.simulated_overrides)
        return self.load().run(config, options, reporter, stop)


# ASSUMPTION: one chat replica's mean arrival rate on a simulated GPU (requests/s, 8b on an H100 SXM with the
# trace's real lengths: the token scale in workloads/simulated_serving.py). Azure 2023's 5.53 req/s
# (ChatConfig's default) is the whole conversation service's traffic over an unknown number of replicas; a
# replica is sized for the diurnal peak (2.5x the trough), so off-peak it is mostly idle. One 8b request
# alone keeps the H100 busy about 1.5-2 s (a few hundred decode passes of ~7 ms), so the rate is set where a
# 20 s quick run from the trough leaves it idle more than half the time on seeds 0, 1 and 2 (measured busy
# fractions 0.19, 0.40, 0.04 at 0.25; 0.19, 0.50, 0.04 at 0.3; 0.37, 0.55, 0.08 at 0.5): 5.53 / 0.25 is
# about 22 replicas for the service.
CHAT_SIMULATED_RATE_PER_S = 0.25

REGIMES: Mapping[str, Regime] = {regime.name: regime for regime in (
    Regime("training", "wattledger.workloads.training", "TrainingConfig",
           "sustained synchronised training steps (AdamW, bf16 autocast, DDP, checkpoints)", "trained", "#1f5fa8"),
    Regime("chat", "wattledger.workloads.chat", "ChatConfig",
           "human chat serving: diurnal, bursty arrivals served with continuous batching", "generated", "#d9731a",
           PerUnitEnergy("joules_per_request", "request", "requests_completed", None, from_tokens=True),
           simulated_overrides=MappingProxyType({"mean_rate_per_s": CHAT_SIMULATED_RATE_PER_S})),
    Regime("agentic", "wattledger.workloads.agentic", "AgenticConfig",
           "agentic sessions: long contexts, tool calls that idle the GPU, KV spill to host", "generated",
           "#2a9150",
           PerUnitEnergy("joules_per_session", "session", "sessions_completed", "sessions_started",
                         from_tokens=False)),
)}

# What the benchmark runs when --workloads is not given: every regime, in this order.
DEFAULT_REGIMES: tuple[str, ...] = tuple(REGIMES)

# A profiled command (``wattledger run``) is one phase named after its workload: its colour in the report.
COMMAND_COLOR = "#7a4fb0"


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device. Imports torch, so only when called: the
    benchmark asks it to pick its default preset, just before it runs the (torch) regimes anyway."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def cuda_devices(device: str) -> list[tuple[int, str | None]]:
    """(torch index, CUDA UUID or None) of each CUDA device a regime run on ``device`` uses; empty when it
    runs on the CPU. Imports torch (``workloads.common``), so only when a regime is about to run."""
    from wattledger.workloads import common

    return [(index, common.cuda_uuid(index)) for index in common.cuda_devices_of(device)]


def hold_cuda_context(device: str) -> list[int]:
    """Create the CUDA context on the device(s) a regime run on ``device`` uses (``common.hold_cuda_context``)
    and return their torch indices; nothing (empty) on the CPU. Imports torch."""
    from wattledger.workloads import common

    indices = common.cuda_devices_of(device)
    common.hold_cuda_context(indices)
    return indices


def regime(name: str) -> Regime:
    """The record of ``name``; KeyError names the regimes there are."""
    try:
        return REGIMES[name]
    except KeyError:
        raise KeyError(f"no regime {name!r}; there are: {', '.join(REGIMES)}") from None
