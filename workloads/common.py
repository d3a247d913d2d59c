"""What every workload shares: run options, the summary's common part, seeding and thread settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from wattledger.workloads.model import ModelConfig, default_dtype, model_config, pick_device


@dataclass
class RunOptions:
    """Options every workload takes (``wattledger workload NAME --preset --duration --device --seed``)."""

    preset: str = "tiny"
    duration_s: float = 30.0
    device: str = "auto"
    seed: int = 0
    compile: bool = False  # torch.compile the decode step / train step (CUDA graphs on GPU)
    gpus: list[int] = field(default_factory=lambda: [0])  # GPU indices reported to the agent

    def resolve(self) -> tuple[ModelConfig, torch.device, torch.dtype]:
        device = pick_device(self.device)
        return model_config(self.preset), device, default_dtype(device)


def configure_cpu_threads(options: RunOptions) -> None:
    """One intra-op thread for the tiny preset on CPU.

    Its matrices are too small to gain from threads, and on a shared or small machine the extra threads
    only wait on each other: a 1 ms decode step was seen taking 45 ms with 2 threads under load.
    """
    if options.preset == "tiny" and pick_device(options.device).type == "cpu":
        torch.set_num_threads(1)


def seed_everything(seed: int) -> random.Random:
    """Seed torch and return a private ``random.Random`` for the workload's own sampling."""
    torch.manual_seed(seed)
    return random.Random(seed)


def summary_header(workload: str, options: RunOptions, device: torch.device, dtype: torch.dtype,
                   duration_seconds: float, tokens: dict[str, int]) -> dict:
    """The part of every workload summary that is the same for all (``--json`` prints the whole dict)."""
    return {
        "workload": workload,
        "preset": options.preset,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "duration_seconds": round(duration_seconds, 3),
        "tokens": {"prompt": tokens.get("prompt", 0), "generated": tokens.get("generated", 0),
                   "trained": tokens.get("trained", 0)},
    }


def percentiles(values: list[float], qs=(0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Nearest-rank percentiles, keyed p50/p90/p99; None when there are no values."""
    if not values:
        return {f"p{round(q * 100)}": None for q in qs}
    ordered = sorted(values)
    return {f"p{round(q * 100)}": ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] for q in qs}
