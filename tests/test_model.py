"""The Llama-style decoder: cached serving matches the plain forward pass; shapes match the presets."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from wattledger.workloads.model import (  # noqa: E402
    PRESETS,
    KVCache,
    StaticDecoder,
    build_model,
    model_config,
    padded_batch,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    config = model_config("tiny")
    return config, build_model(config, CPU, torch.float32, seed=1).eval()


def full_last_logits(model, sequence):
    return model(torch.tensor([sequence]))[0, -1]


@torch.no_grad()
def test_cached_decode_matches_full_forward_for_batched_sequences_of_different_lengths(tiny):
    config, model = tiny
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (3, 29, 11, 1)]
    cache = KVCache(config, 6, 128, CPU, torch.float32)
    slots = [4, 0, 2, 5]  # any slots, in any order
    tokens, lengths = padded_batch(sequences, CPU)
    logits = model.forward_cached(tokens, lengths, slots, cache)
    for step in range(6):
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], full_last_logits(model, sequence), rtol=1e-5, atol=1e-5)
        next_tokens = logits.argmax(-1).tolist()
        for sequence, token in zip(sequences, next_tokens):
            sequence.append(token)
        if step == 2:
            # A mixed step: one sequence appends several tokens (a new turn), the others decode one.
            extra = [7, 8, 9]
            sequences[1].extend(extra)
            rows = [[t] for t in next_tokens]
            rows[1] = [next_tokens[1], *extra]
            tokens, lengths = padded_batch(rows, CPU)
            logits = model.forward_cached(tokens, lengths, slots, cache)
        else:
            logits = model.forward_cached(torch.tensor([[t] for t in next_tokens]), [1] * 4, slots, cache)
    assert [cache.lengths[s] for s in slots] == [len(s) for s in sequences]


@torch.no_grad()
def test_all_logits_of_a_prefill_match_the_full_forward(tiny):
    config, model = tiny
    sequence = list(range(40))
    cache = KVCache(config, 2, 64, CPU, torch.float32)
    cached = model.forward_cached(torch.tensor([sequence]), [40], [1], cache, all_logits=True)[0]
    torch.testing.assert_close(cached, model(torch.tensor([sequence]))[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_decoder_matches_the_dynamic_path(tiny):
    config, model = tiny
    sequences = [[1, 2, 3], list(range(10, 30)), [5]]
    cache = KVCache(config, 4, 64, CPU, torch.float32)
    decoder = StaticDecoder(model, cache)
    tokens, lengths = padded_batch(sequences, CPU)
    logits = model.forward_cached(tokens, lengths, [0, 1, 2], cache)
    for _ in range(5):
        next_tokens = logits.argmax(-1).tolist()
        for sequence, token in zip(sequences, next_tokens):
            sequence.append(token)
        logits = decoder.step(next_tokens, [0, 1, 2])  # padded to a batch of 4 into the spare slot
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], full_last_logits(model, sequence), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="spare slot"):
        decoder.step([1], [decoder.spare_slot])


@torch.no_grad()
def test_export_and_load_move_a_slot_bit_for_bit(tiny):
    config, model = tiny
    cache = KVCache(config, 3, 64, CPU, torch.float32)
    model.forward_cached(torch.tensor([list(range(12))]), [12], [0], cache)
    keys, values = (t.clone() for t in cache.export(0))
    cache.load(2, keys, values)
    assert cache.lengths[2] == 12
    assert torch.equal(cache.export(2)[0], cache.export(0)[0]) and torch.equal(cache.export(2)[1], cache.export(0)[1])
    a = model.forward_cached(torch.tensor([[5]]), [1], [0], cache)
    b = model.forward_cached(torch.tensor([[5]]), [1], [2], cache)
    assert torch.equal(a, b)


def test_growing_past_the_cache_is_refused(tiny):
    config, model = tiny
    cache = KVCache(config, 2, 8, CPU, torch.float32)
    with pytest.raises(ValueError, match="grow past"):
        model.forward_cached(torch.tensor([list(range(9))]), [9], [0], cache)


def test_preset_shapes_and_kv_bytes_per_token():
    # Llama-3.1-8B: 32 layers x 8 KV heads x 128 head dim x 2 (K, V) x 2 bytes (bf16) = 128 KiB per token.
    assert PRESETS["8b"].kv_bytes_per_token(torch.bfloat16) == 128 * 1024
    assert PRESETS["1b"].kv_bytes_per_token(torch.bfloat16) == 32 * 1024
    # Published sizes: Llama-3.2-1B 1.24e9 parameters, Llama-3.1-8B 8.03e9.
    assert PRESETS["1b"].total_params() == pytest.approx(1.236e9, rel=0.01)
    assert PRESETS["8b"].total_params() == pytest.approx(8.03e9, rel=0.01)
    tiny_config = PRESETS["tiny"]
    model = build_model(tiny_config, CPU, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == tiny_config.total_params()


def test_training_flops_formula():
    config = PRESETS["1b"]
    assert config.training_flops_per_token(2048) == 6 * config.matmul_params() + 12 * 16 * 32 * 64 * 2048


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("70b")
