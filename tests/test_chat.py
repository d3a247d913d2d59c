"""Chat: the arrival process and length tables reproduce their sources; the server batches continuously."""

from __future__ import annotations

import argparse
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattledger.workloads.arrivals import (
    API_CV,
    CONVERSATION_CV,
    ArrivalConfig,
    counts_between,
    expected_counts,
    generate_arrivals,
    interarrival_cv,
    peak_trough_ratio,
)
from wattledger.workloads.lengths import CONVERSATION_OUTPUT, CONVERSATION_PROMPT, LengthSampler, fitted_scale

from fakes import ClockedStop, TickingClock

torch = pytest.importorskip("torch")

from wattledger.workloads.chat import ChatConfig, add_arguments, config_from_args, run  # noqa: E402
from wattledger.workloads.common import RunOptions  # noqa: E402
from wattledger.workloads.reporter import DECODE_ACTIVITY, PREFILL_ACTIVITY, Reporter  # noqa: E402

DAY = 600.0  # one compressed day, the default


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread: on a shared two-core machine a second OpenMP thread stalls steps by tens of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- arrivals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2.5, 4.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_conversation_arrivals_over_one_day_match_target_cv_and_peak_trough_ratio(ratio, seed):
    config = ArrivalConfig(mean_rate_per_s=50.0, day_seconds=DAY, peak_trough_ratio=ratio)
    arrivals = generate_arrivals(config, DAY, random.Random(seed))
    assert len(arrivals) == pytest.approx(50.0 * DAY, rel=0.05)
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < DAY
    assert interarrival_cv(arrivals, config) == pytest.approx(CONVERSATION_CV, rel=0.10)
    assert peak_trough_ratio(arrivals, config, DAY) == pytest.approx(ratio, rel=0.15)


def test_local_rate_follows_the_daily_cycle():
    config = ArrivalConfig(mean_rate_per_s=50.0, day_seconds=DAY, start_fraction=0.3)
    arrivals = generate_arrivals(config, DAY, random.Random(7))
    edges = [DAY * i / 24 for i in range(25)]
    for observed, expected in zip(counts_between(arrivals, edges), expected_counts(config, edges)):
        # Gamma renewal counts: variance about CV^2 x mean over windows this long.
        assert abs(observed - expected) < 4.5 * math.sqrt(CONVERSATION_CV ** 2 * expected)
    assert config.rate_at(DAY * 0.2) == pytest.approx(50.0 * (1 + config.amplitude))  # u = 0.5: the peak
    assert config.rate_at(DAY * 0.7) == pytest.approx(50.0 * (1 - config.amplitude))  # u = 1.0: the trough
    assert config.rate_at(DAY * 0.2) / config.rate_at(DAY * 0.7) == pytest.approx(2.5)


def test_start_at_peak_or_trough():
    peak = ArrivalConfig(mean_rate_per_s=20.0, start_fraction=0.5)
    trough = ArrivalConfig(mean_rate_per_s=20.0, start_fraction=0.0)
    assert peak.rate_at(0) == pytest.approx(20.0 * (1 + peak.amplitude))
    assert trough.rate_at(0) == pytest.approx(20.0 * (1 - trough.amplitude))
    short_peak = generate_arrivals(peak, 30.0, random.Random(3))
    short_trough = generate_arrivals(trough, 30.0, random.Random(3))
    assert len(short_peak) / len(short_trough) == pytest.approx(2.5, rel=0.2)


def test_on_off_api_traffic_is_far_burstier():
    config = ArrivalConfig(mean_rate_per_s=50.0, day_seconds=DAY, traffic="api")
    cvs = []
    for seed in (1, 2):
        arrivals = generate_arrivals(config, DAY, random.Random(seed))
        assert len(arrivals) == pytest.approx(50.0 * DAY, rel=0.35)  # long bursts: the count itself varies
        cvs.append(interarrival_cv(arrivals, config))
    assert min(cvs) > 5
    assert statistics.fmean(cvs) == pytest.approx(API_CV, rel=0.3)
    # Silence most of the time at the trace's rate: most 1 s windows are empty (73% in Azure 2023 code).
    slow = ArrivalConfig(mean_rate_per_s=5.53, day_seconds=DAY, peak_trough_ratio=1.0, traffic="api")
    arrivals = generate_arrivals(slow, 3 * DAY, random.Random(5))
    counts = counts_between(arrivals, [float(t) for t in range(int(3 * DAY) + 1)])
    assert 0.55 < counts.count(0) / len(counts) < 0.9


def test_weekend_days_scale_the_rate():
    config = ArrivalConfig(mean_rate_per_s=100.0, day_seconds=10.0, peak_trough_ratio=1.0, weekend_factor=0.4)
    arrivals = generate_arrivals(config, 70.0, random.Random(11))
    per_day = counts_between(arrivals, [10.0 * d for d in range(8)])
    weekday = statistics.fmean(per_day[:5])
    assert per_day[5] / weekday == pytest.approx(0.4, rel=0.12)
    assert per_day[6] / weekday == pytest.approx(0.4, rel=0.12)
    assert config.rate_at(55.0) == pytest.approx(40.0) and config.rate_at(45.0) == pytest.approx(100.0)
    assert config.cumulative(70.0) == pytest.approx(100.0 * 10 * (5 + 2 * 0.4))


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(1.0, 20.0), peak=st.floats(0.0, 0.999), start=st.floats(0.0, 0.999),
       start_day=st.integers(0, 6), weekend=st.floats(0.05, 3.0), t=st.floats(0.0, 5000.0))
def test_cumulative_rate_inverts(ratio, peak, start, start_day, weekend, t):
    config = ArrivalConfig(mean_rate_per_s=3.0, day_seconds=97.0, peak_trough_ratio=ratio, peak_fraction=peak,
                           start_fraction=start, start_day=start_day, weekend_factor=weekend)
    s = config.cumulative(t)
    assert s >= 0
    assert config.inverse_cumulative(s) == pytest.approx(t, abs=1e-6)
    assert config.cumulative(t + 1e-3) - s == pytest.approx(1e-3 * config.rate_at(t), rel=1e-2, abs=1e-9)


BAD_ARRIVALS = [
    {"mean_rate_per_s": 0}, {"mean_rate_per_s": -1.0}, {"mean_rate_per_s": math.inf}, {"mean_rate_per_s": "5"},
    {"day_seconds": 0}, {"peak_trough_ratio": 0.5}, {"peak_trough_ratio": 1e6}, {"peak_trough_ratio": math.nan},
    {"peak_fraction": 1.0},
    {"start_fraction": -0.1}, {"start_day": 7}, {"start_day": 1.5}, {"weekend_factor": 0}, {"traffic": "bulk"},
    {"cv": 0.0}, {"traffic": "api", "cv": 0.9}, {"on_fraction": 1.0},
]


@pytest.mark.parametrize("bad", BAD_ARRIVALS)
def test_arrival_config_rejects_bad_values(bad):
    with pytest.raises(ValueError) as err:
        ArrivalConfig(**bad)
    assert "\n" not in str(err.value)


@settings(max_examples=100, deadline=None)
@given(rate=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
       ratio=st.floats(allow_nan=True, allow_infinity=True), fraction=st.floats(-2, 2),
       traffic=st.sampled_from(["conversation", "api", "code", ""]))
def test_arrival_config_accepts_exactly_the_valid_values(rate, ratio, fraction, traffic):
    valid = (math.isfinite(rate) and rate > 0 and math.isfinite(ratio) and 1 <= ratio <= 1000 and 0 <= fraction < 1
             and traffic in ("conversation", "api"))
    try:
        config = ArrivalConfig(mean_rate_per_s=rate, peak_trough_ratio=ratio, start_fraction=fraction,
                               traffic=traffic)
    except ValueError:
        assert not valid
    else:
        assert valid and config.rate_at(0.0) > 0


# -- lengths -----------------------------------------------------------------------------------------------


def test_length_quantiles_match_the_azure_conversation_table():
    sampler = LengthSampler()
    rng = random.Random(42)
    pairs = [sampler.sample(rng) for _ in range(20_000)]
    prompts = sorted(p for p, _ in pairs)
    outputs = sorted(o for _, o in pairs)

    def empirical(values, p):  # nearest rank
        return values[math.ceil(p * len(values)) - 1]

    for table, values in ((CONVERSATION_PROMPT, prompts), (CONVERSATION_OUTPUT, outputs)):
        for p, tokens in table[1:-1]:  # the source's own rows, not our p0 / p100
            assert empirical(values, p) == pytest.approx(tokens, rel=0.04), (p, tokens)
    assert max(outputs) <= 1000 and min(outputs) >= 1 and min(prompts) >= 1
    logs = [(math.log(p), math.log(o)) for p, o in pairs]
    assert abs(statistics.correlation([a for a, _ in logs], [b for _, b in logs])) < 0.05  # drawn independently


def test_fitted_scale_fits_the_tiny_cache():
    scale = fitted_scale(1024)
    sampler = LengthSampler(scale=scale, max_total=1024)
    assert scale == pytest.approx(1024 / (4298 + 1000))
    rng = random.Random(1)
    assert all(sum(sampler.sample(rng)) <= 1024 for _ in range(5000))
    assert fitted_scale(8192) == 1.0


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(0.001, 3.0), max_total=st.one_of(st.none(), st.integers(2, 20_000)), seed=st.integers(0, 2**32))
def test_length_sampler_respects_its_caps(scale, max_total, seed):
    sampler = LengthSampler(scale=scale, max_total=max_total)
    rng = random.Random(seed)
    for _ in range(20):
        prompt, output = sampler.sample(rng)
        assert prompt >= 1 and output >= 1
        assert output <= sampler.max_output <= max(1, round(1000 * scale))
        if max_total is not None:
            assert prompt + output <= max_total


@pytest.mark.parametrize("bad", [{"scale": 0}, {"scale": -1.0}, {"scale": math.nan}, {"max_total": 1},
                                 {"max_total": 10.5}, {"kind": "code"}])
def test_length_sampler_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        LengthSampler(**bad)


# -- serving -----------------------------------------------------------------------------------------------


class StopWhenGenerated(Reporter):
    """Sets ``stop`` once ``target`` tokens have been generated (a trace's whole output)."""

    def __init__(self, stop, target: int | None):
        super().__init__("chat", [0], keep_spans=True)
        self.stop_event, self.target = stop, target

    def add_tokens(self, kind: str, count: int) -> None:
        super().add_tokens(kind, count)
        if self.target is not None and self.tokens["generated"] >= self.target:
            self.stop_event.set()


def serve(config: ChatConfig, duration_s: float, seed: int = 0,
          stop_after_generated: int | None = None) -> tuple[dict, Reporter]:
    """Serve on a clock that moves 1 ms per reading (about 4 ms a step) and idles in fake time.

    Arrivals, the deadline and every span then count the server's own steps: which step a request joins,
    how many arrive before the end, and the run's length are the same on a quiet host and a busy one."""
    clock = TickingClock(tick_s=0.001)
    stop = ClockedStop(clock)
    reporter = StopWhenGenerated(stop, stop_after_generated)
    reporter.start()
    summary = run(config, RunOptions(preset="tiny", duration_s=duration_s, device="cpu", seed=seed), reporter,
                  stop, clock_ns=clock.ns)
    reporter.stop()
    return summary, reporter


def test_requests_join_a_running_batch_and_get_exactly_their_target_length():
    # A decodes 400 tokens (hundreds of steps); B and C arrive while it does.
    trace = ((0.0, 100, 400), (0.1, 20, 12), (0.12, 10, 1), (0.13, 300, 30))
    summary, reporter = serve(ChatConfig(trace=trace, keep_requests=True), duration_s=60.0,
                              stop_after_generated=sum(o for _, _, o in trace))
    a, b, c, d = summary["requests"]
    assert all(r["completed"] for r in summary["requests"]), summary["requests"]
    # B was admitted (prefilled) while A was mid-decode, and left before A did.
    assert a["admit_step"] + 1 < b["admit_step"] < b["last_step"] < a["last_step"]
    assert a["admit_step"] < d["admit_step"] < a["last_step"]
    assert c["last_step"] == c["admit_step"]  # one output token: done at its prefill
    for record in summary["requests"]:
        assert record["generated_tokens"] == record["output_tokens"]
        assert 0 <= record["ttft_s"] <= record["e2e_s"]
        assert record["arrival_s"] <= record["admitted_s"] <= record["first_token_s"] <= record["finished_s"]
    assert summary["batch_size"]["max"] >= 2
    assert reporter.tokens["prompt"] == sum(p for _, p, _ in trace) == summary["tokens"]["prompt"]
    assert reporter.tokens["generated"] == sum(o for _, _, o in trace) == summary["tokens"]["generated"]
    assert summary["requests_arrived"] == summary["requests_completed"] == 4
    assert summary["requests_dropped_at_end"] == 0
    kinds = {span.activity for span in reporter.spans}
    assert kinds == {PREFILL_ACTIVITY, DECODE_ACTIVITY} and {span.kind for span in reporter.spans} == {"compute"}
    served = sum(span.seconds for span in reporter.spans) - summary["warm_up_seconds"]
    assert served == pytest.approx(summary["prefill_seconds"] + summary["decode_seconds"], rel=0.05, abs=0.02)


def test_generated_traffic_summary_and_kv_budget():
    config = ChatConfig(mean_rate_per_s=25.0, start_fraction=0.5, max_batch=4, max_len=256, kv_budget_tokens=300,
                        keep_requests=True)
    summary, reporter = serve(config, duration_s=3.0, seed=3)
    records = summary["requests"]
    assert summary["requests_arrived"] == len(records) > 30
    assert summary["requests_completed"] + summary["requests_dropped_at_end"] == summary["requests_arrived"]
    assert summary["requests_completed"] > 0
    assert summary["length_scale"] == pytest.approx(256 / 5298)
    assert reporter.tokens["prompt"] == sum(r["prompt_tokens"] for r in records if r["admit_step"])
    assert reporter.tokens["generated"] == sum(r["generated_tokens"] for r in records)
    for r in records:
        assert r["prompt_tokens"] + r["output_tokens"] <= 256
        if r["completed"]:
            assert r["generated_tokens"] == r["output_tokens"] and r["ttft_s"] <= r["e2e_s"]
    # Admission respects the batch size and the KV budget at every step.
    admitted = [r for r in records if r["admit_step"]]
    for step in range(1, summary["steps"] + 1):
        active = [r for r in admitted if r["admit_step"] <= step <= r["last_step"]]
        assert len(active) <= 4
        assert sum(r["prompt_tokens"] + r["output_tokens"] for r in active) <= 300
    # First come, first served.
    order = sorted(admitted, key=lambda r: r["admit_step"])
    assert [r["index"] for r in order] == sorted(r["index"] for r in order)
    for key in ("ttft_seconds", "tpot_seconds", "e2e_seconds"):
        assert set(summary[key]) == {"p50", "p90", "p99", "mean"}
        assert summary[key]["p50"] <= summary[key]["p99"]
    assert 0 < summary["busy_fraction"] < 1
    assert summary["arrival_rate_per_s"] == pytest.approx(summary["expected_arrival_rate_per_s"], rel=0.4)
    assert summary["interarrival_cv"] is not None and summary["generated_tokens_per_s"] > 0
    assert summary["workload"] == "chat" and summary["traffic"] == "conversation"


def test_stop_event_ends_the_run_early():
    import threading

    stop = threading.Event()
    stop.set()
    summary = run(ChatConfig(), RunOptions(duration_s=60.0, device="cpu"), Reporter("chat", [0]), stop)
    assert summary["duration_seconds"] < 5 and summary["requests_completed"] == 0


BAD_CHAT = [
    {"max_batch": 0}, {"max_batch": 2.0}, {"kv_budget_tokens": 1}, {"max_len": 1}, {"length_scale": 0.0},
    {"traffic": "bulk"}, {"mean_rate_per_s": -1}, {"start_fraction": 1.0}, {"peak_trough_ratio": 0.9},
    {"trace": ((0.0, 0, 5),)}, {"trace": ((-1.0, 5, 5),)}, {"log_every_s": 0},
]


@pytest.mark.parametrize("bad", BAD_CHAT)
def test_bad_chat_config_is_a_one_line_value_error(bad):
    with pytest.raises(ValueError) as err:
        ChatConfig(**bad)
    assert "\n" not in str(err.value)


def test_trace_request_too_long_for_the_cache_is_rejected():
    with pytest.raises(ValueError, match="needs 600 tokens"):
        run(ChatConfig(trace=((0.0, 500, 100),), max_len=512, kv_budget_tokens=550),
            RunOptions(duration_s=1.0, device="cpu"), Reporter("chat", [0]))


def parse(*argv: str) -> ChatConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_command_line_options():
    config = parse("--rate", "2", "--day", "5m", "--peak-trough", "4", "--peak-at", "0.25", "--start-at", "peak",
                   "--weekend-factor", "0.4", "--traffic", "api", "--max-batch", "16", "--kv-budget-tokens", "4096",
                   "--max-len", "512", "--length-scale", "0.5")
    assert (config.mean_rate_per_s, config.day_seconds, config.peak_trough_ratio) == (2.0, 300.0, 4.0)
    assert (config.peak_fraction, config.start_fraction, config.weekend_factor) == (0.25, 0.25, 0.4)
    assert (config.traffic, config.max_batch, config.kv_budget_tokens, config.max_len) == ("api", 16, 4096, 512)
    assert config.length_scale == 0.5
    defaults = parse()
    assert defaults == ChatConfig() and defaults.start_fraction == 0.0  # trough: half a day from the peak
    assert parse("--start-at", "0.3").start_fraction == 0.3


@pytest.mark.parametrize("argv", [["--rate", "fast"], ["--rate", "-2"], ["--day", "soon"], ["--start-at", "noon"],
                                  ["--max-batch", "2.5"], ["--traffic", "code"], ["--kv-budget-tokens", "x"],
                                  ["--length-scale", "inf"], ["--start-day", "9"]])
def test_bad_command_line_values_are_value_errors(argv):
    with pytest.raises(ValueError) as err:
        parse(*argv)
    assert "\n" not in str(err.value)
