"""What every workload shares: run options, the summary's common part, seeding and thread settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from wattledger.workloads.model import ModelConfig, default_dtype, model_config, pick_device


@dataclass(frozen=True)
class SimulatedTiming:
    """Run on a simulated device's time (``workloads/device_time.py``, ``workloads/paced_clock.py``).

    ``device``: the mock preset it simulates ("h100-sxm-80gb", "h200-141gb"); ``timing_preset``: the model
    whose work sets each step's device time and activity ("8b"), which may be larger than the one the CPU
    computes (``RunOptions.preset``, e.g. "tiny"): the CPU still runs a real model for the tokens and the
    control flow (arrivals, batching, tool calls, spill)."""

    device: str = "h100-sxm-80gb"
    timing_preset: str = "8b"


@dataclass
class RunOptions:
    """Options every workload takes (``wattledger workload NAME --preset --duration --device --seed``)."""

    preset: str = "tiny"
    duration_s: float = 30.0
    device: str = "auto"
    seed: int = 0
    compile: bool = False  # torch.compile the decode step / train step (CUDA graphs on GPU)
    gpus: list[int] = field(default_factory=lambda: [0])  # GPU indices reported to the agent
    # On the mock GPU: the simulated device the workload's timing follows (issue 14), or None (the CPU's own
    # time, as before). See ``SimulatedTiming``.
    simulation: SimulatedTiming | None = None

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


UUID_BYTES = 16  # a CUDA device UUID (cudaUUID_t: char bytes[16], cuda_runtime_api.h)


def cuda_devices_of(device: str) -> list[int]:
    """The torch CUDA device indices a workload run on ``device`` uses: one (``cuda:N``, or the current
    device for ``cuda`` and ``auto``), or none when it runs on the CPU. torch's numbering: under
    ``CUDA_VISIBLE_DEVICES`` the runtime renumbers the visible GPUs from 0, so an index here is not an NVML
    index (``cuda_uuid`` is what ties the two)."""
    resolved = pick_device(device)
    if resolved.type != "cuda":
        return []
    return [resolved.index if resolved.index is not None else torch.cuda.current_device()]


def cuda_uuid(index: int) -> str | None:
    """The UUID the CUDA runtime gives torch device ``index``, as text, or None when this torch has none.

    ``torch.cuda.get_device_properties(i).uuid`` is a ``_CUuuid`` (torch >= 1.10, in 2.11-2.13) whose
    ``bytes`` are the 16 bytes of ``cudaDeviceProp.uuid`` and whose ``str()`` is them as 8-4-4-4-12 hex
    (torch/csrc/cuda/Module.cpp), without NVML's ``GPU-`` (or ``MIG-``) prefix. The bytes are read when
    there, so the text does not depend on how a torch release prints the object; the caller compares hex
    digits only."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    raw = getattr(uuid, "bytes", None)  # _CUuuid.bytes: the 16 bytes as a list of ints
    if isinstance(raw, (bytes, bytearray, list, tuple)) and len(raw) == UUID_BYTES:
        text = bytes(raw).hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    return str(uuid)


def hold_cuda_context(indices: list[int]) -> None:
    """Create this process's CUDA context on each torch device in ``indices`` (a one-element allocation,
    then a synchronize, so the context is fully set up): an idle baseline measured after this includes
    what a held context costs, as the regimes' own idle gaps do (a GPU with a context is commonly seen in
    a higher performance state than a bare one; the first GPU run measures by how much: idle vs idle_end)."""
    for index in indices:
        device = torch.device("cuda", index)
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)


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
