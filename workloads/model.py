"""A Llama-style decoder in plain PyTorch, with a static KV cache for batched serving.

RMSNorm, rotary position embeddings, grouped-query attention through ``scaled_dot_product_attention``,
SwiGLU feed-forward. Weights are random: sequence lengths and shapes, not the content, decide how a
workload loads the hardware.

Serving uses *slots*: the KV cache is preallocated as ``[layers, slots, kv_heads, max_len, head_dim]``
for keys and values, each sequence owns one slot, and ``lengths[slot]`` says how many positions of it
are filled. ``forward_cached`` runs any batch of slots at once, each with its own number of new tokens
(prefill of different prompt lengths, decode of one token each, or a mix), padding the batch to the
longest and masking per sequence. Attention reads the cache in place: the batch's slots as one slice (a
view of the filled prefix; slots in the slice but not in the batch are attended and dropped) unless they
lie far apart, the one case that gathers. A prefill from empty slots attends its own fresh keys.

Attention goes through workloads/attention.py, which picks per call shape the way to call SDPA that gets
a fused kernel (flash, memory-efficient or cuDNN) instead of the math kernel.

``build_model`` builds on the target device: on a GPU the weights are allocated and drawn there once,
never initialised on the CPU and copied (the CPU path keeps its weights bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from wattledger.workloads import attention
from wattledger.workloads.compiling import compile_step


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

    def attend(self, q, k, v, mask, causal: bool = False) -> torch.Tensor:
        """Attention (on the fused path workloads/attention.py picks for the shape) and the output projection."""
        return self.output(attention.attend(q, k, v, mask, causal=causal))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, tokens, head_dim]`` attention output -> ``[batch, tokens, dim]``."""
        batch, _, tokens, _ = out.shape
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
        with attention.backend_priority(attention.CAUSAL, tokens.device.type):
            for block in self.blocks:
                q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
                x = x + block.attention.attend(q, k, v, None, causal=True)
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
        plan = _CachedBatch(new_lengths, slots, cache, tokens.shape[1], tokens.device)
        cos = self.rope_cos[plan.positions][:, None]
        sin = self.rope_sin[plan.positions][:, None]
        x = self.embedding(tokens)
        with attention.backend_priority(plan.path(self.config), tokens.device.type):
            for layer, block in enumerate(self.blocks):
                q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
                plan.write(cache, layer, k, v)
                x = x + block.attention.output(plan.attend(cache, layer, q, k, v))
                x = x + block.ffn(block.ffn_norm(x))
        for slot, end in zip(slots, plan.ends):
            cache.lengths[slot] = end
        x = self.norm(x)
        if all_logits:
            return self.lm_head(x)
        if plan.last_columns is None:
            return self.lm_head(x[:, -1])
        return self.lm_head(x[plan.batch_rows, plan.last_columns])


# A batch's slots are read as one slice of the cache (a view, no copy) when the slice spans at most this many
# slots per sequence in the batch: the slots in the slice that are not in the batch are attended and dropped.
# A gather copies the history (read + write) before attention reads it again, about 3x the bytes of reading
# it in place, so a slice up to 2x the batch still moves fewer bytes.
SLICE_SLOTS_PER_ROW = 2


class _CachedBatch:
    """Where one ``forward_cached`` call reads and writes the cache: index tensors built once per call (torch
    ops on the host, one pinned non-blocking copy to the device), and how attention reads the history."""

    def __init__(self, new_lengths: list[int], slots: list[int], cache: KVCache, width: int, device):
        batch = len(slots)
        starts = [cache.lengths[s] for s in slots]
        self.ends = [start + n for start, n in zip(starts, new_lengths)]
        self.width, self.device_type = width, torch.device(device).type
        self.span = max(self.ends)  # keys attended: positions [0, span) of each slot
        if self.span > cache.max_len:
            raise ValueError(f"a sequence would grow past the cache's {cache.max_len} tokens")
        self.fresh = not any(starts)  # no history: attend the new tokens themselves, causally
        self.low_slot, high_slot = min(slots), max(slots)
        self.slice_slots = high_slot - self.low_slot + 1
        self.in_slice = self.slice_slots <= SLICE_SLOTS_PER_ROW * batch
        self.identity = slots == list(range(self.low_slot, self.low_slot + batch))
        # Every query sees every key [0, span): one new token per sequence, all sequences equally long.
        self.unmasked = width == 1 and all(end == self.span for end in self.ends)
        self.all_real = all(n == width for n in new_lengths)
        # Consecutive slots, all at one length, every token real (batch 1 always): the new tokens fill one
        # rectangle of the cache, written through a slice view instead of an indexed scatter.
        self.rectangle = (self.identity and self.all_real and all(start == starts[0] for start in starts),
                          starts[0])
        if width == 1 and self.all_real:
            host = _decode_indices(slots, starts, self)
        else:
            host = _host_indices(new_lengths, slots, starts, width, cache.max_len, self)
        self._unpack(_to_device(host["packed"], device), host["sizes"], batch, width, device, cache.keys.dtype)

    def _unpack(self, packed: torch.Tensor, sizes: dict, batch: int, width: int, device, dtype) -> None:
        parts = dict(zip(sizes, packed.split(list(sizes.values()))))
        self.positions = parts["positions"].view(batch, width)
        self.write_slots, self.write_positions = parts["write_slots"], parts["write_positions"]
        self.rows, self.columns = parts.get("rows"), parts.get("columns")
        self.last_columns = parts.get("last_columns")  # None when every row's last token is its last column
        self.slot_index = parts["slot_index"]  # slot (gather) or slot - low_slot (slice) of each row
        self.batch_rows = torch.arange(batch, device=device) if self.last_columns is not None else None
        self.mask = None
        if not self.fresh and not self.unmasked:
            query_positions = parts["query_positions"].view(-1, width)  # one row per sequence attended
            key_positions = torch.arange(self.span, device=device)
            # A query at position p sees keys 0..p of its own sequence; padding rows are computed and dropped.
            self.mask = attention.additive_mask(key_positions[None, None, None, :] <= query_positions[:, None, :, None],
                                                dtype)

    def path(self, config: ModelConfig) -> str:
        """The attention path every layer of this call takes (workloads/attention.py)."""
        return attention.attention_path(config.heads, config.kv_heads, self.width, self.width if self.fresh
                                        else self.span, self.mask is not None, self.device_type, self.fresh)

    def write(self, cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write only the real new tokens' keys and values into their slots (``k``/``v`` ``[batch, kv_heads,
        width, head_dim]``): a slice assignment when they fill one rectangle, else one indexed write each;
        either way as many elements as there are new tokens."""
        uniform, start = self.rectangle
        if uniform:
            stop_slot, stop = self.low_slot + k.shape[0], start + k.shape[2]
            cache.keys[layer, self.low_slot:stop_slot, :, start:stop] = k
            cache.values[layer, self.low_slot:stop_slot, :, start:stop] = v
            return
        if self.all_real:
            new_k = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])
            new_v = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])
        else:
            new_k = k.transpose(1, 2)[self.rows, self.columns]
            new_v = v.transpose(1, 2)[self.rows, self.columns]
        cache.keys[layer][self.write_slots, :, self.write_positions] = new_k
        cache.values[layer][self.write_slots, :, self.write_positions] = new_v

    def attend(self, cache: KVCache, layer: int, q, k, v) -> torch.Tensor:
        """Attention output ``[batch, heads, width, head_dim]`` of each row over its slot's history."""
        if self.fresh:
            return attention.attend(q, k, v, None, causal=True)
        if not self.in_slice:
            # Slots spread far apart: gather their histories (a copy), the one case that still copies.
            keys = cache.keys[layer][self.slot_index, :, : self.span]
            values = cache.values[layer][self.slot_index, :, : self.span]
            return attention.attend(q, keys, values, self.mask)
        stop = self.low_slot + self.slice_slots
        keys = cache.keys[layer, self.low_slot:stop, :, : self.span]  # views of the filled prefix
        values = cache.values[layer, self.low_slot:stop, :, : self.span]
        if self.identity:
            return attention.attend(q, keys, values, self.mask)
        # Queries go to their slot's row of the slice; rows of slots outside the batch attend and are dropped.
        spread = q.new_zeros((self.slice_slots, *q.shape[1:])).index_copy_(0, self.slot_index, q)
        return attention.attend(spread, keys, values, self.mask)[self.slot_index]


def _host_indices(new_lengths: list[int], slots: list[int], starts: list[int], width: int, max_len: int,
                  plan: _CachedBatch) -> dict:
    """Every index tensor a call needs, built with torch ops on the host and packed into one long tensor
    (so the device gets one copy): positions ``[batch * width]``, the real tokens' rows, columns, slots and
    cache positions, each row's last real column, and the rows of the attended history."""
    lengths = torch.tensor(new_lengths, dtype=torch.long)
    start = torch.tensor(starts, dtype=torch.long)
    slot = torch.tensor(slots, dtype=torch.long)
    offsets = torch.arange(width, dtype=torch.long)
    positions = (start[:, None] + offsets[None, :]).clamp_(max=max_len - 1)
    parts = {"positions": positions.flatten()}
    if plan.all_real:
        parts["write_slots"] = slot.repeat_interleave(width)
        parts["write_positions"] = parts["positions"]
    else:
        rows = torch.repeat_interleave(torch.arange(len(slots)), lengths)
        first = torch.cumsum(lengths, 0) - lengths  # each row's first index among the real tokens
        columns = torch.arange(len(rows)) - first.repeat_interleave(lengths)
        parts.update(rows=rows, columns=columns, write_slots=slot[rows], write_positions=start[rows] + columns)
    if not plan.all_real:
        parts["last_columns"] = lengths - 1
    parts["slot_index"] = slot - plan.low_slot if plan.in_slice else slot
    if not plan.fresh and not plan.unmasked:
        query_positions = positions
        if plan.in_slice and not plan.identity:
            # Slots in the slice but not in the batch: one query at position 0, so no row is fully masked.
            query_positions = torch.zeros(plan.slice_slots, width, dtype=torch.long)
            query_positions[parts["slot_index"]] = positions
        parts["query_positions"] = query_positions.flatten()
    sizes = {name: part.numel() for name, part in parts.items()}
    return {"packed": torch.cat(list(parts.values())), "sizes": sizes}


def _decode_indices(slots: list[int], starts: list[int], plan: _CachedBatch) -> dict:
    """``_host_indices`` for one new token per sequence: each index is ``batch`` values, so the lists are
    built in Python (fewer host ops than the torch ones at decode batches) and packed into one tensor."""
    slot_index = [s - plan.low_slot for s in slots] if plan.in_slice else list(slots)
    parts = {"positions": starts, "write_slots": slots, "write_positions": starts, "slot_index": slot_index}
    if not plan.fresh and not plan.unmasked:
        query_positions = starts
        if plan.in_slice and not plan.identity:
            query_positions = [0] * plan.slice_slots  # slots in the slice but not in the batch: position 0
            for row, position in zip(slot_index, starts):
                query_positions[row] = position
        parts["query_positions"] = query_positions
    sizes = {name: len(part) for name, part in parts.items()}
    return {"packed": torch.tensor([value for part in parts.values() for value in part], dtype=torch.long),
            "sizes": sizes}


def _to_device(values, device: torch.device) -> torch.Tensor:
    """A long tensor on ``device`` from host values (a list or a CPU tensor), copied without waiting.

    ``torch.tensor(values, device="cuda")`` would copy synchronously, which waits for every kernel already
    queued: one hidden device sync per call on the decode hot path. A non-blocking copy is only
    asynchronous from pinned (page-locked) host memory, so the values go through a pinned buffer.
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A randomly initialised model on ``device`` in ``dtype`` (same seed, same device: same weights).

    On the CPU the weights are today's (the tests and goldens rely on them): torch's default module
    initialisation under ``torch.manual_seed(seed)``, then the normal(0, 0.02) draws of ``_init_weights``.
    Elsewhere the model is built on the ``meta`` device (no memory, no RNG), allocated once on the target in
    ``dtype`` and each weight is drawn once there, from a generator on that device: no CPU-side
    initialisation (a serial RNG, twice per weight) and no host copy of the weights.
    """
    device = torch.device(device)
    if device.type == "cpu":
        torch.manual_seed(seed)
        model = Transformer(config)
        return model.to(dtype=dtype) if dtype != torch.float32 else model
    return build_on_device(config, device, dtype, seed)


def build_on_device(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """The model built on ``meta`` and initialised in place on ``device`` (see ``build_model``)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)  # default initialisers run on meta tensors: no storage, no RNG draws
    if config.tie_embeddings:
        # to_empty would give the tied lm_head a tensor of its own (an allocation the size of the vocabulary
        # table); untie it on meta and tie it again after.
        model.lm_head.weight = None
    model = model.to(dtype=dtype).to_empty(device=device)  # one allocation per weight, uninitialised
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    generator = _device_generator(device, seed)
    with torch.no_grad():
        seen: set[int] = set()
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and id(weight) not in seen:  # a tied lm_head: drawn once
                seen.add(id(weight))
                init_parameter(module, weight, generator)
    # The RoPE tables stay fp32 (their precision sets the rotation's), computed on the device.
    model.rope_cos, model.rope_sin = rope_tables(config, device)
    return model


def init_parameter(module: nn.Module, weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """Initialise one module's weight in place: RMSNorm scales to one, Linear and Embedding matrices
    normal(0, 0.02) as ``Transformer._init_weights`` does (std 0.02: GPT-2's and nanoGPT's initialisation)."""
    if isinstance(module, RMSNorm):
        weight.fill_(1.0)
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        weight.normal_(mean=0.0, std=0.02, generator=generator)
    else:
        raise TypeError(f"no initialisation for a {type(module).__name__} weight")


def _device_generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; None on ``meta`` (nothing is drawn there)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


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
    the batch is padded to fixed buckets (``bucket``) and the history attended to a bucketed length
    (``history_bucket``: compiled, the smallest power of two, at least ``MIN_HISTORY_BUCKET``, covering the
    longest sequence; masked per sequence), so a compiled graph sees the same shapes step after step while
    a step reads at most twice the longest history, not every slot's ``max_len`` positions. The history
    length is a dynamic dimension of the compiled step: one graph per batch bucket. Padding rows decode
    into a spare slot that no sequence owns.
    """

    def __init__(self, model: Transformer, cache: KVCache, compile: bool = False):
        if cache.slots < 2:
            raise ValueError("the static decoder needs a spare cache slot for padding rows")
        self.model = model
        self.cache = cache
        self.spare_slot = cache.slots - 1  # callers must not give this slot to a sequence
        self.compiled = compile
        self._key_positions = torch.arange(cache.max_len, device=cache.keys.device)
        step = self._step
        if compile:
            step = _compile_decode_step(step, cache)
        self._compiled_step = step

    def compile_report(self) -> dict | None:
        """``CompiledStep.report()`` of the compiled step (graphs, recompiles, eager fall-back); None in eager."""
        return self._compiled_step.report() if self.compiled else None

    def history_bucket(self, longest: int) -> int:
        """Keys attended for a batch whose longest sequence holds ``longest`` tokens. Compiled: a power of two
        (each distinct length is one more CUDA-graph recording, so few of them); eager: ``longest`` itself
        (no graphs at stake)."""
        if self.compiled:
            return self.power_of_two_bucket(longest, self.cache.max_len)
        return longest

    @staticmethod
    def power_of_two_bucket(longest: int, max_len: int) -> int:
        """The smallest power of two, at least ``MIN_HISTORY_BUCKET``, that holds ``longest`` (capped at max_len)."""
        return min(max(MIN_HISTORY_BUCKET, 1 << max(0, longest - 1).bit_length()), max_len)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              key_positions: torch.Tensor) -> torch.Tensor:
        """``key_positions``: ``arange(history)``, the positions attended; its length is the history bucket
        (a dynamic dimension under compile, so one graph per batch bucket serves every history bucket)."""
        model, cache = self.model, self.cache
        history = key_positions.shape[0]
        cos = model.rope_cos[positions][:, None, None]  # [batch, 1, 1, half]
        sin = model.rope_sin[positions][:, None, None]
        # All slots read as one slice (a view) when the batch fills more than half of them: padding the
        # queries to every slot costs less than gathering the batch's histories (see SLICE_SLOTS_PER_ROW).
        whole_cache = cache.slots < SLICE_SLOTS_PER_ROW * tokens.shape[0]
        query_positions = positions
        if whole_cache:
            # Slots outside the batch: one query at position 0, so no row is fully masked.
            query_positions = torch.zeros(cache.slots, dtype=positions.dtype, device=positions.device)
            query_positions = query_positions.index_copy(0, slots, positions)
        mask = attention.additive_mask(key_positions[None, None, None, :] <= query_positions[:, None, None, None],
                                       cache.keys.dtype)
        x = model.embedding(tokens[:, None])
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            cache.keys[layer][slots, :, positions] = k[:, :, 0]
            cache.values[layer][slots, :, positions] = v[:, :, 0]
            if whole_cache:
                keys, values = cache.keys[layer, :, :, :history], cache.values[layer, :, :, :history]
                # Padding rows all write the spare slot with the same token and position: identical values.
                spread = q.new_zeros((cache.slots, *q.shape[1:])).index_copy(0, slots, q)
                out = attention.attend(spread, keys, values, mask)[slots]
            else:
                keys, values = cache.keys[layer][slots, :, :history], cache.values[layer][slots, :, :history]
                out = attention.attend(q, keys, values, mask)
            x = x + block.attention.output(out)
            x = x + block.ffn(block.ffn_norm(x))
        return model.lm_head(model.norm(x))[:, 0]

    def step(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """Decode one token for each ``slots[i]`` (fed ``tokens[i]``); logits ``[len(slots), vocab]``."""
        cache = self.cache
        if self.spare_slot in slots:
            raise ValueError("the spare slot is reserved for padding")
        width = bucket(len(slots))
        padding = width - len(slots)
        positions = [cache.lengths[s] for s in slots]
        if max(positions) >= cache.max_len:
            raise ValueError(f"a sequence would grow past the cache's {cache.max_len} tokens")
        # One host-to-device copy for the three index rows.
        rows = _to_device([tokens + [0] * padding, positions + [0] * padding, slots + [self.spare_slot] * padding],
                          cache.keys.device)
        key_positions = self._key_positions[: self.history_bucket(max(positions) + 1)]
        if self.compiled:
            # The history length is a dynamic dimension: a new bucket re-records a CUDA graph (milliseconds),
            # it does not recompile (torch._dynamo.mark_dynamic's docs). "maybe": should a backend need the
            # length static after all, dynamo compiles one graph per history bucket instead of failing.
            _mark_dynamic(key_positions, 0)
        path = attention.attention_path(self.model.config.heads, self.model.config.kv_heads, 1,
                                        key_positions.shape[0], True, cache.keys.device.type)
        with attention.backend_priority(path, cache.keys.device.type):  # a no-op under compile
            logits = self._compiled_step(rows[0], rows[1], rows[2], key_positions)
        for s in slots:
            cache.lengths[s] += 1
        return logits[: len(slots)]


# The shortest history a static decode step attends, in tokens: below it the step is launch-bound anyway.
MIN_HISTORY_BUCKET = 64


def decode_graphs(cache: KVCache) -> int:
    """Compiled graphs a static decoder on ``cache`` needs: one per batch bucket up to ``slots - 1``
    sequences. The history length is a dynamic dimension: it adds CUDA-graph recordings, not graphs. (Were
    it specialised, each history bucket would be a graph too, and the limit hit would be reported.)"""
    return len({bucket(n) for n in range(1, cache.slots)})


def _mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None) or torch._dynamo.mark_dynamic
    mark(tensor, dim)


def _compile_decode_step(step, cache: KVCache):
    """``step`` compiled (workloads/compiling.py): the cache's K/V tensors are its static inputs (mutated in
    place every step; CUDA graphs need them at fixed addresses), with a recompile budget of one graph per
    batch bucket; a shape past it runs eagerly and ``compile_report`` says so."""
    return compile_step(step, device_type=cache.keys.device.type, static_tensors=[cache.keys, cache.values],
                        name="static_decode", recompile_limit=decode_graphs(cache))
