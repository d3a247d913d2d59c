"""Which way to call ``scaled_dot_product_attention`` so that a fused kernel runs, per call shape.

SDPA picks its backend from the shapes and the mask (torch source: aten/src/ATen/native/transformers/cuda/
sdp_utils.cpp, ``can_use_flash_attention`` / ``can_use_mem_efficient_attention``): on CUDA the flash kernel
refuses any ``attn_mask``, and the memory-efficient kernel refuses ``q_heads != kv_heads`` before very
recent torch (issue 12; whether 2.11 does is what the GPU check's ``probe_shape`` records), so a masked
grouped-query call lands on the math kernel, which upcasts to fp32, repeats K/V to every query head and
materialises the score matrix. The paths here avoid that whatever the release:

* ``causal``: no history (a prefill from an empty cache): ``is_causal`` over the fresh K/V, no mask, so
  flash runs (it accepts ``enable_gqa``).
* ``unmasked``: every query sees every key (decode where all sequences have the same length, batch 1):
  no mask, grouped-query heads as they are; flash runs.
* ``folded_decode``: one query token per sequence, grouped-query heads, per-sequence lengths. The
  ``q_heads / kv_heads`` query heads that share a KV head are folded into the query length, so K/V keep
  ``kv_heads`` heads (no repeat, no copy) and the mask is one row of lengths per sequence; the
  memory-efficient (or cuDNN) kernel accepts it because the head counts now match.
* ``expanded_kv``: several query tokens per sequence with a mask (prefill on top of a history, mixed
  batches) and grouped-query heads: K/V are expanded to ``q_heads`` heads so the memory-efficient kernel
  accepts the call (a copy of the attended K/V, far cheaper than the math kernel's fp32 scores).
* ``masked``: a mask and equal head counts: passed as it is (memory-efficient or cuDNN).
* ``native_gqa``: the CPU. Its flash kernel takes a mask and grouped-query heads together (measured on
  torch 2.13 with ``backends_that_run``), so nothing is reshaped.

All paths compute the same attention (tests/test_attention_path.py checks each against the math kernel).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import torch.nn.functional as F

CAUSAL = "causal"
UNMASKED = "unmasked"
FOLDED_DECODE = "folded_decode"
EXPANDED_KV = "expanded_kv"
MASKED = "masked"
NATIVE_GQA = "native_gqa"
PATHS = (CAUSAL, UNMASKED, FOLDED_DECODE, EXPANDED_KV, MASKED, NATIVE_GQA)

# What each fused SDPA op is called in a profile, by backend (torch source: aten/src/ATen/native/
# native_functions.yaml, the _scaled_dot_product_*_attention entries).
_BACKEND_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def attention_path(q_heads: int, kv_heads: int, q_len: int, kv_len: int, masked: bool, device_type: str,
                   causal: bool = False) -> str:
    """The path (one of ``PATHS``) a call of this shape takes.

    ``masked``: a per-query mask is needed (sequences of different lengths, or new tokens on top of a
    history). ``causal``: no history, queries and keys are the same ``q_len`` fresh tokens.
    """
    if causal:
        if q_len != kv_len:
            raise ValueError(f"a causal call attends its own tokens: q_len {q_len} != kv_len {kv_len}")
        return CAUSAL
    if not masked:
        return UNMASKED
    if device_type != "cuda":
        return NATIVE_GQA
    if q_heads == kv_heads:
        return MASKED
    return FOLDED_DECODE if q_len == 1 else EXPANDED_KV


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, path: str | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[batch, q_heads, q_len, head_dim]`` over ``k``/``v`` ``[batch, kv_heads, kv_len,
    head_dim]``; ``mask`` (bool, True = attend) broadcasts to ``[batch, 1, q_len, kv_len]``. Returns
    ``[batch, q_heads, q_len, head_dim]``. ``path``: the path to take (a caller that knows it for every
    layer passes it, and tests force one); by default ``attention_path`` of the shapes. Backend priority is
    the caller's (``backend_priority``, entered once per forward pass, not per layer)."""
    if path is None:
        path = attention_path(q.shape[1], k.shape[1], q.shape[2], k.shape[2], mask is not None,
                              q.device.type, causal)
    return _run_path(path, q, k, v, mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the float mask SDPA adds to the scores: 0 or -inf, in ``dtype``.

    SDPA converts a bool mask this way on every call (torch source: aten/src/ATen/native/transformers/
    attention.cpp, ``convert_boolean_attn_mask``); converting once per step spares that per layer.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _run_path(path: str, q, k, v, mask) -> torch.Tensor:
    if path == CAUSAL:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if path == UNMASKED:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if path in (NATIVE_GQA, MASKED):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=path == NATIVE_GQA)
    if path == FOLDED_DECODE:
        return _folded_decode(q, k, v, mask)
    if path == EXPANDED_KV:
        return F.scaled_dot_product_attention(q, _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1]),
                                              attn_mask=mask)
    raise ValueError(f"unknown attention path {path!r}; choose from {', '.join(PATHS)}")


def _folded_decode(q, k, v, mask) -> torch.Tensor:
    """One query token per sequence: query head ``h`` uses KV head ``h // group`` (``enable_gqa``'s
    repeat_interleave order, torch docs of scaled_dot_product_attention), so ``[batch, q_heads, 1, d]``
    read as ``[batch, kv_heads, group, d]`` puts each group's queries on its KV head as ``group`` query
    positions; all of them sit at the same position, so one mask row per sequence serves them all."""
    batch, q_heads, q_len, head_dim = q.shape
    if q_len != 1:
        raise ValueError(f"the folded decode path takes one query token per sequence, not {q_len}")
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.reshape(batch, q_heads, 1, head_dim)


def _expand_heads(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``[batch, kv_heads, len, d]`` -> ``[batch, q_heads, len, d]`` in repeat_interleave order (one copy)."""
    batch, kv_heads, length, head_dim = x.shape
    group = q_heads // kv_heads
    return x[:, :, None].expand(batch, kv_heads, group, length, head_dim).reshape(batch, q_heads, length, head_dim)


def _priority_order(path: str):
    """Backends in the order to try them for ``path`` on CUDA: flash where no mask is passed; for masks the
    memory-efficient kernel, then cuDNN (both take a mask; flash does not). The math kernel last."""
    backend = torch.nn.attention.SDPBackend
    if path in (CAUSAL, UNMASKED):
        return [backend.FLASH_ATTENTION, backend.CUDNN_ATTENTION, backend.EFFICIENT_ATTENTION, backend.MATH]
    return [backend.EFFICIENT_ATTENTION, backend.CUDNN_ATTENTION, backend.FLASH_ATTENTION, backend.MATH]


def _sdpa_kernel_takes_priority() -> bool:
    """``sdpa_kernel(..., set_priority=True)`` (torch/nn/attention/__init__.py; present in 2.11-2.13)."""
    try:
        return "set_priority" in inspect.signature(torch.nn.attention.sdpa_kernel).parameters
    except (AttributeError, TypeError, ValueError):
        return False


_HAS_PRIORITY = _sdpa_kernel_takes_priority()


def backend_priority(path: str, device_type: str):
    """A context giving the path's fused backends priority, on CUDA in eager mode only. Under torch.compile
    the context is left out (dynamo may not trace it); the shapes alone already make the fused kernels
    eligible, and the default order (flash, efficient, math; cuDNN first where torch prefers it) picks them.
    Entering it sets SDPA's global flags (torch/nn/attention/__init__.py): once per forward pass."""
    if device_type != "cuda" or not _HAS_PRIORITY or _compiling():
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(_priority_order(path), set_priority=True)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def example_inputs(path: str, batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
                   device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random q, k, v and a per-sequence-length mask (or None) of the given shape, for a path's call."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q = random(batch, q_heads, q_len, head_dim)
    k, v = random(batch, kv_heads, kv_len, head_dim), random(batch, kv_heads, kv_len, head_dim)
    if path in (CAUSAL, UNMASKED):
        return q, k, v, None
    # Sequence b holds kv_len - b keys (at least q_len, so no query row is fully masked); its queries are
    # the last q_len of them, causally.
    lengths = torch.clamp(kv_len - torch.arange(batch), min=q_len)
    query_positions = lengths[:, None] - q_len + torch.arange(q_len)[None, :]
    mask = torch.arange(kv_len)[None, None, :] <= query_positions[:, :, None]
    return q, k, v, mask[:, None].to(device)


def backends_that_run(q, k, v, mask=None, causal: bool = False, enable_gqa: bool = False) -> dict[str, str]:
    """Each SDPA backend tried alone (``sdpa_kernel([backend])``) on this call: ``{"flash": "ok", "cudnn":
    "RuntimeError: ..."}``. Backends this torch build does not name are left out."""
    results = {}
    for name in ("flash", "efficient", "cudnn", "math"):
        backend = getattr(torch.nn.attention.SDPBackend, _ENUM_NAMES[name], None)
        if backend is None:
            continue
        # SDPA says why a backend refuses a call in warnings, then raises RuntimeError when none is left.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.nn.attention.sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=enable_gqa)
                results[name] = "ok"
            except RuntimeError as error:
                reasons = [str(w.message).splitlines()[0][:200] for w in caught] or [str(error).splitlines()[0]]
                results[name] = "refused: " + " | ".join(reasons[:3])
    return results


_ENUM_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
               "math": "MATH"}


def backend_that_ran(path: str, q, k, v, mask) -> str:
    """The SDPA backend the path's call really dispatches to on this device (read from a profile of the
    call: the fused op's name), or ``"unknown"`` when the profile shows none of them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as recorded, backend_priority(path, q.device.type):
        attend(q, k, v, mask, causal=path == CAUSAL, path=path)
    seen = {_BACKEND_OPS[event.key] for event in recorded.key_averages() if event.key in _BACKEND_OPS}
    # The math kernel's op also shows as a child when a fused op falls back internally: report fused first.
    for backend in ("cudnn", "flash", "efficient", "math"):
        if backend in seen:
            return backend
    return "unknown"


def probe_shape(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, masked: bool,
                device, dtype, causal: bool = False, path: str | None = None) -> dict:
    """For the GPU check: the path a shape takes here (or ``path``, forced), the backend that really ran
    it, and which backends accept the path's call alone."""
    device = torch.device(device)
    path = path or attention_path(q_heads, kv_heads, q_len, kv_len, masked, device.type, causal)
    q, k, v, mask = example_inputs(path, batch, q_heads, kv_heads, q_len, kv_len, head_dim, device, dtype)
    call_q, call_k, call_v, call_mask, gqa = _call_as_made(path, q, k, v, mask)
    return {"shape": {"batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "q_len": q_len,
                      "kv_len": kv_len, "head_dim": head_dim, "masked": masked, "causal": causal},
            "path": path, "ran": backend_that_ran(path, q, k, v, mask),
            "alone": backends_that_run(call_q, call_k, call_v, call_mask, causal=path == CAUSAL, enable_gqa=gqa)}


def _call_as_made(path: str, q, k, v, mask):
    """The tensors the path hands SDPA (after folding or expanding), and whether it asks for enable_gqa."""
    if path == FOLDED_DECODE:
        batch, q_heads, _, head_dim = q.shape
        folded = q.reshape(batch, k.shape[1], q_heads // k.shape[1], head_dim)
        return folded, k, v, mask.reshape(mask.shape[0], 1, 1, mask.shape[-1]), False
    if path == EXPANDED_KV:
        return q, _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1]), mask, False
    return q, k, v, mask, path in (CAUSAL, UNMASKED, NATIVE_GQA)
