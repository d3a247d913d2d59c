"""Roofline arithmetic for the decoder: bytes and FLOPs of a decode step and a prefill, and the rate they allow.

A step cannot run faster than the time to move its bytes through HBM or the time to do its FLOPs on the
tensor cores, whichever is longer (the roofline model: Williams, Waterman and Patterson, "Roofline: an
insightful visual performance model for multicore architectures", CACM 52(4), 2009). Decode at small batch
is bound by the bytes; prefill, and decode at a large enough batch, by the FLOPs.

Everything here is plain arithmetic over ``ModelConfig``: no tensors, no device. Sizes are in elements or
bytes (``element_bytes``: 2 for bf16, 4 for fp32), times in seconds, rates in tokens per second.

    python -m wattledger.workloads.roofline --table     # the figures docs/gpu-check.md quotes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from wattledger.workloads.model import PRESETS, ModelConfig, model_config

BF16_BYTES = 2


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's datasheet ceilings: HBM bandwidth (bytes/s) and dense bf16 tensor-core peak (FLOP/s)."""

    name: str
    hbm_bytes_per_s: float
    peak_bf16_flops: float
    source: str


# Datasheet figures. NVIDIA lists the bf16 tensor-core rate "with sparsity"; the dense rate is half of it
# (the datasheets' footnote). TB/s are decimal (1e12 bytes/s).
GPU_SPECS: dict[str, GpuSpec] = {
    "H100 SXM": GpuSpec("H100 SXM", 3.35e12, 989e12,
                        "NVIDIA H100 Tensor Core GPU datasheet: HBM3 3.35 TB/s, BF16 1,979 TFLOPS with sparsity"),
    "H100 NVL": GpuSpec("H100 NVL", 3.9e12, 835e12,
                        "NVIDIA H100 Tensor Core GPU datasheet: HBM3 3.9 TB/s, BF16 1,671 TFLOPS with sparsity"),
    "H100 PCIe": GpuSpec("H100 PCIe", 2.0e12, 756e12,
                         "NVIDIA H100 Tensor Core GPU datasheet: HBM2e 2 TB/s, BF16 1,513 TFLOPS with sparsity"),
    "H200 SXM": GpuSpec("H200 SXM", 4.8e12, 989e12,
                        "NVIDIA H200 Tensor Core GPU datasheet: HBM3e 4.8 TB/s, BF16 1,979 TFLOPS with sparsity"),
    "H200 NVL": GpuSpec("H200 NVL", 4.8e12, 835e12,
                        "NVIDIA H200 Tensor Core GPU datasheet: HBM3e 4.8 TB/s, BF16 1,671 TFLOPS with sparsity"),
}

# How torch.cuda.get_device_name() / NVML name each part, most specific first: the SXM parts carry no form
# factor in their names ("NVIDIA H100 80GB HBM3", "NVIDIA H200"), the others do ("NVIDIA H200 NVL").
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("H100 NVL", "H100 NVL"),
    ("H100 PCIe", "H100 PCIe"),
    ("H200 NVL", "H200 NVL"),
    ("H200", "H200 SXM"),
    ("H100", "H100 SXM"),
)


def gpu_spec_for(device_name: str) -> GpuSpec | None:
    """The datasheet entry for a device name as torch or NVML reports it, or None for an unlisted GPU."""
    for pattern, key in _NAME_PATTERNS:
        if pattern.lower() in device_name.lower():
            return GPU_SPECS[key]
    return None


# --- bytes --------------------------------------------------------------------------------------------


def layer_weight_elements(config: ModelConfig) -> int:
    """Weights of one block: q, k, v, o projections, the SwiGLU gate/up/down, and the two RMSNorm scales."""
    attention = 2 * config.dim * config.heads * config.head_dim + 2 * config.dim * config.kv_heads * config.head_dim
    feed_forward = 3 * config.dim * config.ffn_dim
    return attention + feed_forward + 2 * config.dim


def streamed_weight_elements(config: ModelConfig) -> int:
    """Weights every decode step reads whole: all blocks, the final norm and the lm_head (vocab x dim).

    A tied input embedding is the lm_head's matrix, so it is already in here, once. An untied one is not:
    the step only gathers rows of it (``embedding_rows_elements``).
    """
    return config.layers * layer_weight_elements(config) + config.dim + config.vocab_size * config.dim


def embedding_rows_elements(config: ModelConfig, batch: int) -> int:
    """Elements of the input embedding a step reads: one row per sequence (at most the whole table).

    Tied: 0 here, because those rows belong to the lm_head matrix that ``streamed_weight_elements`` counts.
    """
    if config.tie_embeddings:
        return 0
    return min(batch, config.vocab_size) * config.dim


def kv_bytes_per_token(config: ModelConfig, element_bytes: int = BF16_BYTES) -> int:
    """K and V of one position over all layers: 2 x layers x kv_heads x head_dim x element bytes.

    The same figure as ``ModelConfig.kv_bytes_per_token``, without needing a torch dtype.
    """
    return 2 * config.layers * config.kv_heads * config.head_dim * element_bytes


@dataclass(frozen=True)
class StepBytes:
    """Bytes a step reads from HBM, by what they are."""

    weights: int  # every matmul weight and norm scale, once
    embedding_rows: int  # the gathered rows of an untied input embedding
    kv_cache: int  # K and V of every attended position of every sequence

    @property
    def total(self) -> int:
        return self.weights + self.embedding_rows + self.kv_cache


def decode_step_bytes(config: ModelConfig, context_lengths: Sequence[int],
                      element_bytes: int = BF16_BYTES) -> StepBytes:
    """HBM bytes one decode step reads for ``len(context_lengths)`` sequences.

    ``context_lengths[b]`` is the number of positions sequence ``b``'s new token attends to (its cached
    history plus itself). Left out, as each is under 1% at the batches and contexts this project runs:
    activations (batch x dim per layer), the new K/V written (batch x ``kv_bytes_per_token``), the logits.
    A kernel that reads more than this (a padded or copied history, fp32 upcasts) shows as a lower fraction
    of the roofline, which is the point of the figure.
    """
    batch = _check_lengths(context_lengths)
    return StepBytes(
        weights=streamed_weight_elements(config) * element_bytes,
        embedding_rows=embedding_rows_elements(config, batch) * element_bytes,
        kv_cache=sum(context_lengths) * kv_bytes_per_token(config, element_bytes),
    )


def prefill_bytes(config: ModelConfig, batch: int, prompt_tokens: int, element_bytes: int = BF16_BYTES) -> StepBytes:
    """HBM bytes of a prefill of ``batch`` prompts of ``prompt_tokens`` each on an empty cache.

    Weights once; the K/V it writes (each position once; a fused attention kernel keeps the tiles it
    re-reads on chip); the embedding rows gathered.
    """
    _check_positive(batch=batch, prompt_tokens=prompt_tokens)
    return StepBytes(
        weights=streamed_weight_elements(config) * element_bytes,
        embedding_rows=embedding_rows_elements(config, batch * prompt_tokens) * element_bytes,
        kv_cache=batch * prompt_tokens * kv_bytes_per_token(config, element_bytes),
    )


# --- FLOPs --------------------------------------------------------------------------------------------


def attention_flops_per_position(config: ModelConfig) -> int:
    """FLOPs one query spends per key position it attends: 4 x layers x heads x head_dim.

    QK^T and the weighted sum of V are each a multiply-add (2 FLOPs) per head dimension per head per layer:
    the 4 x L x H x Q x T of PaLM appendix B (Chowdhery et al. 2022, forward = one third of its 12 L H Q T);
    Kaplan et al. 2020 (Table 1) count only the QK^T half, 2 x n_layer x n_ctx x d_attn.
    """
    return 4 * config.layers * config.heads * config.head_dim


def matmul_flops_per_token(config: ModelConfig, with_lm_head: bool = True) -> int:
    """2 FLOPs (multiply and add) per weight per token: the 2N forward cost (Kaplan et al. 2020, Table 1).

    N is every matrix weight: the blocks' projections (norm scales are elementwise, not in N) and, when the
    token's logits are computed, the lm_head. The input embedding is a lookup and costs no FLOPs.
    """
    blocks = config.layers * (layer_weight_elements(config) - 2 * config.dim)
    lm_head = config.vocab_size * config.dim if with_lm_head else 0
    return 2 * (blocks + lm_head)


def decode_step_flops(config: ModelConfig, context_lengths: Sequence[int]) -> int:
    """FLOPs of one decode step: per sequence 2N (logits included) + 4 L H Q x its context length."""
    batch = _check_lengths(context_lengths)
    return batch * matmul_flops_per_token(config) + attention_flops_per_position(config) * sum(context_lengths)


def prefill_flops(config: ModelConfig, batch: int, prompt_tokens: int, all_logits: bool = False) -> int:
    """FLOPs of a causal prefill of ``batch`` prompts of ``prompt_tokens`` each on an empty cache.

    Token ``i`` (0-based) attends to ``i + 1`` positions, so attention costs 4 L H Q x P(P+1)/2 per prompt:
    the causal count a fused kernel does (it skips masked tiles), half of PaLM's convention of a full T per
    token. Logits only for each prompt's last token unless ``all_logits`` (as ``forward_cached`` does).
    """
    _check_positive(batch=batch, prompt_tokens=prompt_tokens)
    matmul = batch * prompt_tokens * matmul_flops_per_token(config, with_lm_head=False)
    logit_tokens = batch * prompt_tokens if all_logits else batch
    lm_head = 2 * config.vocab_size * config.dim * logit_tokens
    attention = batch * attention_flops_per_position(config) * prompt_tokens * (prompt_tokens + 1) // 2
    return matmul + lm_head + attention


# --- the roofline -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """The lower bound on a step's time and what sets it."""

    bytes_read: int
    flops: int
    memory_s: float  # bytes / bandwidth
    compute_s: float  # FLOPs / peak
    tokens: int  # tokens the step produces (decode: one per sequence; prefill: every prompt token)

    @property
    def step_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def decode_roofline(config: ModelConfig, context_lengths: Sequence[int], hbm_bytes_per_s: float,
                    peak_flops: float, element_bytes: int = BF16_BYTES) -> Roofline:
    """Roofline of one decode step: tokens/s = B / max(bytes / bandwidth, FLOPs / peak)."""
    _check_positive(hbm_bytes_per_s=hbm_bytes_per_s, peak_flops=peak_flops)
    bytes_read = decode_step_bytes(config, context_lengths, element_bytes).total
    flops = decode_step_flops(config, context_lengths)
    return Roofline(bytes_read, flops, bytes_read / hbm_bytes_per_s, flops / peak_flops, len(context_lengths))


def prefill_roofline(config: ModelConfig, batch: int, prompt_tokens: int, hbm_bytes_per_s: float,
                     peak_flops: float, element_bytes: int = BF16_BYTES) -> Roofline:
    """Roofline of a prefill: tokens/s = B x P / max(bytes / bandwidth, FLOPs / peak)."""
    _check_positive(hbm_bytes_per_s=hbm_bytes_per_s, peak_flops=peak_flops)
    bytes_read = prefill_bytes(config, batch, prompt_tokens, element_bytes).total
    flops = prefill_flops(config, batch, prompt_tokens)
    return Roofline(bytes_read, flops, bytes_read / hbm_bytes_per_s, flops / peak_flops, batch * prompt_tokens)


def decode_tokens_per_s(config: ModelConfig, context_lengths: Sequence[int], gpu: GpuSpec,
                        element_bytes: int = BF16_BYTES) -> float:
    """The datasheet roofline decode rate on ``gpu``, tokens per second."""
    return decode_roofline(config, context_lengths, gpu.hbm_bytes_per_s, gpu.peak_bf16_flops,
                           element_bytes).tokens_per_s


def _check_lengths(context_lengths: Sequence[int]) -> int:
    if len(context_lengths) == 0:
        raise ValueError("a decode step needs at least one sequence")
    if any(length < 1 for length in context_lengths):
        raise ValueError(f"every context length must be >= 1 (the new token attends to itself), "
                         f"got {min(context_lengths)}")
    return len(context_lengths)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# --- the table docs/gpu-check.md quotes -----------------------------------------------------------------

# What tests/benchmarks/bench_model.py runs on a GPU (and tests/gpu/check.py asks of it): a 512-token
# prompt, then decode at batch 1 and 128. Its decode() prefills 512 tokens, runs 3 warm-up steps, then
# times 32: timed step i attends 512 + 3 + i positions, 532 on average (rounded).
TABLE_PRESETS = ("1b", "8b")
TABLE_GPUS = ("H100 SXM", "H200 SXM", "H200 NVL")
TABLE_PROMPT_TOKENS = 512
TABLE_DECODE_CONTEXT = round(512 + 3 + (32 + 1) / 2)
TABLE_DECODE_BATCHES = (1, 128)


def table_rows(presets: Sequence[str] = TABLE_PRESETS, gpus: Sequence[str] = TABLE_GPUS,
               decode_context: int = TABLE_DECODE_CONTEXT, prompt_tokens: int = TABLE_PROMPT_TOKENS,
               decode_batches: Sequence[int] = TABLE_DECODE_BATCHES) -> list[dict]:
    """One row per GPU x preset x phase: bytes, FLOPs, the two bounds, which one binds, tokens/s."""
    rows = []
    for gpu_name in gpus:
        gpu = GPU_SPECS[gpu_name]
        for preset in presets:
            config = model_config(preset)
            phases = [(f"prefill {prompt_tokens}, batch 1",
                       prefill_roofline(config, 1, prompt_tokens, gpu.hbm_bytes_per_s, gpu.peak_bf16_flops))]
            for batch in decode_batches:
                phases.append((f"decode batch {batch}, context {decode_context}",
                               decode_roofline(config, [decode_context] * batch, gpu.hbm_bytes_per_s,
                                               gpu.peak_bf16_flops)))
            for phase, roof in phases:
                rows.append({"gpu": gpu_name, "preset": preset, "phase": phase, "bytes": roof.bytes_read,
                             "flops": roof.flops, "memory_ms": 1e3 * roof.memory_s,
                             "compute_ms": 1e3 * roof.compute_s, "bound": roof.bound,
                             "tokens_per_s": roof.tokens_per_s})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| GPU | preset | phase | GB read | GFLOP | memory ms | compute ms | bound | roofline tok/s |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['preset']} | {r['phase']} | {r['bytes'] / 1e9:.2f} | "
                     f"{r['flops'] / 1e9:,.0f} | {r['memory_ms']:.3f} | {r['compute_ms']:.3f} | {r['bound']} | "
                     f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wattledger.workloads.roofline",
                                     description="Roofline figures for the model presets on datasheet GPUs.")
    parser.add_argument("--table", action="store_true", help="print the Markdown table docs/gpu-check.md quotes")
    parser.add_argument("--presets", nargs="*", default=list(TABLE_PRESETS))
    parser.add_argument("--gpus", nargs="*", default=list(TABLE_GPUS))
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS] + [g for g in args.gpus if g not in GPU_SPECS]
    if unknown:
        print(f"error: unknown preset or GPU {unknown[0]!r}; presets: {', '.join(PRESETS)}; "
              f"GPUs: {', '.join(GPU_SPECS)}", file=sys.stderr)
        return 2
    print(markdown_table(table_rows(args.presets, args.gpus)))
    for name in args.gpus:
        print(f"\n{name}: {GPU_SPECS[name].source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
