"""The simulated device: how long a step's work takes on the GPU the mock names, and what it keeps busy.

A step costs max(FLOPs / (dense bf16 peak x compute efficiency), HBM bytes / (bandwidth x bandwidth
efficiency)) + a fixed per-step overhead: the roofline (workloads/roofline.py) with the efficiencies a
real serving stack reaches, plus the time between kernels (launches, sampling, vLLM's scheduler; with CUDA
graphs). Its activity is what the mock GPU's power law reads (probes/mock_presets.py ``power_demand_watts``):
gpu = 1, tensor = achieved FLOP/s over the peak, dram = achieved bytes/s over the datasheet bandwidth, sm
= the share of the step its kernels run (none run in the overhead).

The efficiencies, the overhead and the mock's power weights are FITTED to ML.ENERGY's Llama-3.1-8B on one
H100 (workloads/calibration_data.py); rerun the fit and print the comparison with

    python -m wattledger.workloads.device_time --fit      # fitted constants, simulated vs published, miss %
    python -m wattledger.workloads.device_time --table    # the 8b table docs/simulation.md and the README show

Units: seconds, FLOPs, bytes, watts, joules. Plain arithmetic: no torch, no device.
"""

from __future__ import annotations

import argparse
import itertools
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from wattledger.probes.activity import Activity
from wattledger.probes.mock_presets import POWER_WEIGHTS, PRESETS, power_demand_watts
from wattledger.workloads import calibration_data as cal
from wattledger.workloads.model import ModelConfig, model_config
from wattledger.workloads.roofline import (BF16_BYTES, GPU_SPECS, GpuSpec, attention_flops_per_position,
                                           decode_step_bytes, decode_step_flops, embedding_rows_elements,
                                           kv_bytes_per_token, matmul_flops_per_token, streamed_weight_elements)


@dataclass(frozen=True)
class StepWork:
    """What one device step does: ``flops`` (FLOP, every matmul and attention) and ``hbm_bytes`` (B)."""

    flops: float
    hbm_bytes: float

    def __post_init__(self) -> None:
        for name in ("flops", "hbm_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"step work {name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))  # plain floats downstream, whatever came in


@dataclass(frozen=True)
class DeviceStep:
    """A step on the simulated device: its time (s), its activity, and what bounds it."""

    seconds: float
    activity: Activity
    bound: str  # "memory" | "compute" | "overhead"


@dataclass(frozen=True)
class TimingConstants:
    """Fractions of the datasheet ceilings a serving stack reaches, and the gap per step (s)."""

    compute_efficiency: float  # of dense bf16 peak
    bandwidth_efficiency: float  # of datasheet HBM bandwidth
    overhead_s: float  # per step, GPU idle between kernels


# The timing constants. The three ML.ENERGY points are all memory-bound, so they fix the bandwidth
# efficiency (FITTED: python -m wattledger.workloads.device_time --fit) and say nothing of the compute one.
# compute_efficiency, ASSUMPTION: 0.60 of dense peak, between Llama 3's 38-43% bf16 MFU on 16K H100s
# (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 4; communication included) and about 0.80 for one
# large bf16 GEMM (790-800 TFLOP/s measured of 989: docs/measurement.md, "Reference figures").
# overhead_s, ASSUMPTION: at least 0.2 ms per step with the GPU idle between CUDA graphs (vLLM's scheduler,
# sampling, the host-device sync of each step); FITTED within FIT_BOUNDS (the fit would take 0 if allowed:
# the published step times grow with the bytes at about 2.0 TB/s from a near-zero intercept).
FITTED_TIMING = TimingConstants(compute_efficiency=0.60, bandwidth_efficiency=0.66, overhead_s=0.2e-3)
FIT_BOUNDS = {"bandwidth_efficiency": (0.40, 0.90), "overhead_s": (0.2e-3, 4e-3)}
ASSUMED_COMPUTE_EFFICIENCY = 0.60

# FITTED with the timing: the mock's power weights, kept where the mock reads them (probes/mock_presets.py
# POWER_WEIGHTS); --fit prints what the fit gives beside them.
FITTED_POWER_WEIGHTS = POWER_WEIGHTS
# The three points fix the tensor weight (their tensor share goes 0.04 -> 0.4) and one mix of sm and dram
# (every point runs its kernels back to back at the same DRAM share): the fit is a ridge regression toward
# the simulator's earlier ASSUMPTION weights, so the split between sm and dram stays theirs.
PRIOR_POWER_WEIGHTS = {"sm": 0.5, "tensor": 0.4, "dram": 0.3}
RIDGE_STRENGTH = 1e-3

# The mock presets' GPUs: probes/mock_presets.py names -> GPU_SPECS keys.
MOCK_GPUS: dict[str, str] = {"h100-sxm-80gb": "H100 SXM", "h200-141gb": "H200 SXM"}

TIMING_SOURCES = {
    "ceilings": "workloads/roofline.py GPU_SPECS (NVIDIA datasheets, dense bf16 = half the sparse figure)",
    "roofline": "Williams, Waterman, Patterson, CACM 52(4), 2009",
    "fit": cal.SOURCE,
    "H200": "ASSUMPTION: the H100 fit's efficiencies and overhead (same software stack), H200 ceilings",
    "sm": "ASSUMPTION: SMs busy while kernels run, idle in the per-step overhead",
}


class SimulatedDevice:
    """One simulated GPU: a step's work in, its device time and activity out."""

    def __init__(self, mock_preset: str, gpu: GpuSpec, timing: TimingConstants = FITTED_TIMING,
                 power_weights: dict[str, float] | None = None):
        if not (0 < timing.compute_efficiency <= 1 and 0 < timing.bandwidth_efficiency <= 1
                and timing.overhead_s >= 0):
            raise ValueError(f"efficiencies must be in (0, 1] and overhead >= 0, got {timing}")
        self.name = gpu.name
        self.mock_preset = mock_preset
        self.gpu = gpu
        self.timing = timing
        self.power_weights = dict(FITTED_POWER_WEIGHTS if power_weights is None else power_weights)

    def step(self, work: StepWork) -> DeviceStep:
        """Device time of ``work`` (s) and the activity it drives; a zero work costs the overhead alone."""
        compute_s = work.flops / (self.gpu.peak_bf16_flops * self.timing.compute_efficiency)
        memory_s = work.hbm_bytes / (self.gpu.hbm_bytes_per_s * self.timing.bandwidth_efficiency)
        kernel_s = max(compute_s, memory_s)
        seconds = kernel_s + self.timing.overhead_s
        if seconds <= 0:  # no work and no overhead: an instant with nothing running
            return DeviceStep(0.0, Activity(gpu=1.0), "overhead")
        if self.timing.overhead_s > kernel_s:
            bound = "overhead"
        else:
            bound = "compute" if compute_s > memory_s else "memory"
        activity = Activity(gpu=1.0, sm=kernel_s / seconds,
                            tensor=min(1.0, work.flops / seconds / self.gpu.peak_bf16_flops),
                            dram=min(1.0, work.hbm_bytes / seconds / self.gpu.hbm_bytes_per_s))
        return DeviceStep(seconds, activity, bound)

    def power_watts(self, activity: Activity) -> float:
        """The mock's power law for ``activity`` with this device's weights, capped at the limit (W)."""
        spec = PRESETS[self.mock_preset]
        return min(spec.power_limit_watts, power_demand_watts(spec, activity, self.power_weights))

    def describe(self) -> dict:
        """Everything a summary or report needs to say what was simulated, with sources."""
        spec = PRESETS[self.mock_preset]
        return {"name": self.name, "mock_preset": self.mock_preset,
                "hbm_bytes_per_s": self.gpu.hbm_bytes_per_s, "peak_bf16_flops": self.gpu.peak_bf16_flops,
                **asdict(self.timing), "power_weights": dict(self.power_weights),
                "power_limit_watts": spec.power_limit_watts, "idle_power_watts": spec.idle_power_watts,
                "sources": {**TIMING_SOURCES, "gpu": self.gpu.source}}


def simulated_device(mock_preset: str) -> SimulatedDevice:
    """The simulated GPU behind a mock preset; ValueError (one line) for an unknown preset."""
    if mock_preset not in MOCK_GPUS:
        raise ValueError(f"no simulated device for mock preset {mock_preset!r}; choose from {', '.join(MOCK_GPUS)}")
    return SimulatedDevice(mock_preset, GPU_SPECS[MOCK_GPUS[mock_preset]])


# --- the work of the workloads' steps -----------------------------------------------------------------


def prefill_chunk_work(config: ModelConfig, new_tokens: int, cached_tokens: int) -> StepWork:
    """FLOPs and KV bytes of one prefill chunk, weights excluded (the step that runs it reads them once).

    ``new_tokens`` are computed, attending to ``cached_tokens`` already in the cache and causally to each
    other (4 L H Q per attended position, roofline.py); one row of logits (the chunk that ends a prompt
    samples a token; ASSUMPTION: counted for every chunk, under 1% of a chunk's FLOPs). Bytes: the cached
    K/V read and the new K/V written.
    """
    if new_tokens < 1 or cached_tokens < 0:
        raise ValueError(f"a prefill chunk needs new tokens >= 1 and cached >= 0, got ({new_tokens}, {cached_tokens})")
    attended = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2
    flops = (new_tokens * matmul_flops_per_token(config, with_lm_head=False) + 2 * config.vocab_size * config.dim
             + attention_flops_per_position(config) * attended)
    return StepWork(float(flops), float((cached_tokens + new_tokens) * kv_bytes_per_token(config)))


def serving_step_work(config: ModelConfig, decode_contexts: Sequence[int],
                      prefill_chunks: Sequence[tuple[int, int]]) -> StepWork:
    """One continuous-batching forward pass: a decode token per running sequence plus prefill chunks.

    ``decode_contexts[b]``: positions sequence b's new token attends (itself included); ``prefill_chunks``:
    (new tokens, tokens already cached) per admitted request. Weights stream once for the whole step.
    """
    if len(decode_contexts) == 0 and len(prefill_chunks) == 0:
        raise ValueError("a serving step needs at least one decode sequence or prefill chunk")
    flops = 0.0
    kv_bytes = 0.0
    if decode_contexts:
        flops += decode_step_flops(config, decode_contexts)
        kv_bytes += decode_step_bytes(config, decode_contexts).kv_cache
    for new_tokens, cached_tokens in prefill_chunks:
        chunk = prefill_chunk_work(config, new_tokens, cached_tokens)
        flops += chunk.flops
        kv_bytes += chunk.hbm_bytes
    tokens = len(decode_contexts) + sum(new for new, _ in prefill_chunks)
    weights = (streamed_weight_elements(config) + embedding_rows_elements(config, tokens)) * BF16_BYTES
    return StepWork(flops, weights + kv_bytes)


# Training step traffic. ASSUMPTION (mixed precision with AdamW, no recomputation): per parameter, bf16
# weights read in forward and backward (4 B), bf16 gradients written and read by the optimizer (4 B), fp32
# master weights, m and v read and written (24 B), the bf16 copy written (2 B): 34 B. Activations: 34 x dim
# bytes per token per layer saved in forward and read in backward (Korthikanti et al. 2022, "Reducing
# Activation Recomputation in Large Transformer Models", eq. 1, without the attention-score term a fused
# attention kernel never stores), plus bf16 logits written and read.
TRAINING_BYTES_PER_PARAMETER = 34
ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM = 34


def training_step_work(config: ModelConfig, batch: int, seq_len: int) -> StepWork:
    """Forward + backward + AdamW over ``batch`` sequences of ``seq_len``: 3x forward FLOPs, the bytes above."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"a training step needs batch >= 1 and seq_len >= 1, got batch={batch}, seq_len={seq_len}")
    tokens = batch * seq_len
    # Backward costs twice the forward (Kaplan et al. 2020, section 2.1: 6N per token in all).
    forward = (tokens * matmul_flops_per_token(config)
               + batch * attention_flops_per_position(config) * seq_len * (seq_len + 1) // 2)
    parameters = streamed_weight_elements(config) + (0 if config.tie_embeddings else config.vocab_size * config.dim)
    activations = 2 * ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM * config.dim * config.layers * tokens
    logits = 2 * BF16_BYTES * config.vocab_size * tokens
    return StepWork(float(3 * forward), float(TRAINING_BYTES_PER_PARAMETER * parameters + activations + logits))


# --- calibration against ML.ENERGY ----------------------------------------------------------------------


@dataclass(frozen=True)
class SteadyState:
    """The mean step of a saturated vLLM server at one published point: its work and the sequences running."""

    point: cal.PublishedPoint
    running: int  # sequences decoding each step
    work: StepWork


def steady_state(config: ModelConfig, point: cal.PublishedPoint, lengths: cal.ChatLengths = cal.CHAT_LENGTHS,
                 kv_cache_bytes: float = cal.KV_CACHE_BYTES) -> SteadyState:
    """The mean continuous-batching step behind a published point.

    ASSUMPTIONS: every running sequence is a uniform distance through its response, so it attends prompt +
    output / 2 positions; the running batch is max_num_seqs unless the KV cache cannot hold that many such
    contexts; each step admits running / output new requests (one finishes per output_tokens steps per
    slot), whose prefill is spread over the steps (chunked prefill), on an empty cache.
    """
    context = lengths.prompt_tokens + lengths.output_tokens // 2
    running = max(1, min(point.batch, int(kv_cache_bytes // (context * kv_bytes_per_token(config)))))
    decode = serving_step_work(config, [context] * running, [])
    prefill = prefill_chunk_work(config, lengths.prompt_tokens, 0)
    admitted = running / lengths.output_tokens
    return SteadyState(point, running, StepWork(decode.flops + admitted * prefill.flops,
                                                decode.hbm_bytes + admitted * prefill.hbm_bytes))


def simulated_point(device: SimulatedDevice, state: SteadyState) -> dict:
    """Simulated tok/s, W and J/token of a steady state, beside the published figures."""
    step = device.step(state.work)
    tokens_per_s = state.running / step.seconds
    watts = device.power_watts(step.activity)
    return {"batch": state.point.batch, "running": state.running, "bound": step.bound,
            "tokens_per_s": tokens_per_s, "watts": watts, "joules_per_token": watts / tokens_per_s,
            "activity": step.activity, "published": state.point}


def _grid(low: float, high: float, count: int) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def fit_timing(states: Sequence[SteadyState], gpu: GpuSpec) -> TimingConstants:
    """Bandwidth efficiency and overhead (within FIT_BOUNDS) minimising the squared log miss of tok/s.

    The compute efficiency stays ASSUMED_COMPUTE_EFFICIENCY: no published point is compute-bound."""
    best, best_cost = None, math.inf
    grids = [_grid(*FIT_BOUNDS[name], count) for name, count in
             (("bandwidth_efficiency", 101), ("overhead_s", 191))]
    for bandwidth_eff, overhead_s in itertools.product(*grids):
        timing = TimingConstants(ASSUMED_COMPUTE_EFFICIENCY, bandwidth_eff, overhead_s)
        device = SimulatedDevice("h100-sxm-80gb", gpu, timing)
        cost = sum(math.log(s.running / device.step(s.work).seconds / s.point.tokens_per_s) ** 2 for s in states)
        if cost < best_cost:
            best, best_cost = timing, cost
    return best


def fit_power_weights(device: SimulatedDevice, states: Sequence[SteadyState]) -> dict[str, float]:
    """sm/tensor/dram weights giving the published W: ridge least squares toward PRIOR_POWER_WEIGHTS.

    Minimises sum (load(w) - published load)^2 + RIDGE_STRENGTH x |w - prior|^2, where a point's published
    load is (W - idle) / (limit - idle), the mock's law read backwards (no point is at the cap)."""
    spec = PRESETS[device.mock_preset]
    limit, idle = spec.power_limit_watts, spec.idle_power_watts
    import numpy as np  # the workloads extra's (with the bench); only the fit needs it

    names = ("sm", "tensor", "dram")
    rows = np.array([[getattr(device.step(s.work).activity, n) for n in names] for s in states])
    loads = np.array([(s.point.watts - idle) / (limit - idle) for s in states])
    prior = np.array([PRIOR_POWER_WEIGHTS[n] for n in names])
    # The ridge's normal equations: (A^T A + lambda I) w = A^T b + lambda prior.
    normal = rows.T @ rows + RIDGE_STRENGTH * np.eye(len(names))
    weights = [float(w) for w in np.linalg.solve(normal, rows.T @ loads + RIDGE_STRENGTH * prior)]
    if any(w < 0 for w in weights):
        raise ValueError(f"the power fit gave a negative weight {dict(zip(names, weights))}")
    return dict(zip(names, weights))


def calibration_states(mock_preset: str = cal.CALIBRATION_MOCK_PRESET) -> list[SteadyState]:
    """The steady states of the published points, with the KV cache of ``mock_preset``'s GPU."""
    config = model_config(cal.CALIBRATION_MODEL_PRESET)
    kv_cache_bytes = cal.KV_CACHE_BYTES_BY_PRESET[mock_preset]
    return [steady_state(config, point, kv_cache_bytes=kv_cache_bytes) for point in cal.H100_LLAMA_8B_POINTS]


def run_fit() -> tuple[TimingConstants, dict[str, float]]:
    """Fit timing, then power weights on the fitted timing's activities."""
    states = calibration_states()
    gpu = GPU_SPECS[MOCK_GPUS[cal.CALIBRATION_MOCK_PRESET]]
    timing = fit_timing(states, gpu)
    weights = fit_power_weights(SimulatedDevice(cal.CALIBRATION_MOCK_PRESET, gpu, timing), states)
    return timing, weights


def _miss(simulated: float, published: float) -> str:
    return f"{100 * (simulated - published) / published:+.1f}%"


def calibration_table(device: SimulatedDevice | None = None) -> str:
    """Markdown: each published point, simulated vs published tok/s, W and J/token, and the miss."""
    device = device or simulated_device(cal.CALIBRATION_MOCK_PRESET)
    lines = ["| batch (running) | bound | tok/s sim / pub (miss) | W sim / pub (miss) | J/token sim / pub (miss) |",
             "|---|---|---:|---:|---:|"]
    for state in calibration_states():
        r = simulated_point(device, state)
        p = state.point
        lines.append(f"| {p.batch} ({r['running']}) | {r['bound']} | {r['tokens_per_s']:,.0f} / {p.tokens_per_s:,.0f} "
                     f"({_miss(r['tokens_per_s'], p.tokens_per_s)}) | {r['watts']:.0f} / {p.watts:.0f} "
                     f"({_miss(r['watts'], p.watts)}) | {r['joules_per_token']:.3f} / {p.joules_per_token:.3f} "
                     f"({_miss(r['joules_per_token'], p.joules_per_token)}) |")
    return "\n".join(lines)


def h200_table() -> str:
    """Markdown: the same serving points simulated on the H200 preset (nothing published to compare)."""
    device = simulated_device("h200-141gb")
    lines = ["| batch (running) | bound | tok/s | W | J/token |", "|---|---|---:|---:|---:|"]
    for state in calibration_states("h200-141gb"):
        r = simulated_point(device, state)
        lines.append(f"| {state.point.batch} ({r['running']}) | {r['bound']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['watts']:.0f} | {r['joules_per_token']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wattledger.workloads.device_time",
                                     description="The simulated device's calibration against ML.ENERGY.")
    parser.add_argument("--fit", action="store_true", help="refit the constants and print them with the misses")
    parser.add_argument("--table", action="store_true", help="print the 8b calibration table (current constants)")
    args = parser.parse_args(argv)
    if not (args.fit or args.table):
        parser.print_usage(sys.stderr)
        print("error: give --fit or --table", file=sys.stderr)
        return 2
    if args.fit:
        timing, weights = run_fit()
        print(f"fitted timing: {timing}\nfitted power weights: {weights}\n(in use: {FITTED_TIMING}, {FITTED_POWER_WEIGHTS})\n")
        gpu = GPU_SPECS[MOCK_GPUS[cal.CALIBRATION_MOCK_PRESET]]
        print(calibration_table(SimulatedDevice(cal.CALIBRATION_MOCK_PRESET, gpu, timing, weights)))
    else:
        print("Simulated H100 SXM vs ML.ENERGY (Llama-3.1-8B, vLLM)\n")
        print(calibration_table())
        print("\nSimulated H200 SXM, same points (SIMULATED only)\n")
        print(h200_table())
    print(f"\nlengths: prompt {cal.CHAT_LENGTHS.prompt_tokens} ({cal.CHAT_LENGTHS.prompt_source}); output "
          f"{cal.CHAT_LENGTHS.output_tokens} ({cal.CHAT_LENGTHS.output_source})\npublished: {cal.SOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
