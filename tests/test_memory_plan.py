"""The training memory plan (workloads/memory_plan.py): its activation count against the bytes autograd
really saves on CPU, in bf16 autocast and in fp32, and its arithmetic for the presets."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from wattledger.workloads.memory_plan import (
    DDP_BUCKET_BYTES_PER_PARAM,
    GIB,
    STATE_BYTES_PER_PARAM,
    activation_bytes_per_token,
    linear_params,
    plan_training_memory,
)
from wattledger.workloads.model import PRESETS, build_model

TINY = PRESETS["tiny"]
# Another shape, with different ratios of heads, kv heads, ffn width and vocabulary, so a term that only
# happens to match for tiny's shape cannot pass.
ODD = replace(TINY, name="odd", dim=96, layers=3, heads=6, kv_heads=2, ffn_dim=200, vocab_size=300)


def _saved_bytes(config, batch_size: int, seq_len: int, bf16_autocast: bool) -> tuple[int, int]:
    """(bytes of the bf16 weight copies, bytes of everything else) that autograd saves for the backward of
    one training forward and loss, each storage counted once, the parameters themselves left out.

    Weight copies are told apart by shape: the batch here (batch_size x seq_len tokens) is chosen to match
    no weight's dimensions."""
    model = build_model(config, torch.device("cpu"), torch.float32)
    tokens = torch.randint(config.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(sorted(m.weight.shape)) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            is_copy = tensor.dtype == torch.bfloat16 and tuple(sorted(tensor.shape)) in weight_shapes
            saved[storage.data_ptr()] = (storage.nbytes(), is_copy)
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast:
            logits = model(tokens[:, :-1])
        # As the training step computes its loss (workloads/training.py, _optimizer_step): outside autocast.
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    copies = sum(size for size, is_copy in saved.values() if is_copy)
    return copies, sum(size for size, is_copy in saved.values() if not is_copy)


@pytest.mark.parametrize("config", [TINY, ODD], ids=lambda c: c.name)
@pytest.mark.parametrize("bf16_autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_activation_count_matches_what_autograd_saves(config, bf16_autocast):
    batch_size, seq_len = 3, 40  # 120 tokens: no weight has a dimension of 120, 3 or 40
    copies, activations = _saved_bytes(config, batch_size, seq_len, bf16_autocast)
    plan = plan_training_memory(config, batch_size, seq_len, bf16_autocast=bf16_autocast, ddp=False)
    assert copies == plan.weight_copy_bytes == (2 * linear_params(config) if bf16_autocast else 0)
    element_bytes = 2 if bf16_autocast else 4
    # Of the loss, autograd saves the fp32 log-softmax (4 B a logit); the held logits and the two gradients
    # of the backward are the plan's too, but no saved tensor shows them.
    expected = batch_size * seq_len * (activation_bytes_per_token(config, element_bytes) + 4 * config.vocab_size)
    # Within 1%: what the count leaves out is the RoPE tables' rows for these positions (4 x head_dim bytes
    # a position, not a token) and a scalar.
    assert activations == pytest.approx(expected, rel=0.01)
    assert activations >= expected


def test_plan_arithmetic_for_8b_on_one_gpu():
    config = PRESETS["8b"]
    plan = plan_training_memory(config, 1, 4096, bf16_autocast=True, ddp=False)
    assert plan.state_bytes == config.total_params() * STATE_BYTES_PER_PARAM
    assert plan.weight_copy_bytes == 2 * linear_params(config)
    assert plan.total_bytes == plan.state_bytes + plan.weight_copy_bytes + plan.activation_bytes + plan.loss_bytes
    # An 8b replica with fp32 AdamW cannot fit an H200 (143,771 MiB) at 1 x 4096 tokens, whatever the margin.
    assert plan.total_bytes > 143_771 * 2**20
    assert plan.to_json()["total_bytes"] == plan.total_bytes


def test_ddp_adds_a_gradient_sized_bucket_per_parameter():
    alone = plan_training_memory(PRESETS["1b"], 4, 2048, bf16_autocast=True, ddp=False)
    replica = plan_training_memory(PRESETS["1b"], 4, 2048, bf16_autocast=True, ddp=True)
    assert replica.state_bytes - alone.state_bytes == PRESETS["1b"].total_params() * DDP_BUCKET_BYTES_PER_PARAM
    assert replica.activation_bytes == alone.activation_bytes


def test_refusal_is_one_line_and_says_when_the_state_alone_is_too_big():
    plan = plan_training_memory(PRESETS["8b"], 1, 4096, bf16_autocast=True, ddp=False)
    assert plan.refusal("cuda:0 has 200.0 GiB free", 200 * GIB) is None
    h100 = plan.refusal("cuda:0 has 79.1 GiB free of 79.2", int(79.1 * GIB))
    assert "\n" not in h100 and "alone do not fit" in h100 and plan.max_tokens_within(int(79.1 * GIB)) == 0
