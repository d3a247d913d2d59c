"""The published measurements the simulated device is calibrated on, and the workload assumed behind them.

Figures: ML.ENERGY leaderboard data (vLLM, Llama-3.1-8B, one H100 SXM), as listed in
docs/measurement.md ("Reference figures"). Energy is GPU energy per
output token (J), power the mean board power over the steady-state window (W), throughput output tokens
per second over that window. ``python -m wattledger.workloads.device_time --fit`` refits against them.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = ("ML.ENERGY leaderboard data: Llama-3.1-8B, 1x H100 SXM, vLLM, chat task "
          "(https://ml.energy/leaderboard; figures as listed in docs/measurement.md, Reference figures)")


@dataclass(frozen=True)
class PublishedPoint:
    """One published serving configuration: vLLM's maximum batch and what was measured at it."""

    batch: int  # vLLM max_num_seqs
    joules_per_token: float  # J per output token
    watts: float  # mean GPU board power, W
    tokens_per_s: float  # output tokens per second


H100_LLAMA_8B_POINTS: tuple[PublishedPoint, ...] = (
    PublishedPoint(batch=8, joules_per_token=0.455, watts=486.0, tokens_per_s=1_070.0),
    PublishedPoint(batch=128, joules_per_token=0.095, watts=669.0, tokens_per_s=7_037.0),
    PublishedPoint(batch=512, joules_per_token=0.070, watts=688.0, tokens_per_s=9_806.0),
)

CALIBRATION_MOCK_PRESET = "h100-sxm-80gb"
CALIBRATION_MODEL_PRESET = "8b"


@dataclass(frozen=True)
class ChatLengths:
    """The request shape assumed behind the published points, in tokens, with where each figure is from."""

    prompt_tokens: int
    output_tokens: int
    prompt_source: str
    output_source: str


# ML.ENERGY does not publish the prompt lengths of its chat task in the pages this project has; its v3
# blog post gives the mean response length of "Text Conversation" (reasoning off). The Azure trace's output
# median (129) cannot be behind the published batch-512 figure: 1,020 prompt tokens per 129 output tokens is
# about 110 GFLOP of prefill per output token for the 8b, and 9,806 tok/s of that is over 1 PFLOP/s, above
# the H100's 989 TFLOP/s dense peak. So: the Azure prompt median with ML.ENERGY's own mean response length.
CHAT_LENGTHS = ChatLengths(
    prompt_tokens=1_020,
    output_tokens=717,
    prompt_source="ASSUMPTION: Azure LLM inference trace 2023, conversation, prompt p50 1,020 tokens "
                  "(docs/workload-figures.md); ML.ENERGY does not state its chat prompt lengths",
    output_source="ML.ENERGY Leaderboard v3.0 blog (ml.energy/blog, 'Diagnosing Inference Energy Consumption "
                  "with the ML.ENERGY Leaderboard v3.0'): Text Conversation mean output 717 tokens",
)

# How many tokens of KV cache vLLM can hold on the H100: it may not run max_num_seqs sequences at once when
# their contexts do not fit, so the steady-state running batch is min(max_num_seqs, this / mean context).
# ASSUMPTION: vLLM's default gpu_memory_utilization 0.9 of 80 GiB, minus the 16.06 GB of bf16 weights and
# about 4 GB for activations and CUDA graphs.
KV_CACHE_BYTES = 0.9 * 80 * 1024**3 - 16.06e9 - 4e9
# The same rule on the H200's 141 GB (143,771 MiB as NVML reports it: probes/mock_presets.py), for the
# simulated-only H200 rows of the table.
KV_CACHE_BYTES_BY_PRESET = {"h100-sxm-80gb": KV_CACHE_BYTES, "h200-141gb": 0.9 * 143_771 * 1024**2 - 16.06e9 - 4e9}
