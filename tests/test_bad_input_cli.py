"""Bad input, as a user types it (issue 8, item 14): a real ``wattledger`` process, exit status 2, exactly one
line on stderr, never a traceback. Config files, mock faults, replay files, the record path, the token,
``bench --port`` and run directories given to ``report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

WATTLEDGER = [sys.executable, "-m", "wattledger.agent.cli"]
GOOD_HEADER = {"type": "header", "format": "wattledger-samples", "version": 1, "simulated": True,
               "gpus": [{"index": 0, "uuid": "GPU-0", "model_name": "m", "driver_version": "d",
                         "memory_total_bytes": None, "power_limit_default_watts": None}]}
BINARY = bytes(range(0x80, 0x100)) * 8  # no newline, no valid UTF-8 sequence


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WATTLEDGER_")}
    environ.update(env or {})
    return subprocess.run(WATTLEDGER + args, capture_output=True, text=True, timeout=60, cwd=cwd, env=environ)


def assert_one_line_usage_error(result: subprocess.CompletedProcess, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert result.returncode == 2, (result.returncode, result.stderr)


@pytest.mark.parametrize("content, needle", [
    (b"[agent]\nport = [1]\n", "port: expected an integer, got [1]"),
    (b"[agent]\nreplay_speed = [1]\n", "replay_speed: expected a number"),
    (b'[agent]\nbackend = "mock"\nlog_level = "\xff"\n', "not UTF-8 text"),
    (bytes(range(256)), "config file"),
    (b"interval = nan\n", "interval: expected a finite duration, got nan"),
    (b'port = 1\n[agent]\nbackend = "mock"\n', "key 'port' sits outside the [agent] table"),
    (b'[agent]\ntoken = "                    "\n', "token is empty or only whitespace"),
], ids=["list-port", "list-speed", "not-utf8", "binary", "nan-interval", "key-beside-agent", "blank-token"])
def test_bad_config_files(tmp_path, content, needle):
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    for command in (["devices", "--backend", "mock"], ["agent", "--backend", "mock", "--port", "0"]):
        assert_one_line_usage_error(run([*command[:1], "--config", str(path), *command[1:]], tmp_path), needle)


@pytest.mark.parametrize("fault, needle", [
    ("gpu_lost:gpu=5:at=1", "there is no GPU 5"),
    ("gpu_lost:gpu=0:gpu=1:at=1", "gpu= given twice"),
])
def test_bad_mock_faults(tmp_path, fault, needle):
    assert_one_line_usage_error(run(["agent", "--backend", "mock", "--port", "0", "--mock-fault", fault], tmp_path),
                                needle)


def _gpu(ns: int, **fields) -> dict:
    return {"type": "gpu", "index": 0, "uuid": "GPU-0", "monotonic_ns": ns, **fields}


def _lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("content, needle", [
    (BINARY, "line 1: not UTF-8 text"),
    (bytes(range(256)) * 8, "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n" + _lines(_gpu(1)), "line 1: JSON nested too deeply"),
    (_lines({**GOOD_HEADER, "gpus": 5}, _gpu(1)), "gpus must be a list"),
    (_lines({**GOOD_HEADER, "gpus": [5]}, _gpu(1)), "gpu entry in the header is not an object"),
    (_lines({**GOOD_HEADER, "gpus": [{**GOOD_HEADER["gpus"][0], "index": "a"}]}, _gpu(1)), "index must be"),
    (_lines({**GOOD_HEADER, "version": "1"}, _gpu(1)), "format version"),
    (_lines({**GOOD_HEADER, "simulated": "yes"}, _gpu(1)), "simulated must be true or false"),
    (_lines(GOOD_HEADER, _gpu(1, energy_joules=5.0), _gpu(2, energy_joules=-5.0), _gpu(3)),
     "line 3: gpu record: energy_joules must be >= 0"),
    (_lines(GOOD_HEADER, _gpu(1, utilization_gpu_ratio=1.5), _gpu(2)), "line 2: gpu record: utilization_gpu_ratio"),
    (_lines(GOOD_HEADER, _gpu(1, sm_activity_ratio=-0.1), _gpu(2)), "line 2: gpu record: sm_activity_ratio"),
    (_lines(GOOD_HEADER, _gpu(1)) + b'{"type":"gpu","index":0,"uuid":"GPU-0","monotonic_ns":2,"power_watts":NaN}\n'
     + _lines(_gpu(3)), "line 3: gpu record: power_watts must be finite"),
    (_lines(GOOD_HEADER, _gpu(1), _gpu(2, index=3), _gpu(4)), "line 3: GPU 3 is not among the header's GPUs"),
], ids=["binary", "binary-with-newlines", "deep-json", "gpus-int", "gpu-entry-int", "gpu-index-str", "version-str", "simulated-str",
        "negative-energy", "utilization-above-1", "activity-below-0", "nan-power", "unknown-gpu"])
def test_corrupt_replay_files(tmp_path, content, needle):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(content)
    for command in ("devices", "agent"):
        assert_one_line_usage_error(run([command, "--replay", str(path)], tmp_path), needle)


def test_record_at_a_directory(tmp_path):
    (tmp_path / "out").mkdir()
    assert_one_line_usage_error(run(["agent", "--backend", "mock", "--port", "0", "--record", "out"], tmp_path),
                                "is a directory")


@pytest.mark.parametrize("target", ["/proc/forbidden.jsonl", "/sys/forbidden.jsonl"])
def test_record_at_an_unwritable_path(tmp_path, target):
    assert_one_line_usage_error(run(["agent", "--backend", "mock", "--port", "0", "--record", target], tmp_path),
                                "record: ")


@pytest.mark.parametrize("token", [" " * 24, "\t \t"])
def test_whitespace_only_token_from_the_environment(tmp_path, token):
    assert_one_line_usage_error(run(["agent", "--backend", "mock", "--port", "0"], tmp_path,
                                    {"WATTLEDGER_TOKEN": token}), "token is empty or only whitespace")


def test_whitespace_only_token_given_to_a_workload(tmp_path):
    assert_one_line_usage_error(run(["workload", "chat", "--duration", "1s"], tmp_path, {"WATTLEDGER_TOKEN": "   "}),
                                "WATTLEDGER_TOKEN: token is empty or only whitespace")


def test_workloads_agent_url_variable_does_not_stop_the_agent(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WATTLEDGER_")}
    environ.update(WATTLEDGER_AGENT_URL="http://127.0.0.1:9478", WATTLEDGER_WORKLOAD="chat")
    process = subprocess.Popen(WATTLEDGER + ["agent", "--backend", "mock", "--address", "127.0.0.1", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=tmp_path)
    try:
        printed = []
        while len(printed) < 20 and not any("metrics at http://" in line for line in printed):
            printed.append(process.stdout.readline())
        assert "metrics at http://" in printed[-1], (printed, process.poll())
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0 and "Traceback" not in err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_bench_port_out_of_range(tmp_path, port):
    assert_one_line_usage_error(run(["bench", "--quick", "--port", port], tmp_path), "--port")


def _run_dir(root: Path, events: bytes | None, samples: bytes | None, spans: bytes | None = None) -> Path:
    root.mkdir()
    for name, content in (("events.jsonl", events), ("samples.jsonl", samples), ("spans.jsonl", spans)):
        if content is not None:
            (root / name).write_bytes(content)
    return root


_START = {"type": "run_start", "monotonic_ns": 1_000, "kind": "bench"}


@pytest.mark.parametrize("events, samples, spans, needle", [
    (None, None, None, "not a wattledger run directory"),
    (_lines(_START), None, None, "no samples.jsonl"),
    (b"", b"", None, "no run_start event"),
    (_lines({"type": "run_start"}), b"", None, "line 1: an event needs a type and monotonic_ns"),
    (b"[1]\n{}\n", b"", None, "line 1: not a JSON object"),
    (BINARY + b"\n" + _lines(_START), b"", None, "line 1: not UTF-8 text"),
    (b"[" * 100_000 + b"\n" + _lines(_START), b"", None, "line 1: JSON nested too deeply"),
    (b"{not json\n" + _lines(_START), b"", None, "line 1: not JSON"),
    (_lines({**_START, "settings": 5}), b"", None, "run_start settings must be an object"),
    (_lines({**_START, "settings": {"workloads": "chat"}}), b"", None, "settings.workloads must be a list"),
    (_lines(_START, {"type": "phase_start", "monotonic_ns": 5}), b"", None, "phase_start event needs a phase"),
    (_lines(_START), _lines(GOOD_HEADER, {"type": "gpu", "index": 0}, _gpu(5)), None, "line 2: gpu record without"),
    (_lines(_START), _lines(GOOD_HEADER, _gpu(5, energy_joules=-1.0), _gpu(6)), None, "energy_joules must be >= 0"),
    (_lines(_START), _lines({**GOOD_HEADER, "gpus": [3]}, _gpu(6)), None, "line 1: a gpu entry in the header"),
    (_lines(_START), _lines({"type": "tokens", "counts": {}}, _gpu(6)), None, "tokens record needs monotonic_ns"),
    (_lines(_START), _lines({"type": "tokens", "monotonic_ns": 5, "counts": {"a": "x"}}, _gpu(6)), None,
     "tokens counts must map"),
    (_lines(_START), _lines({"type": "truth", "monotonic_ns": 5, "energy_joules": 3}, _gpu(6)), None,
     "truth energy_joules"),
    (_lines(_START), b"", _lines({"workload": "chat"}, {"workload": "chat"}), "a span needs a workload and a kind"),
    (_lines(_START), b"", _lines({"workload": "chat", "kind": "compute", "start_ns": "1", "end_ns": 2}, {}),
     "a span needs start_ns and end_ns"),
], ids=["empty-dir", "no-samples-file", "empty-files", "run-start-without-time", "list-event", "binary-events",
        "deep-events", "bad-json", "settings-int", "workloads-str", "phase-without-name", "gpu-without-uuid",
        "negative-energy", "bad-header", "tokens-without-time", "tokens-str", "truth-int", "span-without-kind",
        "span-str-time"])
def test_malformed_run_directories_given_to_report(tmp_path, events, samples, spans, needle):
    run_dir = _run_dir(tmp_path / "run", events, samples, spans)
    assert_one_line_usage_error(run(["report", str(run_dir)], tmp_path), needle)


@pytest.mark.parametrize("make", [lambda p: p, lambda p: (p.write_text("x"), p)[1]], ids=["missing", "a-file"])
def test_report_on_something_that_is_not_a_directory(tmp_path, make):
    target = make(tmp_path / "target")
    why = "no such directory" if not target.exists() else "not a directory"
    assert_one_line_usage_error(run(["report", str(target)], tmp_path), f"is not a wattledger run directory ({why})")
