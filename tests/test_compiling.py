"""workloads/compiling.py: static KV inputs, one recompile budget per step, and a limit hit that is reported.

Every compile here is a real ``torch.compile``: dynamo traces the step and hands the graph to a backend. The
backend is either a recording one (it keeps each graph's placeholders, as dynamo describes them, and runs
the graph as traced) or "aot_eager" (dynamo + AOTAutograd, what inductor sits behind). Inductor itself
is not used: a cold inductor compile of even a tiny step takes 30 s on the 2-core CI machine, and
everything checked here (what dynamo marks static, how it counts graphs against the limit) happens before
inductor is called.
"""

from __future__ import annotations

import logging

import pytest
import torch

from wattledger.workloads.compiling import (
    check_bucket_count,
    compile_step,
    _self_check_case,
    count_cuda_graph_launches,
    cuda_graph_self_check,
    cuda_graph_status,
    dynamo_recompile_limit,
    inductor_mode,
    is_static_input,
)

ROWS, WIDTH = 16, 8


class RecordingBackend:
    """A torch.compile backend that notes, for each graph, every placeholder's source and static type."""

    def __init__(self):
        self.graphs: list[dict[str, str | None]] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        placeholders = {}
        for node in graph_module.graph.find_nodes(op="placeholder"):
            source = getattr(node, "_dynamo_source", None)
            static_type = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            placeholders[source.name if source is not None else node.name] = static_type
        self.graphs.append(placeholders)
        return graph_module.forward


class TinyCache:
    """Like KVCache: tensors on a plain object, which dynamo lifts as graph inputs."""

    def __init__(self):
        self.keys = torch.zeros(ROWS, WIDTH)


class TinyDecoder:
    """Like StaticDecoder: a bound-method step that writes into the cache in place and reads it back."""

    def __init__(self, cache: TinyCache):
        self.cache = cache

    def step(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.cache.keys[rows] = values
        return self.cache.keys.sum(0) * 2


def call_with_rows(step, rows: int) -> torch.Tensor:
    """Call ``step`` with a batch of ``rows`` rows: each distinct ``rows`` is one shape, so one graph."""
    return step(torch.full((rows, WIDTH), float(rows)), torch.arange(rows))


def expected_after(rows_called: list[int]) -> torch.Tensor:
    """What the eager decoder returns after the same calls, for comparison."""
    decoder = TinyDecoder(TinyCache())
    out = None
    for rows in rows_called:
        out = call_with_rows(decoder.step, rows)
    return out


@pytest.fixture
def small_limit():
    """Dynamo's recompile limit set to 2 for the test and restored after (both limits compile_step may raise)."""
    with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=256):
        yield 2


def test_the_cache_tensors_are_static_inputs_of_the_graph_and_the_batch_is_not():
    backend = RecordingBackend()
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[decoder.cache.keys], name="static",
                        backend=backend)
    call_with_rows(step, 3)
    (placeholders,) = backend.graphs
    cache_inputs = {source: kind for source, kind in placeholders.items() if "cache" in source}
    batch_inputs = {source: kind for source, kind in placeholders.items() if "cache" not in source}
    assert list(cache_inputs.values()) == ["unguarded"], placeholders
    assert batch_inputs and set(batch_inputs.values()) == {None}, placeholders
    assert is_static_input(decoder.cache.keys) and step.report()["static_inputs"] == 1


def test_without_static_tensors_the_cache_is_an_ordinary_mutated_input():
    """The control for the test above: what inductor's CUDA-graph trees refuse as 'mutated inputs'."""
    backend = RecordingBackend()
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[], name="not static", backend=backend)
    call_with_rows(step, 3)
    (placeholders,) = backend.graphs
    assert [kind for source, kind in placeholders.items() if "cache" in source] == [None], placeholders


def test_a_compiled_step_computes_what_the_eager_step_does_through_aot_autograd():
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[decoder.cache.keys], name="aot",
                        backend="aot_eager")
    calls = [3, 5, 3]
    for rows in calls:
        out = call_with_rows(step, rows)
    torch.testing.assert_close(out, expected_after(calls), rtol=0, atol=0)
    report = step.report()
    assert (report["compiled"], report["graphs"], report["recompiles"], report["fell_back_to_eager"]) == \
        (True, 2, 1, False)


class WeightedDecoder(TinyDecoder):
    """Writes through a weight that requires grad, as the model's projections do."""

    def __init__(self, cache: TinyCache):
        super().__init__(cache)
        self.weight = torch.nn.Parameter(torch.ones(WIDTH))

    def step(self, values, rows):
        self.cache.keys[rows] = values * self.weight
        return self.cache.keys.sum(0)


@pytest.mark.parametrize("inference, graphs", [(True, 1), (False, 2)])
def test_an_inference_step_runs_without_autograd_and_does_not_recompile(inference, graphs):
    """Without inference=True (the control) the first write makes the cache require grad: a recompile."""
    decoder = WeightedDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[decoder.cache.keys], name="grad",
                        inference=inference, backend=RecordingBackend())
    for _ in range(3):
        out = call_with_rows(step, 2)
    assert step.report()["graphs"] == graphs
    assert out.requires_grad is not inference and decoder.cache.keys.requires_grad is not inference


def test_two_steps_over_the_same_method_do_not_share_the_recompile_budget(small_limit):
    first, second = TinyDecoder(TinyCache()), TinyDecoder(TinyCache())
    backend = RecordingBackend()
    steps = [compile_step(d.step, device_type="cpu", static_tensors=[d.cache.keys], name=f"decoder {i}",
                          backend=backend) for i, d in enumerate((first, second))]
    for step, shapes in zip(steps, ([1, 2], [3, 4])):
        for rows in shapes:
            call_with_rows(step, rows)
    assert steps[0].code is not steps[1].code
    assert [(s.report()["graphs"], s.report()["fell_back_to_eager"]) for s in steps] == [(2, False)] * 2
    assert len(backend.graphs) == 2 * small_limit


def test_the_control_plain_torch_compile_shares_one_budget_per_code_object(small_limit):
    """What StaticDecoder did before: torch.compile on each decoder's bound method. The second decoder's
    shapes find the first one's budget spent and run eagerly: the failure the test above guards against."""

    class FreshDecoder(TinyDecoder):  # a class of its own, so no other test's graphs sit on its code object
        def step(self, values, rows):
            self.cache.keys[rows] = values
            return self.cache.keys.sum(0) * 2

    backend = RecordingBackend()
    for decoder, shapes in zip((FreshDecoder(TinyCache()), FreshDecoder(TinyCache())), ([1, 2], [3, 4])):
        step = torch.compile(decoder.step, backend=backend, dynamic=False)
        for rows in shapes:
            call_with_rows(step, rows)
    assert len(backend.graphs) == small_limit  # the second decoder got no graph at all


def test_hitting_the_limit_is_reported_once_and_known_shapes_stay_compiled(small_limit, capsys):
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[decoder.cache.keys], name="chat decode",
                        backend=RecordingBackend())
    calls = [1, 2, 3, 3, 1, 4]
    for rows in calls:
        out = call_with_rows(step, rows)
    torch.testing.assert_close(out, expected_after(calls), rtol=0, atol=0)  # eager still computes right
    report = step.report()
    assert (report["compiled"], report["fell_back_to_eager"], report["graphs"], report["limit"]) == \
        (False, True, small_limit, small_limit)
    assert (report["signatures"], report["eager_signatures"], report["calls"], report["eager_calls"]) == (4, 2, 6, 3)
    assert "recompile_limit" in report["limit_message"]
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wattledger:")]
    assert len(ours) == 1 and "chat decode" in ours[0] and "eagerly" in ours[0]
    assert "partly eager" in step.summary()


def test_a_known_shape_that_must_recompile_past_the_limit_is_reported_eager(small_limit):
    """A guard on something other than the inputs' shapes (here a Python number the step reads) fails."""

    class ScaledDecoder(TinyDecoder):
        scale = 2

        def step(self, values, rows):
            self.cache.keys[rows] = values
            return self.cache.keys.sum(0) * self.scale

    decoder = ScaledDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[], name="scaled", backend=RecordingBackend())
    call_with_rows(step, 1)
    call_with_rows(step, 2)
    decoder.scale = 3  # dynamo specialised on 2: rows=1 needs a third graph, past the limit of 2
    out = call_with_rows(step, 1)
    torch.testing.assert_close(out, expected_after([1, 2, 1]) / 2 * 3, rtol=0, atol=0)
    report = step.report()
    assert (report["graphs"], report["fell_back_to_eager"], report["eager_calls"]) == (2, True, 1)
    assert "last reason" in report["limit_message"]


def test_the_limit_hit_is_seen_even_with_dynamos_warning_filtered_out(small_limit):
    """TORCH_LOGS can silence dynamo's warning; then the full cache still tells."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        decoder = TinyDecoder(TinyCache())
        step = compile_step(decoder.step, device_type="cpu", static_tensors=[], name="quiet",
                            backend=RecordingBackend())
        for rows in (1, 2, 3):
            call_with_rows(step, rows)
    finally:
        logger.setLevel(level)
    report = step.report()
    assert report["fell_back_to_eager"] and report["eager_signatures"] == 1
    assert report["limit_message"].startswith("no graph for a new input signature")


def test_a_dimension_marked_dynamic_is_one_graph_for_all_its_sizes(small_limit):
    """StaticDecoder's history length: marked dynamic, so new lengths reuse the batch bucket's graph."""
    positions = torch.arange(64)

    def attend(values: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        return values.sum(0) + key_positions.float().mean()

    step = compile_step(attend, device_type="cpu", static_tensors=[], name="history", backend=RecordingBackend())
    for rows, history in ((1, 8), (1, 16), (2, 8), (2, 32), (1, 32)):
        key_positions = positions[:history]
        torch._dynamo.mark_dynamic(key_positions, 0)
        torch.testing.assert_close(step(torch.ones(rows, WIDTH), key_positions),
                                   attend(torch.ones(rows, WIDTH), key_positions))
    report = step.report()
    assert (report["graphs"], report["signatures"], report["fell_back_to_eager"]) == (2, 2, False)
    key_positions = positions[:8]
    torch._dynamo.mark_dynamic(key_positions, 0)
    step(torch.ones(3, WIDTH), key_positions)  # a third batch shape: past the limit of 2
    assert step.report()["fell_back_to_eager"] and step.report()["eager_calls"] == 1


def test_a_step_given_a_recompile_limit_raises_dynamos_and_never_lowers_it(small_limit):
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[], name="wide", recompile_limit=4,
                        backend=RecordingBackend())
    for rows in (1, 2, 3, 4):
        call_with_rows(step, rows)
    report = step.report()
    assert (report["graphs"], report["limit"], report["fell_back_to_eager"]) == (4, 4, False)
    compile_step(decoder.step, device_type="cpu", static_tensors=[], name="narrow", recompile_limit=1,
                 backend=RecordingBackend())
    assert dynamo_recompile_limit() == 4


def test_the_models_default_batch_buckets_do_not_fit_dynamos_default_limit():
    model_buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # workloads/model.py's bucket() default
    with pytest.raises(ValueError) as error:
        check_bucket_count(model_buckets, 8)
    message = str(error.value)
    assert "\n" not in message and "9 shape buckets" in message and "limit is 8" in message
    check_bucket_count(model_buckets[:8], 8)
    check_bucket_count([(1, 64), (1, 64), (2, 64)], 2)  # (batch, history) pairs, counted once each
    with pytest.raises(ValueError):
        check_bucket_count([(b, h) for b in (1, 2, 4) for h in (64, 128, 256)], 8)


def test_bad_arguments_are_refused_with_one_line():
    decoder = TinyDecoder(TinyCache())
    for kwargs in ({"device_type": "tpu"}, {"device_type": "cpu", "recompile_limit": 0}):
        with pytest.raises(ValueError):
            compile_step(decoder.step, static_tensors=[], name="bad", **kwargs)
    with pytest.raises(TypeError):
        compile_step(decoder.step, device_type="cpu", static_tensors=[[1, 2]], name="bad")
    with pytest.raises(TypeError):
        compile_step(torch.nn.Linear(2, 2), device_type="cpu", static_tensors=[], name="bad")


def test_the_fresh_copy_keeps_defaults_closures_and_the_bound_object():
    scale = 3.0

    def scaled(x, *, offset=1.0, factor=2.0):
        return x * scale * factor + offset

    step = compile_step(scaled, device_type="cpu", static_tensors=[], name="closure", backend="aot_eager")
    assert step.code is not scaled.__code__ and step.code.co_name.startswith("scaled__closure_")
    torch.testing.assert_close(step(torch.ones(2)), torch.full((2,), 7.0))
    torch.testing.assert_close(step(torch.ones(2), offset=0.0), torch.full((2,), 6.0))


def test_cuda_graphs_are_not_applicable_on_the_cpu():
    assert inductor_mode("cpu") == "default" and inductor_mode("cuda") == "reduce-overhead"
    decoder = TinyDecoder(TinyCache())
    step = compile_step(decoder.step, device_type="cpu", static_tensors=[], name="cpu", backend=RecordingBackend())
    call_with_rows(step, 2)
    assert cuda_graph_status(step)["verdict"] == "not applicable"
    if not torch.cuda.is_available():
        assert count_cuda_graph_launches(lambda: call_with_rows(step, 2)) is None
        assert {case["verdict"] for case in cuda_graph_self_check().values()} == {"not applicable"}


def test_the_gpu_self_check_case_runs_through_on_the_cpu():
    """The body the GPU check runs, on CPU tensors with aot_eager: it compiles, calls, and reports."""
    result = _self_check_case(True, "cpu", "aot_eager", rows=2, width=4)
    assert result["graphs"] == 1 and result["verdict"] == "not applicable"  # mode None: no CUDA graphs
