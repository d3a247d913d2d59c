"""A Llama-style decoder in plain PyTorch, with a static KV cache for batched serving.

RMSNorm, rotary position embeddings, grouped-query attention through ``scaled_dot_product_attention``,
SwiGLU feed-forward. Weights are random: sequence lengths and shapes, not the content, decide how a
workload loads the hardware.

Serving uses *slots*: the KV cache is preallocated as ``[layers, slots, kv_heads, max_len, head_dim]``
for keys and values, each sequence owns one slot, and ``lengths[slot]`` says how many positions of it
are filled. ``forward_cached`` runs any batch of slots at once, each with its own number of new tokens
(prefill of different prompt lengths, decode of one token each, or a mix), padding the batch to the
longest and masking per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder. ``ffn_dim`` is the SwiGLU hidden size."""

    name: str
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 500_000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of KV cache one token takes: 2 (K and V) x layers x kv_heads x head_dim x element size."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(dtype).bits // 8

    def matmul_params(self) -> int:
        """Parameters that take part in matrix products (all but the input embedding table, a lookup).

        This is the N of the 6N FLOPs-per-token estimate (PaLM appendix B; nanoGPT's MFU).
        """
        attention = self.dim * self.heads * self.head_dim * 2 + self.dim * self.kv_heads * self.head_dim * 2
        feed_forward = 3 * self.dim * self.ffn_dim
        per_layer = attention + feed_forward + 2 * self.dim
        return self.layers * per_layer + self.dim + self.vocab_size * self.dim

    def total_params(self) -> int:
        embedding = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.matmul_params() + embedding

    def training_flops_per_token(self, seq_len: int) -> float:
        """6N + 12 * layers * heads * head_dim * seq_len (PaLM appendix B)."""
        return 6 * self.matmul_params() + 12 * self.layers * self.heads * self.head_dim * seq_len


# Shapes: Llama-3.2-1B and Llama-3.1-8B as published in their model cards (config.json); 125m at GPT-2
# small scale; tiny for CPU tests. Source table: docs/workload-figures.md, "Model shapes".
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", dim=128, layers=2, heads=4, kv_heads=2, ffn_dim=384, vocab_size=512,
                        max_seq_len=1024, rope_theta=10_000.0),
    "125m": ModelConfig("125m", dim=768, layers=12, heads=12, kv_heads=4, ffn_dim=2048, vocab_size=32_000,
                        max_seq_len=4096, rope_theta=10_000.0, tie_embeddings=True),
    "1b": ModelConfig("1b", dim=2048, layers=16, heads=32, kv_heads=8, ffn_dim=8192, vocab_size=128_256,
                      max_seq_len=8192, tie_embeddings=True),
    "8b": ModelConfig("8b", dim=4096, layers=32, heads=32, kv_heads=8, ffn_dim=14_336, vocab_size=128_256,
                      max_seq_len=8192),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    try:
        config = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}") from None
    return replace(config, **overrides) if overrides else config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16, as the Llama reference does.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, ``[max_seq_len, head_dim / 2]`` each, in fp32."""
    half = config.head_dim // 2
    inverse_freq = 1.0 / (config.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.max_seq_len, device=device, dtype=torch.float32), inverse_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, heads, tokens, head_dim]`` by per-token tables ``[batch, 1, tokens, head_dim/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.q = nn.Linear(config.dim, config.heads * config.head_dim, bias=False)
        self.k = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.v = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.o = nn.Linear(config.heads * config.head_dim, config.dim, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, tokens, _ = x.shape
        c = self.config
        q = self.q(x).view(batch, tokens, c.heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, tokens, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, tokens, c.kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask) -> torch.Tensor:
        batch, _, tokens, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(batch, tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)


class KVCache:
    """Preallocated keys and values for ``slots`` sequences of up to ``max_len`` tokens.

    ``keys``/``values`` are ``[layers, slots, kv_heads, max_len, head_dim]``; ``lengths[slot]`` (a CPU
    list, so reading it never synchronises the device) is how many positions hold real tokens.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device, dtype):
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's {config.max_seq_len}")
        shape = (config.layers, slots, config.kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.max_len = max_len
        self.bytes_per_token = config.kv_bytes_per_token(dtype)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return self.keys.nelement() * self.keys.element_size() * 2

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def export(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one slot's filled K and V, ``[layers, kv_heads, length, head_dim]`` each."""
        length = self.lengths[slot]
        return self.keys[:, slot, :, :length], self.values[:, slot, :, :length]

    def load(self, slot: int, keys: torch.Tensor, values: torch.Tensor, non_blocking: bool = False) -> None:
        """Fill a slot from tensors shaped as ``export`` returns (any device)."""
        length = keys.shape[2]
        self.keys[:, slot, :, :length].copy_(keys, non_blocking=non_blocking)
        self.values[:, slot, :, :length].copy_(values, non_blocking=non_blocking)
        self.lengths[slot] = length


class Transformer(nn.Module):
    """The decoder. ``forward`` is the plain full-sequence pass (training); ``forward_cached`` serves."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        cos, sin = rope_tables(config, torch.device("cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` for a full causal pass over ``tokens`` ``[batch, tokens]``."""
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        cos = self.rope_cos[positions][None, None]
        sin = self.rope_sin[positions][None, None]
        x = self.embedding(tokens)
        for block in self.blocks:
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + block.attention.o(out.transpose(1, 2).reshape(batch, length, -1))
            x = x + block.ffn(block.ffn_norm(x))
        return self.lm_head(self.norm(x))

    def forward_cached(
        self,
        tokens: torch.Tensor,
        new_lengths: list[int],
        slots: list[int],
        cache: KVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run new tokens of several sequences on top of what their cache slots hold.

        ``tokens`` is ``[batch, width]``, row ``b`` holding ``new_lengths[b]`` real tokens for slot
        ``slots[b]`` (the rest is padding). Their keys and values are written into the cache and the
        slot lengths advance. Returns the logits of each row's last real token ``[batch, vocab]``, or of
        every position ``[batch, width, vocab]`` with ``all_logits``.
        """
        batch, width = tokens.shape
        device = tokens.device
        starts = [cache.lengths[s] for s in slots]
        ends = [start + n for start, n in zip(starts, new_lengths)]
        if max(ends) > cache.max_len:
            raise ValueError(f"a sequence would grow past the cache's {cache.max_len} tokens")
        span = max(ends)  # keys attended: positions [0, span) of each slot
        # Index tensors are built from host lists and copied without waiting: no device sync here.
        positions = _to_device([[min(start + t, cache.max_len - 1) for t in range(width)] for start in starts],
                               device)  # [batch, width]
        cos = self.rope_cos[positions][:, None]
        sin = self.rope_sin[positions][:, None]
        key_positions = torch.arange(span, device=device)
        # A query at position p sees keys 0..p of its own sequence; padding rows are computed and dropped.
        mask = (key_positions[None, None, None, :] <= positions[:, None, :, None])
        real = [(b, t) for b, n in enumerate(new_lengths) for t in range(n)]
        rows = _to_device([b for b, _ in real], device)
        columns = _to_device([t for _, t in real], device)
        slot_t = _to_device(slots, device)
        write_slots = _to_device([slots[b] for b, _ in real], device)
        write_positions = _to_device([starts[b] + t for b, t in real], device)

        x = self.embedding(tokens)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            # Write only the real tokens into their slots, then read each slot's whole history.
            cache.keys[layer][write_slots, :, write_positions] = k.transpose(1, 2)[rows, columns]
            cache.values[layer][write_slots, :, write_positions] = v.transpose(1, 2)[rows, columns]
            keys = cache.keys[layer][slot_t, :, :span]
            values = cache.values[layer][slot_t, :, :span]
            x = x + block.attention.attend(q, keys, values, mask)
            x = x + block.ffn(block.ffn_norm(x))
        for slot, end in zip(slots, ends):
            cache.lengths[slot] = end
        x = self.norm(x)
        if all_logits:
            return self.lm_head(x)
        last = _to_device([n - 1 for n in new_lengths], device)
        return self.lm_head(x[torch.arange(batch, device=device), last])


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """A long tensor on ``device`` from host values, copied without waiting for the device.

    ``torch.tensor(values, device="cuda")`` would copy synchronously, which waits for every kernel already
    queued: one hidden device sync per call on the decode hot path.
    """
    host = torch.tensor(values, dtype=torch.long)
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A randomly initialised model on ``device`` in ``dtype`` (same seed, same weights)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    model.rope_cos = model.rope_cos.to(device)
    model.rope_sin = model.rope_sin.to(device)
    return model.to(device=device, dtype=dtype) if dtype != torch.float32 else model.to(device)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (what serving and training use), fp32 on CPU (exact tests, fast enough at tiny sizes)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def padded_batch(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Right-pad token lists into ``[batch, longest]`` (pad 0) and return it with the real lengths."""
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    rows = [s + [0] * (width - len(s)) for s in sequences]
    return _to_device(rows, device), lengths


def bucket(size: int, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)) -> int:
    """The smallest bucket that holds ``size``, so compiled decode graphs are reused across batch sizes."""
    for b in buckets:
        if size <= b:
            return b
    return int(2 ** math.ceil(math.log2(size)))


class StaticDecoder:
    """One decode step with static shapes, so ``torch.compile`` (CUDA graphs on GPU) can reuse its graph.

    ``forward_cached`` attends over the longest history in the batch, a shape that changes every step. Here
    every step attends over the whole cache (``max_len`` keys, masked per sequence) and batches are padded
    to fixed buckets, so the compiled graph sees the same shapes step after step. Padding rows decode into
    a spare slot that no sequence owns.
    """

    def __init__(self, model: Transformer, cache: KVCache, compile: bool = False):
        if cache.slots < 2:
            raise ValueError("the static decoder needs a spare cache slot for padding rows")
        self.model = model
        self.cache = cache
        self.spare_slot = cache.slots - 1  # callers must not give this slot to a sequence
        self.compiled = compile
        step = self._step
        if compile:
            mode = "reduce-overhead" if cache.keys.device.type == "cuda" else "default"
            step = torch.compile(step, mode=mode, dynamic=False)
        self._compiled_step = step

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        cos = model.rope_cos[positions][:, None, None]  # [batch, 1, 1, half]
        sin = model.rope_sin[positions][:, None, None]
        key_positions = torch.arange(cache.max_len, device=tokens.device)
        mask = key_positions[None, None, None, :] <= positions[:, None, None, None]
        x = model.embedding(tokens[:, None])
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            cache.keys[layer][slots, :, positions] = k[:, :, 0]
            cache.values[layer][slots, :, positions] = v[:, :, 0]
            keys = cache.keys[layer][slots]
            values = cache.values[layer][slots]
            x = x + block.attention.attend(q, keys, values, mask)
            x = x + block.ffn(block.ffn_norm(x))
        return model.lm_head(model.norm(x))[:, 0]

    def step(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """Decode one token for each ``slots[i]`` (fed ``tokens[i]``); logits ``[len(slots), vocab]``."""
        cache = self.cache
        if self.spare_slot in slots:
            raise ValueError("the spare slot is reserved for padding")
        width = bucket(len(slots))
        padded_slots = slots + [self.spare_slot] * (width - len(slots))
        positions = [cache.lengths[s] for s in slots] + [0] * (width - len(slots))
        if max(positions) >= cache.max_len:
            raise ValueError(f"a sequence would grow past the cache's {cache.max_len} tokens")
        device = cache.keys.device
        logits = self._compiled_step(
            _to_device(tokens + [0] * (width - len(slots)), device),
            _to_device(positions, device),
            _to_device(padded_slots, device),
        )
        for s in slots:
            cache.lengths[s] += 1
        return logits[: len(slots)]
