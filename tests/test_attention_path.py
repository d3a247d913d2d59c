"""The attention path each call shape takes, and that every path computes what the math kernel computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from wattledger.workloads import attention  # noqa: E402
from wattledger.workloads.attention import (  # noqa: E402
    CAUSAL,
    EXPANDED_KV,
    FOLDED_DECODE,
    MASKED,
    NATIVE_GQA,
    UNMASKED,
    attend,
    attention_path,
    example_inputs,
)

# (q_heads, kv_heads, q_len, kv_len, masked, causal) -> the path on CUDA, and on the CPU.
SHAPES = {
    "prefill from empty (8b)": ((32, 8, 2048, 2048, False, True), CAUSAL, CAUSAL),
    "decode, equal lengths (8b, batch 1)": ((32, 8, 1, 700, False, False), UNMASKED, UNMASKED),
    "decode, per-sequence lengths (8b)": ((32, 8, 1, 700, True, False), FOLDED_DECODE, NATIVE_GQA),
    "prefill on a history / mixed (8b)": ((32, 8, 64, 700, True, False), EXPANDED_KV, NATIVE_GQA),
    "masked, no grouping": ((8, 8, 64, 700, True, False), MASKED, NATIVE_GQA),
    "decode, no grouping": ((8, 8, 1, 700, True, False), MASKED, NATIVE_GQA),
}


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_takes_its_path(name):
    shape, on_cuda, on_cpu = SHAPES[name]
    q_heads, kv_heads, q_len, kv_len, masked, causal = shape
    assert attention_path(q_heads, kv_heads, q_len, kv_len, masked, "cuda", causal) == on_cuda
    assert attention_path(q_heads, kv_heads, q_len, kv_len, masked, "cpu", causal) == on_cpu


def test_a_causal_call_must_attend_its_own_tokens():
    with pytest.raises(ValueError, match="q_len"):
        attention_path(4, 2, 3, 8, False, "cuda", causal=True)


def reference(q, k, v, mask, causal):
    """The math kernel alone, K/V repeated to every query head: the plain definition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


# (path, batch, q_heads, kv_heads, q_len, kv_len): decode, prefill, mixed (several new tokens on a history,
# per-sequence lengths), grouped-query and not.
CASES = [
    (CAUSAL, 3, 4, 2, 9, 9),
    (UNMASKED, 1, 4, 2, 1, 13),
    (UNMASKED, 2, 8, 2, 1, 13),
    (FOLDED_DECODE, 3, 4, 2, 1, 13),
    (FOLDED_DECODE, 2, 8, 1, 1, 20),
    (EXPANDED_KV, 3, 4, 2, 5, 13),
    (EXPANDED_KV, 2, 6, 2, 1, 11),
    (MASKED, 3, 4, 4, 5, 13),
    (NATIVE_GQA, 3, 4, 2, 5, 13),
    (NATIVE_GQA, 3, 4, 2, 1, 13),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_path_computes_what_the_math_kernel_computes(case):
    path, batch, q_heads, kv_heads, q_len, kv_len = case
    q, k, v, mask = example_inputs(path, batch, q_heads, kv_heads, q_len, kv_len, 16, "cpu", torch.float32)
    assert (mask is None) == (path in (CAUSAL, UNMASKED))
    got = attend(q, k, v, mask, causal=path == CAUSAL, path=path)
    assert got.shape == q.shape
    torch.testing.assert_close(got, reference(q, k, v, mask, path == CAUSAL), rtol=1e-5, atol=1e-5)


def test_the_masks_really_differ_per_sequence():
    # Else the masked cases above would test an unmasked call.
    _, _, _, mask = example_inputs(FOLDED_DECODE, 3, 4, 2, 1, 13, 16, "cpu", torch.float32)
    assert mask.sum(-1).flatten().tolist() == [13, 12, 11]


def test_an_unknown_path_is_refused():
    q, k, v, mask = example_inputs(MASKED, 1, 2, 2, 1, 4, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown attention path"):
        attend(q, k, v, mask, path="paged")


def test_the_probe_names_the_path_and_the_backend_that_ran_on_this_device():
    report = attention.probe_shape(2, 4, 2, 1, 16, 16, True, "cpu", torch.float32)
    assert report["path"] == NATIVE_GQA
    # The CPU runs the call on its flash kernel (a fused op in the profile), and the math kernel alone
    # also accepts it; the CUDA-only kernels refuse it.
    assert report["ran"] == "flash"
    assert report["alone"]["math"] == "ok" and report["alone"]["flash"] == "ok"
    assert report["alone"]["efficient"].startswith("refused")
    forced = attention.probe_shape(2, 4, 2, 1, 16, 16, True, "cpu", torch.float32, path=FOLDED_DECODE)
    assert forced["path"] == FOLDED_DECODE and forced["alone"]["math"] == "ok"
