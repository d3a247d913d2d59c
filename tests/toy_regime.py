"""A regime with no model and no torch: the workload protocol of ``workloads/registry.py`` and nothing else.

Each step "generates" ``tokens_per_step`` tokens: it reports them and a compute span through the reporter
and waits ``step_seconds`` (the span's length). ``tests/test_regime_registry.py`` registers it with one
registry line and runs it through ``wattledger workload`` and ``wattledger bench``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from wattledger.probes.activity import Activity

STEP_ACTIVITY = Activity(gpu=1.0, sm=0.5, tensor=0.3, dram=0.4)  # what the mock GPU shows during a step


@dataclass
class ToyConfig:
    step_seconds: float = 0.05
    tokens_per_step: int = 16


def add_arguments(parser) -> None:
    parser.add_argument("--tokens-per-step", type=int, default=ToyConfig.tokens_per_step)


def config_from_args(args) -> ToyConfig:
    if args.tokens_per_step < 1:
        raise ValueError("--tokens-per-step must be at least 1")
    return ToyConfig(tokens_per_step=args.tokens_per_step)


def run(config: ToyConfig, options, reporter, stop) -> dict:
    """Steps until ``options.duration_s`` has passed or ``stop`` is set; the summary of what ran."""
    started_ns = time.monotonic_ns()
    deadline_ns = started_ns + round(options.duration_s * 1e9)
    steps = 0
    while not stop.is_set() and time.monotonic_ns() < deadline_ns:
        step_start_ns = time.monotonic_ns()
        stop.wait(config.step_seconds)
        reporter.span("compute", step_start_ns, time.monotonic_ns(), STEP_ACTIVITY)
        reporter.add_tokens("generated", config.tokens_per_step)
        steps += 1
    return {"workload": "toy", "device": "none", "steps": steps,
            "duration_seconds": round((time.monotonic_ns() - started_ns) / 1e9, 3), "tokens": dict(reporter.tokens)}
