"""The roofline arithmetic (workloads/roofline.py) against hand-computed figures for the tiny preset.

Tiny: dim 128, 2 layers, 4 heads of 32, 2 KV heads, SwiGLU 384, vocab 512, untied.
Per block: q, o 2 x 128 x 128 = 32,768; k, v 2 x 128 x 64 = 16,384; FFN 3 x 128 x 384 = 147,456; two norm
scales 256: 196,864. Streamed weights: 2 x 196,864 + final norm 128 + lm_head 512 x 128 = 459,392 elements.
KV per position: 2 (K, V) x 2 layers x 2 heads x 32 x 2 bytes = 512 bytes (bf16).
"""

from __future__ import annotations

import pytest
import torch

from wattledger.workloads import roofline
from wattledger.workloads.model import build_model, model_config

TINY = model_config("tiny")
TINY_TIED = model_config("tiny", tie_embeddings=True)
STREAMED_ELEMENTS = 459_392
KV_BYTES_PER_POSITION = 512
MATMUL_FLOPS_PER_TOKEN = 2 * (2 * (196_864 - 256) + 512 * 128)  # 917,504: norms are not matmuls
ATTENTION_FLOPS_PER_POSITION = 4 * 2 * 4 * 32  # 1,024


def test_decode_step_bytes_for_tiny_by_hand():
    step = roofline.decode_step_bytes(TINY, [5, 7, 10])
    assert step.weights == STREAMED_ELEMENTS * 2
    assert step.embedding_rows == 3 * 128 * 2  # three gathered rows, not the 512-row table
    assert step.kv_cache == (5 + 7 + 10) * KV_BYTES_PER_POSITION
    assert step.total == 918_784 + 768 + 11_264


def test_streamed_weights_match_the_model_and_the_config():
    # Every parameter of the real model is read once, except the untied input embedding table.
    model = build_model(TINY, torch.device("cpu"), torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    assert roofline.streamed_weight_elements(TINY) == parameters - TINY.vocab_size * TINY.dim
    assert roofline.streamed_weight_elements(TINY) == TINY.matmul_params()
    assert roofline.kv_bytes_per_token(TINY) == TINY.kv_bytes_per_token(torch.bfloat16)


def test_tied_embeddings_are_counted_once():
    tied_model = build_model(TINY_TIED, torch.device("cpu"), torch.float32)
    unique_parameters = sum(p.numel() for p in tied_model.parameters())  # the shared matrix once
    tied = roofline.decode_step_bytes(TINY_TIED, [4] * 8, element_bytes=4)
    assert tied.embedding_rows == 0
    assert tied.weights == unique_parameters * 4
    untied = roofline.decode_step_bytes(TINY, [4] * 8, element_bytes=4)
    assert untied.total - tied.total == 8 * TINY.dim * 4


def test_the_untied_embedding_table_is_not_read_whole():
    one = roofline.decode_step_bytes(TINY, [1])
    assert one.embedding_rows == TINY.dim * 2
    # A batch larger than the vocabulary gathers at most every row once.
    huge = roofline.decode_step_bytes(TINY, [1] * 2 * TINY.vocab_size)
    assert huge.embedding_rows == TINY.vocab_size * TINY.dim * 2


def test_kv_bytes_grow_with_context():
    short = roofline.decode_step_bytes(TINY, [100, 100])
    long = roofline.decode_step_bytes(TINY, [100, 900])
    assert long.weights == short.weights
    assert long.kv_cache - short.kv_cache == 800 * KV_BYTES_PER_POSITION
    eight_b = model_config("8b")
    assert roofline.kv_bytes_per_token(eight_b) == 2 * 32 * 8 * 128 * 2  # 128 KiB per position


def test_decode_and_prefill_flops_by_hand():
    assert roofline.matmul_flops_per_token(TINY) == MATMUL_FLOPS_PER_TOKEN
    assert roofline.decode_step_flops(TINY, [5, 7, 10]) == (3 * MATMUL_FLOPS_PER_TOKEN
                                                             + 22 * ATTENTION_FLOPS_PER_POSITION)
    # Batch 2 of 4-token prompts: 8 tokens through the blocks, 2 last-token logits, causal attention
    # 1 + 2 + 3 + 4 = 10 positions per prompt.
    blocks = 2 * (2 * (196_864 - 256))
    assert roofline.prefill_flops(TINY, 2, 4) == 8 * blocks + 2 * 2 * 512 * 128 + 2 * 10 * 1_024
    assert roofline.prefill_flops(TINY, 2, 4, all_logits=True) == (8 * MATMUL_FLOPS_PER_TOKEN
                                                                    + 2 * 10 * 1_024)


def test_decode_roofline_takes_the_slower_bound():
    memory_bound = roofline.decode_roofline(TINY, [5, 7, 10], hbm_bytes_per_s=1e6, peak_flops=1e9)
    assert memory_bound.bound == "memory"
    assert memory_bound.step_s == pytest.approx(930_816 / 1e6)
    assert memory_bound.tokens_per_s == pytest.approx(3 / (930_816 / 1e6))
    compute_bound = roofline.decode_roofline(TINY, [5, 7, 10], hbm_bytes_per_s=1e12, peak_flops=1e6)
    assert compute_bound.bound == "compute"
    assert compute_bound.tokens_per_s == pytest.approx(3 / (2_775_040 / 1e6))


def test_datasheet_rates_and_names():
    h200 = roofline.gpu_spec_for("NVIDIA H200")
    assert h200 is roofline.GPU_SPECS["H200 SXM"]
    assert roofline.gpu_spec_for("NVIDIA H200 NVL") is roofline.GPU_SPECS["H200 NVL"]
    assert roofline.gpu_spec_for("NVIDIA H100 80GB HBM3") is roofline.GPU_SPECS["H100 SXM"]
    assert roofline.gpu_spec_for("NVIDIA H100 PCIe") is roofline.GPU_SPECS["H100 PCIe"]
    assert roofline.gpu_spec_for("NVIDIA A100-SXM4-80GB") is None
    # Same chip, more bandwidth: the H200 decodes the 8b model faster, by the bandwidth ratio at batch 1.
    eight_b = model_config("8b")
    ratio = (roofline.decode_tokens_per_s(eight_b, [512], h200)
             / roofline.decode_tokens_per_s(eight_b, [512], roofline.GPU_SPECS["H100 SXM"]))
    assert ratio == pytest.approx(4.8 / 3.35)


@pytest.mark.parametrize("lengths", [[], [0], [3, -1]])
def test_bad_context_lengths_are_refused(lengths):
    with pytest.raises(ValueError):
        roofline.decode_step_bytes(TINY, lengths)


def test_table_command(capsys):
    assert roofline.main(["--table", "--presets", "tiny", "--gpus", "H200 SXM"]) == 0
    out = capsys.readouterr().out
    assert "| H200 SXM | tiny | decode batch 128" in out
    assert roofline.main(["--table", "--presets", "nope"]) == 2
    assert "unknown preset or GPU 'nope'" in capsys.readouterr().err
