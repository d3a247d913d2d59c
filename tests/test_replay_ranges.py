"""Replayed values are range-checked, with the line number (issue 8, item 14): a non-finite number, a negative
counter, a ratio outside 0..1, a header of the wrong types, binary and deeply nested lines are refused in one
line naming the line; the ledger never sees them."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from wattledger.probes import records
from wattledger.probes.base import ProbeUnavailable
from wattledger.probes.replay import ReplayFileError, ReplayGpuBackend

GPU = {"index": 0, "uuid": "GPU-0", "model_name": "m", "driver_version": "d", "memory_total_bytes": None,
       "power_limit_default_watts": None}
HEADER = {"type": "header", "format": "wattledger-samples", "version": 1, "simulated": False, "gpus": [GPU]}
RATIO_FIELDS = ("utilization_gpu_ratio", "utilization_memory_controller_ratio", "sm_activity_ratio",
                "sm_occupancy_ratio", "tensor_activity_ratio", "dram_activity_ratio")
NON_NEGATIVE_FIELDS = ("energy_joules", "power_watts", "power_average_watts", "memory_used_bytes",
                       "pcie_transmit_bytes", "nvlink_receive_bytes", "sm_clock_hertz", "ecc_corrected_errors",
                       "pcie_receive_bytes_per_second")


def gpu(ns: int, **fields) -> dict:
    return {"type": "gpu", "index": 0, "uuid": "GPU-0", "monotonic_ns": ns, **fields}


def write(path, *lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def refusal(path) -> str:
    with pytest.raises(ReplayFileError) as err:
        ReplayGpuBackend(path)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("field", RATIO_FIELDS)
@pytest.mark.parametrize("value", [1.5, -0.01, 100.0])
def test_ratios_outside_0_to_1_are_refused_with_the_line(tmp_path, field, value):
    write(tmp_path / "t.jsonl", HEADER, gpu(1), gpu(2, **{field: value}), gpu(3))
    assert f"line 3: gpu record: {field} must be 0 to 1" in refusal(tmp_path / "t.jsonl")


@pytest.mark.parametrize("field", NON_NEGATIVE_FIELDS)
def test_negative_counters_and_readings_are_refused_with_the_line(tmp_path, field):
    write(tmp_path / "t.jsonl", HEADER, gpu(1, **{field: -1}), gpu(2))
    assert f"line 2: gpu record: {field} must be >= 0" in refusal(tmp_path / "t.jsonl")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(tmp_path, token):
    raw = '{"type":"gpu","index":0,"uuid":"GPU-0","monotonic_ns":2,"temperature_gpu_celsius":%s}' % token
    write(tmp_path / "t.jsonl", HEADER, gpu(1), raw, gpu(3))
    assert "line 3: gpu record: temperature_gpu_celsius must be finite" in refusal(tmp_path / "t.jsonl")


def test_rounding_at_the_edge_of_a_ratio_is_accepted(tmp_path):
    write(tmp_path / "t.jsonl", HEADER, gpu(1, sm_activity_ratio=1.0 + 1e-12, utilization_gpu_ratio=0.0), gpu(2))
    assert ReplayGpuBackend(tmp_path / "t.jsonl").devices()[0].index == 0


@pytest.mark.parametrize("extra, message", [
    ({"throttle_seconds": {"power": -1.0}}, "throttle_seconds must map reasons to finite seconds >= 0"),
    ({"processes": [{"pid": -3, "memory_used_bytes": 1}]}, "processes.pid must be a whole number >= 0"),
    ({"processes": [{"memory_used_bytes": 1}]}, "an entry of processes has no pid"),
    ({"processes": 5}, "processes must be a list of objects"),
    ({"mig_instances": [{"gpu_instance_id": 1, "compute_instance_id": 0, "uuid": "MIG-1",
                         "memory_used_bytes": 1, "memory_total_bytes": 2, "sm_activity_ratio": 2.0}]},
     "mig_instances.sm_activity_ratio must be 0 to 1"),
])
def test_nested_values_are_checked_too(tmp_path, extra, message):
    write(tmp_path / "t.jsonl", HEADER, gpu(1, **extra), gpu(2))
    assert message in refusal(tmp_path / "t.jsonl")


@pytest.mark.parametrize("header, message", [
    ({**HEADER, "gpus": 5}, "line 1: gpus must be a list"),
    ({**HEADER, "gpus": [5]}, "line 1: a gpu entry in the header is not an object"),
    ({**HEADER, "gpus": [{"index": 0}]}, "line 1: a gpu entry in the header has no uuid"),
    ({**HEADER, "gpus": [{**GPU, "index": "0"}]}, "line 1: header gpu index must be a whole number"),
    ({**HEADER, "gpus": [{**GPU, "uuid": 3}]}, "line 1: header gpu uuid must be a string"),
    ({**HEADER, "gpus": [{**GPU, "memory_total_bytes": -1}]}, "memory_total_bytes must be"),
    ({**HEADER, "gpus": [{**GPU, "mig_enabled": "no"}]}, "mig_enabled must be true or false"),
    ({**HEADER, "gpus": [GPU, GPU]}, "a GPU index appears twice"),
    ({**HEADER, "simulated": 1}, "simulated must be true or false"),
    ({**HEADER, "version": [1]}, "format version [1] is not supported"),
])
def test_header_types(tmp_path, header, message):
    write(tmp_path / "t.jsonl", header, gpu(1))
    assert message in refusal(tmp_path / "t.jsonl")


def test_binary_file(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(bytes(range(0x80, 0x100)) * 16)
    assert "line 1: not UTF-8 text" in refusal(tmp_path / "t.jsonl")


def test_binary_in_the_middle(tmp_path):
    write(tmp_path / "t.jsonl", HEADER, gpu(1))
    with open(tmp_path / "t.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe\n" + json.dumps(gpu(2)).encode() + b"\n")
    assert "line 3: not UTF-8 text" in refusal(tmp_path / "t.jsonl")


def test_a_last_line_cut_in_a_multibyte_character_is_still_tolerated(tmp_path):
    write(tmp_path / "t.jsonl", HEADER, gpu(1))
    with open(tmp_path / "t.jsonl", "ab") as handle:
        handle.write(b'{"type":"gpu","uuid":"\xc3')
    assert ReplayGpuBackend(tmp_path / "t.jsonl").devices()[0].uuid == "GPU-0"


@pytest.mark.parametrize("depth", [10_000, 1_000_000])
def test_deeply_nested_json_is_one_line(tmp_path, depth):
    write(tmp_path / "t.jsonl", HEADER, "[" * depth + "]" * depth, gpu(1))
    assert "line 2: JSON nested too deeply" in refusal(tmp_path / "t.jsonl")
    with pytest.raises(records.RecordError, match="nested too deeply"):
        records.parse_line("{\"a\":" * depth, 7)


def test_a_gpu_missing_from_the_header(tmp_path):
    write(tmp_path / "t.jsonl", HEADER, gpu(1), {**gpu(2), "index": 1}, gpu(3))
    assert "line 3: GPU 1 is not among the header's GPUs" in refusal(tmp_path / "t.jsonl")


def test_every_refusal_is_a_probe_unavailable_too(tmp_path):
    """The daemon's callers that catch ProbeUnavailable keep working; the command line tells the two apart."""
    assert issubclass(ReplayFileError, ProbeUnavailable)
    with pytest.raises(ReplayFileError, match="cannot read replay file"):
        ReplayGpuBackend(tmp_path / "missing.jsonl")


_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10**6, max_value=10**12),
                     st.booleans(), st.none(), st.text(max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(RATIO_FIELDS + NON_NEGATIVE_FIELDS + ("temperature_gpu_celsius",)),
                              _NUMBERS, min_size=1, max_size=4))
def test_whatever_is_recorded_what_replays_is_in_range(tmp_path, values):
    path = tmp_path / "t.jsonl"
    raw = json.dumps(gpu(2, **values))  # json writes nan and inf as NaN / Infinity, as a careless writer would
    write(path, HEADER, gpu(1), raw, gpu(3))
    try:
        backend = ReplayGpuBackend(path)
    except ReplayFileError as err:
        assert "\n" not in str(err) and "line 3" in str(err)
        return
    sample = backend._timelines[0][1][1]
    for name, value in values.items():
        got = getattr(sample, name)
        if got is None:
            continue
        assert math.isfinite(got)
        if name.endswith("_ratio"):
            assert -1e-9 <= got <= 1 + 1e-9
        elif name in NON_NEGATIVE_FIELDS:
            assert got >= 0
