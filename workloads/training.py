"""Training: sustained, synchronised steps (AdamW, bf16 autocast, grad accumulation, DDP, checkpoints).

Reads like nanoGPT's ``train.py``: a config dataclass, setup, one loop, a log line every ``log_every``
steps with loss, step time, tokens/s and MFU. Runs alone or under ``torchrun`` (DDP: gloo on CPU, NCCL on
CUDA); every rank reports its own trained tokens and spans for its own GPU, rank 0 logs and returns the
summary.

    python -m wattledger.workloads.training --preset tiny --max-steps 50
    torchrun --nproc_per_node 2 -m wattledger.workloads.training --preset tiny --max-steps 5

The data is a synthetic token stream the model can learn (so the loss falls, as in real training): each
sequence walks a fixed random transition table, ``next = table[prev]`` with probability 0.9, else a
uniformly random token. Sequence ``j`` of a step's global batch is a pure function of (seed, step, j), so
rank ``r`` of ``W`` draws its own shard, and a resumed run sees the same data as an uninterrupted one.

Figures and their sources: docs/workload-figures.md, "Training".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wattledger.workloads.common import RunOptions, SimulatedTiming, percentiles, summary_header
from wattledger.workloads.memory_plan import GIB, TrainingMemoryPlan, WontFitError, plan_training_memory
from wattledger.workloads.model import ModelConfig, build_model, model_config, pick_device
from wattledger.workloads.paced_clock import NS_PER_S, PacedClock
from wattledger.workloads.reporter import TRAIN_ACTIVITY, Reporter

CHECKPOINT_MODES = ("sync", "async")

# Sequences per rank per micro-step and tokens per sequence when the config leaves them unset. tiny runs
# in milliseconds per step on a CPU (the tests); the others are sized to keep one H100's tensor cores busy
# without activation checkpointing. 8b needs more than one GPU's memory for fp32 AdamW (16 bytes/param):
# check_memory_fits refuses it up front with the arithmetic (workloads/memory_plan.py).
DEFAULT_BATCH_SHAPE: dict[str, tuple[int, int]] = {
    "tiny": (8, 64),
    "125m": (16, 1024),
    "1b": (4, 2048),
    "8b": (1, 4096),
}

# Dense bf16 tensor-core peak per GPU, FLOP/s, matched against torch.cuda.get_device_name() by substring.
# Sources: the NVIDIA H100 and H200 datasheets' "BFLOAT16 Tensor Core" rows, which give the figure with
# 2:4 sparsity; the dense peak is half of it. The plain names are the SXM parts ("NVIDIA H100 80GB HBM3",
# "NVIDIA H200"); the NVL and PCIe boards run lower clocks and power. The longest name contained in the
# device's name wins (peak_bf16_flops_for), so "NVIDIA H200 NVL" gets the NVL figure, not the SXM one,
# whatever the order here. (A GH200's name contains "H200": its GPU is SXM-class, 990 dense in the GH200
# datasheet, so the H200 figure is the right one for it too.)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989e12),  # H100 SXM: 1,979 TFLOPS with sparsity
    ("H100 PCIe", 756e12),  # 1,513 with sparsity
    ("H100 NVL", 835e12),  # 1,671 with sparsity
    ("H200", 989e12),  # H200 SXM: 1,979 with sparsity
    ("H200 NVL", 835e12),  # 1,671 with sparsity
)

# Steps the steady-state tokens/s and MFU leave out: the first step of every run (it pays for cuBLAS
# handles and workspaces, the caching allocator's growth and AdamW's lazily created moments, none of which
# recurs), and under --compile every step during which dynamo compiled a graph (_dynamo_graph_count).
WARMUP_STEPS = 1

# The synthetic stream follows the table with this probability, else draws a uniform token.
FOLLOW_PROBABILITY = 0.9


@dataclass
class TrainingConfig:
    """How to train (the model shape comes from ``RunOptions.preset``)."""

    batch_size: int | None = None  # sequences per rank per micro-step; None = DEFAULT_BATCH_SHAPE[preset]
    seq_len: int | None = None  # tokens per sequence; None = DEFAULT_BATCH_SHAPE[preset]
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    lr: float = 3e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices only (not norms), as nanoGPT does
    warmup_steps: int = 10  # linear warmup, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = never
    checkpoint_dir: str | None = None  # None = a temporary folder, removed at the end
    checkpoint_mode: str = "sync"  # "sync" (torch.save, loop blocked) or "async" (DCP async_save)
    peak_flops: float | None = None  # per-GPU peak for MFU, FLOP/s; None = PEAK_BF16_FLOPS by device name
    memory_limit_gib: float | None = None  # device memory the run must fit in, GiB (check_memory_fits); None =
    # what torch.cuda.mem_get_info reports free on CUDA, and no check on the CPU
    log_every: int = 10  # steps between log lines on rank 0; 0 = never
    max_steps: int | None = None  # stop when the step counter reaches this (a resumed run counts the
    # steps before its checkpoint); None = run for RunOptions.duration_s
    resume_from: str | None = None  # checkpoint (file for sync, folder for async) to continue from

    def validate(self, model: ModelConfig | None = None) -> None:
        """Raise ValueError, one line, naming the first bad value."""
        def positive_int(name: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
            if value is None and allow_none:
                return
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        positive_int("batch_size", self.batch_size, allow_none=True)
        positive_int("seq_len", self.seq_len, allow_none=True)
        positive_int("grad_accum_steps", self.grad_accum_steps)
        positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        positive_int("checkpoint_every", self.checkpoint_every, allow_zero=True)
        positive_int("log_every", self.log_every, allow_zero=True)
        positive_int("max_steps", self.max_steps, allow_none=True)
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value!r}")
        if self.checkpoint_mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint_mode must be one of {', '.join(CHECKPOINT_MODES)}, "
                             f"got {self.checkpoint_mode!r}")
        if self.peak_flops is not None and (isinstance(self.peak_flops, bool)
                                            or not isinstance(self.peak_flops, (int, float))
                                            or not math.isfinite(self.peak_flops) or self.peak_flops <= 0):
            raise ValueError(f"peak_flops must be a positive number of FLOP/s, got {self.peak_flops!r}")
        if self.memory_limit_gib is not None and (isinstance(self.memory_limit_gib, bool)
                                                  or not isinstance(self.memory_limit_gib, (int, float))
                                                  or not math.isfinite(self.memory_limit_gib)
                                                  or self.memory_limit_gib <= 0):
            raise ValueError(f"memory_limit_gib must be a positive number of GiB, got {self.memory_limit_gib!r}")
        if self.resume_from is not None and not os.path.exists(self.resume_from):
            raise ValueError(f"resume_from {self.resume_from!r} does not exist")
        if model is not None and self.seq_len is not None and self.seq_len > model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the {model.name} model's {model.max_seq_len}")

    def shape(self, preset: str) -> tuple[int, int]:
        """(batch_size, seq_len) with the preset's defaults filled in."""
        default_batch, default_seq = DEFAULT_BATCH_SHAPE.get(preset, DEFAULT_BATCH_SHAPE["tiny"])
        return (self.batch_size or default_batch, self.seq_len or default_seq)


# -- data ---------------------------------------------------------------------------------------------


class SyntheticTokens:
    """A learnable token stream: each sequence walks a fixed random table, ``next = table[prev]`` with
    probability 0.9, else a uniform token.

    The table is one random cycle through the whole vocabulary (``table[order[i]] = order[i + 1]``), so
    k steps along it are an index shift and a batch is built with a few tensor ops instead of a Python
    loop per token (that loop would cost milliseconds per step at 4K tokens).
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(vocab_size, generator=generator)  # the cycle
        self.position = torch.argsort(self.order)  # where each token sits on the cycle
        self.table = self.order[(self.position + 1) % vocab_size]  # table[prev] = next

    def loss_floor_nats(self) -> float:
        """Entropy of the next token given the previous one: the best mean loss any model can reach."""
        v, p = self.vocab_size, FOLLOW_PROBABILITY
        follow = p + (1 - p) / v
        other = (1 - p) / v
        return -(follow * math.log(follow) + (v - 1) * other * math.log(other))

    def batch(self, step: int, rank: int = 0, world: int = 1, batch_size: int = 1,
              micro_step: int = 0) -> torch.Tensor:
        """Sequences for one micro-step on one rank: int64 ``[batch_size, seq_len + 1]`` on the CPU
        (inputs are ``[:, :-1]``, targets ``[:, 1:]``).

        Step ``step``'s global batch is numbered micro-step-major then rank: rank ``r`` in micro-step
        ``m`` gets sequences ``(m * world + r) * batch_size + i``. So W ranks of batch B each together see
        exactly what one process of batch W*B sees, and accumulating A micro-steps of B equals one of A*B.
        """
        first = (micro_step * world + rank) * batch_size
        length = self.seq_len + 1
        generator = torch.Generator()
        fresh_draw = torch.empty(batch_size, length)
        fresh_token = torch.empty(batch_size, length, dtype=torch.long)
        for i in range(batch_size):
            # One seed per (run seed, step, sequence): odd 64-bit multipliers (splitmix64's constants)
            # keep neighbouring triples far apart.
            generator.manual_seed((self.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9
                                   + (first + i) * 0x94D049BB133111EB) % 2**63)
            fresh_draw[i] = torch.rand(length, generator=generator)
            fresh_token[i] = torch.randint(self.vocab_size, (length,), generator=generator)
        fresh = fresh_draw >= FOLLOW_PROBABILITY
        fresh[:, 0] = True  # every sequence opens with a uniform token
        index = torch.arange(length).expand(batch_size, length)
        last_fresh = torch.where(fresh, index, 0).cummax(dim=1).values
        start = self.position[fresh_token.gather(1, last_fresh)]
        return self.order[(start + index - last_fresh) % self.vocab_size]


# -- checkpoints --------------------------------------------------------------------------------------


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    data: dict | None = None) -> str:
    """Write model, optimizer, step and data position to ``path`` (one ``torch.save`` file).

    Written to ``path.tmp``, flushed to disk, then renamed over ``path``: a crash mid-write leaves the
    previous checkpoint intact, never a truncated one.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "data": dict(data or {}, next_step=step)}
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    process_group=None) -> int:
    """Restore ``model`` and ``optimizer`` in place from a checkpoint and return its step.

    A file is a ``save_checkpoint`` checkpoint; a folder is a torch.distributed.checkpoint (DCP) one,
    written by the async mode.
    """
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": 0}
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed:
            _quiet_single_process_dcp()
        dcp.load(state, checkpoint_id=path, process_group=process_group, no_dist=not distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return int(state["step"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _quiet_single_process_dcp() -> None:
    """DCP warns on every save and load without a process group, even with ``no_dist=True``, that it
    assumes a single process (torch 2.13, state_dict_saver.py/state_dict_loader.py): here that is the
    intent. The save warns from DCP's writer thread, so a ``catch_warnings`` block cannot reach it; this
    narrow filter matches that one message only."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)


class Checkpointer:
    """Saves every ``checkpoint_every`` steps and keeps the newest complete checkpoint only.

    sync: rank 0 writes a ``torch.save`` file while every rank waits at a barrier (the whole stall).
    async: ``torch.distributed.checkpoint.async_save`` copies the state to CPU memory (the stall), then
    writes it from a background thread while training goes on; the next save, and the end of the run,
    first wait for the previous write (also stall). Under DDP it uses its own gloo group: DCP needs a CPU
    backend, and sharing the group the gradients all-reduce on with a background thread is unsafe.
    """

    def __init__(self, folder: str, mode: str, rank: int, distributed: bool, device: torch.device):
        self.folder = folder
        self.rank = rank
        self.distributed = distributed
        self.mode_used = mode
        self.fallback_reason: str | None = None
        self.group = None
        self.pending = None  # (future, path) of the async write in flight
        self.latest: str | None = None  # newest complete checkpoint
        self.stager = None
        if mode == "async":
            try:
                import torch.distributed.checkpoint as dcp

                self._async_save = dcp.async_save
                if device.type == "cuda":
                    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                    # Pinned host buffers, allocated at the first save and reused after (they are free
                    # again once the previous write is waited for): the device-to-host copy, the part
                    # that blocks the loop, then runs at full PCIe speed. DCP's own default stages into
                    # fresh pageable memory on every save.
                    self.stager = DefaultStager(StagingOptions(
                        use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                        use_non_blocking_copy=False))
                if distributed:
                    self.group = dist.new_group(backend="gloo")
                else:
                    _quiet_single_process_dcp()
            except (ImportError, AttributeError, RuntimeError) as err:
                self._fall_back(f"torch.distributed.checkpoint.async_save unavailable: {err}")

    def _fall_back(self, reason: str) -> None:
        self.mode_used, self.fallback_reason = "sync", f"async checkpointing fell back to sync: {reason}"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, data: dict) -> str:
        if self.mode_used == "async":
            try:
                return self._save_async(model, optimizer, step, data)
            except Exception as err:  # noqa: BLE001 - any failure of the experimental API: say so, go sync
                self._fall_back(f"{type(err).__name__}: {err}".splitlines()[0])
        path = os.path.join(self.folder, f"step_{step:08d}.pt")
        if self.rank == 0:  # every rank holds the same replica: one writer is enough
            save_checkpoint(path, model, optimizer, step, data)
            self._completed(path)
        else:
            self.latest = path
        if self.distributed:
            dist.barrier()  # the other ranks wait for the write too: that is the stall they see
        return path

    def _save_async(self, model, optimizer, step, data) -> str:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()  # one write in flight at a time, as torchtitan does
        path = os.path.join(self.folder, f"step_{step:08d}")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": step,
                 "data": dict(data, next_step=step)}
        # Returns once the state is staged (deep-copied to CPU memory), so the loop may update the
        # parameters while the write goes on.
        future = self._async_save(state, checkpoint_id=path, process_group=self.group,
                                  async_stager=self.stager, no_dist=not self.distributed)
        self.pending = (future, path)
        return path

    def wait(self) -> None:
        """Block until the async write in flight (if any) is on disk."""
        if self.pending is not None:
            future, path = self.pending
            self.pending = None
            result = getattr(future, "upload_completion", future)  # AsyncSaveResponse or a Future
            result.result()
            self._completed(path)

    def close(self) -> None:
        """Wait for the write in flight and free the pinned staging buffers."""
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def _completed(self, path: str) -> None:
        previous, self.latest = self.latest, path
        if self.rank == 0 and previous and previous != path:
            # Keep one: a 1b checkpoint with AdamW state is about 20 GB.
            if os.path.isdir(previous):
                shutil.rmtree(previous, ignore_errors=True)
            elif os.path.exists(previous):
                os.remove(previous)


# -- setup helpers ------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains stay undecayed), betas as in GPT-3 and nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel is one launch for all parameters on CUDA; the CPU keeps the default (foreach).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=True if device.type == "cuda" else None)


def learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warmup, then constant: a run's length is set by its duration, so there is no known end for
    a cosine decay to aim at."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def peak_bf16_flops_for(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the PEAK_BF16_FLOPS entry whose name is the longest one contained
    in ``device_name`` (the most specific: "H200 NVL" before "H200"); None when none is."""
    matches = [(len(part), flops) for part, flops in PEAK_BF16_FLOPS if part in device_name]
    return max(matches)[1] if matches else None


def default_peak_flops(device: torch.device) -> tuple[float | None, str | None]:
    """(peak FLOP/s, None), or (None, why not) when the device is not in PEAK_BF16_FLOPS."""
    if device.type != "cuda":
        return None, f"no peak FLOP/s known for {device.type}; pass --peak-tflops to get an MFU"
    name = torch.cuda.get_device_name(device)
    flops = peak_bf16_flops_for(name)
    if flops is None:
        return None, f"no peak FLOP/s known for {name!r}; pass --peak-tflops to get an MFU"
    return flops, None


def uses_bf16_autocast(device: torch.device) -> bool:
    """The recipe: fp32 master weights with bf16 autocast on CUDA; plain fp32 on the CPU, so the tests can
    compare runs bit for bit."""
    return device.type == "cuda"


def rank_device(device: torch.device) -> torch.device:
    """The device this process trains on: under torchrun on CUDA, the GPU of its local rank."""
    env = _distributed_env()
    if env is not None and device.type == "cuda":
        return torch.device("cuda", env[2])
    return device


def _memory_available(device: torch.device, memory_limit_gib: float | None) -> tuple[int, str] | None:
    """(bytes the run may use on ``device``, the phrase that says so), or None when there is nothing to
    check against (the CPU, without a limit given)."""
    if memory_limit_gib is not None:
        return int(memory_limit_gib * GIB), f"{device} is given {memory_limit_gib:g} GiB (--memory-limit-gib)"
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    # What this process's caching allocator holds but no tensor uses (an earlier regime's blocks in a bench)
    # is free to this run too; mem_get_info counts it as used.
    reusable_bytes = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available_bytes = free_bytes + reusable_bytes
    return available_bytes, f"{device} has {available_bytes / GIB:.1f} GiB free of {total_bytes / GIB:.1f}"


def memory_plan(model: ModelConfig, device: torch.device, batch_size: int, seq_len: int) -> TrainingMemoryPlan:
    """What this process would hold per GPU (workloads/memory_plan.py): DDP's replica and buckets under
    torchrun, the bf16 autocast copies on CUDA."""
    return plan_training_memory(model, batch_size, seq_len, bf16_autocast=uses_bf16_autocast(device),
                                ddp=_distributed_env() is not None)


def check_memory_fits(config: TrainingConfig, model: ModelConfig, device: torch.device, batch_size: int,
                      seq_len: int) -> None:
    """Raise WontFitError (a ValueError; one line with the arithmetic and what would fit) when the run
    cannot fit on ``device``: before the model is built or a byte is allocated, so an 8b run is refused in
    a second instead of running out of memory after minutes of setup. ``device`` is this rank's (see
    rank_device). Nothing is checked on the CPU unless ``config.memory_limit_gib`` is set."""
    available = _memory_available(device, config.memory_limit_gib)
    if available is None:
        return
    limit_bytes, where = available
    refusal = memory_plan(model, device, batch_size, seq_len).refusal(where, limit_bytes)
    if refusal is not None:
        raise WontFitError(refusal)


def _distributed_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun, else None."""
    if all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return None


# -- simulated device time (issue 14) -----------------------------------------------------------------

# The shape simulated when the timing preset does not fit one simulated GPU (8b: 16 B/param of fp32
# weights, gradients and AdamW state alone is 120 GiB).
SIMULATED_FALLBACK_PRESET = "1b"
# Micro-steps of the preset's DEFAULT_BATCH_SHAPE per simulated optimizer step (1b: 4 x 2048 x 8 = 65,536
# tokens, 0.86 s on an H100 SXM). Chosen so the device time of a step stays above what this CPU takes for
# one tiny step, with headroom for a loaded host: training never idles, so a CPU slower than the simulated
# step would fall further behind at every step (the "CPU kept up" check). Measured: 0.57 s p50, 0.84 s p90
# per tiny 8 x 64 step on 2 cores beside other test runs (load 5); a single 4 x 2048 micro-step (0.11 s)
# was outrun there, and 4 micro-steps (0.43 s) sat below that p90. ASSUMPTION: 8 micro-steps (65K tokens
# per optimizer step) is a usual 1b pretraining batch on one GPU (global batches of 0.5-4M tokens are
# reached with more GPUs or more accumulation).
SIMULATED_GRAD_ACCUM_STEPS = 8
# Bytes a checkpoint writes per parameter: fp32 weights 4 + AdamW's two fp32 moments 8 (what
# save_checkpoint writes: model and optimizer state, no gradients).
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
# The bandwidth a simulated checkpoint blocks the loop at, B/s, by mode. ASSUMPTION: sync writes the state
# to a local datacenter NVMe drive at ~2 GB/s sustained (PCIe Gen4 x4 drives' sequential-write class);
# async blocks only while the state is copied to pinned host memory, ~50 GB/s (about 80 % of PCIe Gen5
# x16's 64 GB/s per direction, the H100/H200 SXM host link), and its write then runs behind the steps.
SIMULATED_CHECKPOINT_BYTES_PER_S: dict[str, float] = {"sync": 2e9, "async": 50e9}


@dataclass(frozen=True)
class SimulatedTraining:
    """A training run on a simulated device's time: the shape whose work sets each step's device time
    and tokens (which may be larger than the model the CPU computes), and what one step costs there."""

    device: object  # workloads.device_time.SimulatedDevice
    requested_preset: str  # SimulatedTiming.timing_preset
    timing_config: ModelConfig  # the simulated shape's model: requested_preset, or the fallback
    batch_size: int  # sequences per simulated micro-step
    seq_len: int  # tokens per sequence
    grad_accum_steps: int  # micro-steps per simulated optimizer step
    step: object  # device_time.DeviceStep of one optimizer step (every step does the same work)
    memory_bytes: int  # what the simulated run holds on its GPU (workloads/memory_plan.py), B
    fit_note: str | None  # why the fallback shape is simulated; None when the requested one fits

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum_steps

    @property
    def step_ns(self) -> int:
        return round(self.step.seconds * NS_PER_S)

    def checkpoint_seconds(self, mode: str) -> float:
        """Simulated stall of one checkpoint of the simulated model's state (s): bytes / stated bandwidth."""
        return (self.timing_config.total_params() * CHECKPOINT_BYTES_PER_PARAM
                / SIMULATED_CHECKPOINT_BYTES_PER_S[mode])


def _simulated_plan(preset: str) -> TrainingMemoryPlan:
    """The CUDA recipe's memory for ``preset`` at its default training shape, one GPU, no DDP."""
    return plan_training_memory(model_config(preset), *DEFAULT_BATCH_SHAPE[preset], bf16_autocast=True, ddp=False)


def simulated_training(timing: SimulatedTiming) -> SimulatedTraining:
    """The simulated shape for ``timing`` (its timing preset at DEFAULT_BATCH_SHAPE when that fits the
    simulated GPU's memory, else SIMULATED_FALLBACK_PRESET, with why) and one step's device cost.
    ValueError (one line) for an unknown device or preset."""
    from wattledger.probes import mock_presets
    from wattledger.workloads import device_time

    device = device_time.simulated_device(timing.device)  # ValueError for a device the mock has no preset of
    limit_bytes = mock_presets.PRESETS[timing.device].memory_total_bytes  # what NVML reports as total
    preset, note = timing.timing_preset, None
    plan = _simulated_plan(preset)
    if plan.total_bytes > limit_bytes:
        note = (f"{preset} training does not fit one {device.name} ({plan.total_bytes / GIB:.0f} GiB needed, "
                f"{limit_bytes / GIB:.0f} GiB there): {SIMULATED_FALLBACK_PRESET} is simulated instead")
        preset = SIMULATED_FALLBACK_PRESET
        plan = _simulated_plan(preset)
    config = model_config(preset)
    batch_size, seq_len = DEFAULT_BATCH_SHAPE[preset]
    # One step's work as one pass over all its micro-steps' sequences. ASSUMPTION: the weights' re-read by
    # each further micro-step (bf16, 4 B/param forward and backward) is left out: under 2 % of a 1b step,
    # which is compute-bound.
    work = device_time.training_step_work(config, batch_size * SIMULATED_GRAD_ACCUM_STEPS, seq_len)
    return SimulatedTraining(device=device, requested_preset=timing.timing_preset, timing_config=config,
                             batch_size=batch_size, seq_len=seq_len, grad_accum_steps=SIMULATED_GRAD_ACCUM_STEPS,
                             step=device.step(work), memory_bytes=plan.total_bytes, fit_note=note)


def _simulated_summary(sim: SimulatedTraining, t: _Trainer, clock: PacedClock, steps: int) -> dict:
    """The ``simulated_device`` summary key (workloads/common.py SimulatedTiming; issue 14); seconds are
    simulated ones, ``device_busy_seconds`` this rank's GPU's."""
    described = sim.device.describe()
    peak = peak_bf16_flops_for(sim.device.name)
    mfu = (sim.timing_config.training_flops_per_token(sim.seq_len) * sim.tokens_per_step / sim.step.seconds / peak
           if peak and sim.step.seconds > 0 else None)
    return {
        "device": described.get("name", sim.device.name), "mock_preset": sim.device.mock_preset,
        "timing_preset": sim.timing_config.name, "timing_preset_requested": sim.requested_preset,
        "timing_note": sim.fit_note, "computed_preset": t.model_config.name, **clock.report(),
        "device_busy_seconds": steps * sim.step.seconds,
        "shapes": (f"computed: {t.model_config.name} {t.batch_size} x {t.seq_len} per step, timing and tokens: "
                   f"{sim.timing_config.name} {sim.batch_size} x {sim.seq_len} x {sim.grad_accum_steps} accum on "
                   f"{sim.device.name}"),
        "batch_size": sim.batch_size, "seq_len": sim.seq_len, "grad_accum_steps": sim.grad_accum_steps,
        "tokens_per_step": sim.tokens_per_step,
        "step_seconds": sim.step.seconds, "bound": sim.step.bound,
        "activity": {"sm": sim.step.activity.sm, "tensor": sim.step.activity.tensor,
                     "dram": sim.step.activity.dram},
        "memory_bytes": sim.memory_bytes,
        "mfu_simulated": mfu,
        "mfu_note": "SIMULATED: the roofline's fitted efficiency by construction, not a measurement",
        "checkpoint_bytes_per_second": dict(SIMULATED_CHECKPOINT_BYTES_PER_S),
        "calibration": described,
    }


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class _Trainer:
    """What the loop works with, built once by ``_set_up``: this rank's place in the group, the model and
    its optimizer, the data, the checkpointer, and the figures every step shares."""

    model_config: ModelConfig
    device: torch.device  # under torchrun on CUDA, the GPU of this rank's local rank
    compute_dtype: torch.dtype
    autocast: contextlib.AbstractContextManager
    rank: int
    world: int
    distributed: bool  # launched by torchrun (even with one rank)
    owns_group: bool  # this run initialised the process group, so it destroys it at the end
    compiled: bool
    raw_model: nn.Module  # the bare module: what checkpoints save and memory is counted on
    model: nn.Module | None  # what the loop calls (DDP- and compile-wrapped as asked); None once freed
    optimizer: torch.optim.Optimizer
    data: SyntheticTokens
    batch_size: int  # sequences per rank per micro-step
    seq_len: int  # tokens per sequence
    first_step: int  # the step counter at the start: the checkpoint's step when resumed, else 0
    checkpointer: Checkpointer | None
    temporary_folder: str | None  # the checkpoints' folder when the config names none; removed at the end
    tokens_per_step: int  # per rank
    flops_per_token: float  # training FLOPs per token, forward and backward
    peak_flops: float | None  # per GPU, FLOP/s; None: no MFU
    mfu_note: str | None  # why there is no peak, when there is none
    simulation: SimulatedTraining | None = None  # on a simulated device's time (issue 14); None: the CPU's

    @property
    def activity(self):
        """The activity each compute span carries: the simulated step's, else the fixed training one."""
        return self.simulation.step.activity if self.simulation is not None else TRAIN_ACTIVITY

    @property
    def master(self) -> bool:
        return self.rank == 0


@dataclass
class _Progress:
    """What the loop measured: each step's seconds, the losses, the log's points, the checkpoint stalls."""

    step_seconds: list[float] = field(default_factory=list)
    compile_steps: list[bool] = field(default_factory=list)  # per step: dynamo compiled a graph during it
    loss_first: float | None = None
    loss_last: float | None = None
    loss_log: list[list[float]] = field(default_factory=list)  # [step, loss] at each log line
    checkpoints: list[dict] = field(default_factory=list)  # {"step", "stall_seconds"} per save
    stall_seconds: float = 0.0  # the loop blocked on checkpoints, the final wait included

    def add_step(self, seconds: float, loss: float, compiled: bool = False) -> None:
        self.step_seconds.append(seconds)
        self.compile_steps.append(compiled)
        self.loss_first = loss if self.loss_first is None else self.loss_first
        self.loss_last = loss


def run(config: TrainingConfig, options: RunOptions, reporter: Reporter,
        stop: threading.Event | None = None, paced_clock: PacedClock | None = None) -> dict:
    """Train until ``config.max_steps`` or ``options.duration_s`` (or ``stop``); return the summary.

    Under torchrun every rank returns a summary, but only rank 0's is the run's (the others carry their
    own figures and ``"rank"``). A run that cannot fit on its device raises WontFitError (check_memory_fits)
    before anything is built. With ``options.simulation`` every step still runs on this device, but costs
    the simulated device's time of the simulated shape's step (``simulated_training``), paced by
    ``paced_clock`` (default: a PacedClock on the wall clock; tests inject one).
    """
    stop = stop or threading.Event()
    model_config, device, _ = options.resolve()
    config.validate(model_config)
    batch_size, seq_len = config.shape(options.preset)
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the {model_config.name} model's {model_config.max_seq_len}")
    train_device = rank_device(device)
    check_memory_fits(config, model_config, train_device, batch_size, seq_len)
    simulation = simulated_training(options.simulation) if options.simulation is not None else None
    if train_device.type == "cuda":
        # The peaks in the summary and the reporter are this run's, not an earlier regime's in the process.
        torch.cuda.reset_peak_memory_stats(train_device)
    setup_start = time.perf_counter()
    t = _with_simulation(_set_up(config, options, model_config, device, batch_size, seq_len), simulation)
    progress = _Progress()
    setup_seconds = time.perf_counter() - setup_start
    if t.master and config.log_every:
        _log_start(t, config)
    # The loop's clock: the simulated device's schedule (it moves only by the device time spent), or the CPU's.
    clock = (paced_clock or PacedClock(stop=stop)) if simulation is not None else time.monotonic_ns

    step = t.first_step
    loop_start_ns = clock()
    deadline_ns = loop_start_ns + int(options.duration_s * 1e9)
    while config.max_steps is None or step < config.max_steps:
        graphs_before = _dynamo_graph_count() if t.compiled else None
        lr = learning_rate(config, step)
        loss_value, wants_stop = _train_one_step(t, config, reporter, clock, step, lr, progress,
                                                 lambda: stop.is_set() or _past(t, clock, config, deadline_ns))
        step += 1
        compiled_now = graphs_before is not None and (_dynamo_graph_count() or 0) > graphs_before
        progress.compile_steps[-1] = compiled_now
        if len(progress.step_seconds) == 1:
            reporter.set_memory(t.simulation.memory_bytes if t.simulation is not None
                                else _memory_bytes(t.raw_model, t.optimizer, t.device))
        if t.master and config.log_every and (step % config.log_every == 0 or step == t.first_step + 1):
            _log_step(t, progress, step, loss_value, lr)
        if t.checkpointer is not None and step % config.checkpoint_every == 0:
            _checkpoint_step(t, config, options, reporter, progress, step, clock)
        if wants_stop:
            break

    _finish_checkpoints(t, reporter, progress)
    wall_seconds = (clock() - loop_start_ns) / 1e9
    checkpoint_last_path = _leave(t)
    summary = _summary(config, options, t, progress, wall_seconds, setup_seconds, checkpoint_last_path)
    if simulation is not None:
        summary["simulated_device"] = _simulated_summary(simulation, t, clock, len(progress.step_seconds))
    return summary


def _with_simulation(t: _Trainer, simulation: SimulatedTraining | None) -> _Trainer:
    """``t`` as the loop sees it on a simulated device: the simulated shape's tokens per step, training
    FLOPs per token and the simulated GPU's peak (so the summary's throughput and MFU are the simulated
    step's, labelled so in ``simulated_device``); unchanged without a simulation."""
    if simulation is None:
        return t
    peak = peak_bf16_flops_for(simulation.device.name)
    return replace(
        t, simulation=simulation, tokens_per_step=simulation.tokens_per_step,
        flops_per_token=simulation.timing_config.training_flops_per_token(simulation.seq_len),
        peak_flops=peak, mfu_note=None if peak else f"no peak FLOP/s known for {simulation.device.name!r}")


def _past(t: _Trainer, clock, config: TrainingConfig, deadline_ns: int) -> bool:
    """Whether the run's duration is over once this step ends (only without max_steps). On the CPU's
    clock: the step's compute has just ended; on a simulated device: the step's device time ends there."""
    if config.max_steps is not None:
        return False
    return clock() + (t.simulation.step_ns if t.simulation is not None else 0) >= deadline_ns


def _train_one_step(t: _Trainer, config: TrainingConfig, reporter: Reporter, clock, step: int, lr: float,
                    progress: _Progress, stop_requested) -> tuple[float, bool]:
    """One optimizer step as a "compute" span, its tokens reported after it: (the loss, whether to stop).

    ``stop_requested`` is a callable read once the step's compute has been queued (the previous step ended
    on a device sync, so the CPU clock is true at the start). On a simulated device the span is the
    device time of the simulated step, paced to the wall clock, whatever this CPU took."""
    step_start_ns = clock()
    # Announced now, so an in-process mock GPU counts the step while it runs: a step longer than the
    # mock's lag (seen on a busy host) would otherwise reach it too late to count in full.
    reporter.span_started("compute", step_start_ns, t.activity)
    loss_sum = _optimizer_step(t, config, step, lr)
    loss_value, wants_stop = _read_loss(t, loss_sum, stop_requested())
    if t.simulation is not None:
        step_start_ns, step_end_ns = clock.spend(t.simulation.step.seconds)
    else:
        step_end_ns = clock()
    reporter.span("compute", step_start_ns, step_end_ns, t.activity)
    reporter.add_tokens("trained", t.tokens_per_step)
    progress.add_step((step_end_ns - step_start_ns) / 1e9, loss_value)
    return loss_value, wants_stop


def _set_up(config: TrainingConfig, options: RunOptions, model_config: ModelConfig, device: torch.device,
            batch_size: int, seq_len: int) -> _Trainer:
    """Join the process group under torchrun, then build the model, optimizer, data and checkpointer."""
    # Data parallel when launched by torchrun; alone otherwise.
    env = _distributed_env()
    rank, world, local_rank = env or (0, 1, 0)
    owns_group = env is not None and not dist.is_initialized()
    device = rank_device(device)
    if env is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    distributed = env is not None

    # Master weights and optimizer state in fp32; matrix products in bf16 under autocast on CUDA. The CPU
    # stays fp32 so the tests can compare runs bit for bit.
    bf16 = uses_bf16_autocast(device)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    raw_model = build_model(model_config, device, torch.float32, seed=options.seed)
    optimizer = make_optimizer(raw_model, config, device)
    data = SyntheticTokens(model_config.vocab_size, seq_len, options.seed)
    first_step = load_checkpoint(config.resume_from, raw_model, optimizer) if config.resume_from else 0
    model: nn.Module = raw_model
    if distributed:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[local_rank] if device.type == "cuda"
                                                    else None)
    if options.compile:
        model = torch.compile(model)
    checkpointer, temporary_folder = _make_checkpointer(config, rank, distributed, device)
    if config.peak_flops is not None:
        peak_flops, mfu_note = float(config.peak_flops), None
    else:
        peak_flops, mfu_note = default_peak_flops(device)
    return _Trainer(
        model_config=model_config, device=device, compute_dtype=compute_dtype, autocast=autocast, rank=rank,
        world=world, distributed=distributed, owns_group=owns_group, compiled=options.compile,
        raw_model=raw_model, model=model, optimizer=optimizer, data=data, batch_size=batch_size,
        seq_len=seq_len, first_step=first_step, checkpointer=checkpointer, temporary_folder=temporary_folder,
        tokens_per_step=batch_size * seq_len * config.grad_accum_steps,
        flops_per_token=model_config.training_flops_per_token(seq_len), peak_flops=peak_flops,
        mfu_note=mfu_note)


def _make_checkpointer(config: TrainingConfig, rank: int, distributed: bool,
                       device: torch.device) -> tuple[Checkpointer | None, str | None]:
    """(checkpointer, temporary folder): (None, None) without ``checkpoint_every``; the folder is a fresh
    temporary one, the same on every rank, when the config names none (else None)."""
    if not config.checkpoint_every:
        return None, None
    folder = config.checkpoint_dir
    temporary_folder = None
    if folder is None:
        temporary_folder = tempfile.mkdtemp(prefix="wattledger-training-") if rank == 0 else None
        if distributed:  # every rank must write into the same folder (async) or agree on its name
            shared = [temporary_folder]
            dist.broadcast_object_list(shared, src=0)
            temporary_folder = shared[0]
        folder = temporary_folder
    os.makedirs(folder, exist_ok=True)
    return Checkpointer(folder, config.checkpoint_mode, rank, distributed, device), temporary_folder


def _optimizer_step(t: _Trainer, config: TrainingConfig, step: int, lr: float) -> torch.Tensor:
    """One optimizer step at learning rate ``lr`` over ``grad_accum_steps`` micro-steps. Returns the step's
    mean loss (nats) as a device scalar, not read back: the caller's read is the step's one sync."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=t.device)
    for micro_step in range(config.grad_accum_steps):
        tokens = t.data.batch(step, t.rank, t.world, t.batch_size, micro_step)
        tokens = tokens.pin_memory().to(t.device, non_blocking=True) if t.device.type == "cuda" else tokens
        if t.distributed:
            # All-reduce the gradients only on the last micro-step (as nanoGPT does): the earlier
            # ones just accumulate locally.
            raw_ddp = t.model._orig_mod if t.compiled else t.model
            raw_ddp.require_backward_grad_sync = micro_step == config.grad_accum_steps - 1
        with t.autocast:
            logits = t.model(tokens[:, :-1])
        # Mean over this micro-batch, divided by the micro-steps so the sum of the gradients is the
        # mean over the whole step's batch.
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                               tokens[:, 1:].reshape(-1)) / config.grad_accum_steps
        loss.backward()
        loss_sum += loss.detach()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), config.grad_clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def _read_loss(t: _Trainer, loss_sum: torch.Tensor, wants_stop: bool) -> tuple[float, bool]:
    """(mean loss over the ranks in nats, whether any rank wants to stop).

    Reading the loss back waits for the device: the step's one sync point, so the compute span ends when
    the GPU is done, and the log needs the value anyway.
    """
    if not t.distributed:
        return loss_sum.item(), wants_stop
    # One small all-reduce carries the mean loss for the log and the stop decision: every rank must leave
    # the loop at the same step, or the others hang in the next gradient all-reduce.
    shared = torch.stack([loss_sum, torch.tensor(float(wants_stop), device=t.device)])
    dist.all_reduce(shared)
    loss_total, stop_votes = shared.tolist()
    return loss_total / t.world, stop_votes > 0


def _log_start(t: _Trainer, config: TrainingConfig) -> None:
    print(f"training {t.model_config.name}: {t.model_config.total_params():,} params, world {t.world}, "
          f"{t.batch_size} x {t.seq_len} tokens x {config.grad_accum_steps} accum per rank, {t.device}, "
          f"{str(t.compute_dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)


def _log_step(t: _Trainer, progress: _Progress, step: int, loss: float, lr: float) -> None:
    """The step's log line (loss, lr, step time, tokens/s of all ranks, MFU), and its point in loss_log."""
    seconds = progress.step_seconds[-1]
    tokens_per_second = t.tokens_per_step * t.world / seconds
    mfu = t.flops_per_token * tokens_per_second / (t.peak_flops * t.world) if t.peak_flops else None
    mfu_text = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
    print(f"step {step} | loss {loss:.4f} | lr {lr:.2e} | {seconds * 1e3:.1f} ms | "
          f"{tokens_per_second:,.0f} tok/s{mfu_text}", file=sys.stderr, flush=True)
    progress.loss_log.append([step, loss])


def _checkpoint_step(t: _Trainer, config: TrainingConfig, options: RunOptions, reporter: Reporter,
                     progress: _Progress, step: int, clock=time.monotonic_ns) -> None:
    """Save at ``step``; the time the loop is blocked is a "checkpoint" span and counts as stall. On a
    simulated device the save still happens (the computed model's), but the stall is the simulated
    model's state over SIMULATED_CHECKPOINT_BYTES_PER_S, spent idle on the paced clock."""
    stall_start_ns = clock()
    t.checkpointer.save(t.raw_model, t.optimizer, step, {
        "seed": options.seed, "world_size": t.world, "batch_size": t.batch_size, "seq_len": t.seq_len,
        "grad_accum_steps": config.grad_accum_steps})
    if t.simulation is not None:
        clock.wait_until(stall_start_ns + round(t.simulation.checkpoint_seconds(t.checkpointer.mode_used)
                                                * NS_PER_S))
    stall_end_ns = clock()
    reporter.span("checkpoint", stall_start_ns, stall_end_ns)
    progress.stall_seconds += (stall_end_ns - stall_start_ns) / 1e9
    progress.checkpoints.append({"step": step, "stall_seconds": (stall_end_ns - stall_start_ns) / 1e9})


def _finish_checkpoints(t: _Trainer, reporter: Reporter, progress: _Progress) -> None:
    """Wait for an async write still in flight, then close the checkpointer."""
    if t.checkpointer is None:
        return
    if t.checkpointer.pending is not None and t.simulation is not None:
        # ASSUMPTION: on a simulated device the last async write has finished behind the last steps (it
        # takes its state's bytes over the disk's 2 GB/s); the computed model's write is waited for unseen.
        t.checkpointer.wait()
    elif t.checkpointer.pending is not None:
        # The run is not over until its last checkpoint is on disk: the loop is blocked, so it is stall.
        stall_start_ns = time.monotonic_ns()
        t.checkpointer.wait()
        stall_end_ns = time.monotonic_ns()
        reporter.span("checkpoint", stall_start_ns, stall_end_ns)
        progress.stall_seconds += (stall_end_ns - stall_start_ns) / 1e9
    t.checkpointer.close()


def _leave(t: _Trainer) -> str | None:
    """Remove the temporary checkpoint folder and leave the process group this run joined. Returns the
    newest checkpoint's path (None when there is none or it was in the temporary folder)."""
    checkpoint_last_path = t.checkpointer.latest if t.checkpointer is not None else None
    if t.temporary_folder is not None:
        if t.distributed:
            dist.barrier()  # every rank is done writing into it
        if t.master:
            shutil.rmtree(t.temporary_folder, ignore_errors=True)
        checkpoint_last_path = None
    if t.owns_group:
        # Leave together: a rank that closes its gloo connections while a slower peer (a busy host) is
        # still finishing the last collective can make that peer's gloo thread throw, which aborts it.
        dist.barrier()
        # DDP's reducer keeps the process group alive, and DDP's reference cycles would free it only at
        # interpreter exit, where gloo's worker threads are torn down with the interpreter: rank 1 was
        # seen dying there with SIGABRT ("terminate called without an active exception") under load.
        # Free the wrapper (and with it the group) now, while the interpreter is whole.
        t.model = None
        gc.collect()
        dist.destroy_process_group()
    return checkpoint_last_path


def _summary(config: TrainingConfig, options: RunOptions, t: _Trainer, progress: _Progress, wall_seconds: float,
             setup_seconds: float, checkpoint_last_path: str | None) -> dict:
    """The run's summary: ``summary_header`` plus the shape, losses, step times, throughput, MFU (with
    its formula) and the checkpoint figures; seconds of wall time unless named otherwise."""
    steps = len(progress.step_seconds)
    trained_tokens = steps * t.tokens_per_step * t.world
    busy_seconds = sum(progress.step_seconds)
    checkpointer = t.checkpointer
    # MFU's FLOPs are the simulated shape's on a simulated device (its tokens are the ones counted).
    m, flops_seq_len = ((t.simulation.timing_config, t.simulation.seq_len) if t.simulation is not None
                        else (t.model_config, t.seq_len))
    summary = summary_header("training", options, t.device, t.compute_dtype, wall_seconds,
                             {"trained": trained_tokens})
    summary.update({
        "rank": t.rank,
        "world_size": t.world,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum_steps": config.grad_accum_steps,
        "tokens_per_step": t.tokens_per_step * t.world,
        "steps": steps,
        "step_start": t.first_step,
        "loss_first": progress.loss_first,
        "loss_last": progress.loss_last,
        "loss_floor_nats": t.data.loss_floor_nats(),
        "loss_log": progress.loss_log,
        "step_time_seconds": {"mean": busy_seconds / steps if steps else None,
                              **percentiles(progress.step_seconds, qs=(0.5, 0.9))},
        **steady_state_throughput(progress.step_seconds, progress.compile_steps, t.tokens_per_step * t.world,
                                  t.flops_per_token, t.peak_flops, t.world, t.mfu_note),
        "tokens_per_second_wall": trained_tokens / wall_seconds if wall_seconds > 0 else None,
        "flops_per_token": t.flops_per_token,
        "mfu_peak_flops": t.peak_flops,
        "mfu_formula": (f"mfu = flops_per_token * tokens_per_second / (peak_flops * world_size); "
                        f"flops_per_token = 6N + 12*L*H*Q*T = 6*{m.matmul_params()} + "
                        f"12*{m.layers}*{m.heads}*{m.head_dim}*{flops_seq_len} "
                        f"(PaLM appendix B); tokens_per_second = trained tokens of all ranks / summed step "
                        f"time, over the steady steps: the first {WARMUP_STEPS} and any step in which "
                        f"torch.compile compiled a graph are left out (mfu_all_steps keeps them)"),
        "memory_estimate_bytes": memory_plan(t.model_config, t.device, t.batch_size, t.seq_len).total_bytes,
        "memory_peak_allocated_bytes": (torch.cuda.max_memory_allocated(t.device) if t.device.type == "cuda"
                                        else None),
        "checkpoint_mode": config.checkpoint_mode if checkpointer else None,
        "checkpoint_mode_used": checkpointer.mode_used if checkpointer else None,
        "checkpoint_fallback_reason": checkpointer.fallback_reason if checkpointer else None,
        "checkpoint_count": len(progress.checkpoints),
        "checkpoint_stall_seconds": progress.stall_seconds,
        "checkpoint_last_path": checkpoint_last_path,
        "checkpoints": progress.checkpoints,
        "goodput": busy_seconds / wall_seconds if wall_seconds > 0 else None,
        "setup_seconds": setup_seconds,
        "config": asdict(config),
    })
    return summary


def steady_state_throughput(step_seconds: list[float], compile_steps: list[bool], tokens_per_step: int,
                            flops_per_token: float, peak_flops: float | None, world: int,
                            no_peak_note: str | None = None) -> dict:
    """Tokens/s and MFU over the steady steps, and the same over all steps beside them (labelled).

    ``step_seconds[i]`` is step i's time and ``compile_steps[i]`` whether dynamo compiled a graph during
    it; ``tokens_per_step`` counts every rank's tokens, ``peak_flops`` is per GPU (None: no MFU, for the
    reason ``no_peak_note``). The steady steps are all but the first WARMUP_STEPS and the compile steps:
    a first step that takes seconds would otherwise pull a short run's MFU far below what the hardware
    sustains. MFU = flops_per_token x tokens/s / (peak x world) (PaLM appendix B).
    """
    counted = [seconds for i, (seconds, compiled) in enumerate(zip(step_seconds, compile_steps))
               if i >= WARMUP_STEPS and not compiled]

    def rate(seconds: list[float]) -> float | None:
        total = sum(seconds)
        return len(seconds) * tokens_per_step / total if total > 0 else None

    def utilisation(tokens_per_second: float | None) -> float | None:
        if not peak_flops or tokens_per_second is None:
            return None
        return flops_per_token * tokens_per_second / (peak_flops * world)

    tokens_per_second, all_steps = rate(counted), rate(step_seconds)
    mfu = utilisation(tokens_per_second)
    if not step_seconds:
        note = "no step finished"
    elif not peak_flops:
        note = no_peak_note or "no peak FLOP/s; pass --peak-tflops to get an MFU"
    elif not counted:
        note = (f"only warm-up steps ran ({len(step_seconds)}: the first {WARMUP_STEPS} and compile steps are "
                f"left out); run more steps for a steady-state MFU")
    else:
        note = None
    return {"tokens_per_second": tokens_per_second, "tokens_per_second_all_steps": all_steps,
            "mfu": mfu, "mfu_all_steps": utilisation(all_steps), "mfu_note": note,
            "steady_steps": len(counted), "warmup_steps_excluded": len(step_seconds) - len(counted)}


def _dynamo_graph_count() -> int | None:
    """Graphs dynamo has compiled in this process: ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``
    (torch/_dynamo/output_graph.py, counted since torch 2.0, there in 2.11 and 2.13). A private counter,
    so None when it is missing: then only the first WARMUP_STEPS are left out."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # any failure to read it only loses the compile-step detection
        return None


def _memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """GPU memory the run holds: the allocator's peak on CUDA; on CPU the training state (parameters, one
    gradient each, optimizer moments), which is what the mock GPU is told the workload occupies."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t))
    return 2 * params + moments


# -- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This workload's options (the shared ones, --preset --duration --device --seed, are the caller's)."""
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per rank per micro-step (default: per preset, tiny 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: per preset, "
                        "tiny 64)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--lr", type=float, default=TrainingConfig.lr, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=TrainingConfig.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=TrainingConfig.warmup_steps)
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="checkpoint every STEPS optimizer steps (0 = never)")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--checkpoint-mode", default="sync", help="sync (loop blocked while writing) or async "
                        "(torch.distributed.checkpoint.async_save: blocked only while copying to CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-GPU peak TFLOP/s for MFU (default: bf16 dense datasheet peak of an H100/H200)")
    parser.add_argument("--memory-limit-gib", type=float, default=None, metavar="GIB",
                        help="device memory the run must fit in, else it is refused up front with the arithmetic "
                        "(default: the GPU's free memory; no check on the CPU)")
    parser.add_argument("--log-every", type=int, default=TrainingConfig.log_every, metavar="STEPS")
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: run for "
                        "--duration)")
    parser.add_argument("--resume-from", default=None, metavar="PATH", help="checkpoint to continue from")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The config from parsed arguments; ValueError (one line) for a bad value, and for a run that cannot
    fit on its device when ``args`` also names the preset and device (both command lines do): the caller
    turns that into a usage error, exit code 2, before it builds anything."""
    config = TrainingConfig(
        batch_size=args.batch_size, seq_len=args.seq_len, grad_accum_steps=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir, checkpoint_mode=args.checkpoint_mode,
        peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12,
        memory_limit_gib=args.memory_limit_gib, log_every=args.log_every, max_steps=args.max_steps,
        resume_from=args.resume_from)
    config.validate()
    preset, device = getattr(args, "preset", None), getattr(args, "device", None)
    if preset is not None and device is not None:
        model = model_config(preset)
        config.validate(model)
        check_memory_fits(config, model, rank_device(pick_device(device)), *config.shape(preset))
    return config


def main(argv: list[str] | None = None) -> int:
    """``python -m`` / ``torchrun -m`` entry point: train and print the summary JSON on rank 0."""
    import json

    from wattledger.agent.config import parse_duration_seconds
    from wattledger.workloads.reporter import make_reporter

    parser = argparse.ArgumentParser(prog="python -m wattledger.workloads.training", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--preset", default="tiny", help="model shape: tiny, 125m, 1b, 8b")
    parser.add_argument("--duration", default="30s", help="how long to run without --max-steps, e.g. 30s, 2m")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--agent", metavar="URL", help="report tokens and spans to a running agent")
    add_arguments(parser)
    args = parser.parse_args(argv)
    env = _distributed_env()
    rank, world, local_rank = env or (0, 1, 0)
    try:
        config = config_from_args(args)
        duration_s = parse_duration_seconds(args.duration)
        # Under torchrun each rank drives (and reports) the GPU of its local rank.
        options = RunOptions(preset=args.preset, duration_s=duration_s, device=args.device, seed=args.seed,
                             compile=args.compile, gpus=[local_rank])
        options.resolve()
    except ValueError as err:
        print(f"training: error: {err}", file=sys.stderr)
        return 2
    # Ranks report as separate workloads: the agent keeps one running record per name.
    name = "training" if world == 1 else f"training-rank{rank}"
    reporter = make_reporter(name, options.gpus, agent_url=args.agent, token=os.environ.get("WATTLEDGER_TOKEN"))
    reporter.start(pid=os.getpid())
    try:
        summary = run(config, options, reporter)
    finally:
        reporter.stop()
    if rank == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
