"""Will a training run fit on one GPU? The bytes it holds per GPU, from the model's shape alone, so a run
that cannot fit is refused before the model is built (``8b`` would otherwise spend minutes building, then
run out of memory on its first step).

The estimate is the training state plus what one micro-step's forward leaves for its backward:

    bytes per GPU = params x (4 fp32 weights + 4 fp32 gradients + 8 AdamW moments [+ 4 DDP buckets])
                  + linear params x 2                    bf16 weight copies (under bf16 autocast)
                  + tokens x (layers x per-layer + head)  activations autograd saves
                  + tokens x vocab x (12 + a)            the loss: logits and their gradients

Sources, term by term:

* 16 B per parameter: fp32 master weights 4, fp32 gradients 4 and AdamW's two fp32 moments 8, the
  mixed-precision accounting of Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models", section 3.1 (here the master weights are the model's own parameters, so
  there is no separate 16-bit copy to keep between steps).
* DDP: with ``gradient_as_bucket_view=False`` (torch's default) the reducer keeps its own flat buckets, as
  large as all the gradients (torch docs, ``DistributedDataParallel``: ``gradient_as_bucket_view`` "can
  reduce peak memory usage, where the saved memory size will be equal to the total gradients size"), and
  every rank holds a full replica: 4 B more per parameter, whatever the world size.
* bf16 weight copies: under ``torch.autocast`` each ``nn.Linear`` casts its fp32 weight to bf16 once per
  forward (autocast caches its casts of fp32 leaf tensors that require grad; ``aten/src/ATen/autocast_mode.cpp``,
  ``cached_cast``) and autograd keeps that copy for the backward: 2 B per linear parameter (the embedding
  lookup is not autocast and stays fp32).
* Activations: the method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", section 4.1 (count every tensor autograd saves for the backward), applied to this
  model's forward (``workloads/model.py``) instead of their GPT block: SwiGLU, grouped-query attention, an
  fp32 residual stream and norms, a fused attention kernel, no dropout. ``tests/test_memory_plan.py``
  checks the count against the bytes autograd really saves (``torch.autograd.graph.saved_tensors_hooks``),
  in bf16 autocast and in fp32.

Not counted: a fused attention kernel needs no ``[heads, seq, seq]`` scores (Korthikanti's ``5as/h`` term;
the training call is causal without a mask, which the flash and memory-efficient kernels take on an
H100/H200), one layer's transient backward buffers, cuBLAS workspaces, and the CUDA context (the free
memory the check compares against is measured with the context already held). Gradients and activations
peak together only under gradient accumulation (the earlier micro-steps' gradients are held through the
next one's forward); with one micro-step the sum overstates the peak by up to the gradients' 4 B per
parameter, which is the margin left for the allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wattledger.workloads.model import ModelConfig

GIB = 2**30

# Bytes per parameter held between steps: fp32 weights 4 + fp32 gradients 4 + AdamW exp_avg and
# exp_avg_sq 4 + 4 (ZeRO paper, section 3.1).
STATE_BYTES_PER_PARAM = 4 + 4 + 8
# DDP's gradient buckets, one more gradient-sized buffer (torch DDP docs, gradient_as_bucket_view).
DDP_BUCKET_BYTES_PER_PARAM = 4
# A bf16 copy of each linear weight, kept from the forward to the backward under autocast.
BF16_COPY_BYTES_PER_PARAM = 2
FP32_BYTES = 4
INT64_BYTES = 8


class WontFitError(ValueError):
    """A training configuration that cannot fit on its device; the message is one line with the arithmetic."""


def linear_params(config: ModelConfig) -> int:
    """Parameters in ``nn.Linear`` weights (what autocast copies to bf16): all matrix parameters but the
    norms' gains. The output head counts once whether or not it is tied to the embedding."""
    norm_gains = (2 * config.layers + 1) * config.dim
    return config.matmul_params() - norm_gains


def activation_bytes_per_token(config: ModelConfig, element_bytes: int) -> int:
    """Bytes autograd saves per token for the backward, all layers and the head (the loss's
    ``[tokens, vocab]`` tensors are :func:`loss_bytes_per_token`'s). ``element_bytes``: 2 for the matrix
    products' outputs under bf16 autocast, 4 in fp32.

    Per layer, with h = dim, kv = kv_heads x head_dim, f = ffn_dim, a = element_bytes:

    * 16h: each of the two RMSNorms saves its fp32 input and normalised output (the residual stream is
      fp32: the embedding and the master weights are);
    * 12h: the inputs of the six linears. Under autocast each is its own bf16 cast of the fp32 norm output
      (autocast caches only casts of weights), 6 x 2h; in fp32, q/k/v share one saved input, gate/up
      another, and o has its own: 3 x 4h;
    * 2a.h + 2a.kv: the fused attention kernel saves q, k, v (at kv_heads width) and its output;
    * 4 x heads: its fp32 log-sum-exp per query and head;
    * 4a.f: SwiGLU saves the gate output, its SiLU, the up output and their product (down's input);
    * 8: the two norms' fp32 reciprocal RMS.

    The head adds the final norm (8h + 4), the output projection's input (a.h), and the token ids and
    targets (int64 each).
    """
    h, a, f = config.dim, element_bytes, config.ffn_dim
    kv = config.kv_heads * config.head_dim
    per_layer = 16 * h + 12 * h + 2 * a * h + 2 * a * kv + FP32_BYTES * config.heads + 4 * a * f + 2 * FP32_BYTES
    head = 2 * FP32_BYTES * h + FP32_BYTES + a * h + 2 * INT64_BYTES
    return config.layers * per_layer + head


def loss_bytes_per_token(config: ModelConfig, element_bytes: int) -> int:
    """Peak bytes per token of the loss over ``vocab`` logits: the logits the loop holds (``a`` each), the
    fp32 log-softmax ``F.cross_entropy`` saves (4), and, at the start of the backward, the two fp32
    ``[tokens, vocab]`` gradients its backward materialises (nll_loss's, then log_softmax's: 8)."""
    return config.vocab_size * (element_bytes + FP32_BYTES + 2 * FP32_BYTES)


@dataclass(frozen=True)
class TrainingMemoryPlan:
    """What one GPU holds for a training run, in bytes, term by term (module docstring: sources)."""

    preset: str
    params: int
    batch_size: int  # sequences per micro-step on this GPU
    seq_len: int
    state_bytes_per_param: int  # 16, or 20 under DDP
    state_bytes: int  # fp32 weights, gradients, AdamW moments (and DDP buckets)
    weight_copy_bytes: int  # bf16 copies of the linear weights under autocast; 0 in fp32
    activation_bytes: int  # what autograd saves for the backward, one micro-step
    loss_bytes: int  # logits, the saved log-softmax and their two gradients
    bytes_per_token: int  # activations and loss, per token of the micro-step (what grows with the tokens)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.weight_copy_bytes + self.activation_bytes + self.loss_bytes

    def max_tokens_within(self, limit_bytes: int) -> int:
        """The most tokens per micro-step that fit in ``limit_bytes`` (0 when the state alone does not):
        activations and the loss grow linearly with the tokens, the rest is fixed."""
        room = limit_bytes - self.state_bytes - self.weight_copy_bytes
        return max(0, room // self.bytes_per_token)

    def refusal(self, where: str, limit_bytes: int) -> str | None:
        """None when the run fits in ``limit_bytes``; else one line with the arithmetic and what would fit.
        ``where`` names the memory, e.g. "cuda:0 has 140.0 GiB free"."""
        if self.total_bytes <= limit_bytes:
            return None
        copies = f" + bf16 weight copies {self.weight_copy_bytes / GIB:.1f} GiB" if self.weight_copy_bytes else ""
        activations = f"{(self.activation_bytes + self.loss_bytes) / GIB:.1f} GiB"
        arithmetic = (f"{_scientific(self.params)} params x {self.state_bytes_per_param} B = "
                      f"{self.state_bytes / GIB:.1f} GiB{copies} + activations and loss {activations} for "
                      f"{self.batch_size} x {self.seq_len} tokens")
        fitting = self.max_tokens_within(limit_bytes)
        if fitting:
            advice = (f"use a smaller preset, or at most {fitting:,} tokens per micro-step (--batch-size x "
                      f"--seq-len; --grad-accum keeps the batch)")
        else:
            advice = ("the weights, gradients and AdamW state alone do not fit: use a smaller preset (sharding "
                      "across GPUs is not implemented)")
        return (f"{self.preset} training needs ~{self.total_bytes / GIB:.1f} GiB per GPU ({arithmetic}) but "
                f"{where}; {advice}")

    def to_json(self) -> dict:
        return dict(asdict(self), total_bytes=self.total_bytes)


def _scientific(count: int) -> str:
    """8030261248 -> "8.03e9"."""
    mantissa, exponent = f"{count:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plan_training_memory(config: ModelConfig, batch_size: int, seq_len: int, *, bf16_autocast: bool,
                         ddp: bool) -> TrainingMemoryPlan:
    """The plan for ``batch_size`` x ``seq_len`` tokens per micro-step: fp32 master weights and AdamW, bf16
    autocast (the CUDA recipe) or plain fp32 (the CPU's), DDP's full replica and buckets when ``ddp``."""
    element_bytes = 2 if bf16_autocast else FP32_BYTES
    per_param = STATE_BYTES_PER_PARAM + (DDP_BUCKET_BYTES_PER_PARAM if ddp else 0)
    params = config.total_params()
    tokens = batch_size * seq_len
    activations_per_token = activation_bytes_per_token(config, element_bytes)
    loss_per_token = loss_bytes_per_token(config, element_bytes)
    return TrainingMemoryPlan(
        preset=config.name, params=params, batch_size=batch_size, seq_len=seq_len,
        state_bytes_per_param=per_param, state_bytes=params * per_param,
        weight_copy_bytes=linear_params(config) * BF16_COPY_BYTES_PER_PARAM if bf16_autocast else 0,
        activation_bytes=tokens * activations_per_token, loss_bytes=tokens * loss_per_token,
        bytes_per_token=activations_per_token + loss_per_token)
