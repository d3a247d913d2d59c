"""The file exporter writes what the replay backend plays back."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes import FakeClock, run_ticks
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.exporters.jsonl import JsonlRecorder
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.base import ProbeUnavailable
from wattledger.probes.mock import MockGpuBackend
from wattledger.probes.replay import ReplayGpuBackend


def record(path, seconds=5.0):
    clock = FakeClock()
    timeline = ScriptedTimeline(clock.ns()).bursts(0, seconds, 1.0, 0.4, Activity(gpu=1, sm=0.7, tensor=0.5, dram=0.4))
    backend = MockGpuBackend(2, activity=timeline, clock_ns=clock.ns)
    accounting = Accounting([0, 1], clock_ns=clock.ns)
    recorder = JsonlRecorder(path, backend.name, True, backend.devices(), 0.1, clock=clock.seconds)
    accounting.add_span_listener(recorder.write_span)
    sampler = Sampler(Ledger(None, clock.ns), backend, None, 0.1, clock=clock.seconds, sinks=[recorder.write_samples])
    samples = []
    sampler.add_sink(lambda gpus, host: samples.append(gpus))
    run_ticks(sampler, clock, seconds)
    accounting.add_spans([accounting.make_span("chat", "compute", 1, 2, [0])])
    recorder.close()
    return samples, backend


def test_recording_replays_sample_for_sample(tmp_path):
    path = tmp_path / "trace.jsonl"
    recorded, backend = record(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["simulated"] is True
    assert sum(1 for r in lines if r["type"] == "span") == 1
    clock = FakeClock(start_ns=5)
    replay = ReplayGpuBackend(path, clock_ns=clock.ns)
    assert replay.devices() == backend.devices() and replay.simulated
    first_ns = recorded[0][0].monotonic_ns
    for step in recorded:
        clock.now_ns = 5 + step[0].monotonic_ns - first_ns
        played = replay.sample()
        for original, copy in zip(step, played):
            assert copy.monotonic_ns == clock.now_ns
            assert copy.energy_joules == original.energy_joules
            assert copy.utilization_gpu_ratio == original.utilization_gpu_ratio
            assert copy.throttle_reasons == original.throttle_reasons
    assert not replay.finished
    clock.advance(1)
    assert replay.finished
    assert [s.up for s in replay.sample()] == [False, False]


def test_accelerated_replay_and_loop(tmp_path):
    path = tmp_path / "trace.jsonl"
    recorded, _ = record(path)
    clock = FakeClock()
    replay = ReplayGpuBackend(path, speed=10, loop=True, clock_ns=clock.ns)
    clock.advance(0.25)  # 2.5 s into the trace
    expected = next(s for s in recorded if s[0].monotonic_ns - recorded[0][0].monotonic_ns == 2_500_000_000)
    assert replay.sample()[0].energy_joules == expected[0].energy_joules
    clock.advance(0.5)  # 7.5 s: past the 4.9 s trace, so it looped
    assert not replay.finished
    assert replay.sample()[0].energy_joules < recorded[-1][0].energy_joules


def test_a_line_cut_short_at_the_end_is_tolerated(tmp_path):
    path = tmp_path / "trace.jsonl"
    record(path)
    text = path.read_text()
    path.write_text(text + '{"type": "gpu", "index": 0, "uu')
    assert len(ReplayGpuBackend(path).devices()) == 2


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("not json\n", "line 1"),
    ('{"type": "header", "format": "other"}\n', "header"),
    ('{"type": "header", "format": "wattledger-samples", "version": 99, "gpus": []}\n', "version 99"),
    ('{"type": "header", "format": "wattledger-samples", "version": 1, "gpus": []}\n', "no GPU samples"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ProbeUnavailable, match=message):
        replay_or_one_line_error(path)


def test_missing_file(tmp_path):
    with pytest.raises(ProbeUnavailable, match="cannot read"):
        replay_or_one_line_error(tmp_path / "nope.jsonl")


def replay_or_one_line_error(path) -> ReplayGpuBackend:
    """The replay backend for ``path``; the ProbeUnavailable it raises instead is checked to be one line
    (the agent prints it as its last words) and raised again."""
    try:
        return ReplayGpuBackend(path)
    except ProbeUnavailable as err:
        assert "\n" not in str(err)
        raise


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.one_of(st.text(max_size=40), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)
                                  .map(json.dumps)), max_size=5))
def test_any_file_content_replays_or_gives_one_line_error(tmp_path, garbage):
    path = tmp_path / "fuzz.jsonl"
    header = ('{"type":"header","format":"wattledger-samples","version":1,"gpus":[{"index":0,"uuid":"GPU-x",'
              '"model_name":"m","driver_version":"d","memory_total_bytes":null,"power_limit_default_watts":null}]}')
    path.write_text("\n".join([header, *garbage, '{"type":"gpu","index":0,"uuid":"GPU-x","monotonic_ns":5}']) + "\n")
    try:
        backend = replay_or_one_line_error(path)
    except ProbeUnavailable:
        return  # refused in one line: fine
    assert backend.sample()[0].index == 0


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                        max_size=3), max_leaves=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["index", "uuid", "monotonic_ns", "up", "energy_joules", "power_watts",
                                               "throttle_reasons", "throttle_seconds", "processes", "bogus"]),
                              _JSON, max_size=6))
def test_malformed_gpu_records_are_refused_in_one_line(tmp_path, fields):
    path = tmp_path / "fuzz.jsonl"
    header = '{"type":"header","format":"wattledger-samples","version":1,"gpus":[]}'
    path.write_text(header + "\n" + json.dumps({"type": "gpu", **fields}) + "\n" + '{"type":"host"}\n')
    try:
        backend = replay_or_one_line_error(path)
    except ProbeUnavailable:
        return  # refused in one line: fine
    assert all(isinstance(sample.monotonic_ns, int) for sample in backend.sample())
