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


# --- models built on the device (issue 12 item 4) ---------------------------------------------------------


def todays_construction(config, seed):
    """The weights as build_model made them before issue 12, written out by hand: torch's default module
    initialisers under manual_seed(seed), in construction order, then normal(0, 0.02) over every Linear and
    Embedding in Module.apply order (children before their parent). Pins the CPU RNG's draw order."""
    from torch import nn

    torch.manual_seed(seed)
    embedding = nn.Embedding(config.vocab_size, config.dim)
    blocks = []
    for _ in range(config.layers):
        attention = [nn.Linear(config.dim, n, bias=False) for n in
                     (config.heads * config.head_dim, config.kv_heads * config.head_dim,
                      config.kv_heads * config.head_dim)]
        attention.append(nn.Linear(config.heads * config.head_dim, config.dim, bias=False))
        ffn = [nn.Linear(config.dim, config.ffn_dim, bias=False), nn.Linear(config.dim, config.ffn_dim, bias=False),
               nn.Linear(config.ffn_dim, config.dim, bias=False)]
        blocks.append(attention + ffn)
    lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
    if config.tie_embeddings:
        lm_head.weight = embedding.weight
    for module in [embedding, *(linear for block in blocks for linear in block), lm_head]:
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    names = ("q", "k", "v", "o")
    weights = {"embedding.weight": embedding.weight, "lm_head.weight": lm_head.weight}
    for layer, block in enumerate(blocks):
        weights.update({f"blocks.{layer}.attention.{n}.weight": block[i].weight for i, n in enumerate(names)})
        ffn_names = ("gate", "up", "down")
        weights.update({f"blocks.{layer}.ffn.{n}.weight": block[4 + i].weight for i, n in enumerate(ffn_names)})
    return weights


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("125m", {"layers": 1, "vocab_size": 1024})],
                         ids=["tiny", "tied embeddings"])
def test_cpu_weights_are_todays(preset, overrides):
    config = model_config(preset, **overrides)
    model = build_model(config, CPU, torch.float32, seed=7)
    reference = todays_construction(config, seed=7)
    state = dict(model.named_parameters(remove_duplicate=False))
    for name, weight in reference.items():
        assert torch.equal(state[name], weight), name
    norms = [name for name in state if name not in reference]
    assert norms and all(name.endswith("norm.weight") and bool((state[name] == 1).all()) for name in norms)


def test_a_device_build_allocates_nothing_on_the_cpu_and_draws_nothing_from_its_rng():
    from wattledger.workloads.model import build_on_device

    rng_before = torch.get_rng_state()
    model = build_model(model_config("125m", layers=2), torch.device("meta"), torch.bfloat16)  # not the CPU
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.device.type == "meta" and model.rope_cos.dtype == torch.float32
    assert model.lm_head.weight is model.embedding.weight
    assert build_on_device is not None


def test_a_device_build_initialises_each_weight_once_from_its_own_generator(monkeypatch):
    from wattledger.workloads import model as model_module

    calls: dict[int, int] = {}
    original = model_module.init_parameter

    def counting(module, weight, generator):
        calls[id(weight)] = calls.get(id(weight), 0) + 1
        assert generator is not None and generator.device.type == "cpu"
        original(module, weight, generator)

    monkeypatch.setattr(model_module, "init_parameter", counting)
    config = model_config("125m", layers=2, vocab_size=4096)  # tied embeddings: one tensor for two modules
    rng_before = torch.get_rng_state()
    model = model_module.build_on_device(config, CPU, torch.float32, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the default initialisers drew nothing
    parameters = list(model.parameters())
    assert sorted(calls) == sorted(id(p) for p in parameters) and set(calls.values()) == {1}
    assert model.lm_head.weight is model.embedding.weight
    assert sum(p.numel() for p in parameters) == config.total_params()
    matrices = [p for name, p in model.named_parameters() if not name.endswith("norm.weight")]
    assert all(abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002 for p in matrices)
    again = model_module.build_on_device(config, CPU, torch.float32, seed=3)
    other = model_module.build_on_device(config, CPU, torch.float32, seed=4)
    assert torch.equal(again.blocks[1].ffn.down.weight, model.blocks[1].ffn.down.weight)
    assert not torch.equal(other.blocks[1].ffn.down.weight, model.blocks[1].ffn.down.weight)
    torch.testing.assert_close(model.rope_cos, build_model(config, CPU, torch.float32).rope_cos)


# --- decode reads the cache in place (issue 12 item 10) ------------------------------------------------


def attended_keys(monkeypatch, causal_too=False):
    """Record, for every attention call of the model over a history (and the causal ones of fresh tokens
    with ``causal_too``; the full forward makes those), the keys tensor it was handed."""
    from wattledger.workloads import model as model_module

    seen = []
    original = model_module.attention.attend

    def recording(q, k, v, mask=None, causal=False, path=None):
        if causal_too or not causal:
            seen.append(k)
        return original(q, k, v, mask, causal=causal, path=path)

    monkeypatch.setattr(model_module.attention, "attend", recording)
    return seen


def shares_storage(tensor, cache_tensor):
    return tensor.untyped_storage().data_ptr() == cache_tensor.untyped_storage().data_ptr()


# slots of a 10-slot cache: one sequence; several in order (a slice); out of order within twice the batch (a
# slice, queries spread over it); far apart (the gather, the one layout that copies).
SLOT_LAYOUTS = {"one": ([3], True), "in order": ([2, 3, 4], True), "shuffled": ([4, 1, 2], True),
                "far apart": ([0, 9], False)}


@pytest.mark.parametrize("layout", SLOT_LAYOUTS)
@torch.no_grad()
def test_cached_decode_reads_views_of_the_cache_and_matches_the_full_forward(tiny, monkeypatch, layout):
    config, model = tiny
    slots, in_place = SLOT_LAYOUTS[layout]
    sequences = [list(range(5 + 4 * i, 12 + 9 * i)) for i in range(len(slots))]
    cache = KVCache(config, 10, 64, CPU, torch.float32)
    tokens, lengths = padded_batch(sequences, CPU)
    logits = model.forward_cached(tokens, lengths, slots, cache)
    seen = attended_keys(monkeypatch)
    for _ in range(3):
        next_tokens = logits.argmax(-1).tolist()
        for sequence, token in zip(sequences, next_tokens):
            sequence.append(token)
        logits = model.forward_cached(torch.tensor([[t] for t in next_tokens]), [1] * len(slots), slots, cache)
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], full_last_logits(model, sequence), rtol=1e-5, atol=1e-5)
    assert len(seen) == 3 * config.layers
    assert all(shares_storage(k, cache.keys) == in_place for k in seen)
    assert all(k.shape[2] == max(len(s) for s in sequences) - 2 + i // config.layers for i, k in enumerate(seen))


@torch.no_grad()
def test_a_prefill_from_an_empty_cache_attends_its_own_tokens_without_reading_the_cache(tiny, monkeypatch):
    config, model = tiny
    cache = KVCache(config, 3, 64, CPU, torch.float32)
    seen = attended_keys(monkeypatch, causal_too=True)
    sequences = [list(range(1, 20)), [4, 5]]
    tokens, lengths = padded_batch(sequences, CPU)
    logits = model.forward_cached(tokens, lengths, [2, 0], cache)
    assert len(seen) == config.layers and not any(shares_storage(k, cache.keys) for k in seen)
    for row, sequence in enumerate(sequences):
        torch.testing.assert_close(logits[row], full_last_logits(model, sequence), rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.export(0)[0][:, :, :2], cache.export(0)[0])  # only real tokens were written
    assert cache.lengths == [2, 0, 19]


@pytest.mark.parametrize("new_lengths, width", [([3, 1, 4], 4), ([1, 1, 1], 1)], ids=["mixed", "decode"])
def test_the_index_tensors_are_the_ones_the_python_lists_gave(new_lengths, width):
    from wattledger.workloads.model import _CachedBatch

    config = model_config("tiny")
    cache = KVCache(config, 6, 64, CPU, torch.float32)
    cache.lengths[:] = [5, 0, 9, 0, 2, 0]
    slots = [4, 0, 2]
    plan = _CachedBatch(new_lengths, slots, cache, width, CPU)
    starts = [cache.lengths[s] for s in slots]
    real = [(b, t) for b, n in enumerate(new_lengths) for t in range(n)]  # what forward_cached built before
    if plan.rows is not None:
        assert plan.rows.tolist() == [b for b, _ in real] and plan.columns.tolist() == [t for _, t in real]
    assert plan.write_slots.tolist() == [slots[b] for b, _ in real]
    assert plan.write_positions.tolist() == [starts[b] + t for b, t in real]
    assert plan.positions.tolist() == [[min(s + t, cache.max_len - 1) for t in range(width)] for s in starts]
    last_columns = [n - 1 for n in new_lengths]
    assert (plan.last_columns.tolist() if plan.last_columns is not None else [width - 1] * 3) == last_columns
    assert plan.span == max(s + n for s, n in zip(starts, new_lengths))
    assert plan.slot_index.tolist() == slots  # the slice starts at slot 0
    assert plan.mask.shape == (5, 1, width, plan.span)  # slots 0..4 of the slice, one row each
    seen = plan.mask == 0  # the mask is additive: 0 where a query attends, -inf where not
    assert bool((seen | (plan.mask == float("-inf"))).all())
    # Slot 1 and 3 are in the slice, not in the batch: they see their key 0 only.
    assert seen[[1, 3]].sum().item() == 2 * width
    assert seen[4, 0, 0].sum().item() == starts[0] + 1


@torch.no_grad()
def test_the_static_decoder_attends_a_bucketed_history_not_the_whole_slot(tiny, monkeypatch):
    from wattledger.workloads import model as model_module

    config, model = tiny
    monkeypatch.setattr(model_module, "compile_step", lambda step, **_: step)
    cache = KVCache(config, 8, 1024, CPU, torch.float32)
    decoder = StaticDecoder(model, cache)
    assert [decoder.history_bucket(n) for n in (1, 64, 65, 1000)] == [1, 64, 65, 1000]  # eager: no graphs
    compiled = StaticDecoder(model, cache, compile=True)
    assert [compiled.history_bucket(n) for n in (1, 64, 65, 130, 1000)] == [64, 64, 128, 256, 1024]
    sequence = list(range(3, 100))
    logits = model.forward_cached(torch.tensor([sequence]), [len(sequence)], [5], cache)
    seen = attended_keys(monkeypatch)
    for _ in range(2):  # one sequence in eight slots: its history is gathered, up to the bucket only
        sequence.append(int(logits.argmax(-1)))
        logits = compiled.step([sequence[-1]], [5])  # (its compile stubbed: the bucketing is under test)
        torch.testing.assert_close(logits[0], full_last_logits(model, sequence), rtol=1e-5, atol=1e-5)
    assert {k.shape[2] for k in seen} == {128} and cache.max_len == 1024


@pytest.mark.parametrize("lengths, new_lengths, width, on_cuda", [
    ([0, 0], [7, 3], 7, "causal"),  # a prefill from empty slots
    ([9], [1], 1, "unmasked"),  # batch-1 decode
    ([9, 9], [1, 1], 1, "unmasked"),  # decode at one length
    ([9, 4], [1, 1], 1, "folded_decode"),  # decode at per-sequence lengths
    ([9, 4], [3, 1], 3, "expanded_kv"),  # a new turn beside a decode
], ids=["prefill", "batch 1", "equal lengths", "ragged decode", "mixed"])
def test_the_path_each_cached_call_takes_on_cuda(lengths, new_lengths, width, on_cuda):
    from wattledger.workloads.model import _CachedBatch

    config = model_config("tiny")  # 4 query heads on 2 KV heads
    cache = KVCache(config, 2, 64, CPU, torch.float32)
    cache.lengths[: len(lengths)] = lengths
    plan = _CachedBatch(new_lengths, list(range(len(lengths))), cache, width, CPU)
    assert plan.path(config) == ("native_gqa" if on_cuda in ("folded_decode", "expanded_kv") else on_cuda)
    plan.device_type = "cuda"  # the choice is pure arithmetic on the shapes: ask it as CUDA would
    assert plan.path(config) == on_cuda


@torch.no_grad()
def test_the_compiled_static_decoder_keeps_one_graph_across_history_buckets(tiny, monkeypatch):
    # A real torch.compile: dynamo traces the step (backend "eager" runs the traced graph as it is, so no
    # inductor build). The K/V are static inputs; the history length is dynamic, so crossing from the
    # 64-token bucket to the 128-token one re-uses the graph instead of compiling a second one.
    from wattledger.workloads import compiling
    from wattledger.workloads import model as model_module

    monkeypatch.setattr(model_module, "compile_step",
                        lambda step, **options: compiling.compile_step(step, backend="eager", **options))
    config, model = tiny
    cache, reference = (KVCache(config, 3, 256, CPU, torch.float32) for _ in range(2))
    compiled, eager = StaticDecoder(model, cache, compile=True), StaticDecoder(model, reference)
    assert compiling.is_static_input(cache.keys) and compiling.is_static_input(cache.values)
    prompts = [list(range(1, 60)), list(range(7, 30))]
    tokens, lengths = padded_batch(prompts, CPU)
    for target in (cache, reference):
        model.forward_cached(tokens, lengths, [0, 1], target)
    buckets = set()
    next_tokens = [1, 2]
    for _ in range(8):  # the longest sequence goes from 60 to 67 tokens: buckets 64 and 128
        buckets.add(compiled.history_bucket(max(cache.lengths[:2]) + 1))
        logits = compiled.step(next_tokens, [0, 1])
        torch.testing.assert_close(logits, eager.step(next_tokens, [0, 1]), rtol=1e-5, atol=1e-5)
        next_tokens = logits.argmax(-1).tolist()
    report = compiled.compile_report()
    assert buckets == {64, 128}
    assert report["graphs"] == 1 and report["compiled"] and not report["fell_back_to_eager"]
