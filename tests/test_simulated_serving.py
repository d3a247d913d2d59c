"""Chat and agentic on the simulated device's time (issue 14): the tiny model computes the tokens on the CPU,
each step costs the device time of its work with the 8b shape on a simulated H100, and every decision reads
the paced schedule. So a fast and a slow CPU (an injected wall clock that jumps a different amount per
reading; nothing really sleeps) run the same run: the same spans, times and activities, and the same tokens.
Only the pacing report tells them apart."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.fakes import ClockedStop, TickingClock  # noqa: E402
from wattledger.workloads import agentic, chat  # noqa: E402
from wattledger.workloads.common import RunOptions, SimulatedTiming  # noqa: E402
from wattledger.workloads.device_time import serving_step_work, simulated_device  # noqa: E402
from wattledger.workloads.model import model_config  # noqa: E402
from wattledger.workloads.reporter import TRANSFER_ACTIVITY, Reporter  # noqa: E402

# The fake CPU: the wall clock moves this much at every reading. Fast: far below a simulated step (ms), so
# the schedule is always ahead and the clock sleeps; slow: far above it, so the CPU falls behind.
FAST_TICK_S = 1e-6
SLOW_TICK_S = 0.05
H100_8B = SimulatedTiming(device="h100-sxm-80gb", timing_preset="8b")
# Short agentic sessions with short contexts (tests/test_agentic.py's QUICK, the tool time scale left at its
# simulated default: the length scale, 0.05).
QUICK_SESSIONS = {"length_scale": 0.05, "steps_median": 5, "steps_sigma": 0.3, "tool_time_cap_seconds": 2.0,
                  "kv_budget_share": None}
SMALL_CONTEXT = {"compaction_threshold_tokens": 256, "compaction_keep_tokens": 64}


def options(duration_s: float, seed: int = 0) -> RunOptions:
    return RunOptions(preset="tiny", duration_s=duration_s, device="cpu", seed=seed, simulation=H100_8B)


def serve_chat(config: chat.ChatConfig, tick_s: float, duration_s: float = 3.0) -> tuple[dict, Reporter]:
    wall = TickingClock(tick_s=tick_s)
    reporter = Reporter("chat", [0], keep_spans=True)
    reporter.start()
    summary = chat.run(config, options(duration_s), reporter, ClockedStop(wall), clock_ns=wall.ns)
    reporter.stop()
    return summary, reporter


def run_agentic(tick_s: float, duration_s: float = 600.0, **fields) -> tuple[dict, Reporter]:
    wall = TickingClock(tick_s=tick_s)
    reporter = Reporter("agentic", [0], keep_spans=True)
    reporter.start()
    summary = agentic.run(agentic.AgenticConfig(**fields), options(duration_s), reporter, ClockedStop(wall),
                          clock_ns=wall.ns)
    reporter.stop()
    return summary, reporter


def timeline(reporter: Reporter) -> list[tuple]:
    """The spans relative to the first one's start: (kind, start, end in ns, activity)."""
    origin = min(span.start_ns for span in reporter.spans)
    return [(s.kind, s.start_ns - origin, s.end_ns - origin, s.activity) for s in reporter.spans]


# Token scale 4 (the automatic one for max_len 256 is 21): a scaled run, short enough for many requests.
CHAT = chat.ChatConfig(mean_rate_per_s=25.0, start_fraction=0.5, max_batch=4, max_len=256, keep_requests=True,
                       token_scale=4)


def test_chat_runs_the_same_spans_and_tokens_on_a_fast_and_a_slow_cpu():
    fast, fast_reporter = serve_chat(CHAT, FAST_TICK_S)
    slow, slow_reporter = serve_chat(CHAT, SLOW_TICK_S)
    assert fast["requests_completed"] > 10 and fast["steps"] > 100
    assert timeline(fast_reporter) == timeline(slow_reporter)
    assert fast_reporter.tokens == slow_reporter.tokens and fast["requests"] == slow["requests"]
    assert fast["busy_fraction"] == slow["busy_fraction"]
    # Only the pacing report differs: the slow CPU fell behind the simulated H100, the fast one never did.
    assert fast["simulated_device"]["max_lag_seconds"] == 0 and fast["simulated_device"]["lagging_seconds"] == 0
    assert slow["simulated_device"]["max_lag_seconds"] > 1.0 and slow["simulated_device"]["lagging_seconds"] > 0
    described = simulated_device("h100-sxm-80gb").describe()
    assert fast["simulated_device"]["device"] == described["name"]
    assert fast["simulated_device"]["timing_preset"] == "8b" and fast["simulated_device"]["computed_preset"] == "tiny"


def test_chat_busy_fraction_is_the_spans_device_time_over_the_scheduled_time():
    summary, reporter = serve_chat(CHAT, FAST_TICK_S)
    warm_up, *served = reporter.spans  # the warm-up is costed at the schedule's start, before serving
    assert warm_up.seconds == pytest.approx(summary["warm_up_seconds"], abs=1e-9)
    scheduled = summary["simulated_device"]["scheduled_seconds"]
    assert summary["duration_seconds"] == pytest.approx(scheduled, abs=1e-3) and scheduled >= 3.0
    device_seconds = sum(span.seconds for span in served)
    assert summary["busy_fraction"] == pytest.approx(device_seconds / scheduled, rel=1e-6)
    assert summary["prefill_seconds"] + summary["decode_seconds"] == pytest.approx(device_seconds, rel=1e-6)
    assert 0 < summary["busy_fraction"] < 1
    assert summary["simulated_device"]["device_seconds"] == pytest.approx(device_seconds + warm_up.seconds, rel=1e-6)
    tokens_per_s = summary["simulated_device"]["tokens_per_simulated_second"]["generated"]
    assert tokens_per_s == pytest.approx(reporter.tokens["generated"] / scheduled)


def test_a_chat_step_costs_the_device_time_of_its_batch_with_the_8b_shape():
    # One request alone: its prefill step, then a decode step per output token, each at its own context.
    prompt, output = 50, 6
    config = chat.ChatConfig(trace=((0.0, prompt, output),), max_batch=2, max_len=256, keep_requests=True)
    summary, reporter = serve_chat(config, FAST_TICK_S, duration_s=1.0)
    device, eight_b = simulated_device("h100-sxm-80gb"), model_config("8b")
    expected = [device.step(serving_step_work(eight_b, [], [(prompt, 0)]))]
    expected += [device.step(serving_step_work(eight_b, [prompt + n], [])) for n in range(1, output)]
    served = reporter.spans[1:]
    assert [span.activity for span in served] == [step.activity for step in expected]
    assert [span.seconds for span in served] == pytest.approx([step.seconds for step in expected], abs=2e-9)
    # Back to back: the schedule moves only by device time while the request runs.
    assert all(a.end_ns == b.start_ns for a, b in zip(served, served[1:]))
    assert summary["requests"][0]["ttft_s"] == pytest.approx(expected[0].seconds, abs=1e-8)


def test_agentic_runs_the_same_spans_and_tokens_on_a_fast_and_a_slow_cpu():
    fields = dict(sessions=2, total_sessions=3, **QUICK_SESSIONS)
    fast, fast_reporter = run_agentic(FAST_TICK_S, **fields)
    slow, slow_reporter = run_agentic(SLOW_TICK_S, **fields)
    assert fast["sessions_completed"] == 3 and fast["tool_calls"] > 5
    # Simulated: each computed token stands for round(1 / 0.05) = 20 simulated ones, so the simulated steps
    # run the trace's lengths and tool calls take the trace's unscaled time.
    assert fast["config"]["token_scale"] == 20 and fast["config"]["tool_time_scale"] == 1.0
    assert timeline(fast_reporter) == timeline(slow_reporter)
    assert fast_reporter.tokens == slow_reporter.tokens
    for key in ("compute_seconds", "compute_busy_fraction", "idle_fraction", "tool_seconds", "duration_seconds"):
        assert fast[key] == slow[key], key
    assert fast["simulated_device"]["max_lag_seconds"] == 0
    assert slow["simulated_device"]["max_lag_seconds"] > 0 and slow["simulated_device"]["lagging_seconds"] > 0


def test_agentic_tool_calls_are_gpu_idle_gaps_of_their_drawn_durations():
    summary, reporter = run_agentic(FAST_TICK_S, sessions=1, total_sessions=2, record_steps=True, **QUICK_SESSIONS)
    tools = [s for s in reporter.spans if s.kind == "tool_call"]
    compute = [s for s in reporter.spans if s.kind == "compute"]
    # Every step but each session's last ends in a tool call (the trace lists steps in the order they ran).
    last_steps = {(r["session"], r["step"]) for r in summary["steps_trace"]
                  if r["step"] == max(o["step"] for o in summary["steps_trace"] if o["session"] == r["session"])}
    drawn = [r["tool_seconds"] for r in summary["steps_trace"] if (r["session"], r["step"]) not in last_steps]
    assert len(tools) == len(drawn) == summary["tool_calls"] > 3
    assert [t.seconds for t in tools] == pytest.approx(drawn, abs=2e-9)
    for tool in tools:
        assert not any(c.start_ns < tool.end_ns and tool.start_ns < c.end_ns for c in compute)
        # The GPU works until the call starts and again from its end: the gap is the call.
        assert any(c.end_ns == tool.start_ns for c in compute) and any(c.start_ns == tool.end_ns for c in compute)
    # One session: the loop idles exactly through each tool call, and only then.
    idle = [(s.start_ns, s.end_ns) for s in reporter.spans if s.kind == "idle"]
    assert idle == [(t.start_ns, t.end_ns) for t in tools]


def test_agentic_spills_cost_the_8b_kv_bytes_over_the_host_link():
    kv_tokens_budget = 300 * model_config("tiny").kv_bytes_per_token(torch.float32)
    summary, reporter = run_agentic(FAST_TICK_S, sessions=3, total_sessions=3, kv_budget_bytes=kv_tokens_budget,
                                    **QUICK_SESSIONS, **SMALL_CONTEXT)
    spill = summary["spill"]
    assert spill["spills"] > 0 and spill["restores"] > 0
    transfers = [s for s in reporter.spans if s.kind == "transfer"]
    assert len(transfers) == spill["spills"] + spill["restores"]
    assert sum(t.seconds for t in transfers) == pytest.approx(spill["transfer_seconds"], abs=1e-5)
    eight_b_per_tiny = model_config("8b").kv_bytes_per_token(torch.bfloat16) / model_config("tiny").kv_bytes_per_token(
        torch.float32)
    # The simulated contexts: token_scale simulated tokens per computed one.
    eight_b_per_tiny *= summary["config"]["token_scale"]
    moved = (spill["spilled_bytes"] + spill["restored_bytes"]) * eight_b_per_tiny
    expected_s = (spill["spilled_bytes"] * eight_b_per_tiny / agentic.GPU_TO_HOST_BYTES_PER_S
                  + spill["restored_bytes"] * eight_b_per_tiny / agentic.HOST_TO_GPU_BYTES_PER_S)
    assert spill["transfer_seconds"] == pytest.approx(expected_s, rel=1e-4)
    assert spill["achieved_gb_per_s"] == pytest.approx(moved / expected_s / 1e9, rel=1e-3)
    for t in transfers:
        assert t.activity.gpu == TRANSFER_ACTIVITY.gpu
        rates = (t.activity.pcie_transmit_bytes_per_second, t.activity.pcie_receive_bytes_per_second)
        assert rates in ((agentic.GPU_TO_HOST_BYTES_PER_S, 0.0), (0.0, agentic.HOST_TO_GPU_BYTES_PER_S))


# -- the token scale: each computed token stands for k simulated ones ----------------------------------------

ONE_REQUEST = ((0.0, 50, 6),)  # (arrival_s, prompt, output) in computed tokens


def served_tokens(reporter: Reporter) -> dict[str, int]:
    return {kind: reporter.tokens[kind] for kind in ("prompt", "generated")}


def weighted(steps) -> tuple[float, dict[str, float]]:
    """The passes as one span, computed here from their DeviceSteps: summed seconds, seconds-weighted activity."""
    total = sum(s.seconds for s in steps)
    fields = ("gpu", "sm", "tensor", "dram")
    return total, {f: sum(getattr(s.activity, f) * s.seconds for s in steps) / total for f in fields}


def test_token_scale_1_is_todays_run_and_4_gives_4x_the_tokens_and_the_scaled_work():
    device, eight_b = simulated_device("h100-sxm-80gb"), model_config("8b")
    one, one_reporter = serve_chat(chat.ChatConfig(trace=ONE_REQUEST, max_batch=2, max_len=256, token_scale=1),
                                   FAST_TICK_S, duration_s=1.0)
    auto, auto_reporter = serve_chat(chat.ChatConfig(trace=ONE_REQUEST, max_batch=2, max_len=256), FAST_TICK_S,
                                     duration_s=1.0)
    assert timeline(one_reporter) == timeline(auto_reporter) and one_reporter.tokens == auto_reporter.tokens
    assert one["simulated_device"]["token_scale"] == 1 and served_tokens(one_reporter) == {"prompt": 50, "generated": 6}
    four, reporter = serve_chat(chat.ChatConfig(trace=ONE_REQUEST, max_batch=2, max_len=256, token_scale=4,
                                                keep_requests=True), FAST_TICK_S, duration_s=1.0)
    assert served_tokens(reporter) == {"prompt": 4 * 50, "generated": 4 * 6}
    assert {kind: four["tokens"][kind] for kind in ("prompt", "generated")} == served_tokens(reporter)
    assert four["simulated_device"]["token_scale"] == 4
    assert "each computed token stands for 4 simulated tokens" in four["simulated_device"]["token_scale_note"]
    # Computed step 0: the prefill of 200 tokens (its first token), then 3 decode passes at 201..203. Computed
    # step n: decode passes at 4 x (50 + n) + j, j = 0..3. One span per computed step.
    expected = [[device.step(serving_step_work(eight_b, [], [(200, 0)]))]
                + [device.step(serving_step_work(eight_b, [200 + j], [])) for j in range(1, 4)]]
    expected += [[device.step(serving_step_work(eight_b, [4 * (50 + n) + j], [])) for j in range(4)]
                 for n in range(1, 6)]
    served = reporter.spans[1:]
    assert len(served) == len(expected) == 6
    for span, passes in zip(served, expected):
        seconds, activity = weighted(passes)
        assert span.seconds == pytest.approx(seconds, abs=2e-9)
        assert {f: getattr(span.activity, f) for f in activity} == pytest.approx(activity, rel=1e-9)
    assert four["prefill_seconds"] == pytest.approx(expected[0][0].seconds, rel=1e-9)
    assert four["prefill_seconds"] + four["decode_seconds"] == pytest.approx(sum(s.seconds for s in served), abs=1e-8)
    # The first token is out at the end of the prefill pass; TPOT is over the 24 - 1 further simulated tokens.
    assert four["requests"][0]["ttft_s"] == pytest.approx(expected[0][0].seconds, abs=1e-8)
    e2e = four["requests"][0]["e2e_s"]
    assert four["tpot_seconds"]["mean"] == pytest.approx((e2e - expected[0][0].seconds) / 23, rel=1e-6)


def test_agentic_token_scale_multiplies_tokens_and_spill_bytes_not_the_computed_run():
    fields = dict(sessions=2, total_sessions=3, record_steps=True, steps_median=4, steps_sigma=0.3,
                  tool_time_cap_seconds=2.0, length_scale=0.25, kv_budget_share=None)
    one, one_reporter = run_agentic(FAST_TICK_S, token_scale=1, **fields)
    four, four_reporter = run_agentic(FAST_TICK_S, **fields)  # automatic: round(1 / 0.25) = 4
    assert (one["config"]["token_scale"], four["config"]["token_scale"]) == (1, 4)
    # The same computed sessions (their draws do not depend on timing) ...
    assert [r["tokens"] for r in one["steps_trace"]] == [r["tokens"] for r in four["steps_trace"]]
    # ... stand for 4x the tokens, and tool calls for the trace's unscaled time (scale 0.25 x 4 = 1).
    assert four_reporter.tokens == {kind: 4 * n for kind, n in one_reporter.tokens.items()}
    assert (four["generated_tokens"], four["appended_tokens"]) == (4 * one["generated_tokens"],
                                                                 4 * one["appended_tokens"])
    assert (one["config"]["tool_time_scale"], four["config"]["tool_time_scale"]) == (0.25, 1.0)
    assert [r["tool_seconds"] for r in four["steps_trace"]] == pytest.approx(
        [4 * r["tool_seconds"] for r in one["steps_trace"]])
    # Each computed decode token is 4 simulated passes at 4x the contexts: the device works over 4x as long
    # as unscaled. (Which sessions share a decode batch differs: the tool calls end at other times.)
    compute = [[s for s in r.spans if s.kind == "compute"] for r in (one_reporter, four_reporter)]
    assert sum(s.seconds for s in compute[1]) > 4 * sum(s.seconds for s in compute[0])


def test_the_bench_lowers_the_chat_rate_only_on_simulated_time(monkeypatch):
    import types

    from wattledger.workloads import registry

    ran = []
    fake = types.SimpleNamespace(ChatConfig=chat.ChatConfig, run=lambda config, *rest: ran.append(config) or {})
    monkeypatch.setattr(registry.Regime, "load", lambda self: fake)
    common = dict(preset="tiny", duration_s=1.0, device="cpu", seed=0, gpus=[])
    registry.regime("chat").run_as_benchmarked(None, None, **common)
    registry.regime("chat").run_as_benchmarked(None, None, simulated_device="h100-sxm-80gb", **common)
    assert [c.mean_rate_per_s for c in ran] == [chat.ChatConfig().mean_rate_per_s, registry.CHAT_SIMULATED_RATE_PER_S]
    assert ran[1] == chat.ChatConfig(mean_rate_per_s=registry.CHAT_SIMULATED_RATE_PER_S)  # nothing else changed
