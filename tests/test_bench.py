"""``wattledger bench`` end to end on the mock GPU: the measurement, the outputs, interruptions.

One short benchmark (tiny preset, 10 s per regime) runs once for the module; the interruption tests run
their own. The quick benchmark's own timing (under 3 minutes on 2 cores) is measured by
``tests/benchmarks/bench_quick.py``, not asserted here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("torch")

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "summary.schema.json").read_text())
WATTLEDGER = [sys.executable, "-m", "wattledger.agent.cli"]
SHORT = ["--quick", "--backend", "mock", "--duration", "10s", "--idle", "6s", "--cooldown", "1s"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    result = subprocess.run(WATTLEDGER + ["bench", *SHORT, "--output", str(output)], capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = (output / "latest").resolve()
    return result, run_dir, json.loads((run_dir / "summary.json").read_text())


def test_summary_validates_and_says_simulated(bench_run):
    result, run_dir, summary = bench_run
    jsonschema.validate(summary, SCHEMA)
    assert summary["status"] == "complete" and summary["simulated"] is True and summary["backend"] == "mock"
    assert result.stdout.splitlines()[0].startswith("wattledger: ") and "SIMULATED" in result.stdout.splitlines()[0]
    assert set(summary["regimes"]) == {"training", "chat", "agentic"}
    for name in ("samples.jsonl", "spans.jsonl", "events.jsonl", "samples.parquet", "summary.json", "report.html"):
        assert (run_dir / name).exists(), name


def test_joules_per_token_equals_the_mocks_exact_energy_within_1_percent(bench_run):
    _, _, summary = bench_run
    for name, regime in summary["regimes"].items():
        truth = regime["mock_truth"]["joules_per_token"]
        assert regime["joules_per_token"]["gross"] == pytest.approx(truth, rel=0.01), name


def test_utilization_orders_training_agentic_chat_and_chat_is_mostly_idle(bench_run):
    _, _, summary = bench_run
    util = {name: r["gpu_utilization"]["mean"] for name, r in summary["regimes"].items()}
    assert util["training"] > util["agentic"] > util["chat"], util
    assert summary["regimes"]["chat"]["gpu_utilization"]["idle_fraction"] >= 0.5


def test_the_measurement_rules_show_in_the_summary(bench_run):
    _, _, summary = bench_run
    assert summary["idle"]["power_watts"] > 0
    for name, regime in summary["regimes"].items():
        assert regime["duration_seconds"] >= 5
        checks = {c["check"]: c for c in regime["validity"]}
        assert checks["window length"]["passed"] and checks["counter resolution"]["passed"], name
        assert checks["counter vs integrated power"]["passed"], checks["counter vs integrated power"]
        dynamic, gross = regime["joules_per_token"]["dynamic"], regime["joules_per_token"]["gross"]
        assert 0 < dynamic < gross
        cost = regime["cost_usd_per_million_tokens"]
        assert cost["full_load"] <= cost["measured"]
    assert summary["regimes"]["chat"]["joules_per_request"] > 0
    assert summary["regimes"]["training"]["workload"]["goodput"] > 0


def test_report_rebuilds_from_the_raw_files(bench_run, tmp_path):
    _, run_dir, summary = bench_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("samples.jsonl", "spans.jsonl", "events.jsonl"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    result = subprocess.run(WATTLEDGER + ["report", str(copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = json.loads((copy / "summary.json").read_text())
    assert rebuilt["regimes"]["chat"]["energy_joules"] == pytest.approx(summary["regimes"]["chat"]["energy_joules"])


def wait_for_phase(run_dir_parent: Path, phase: str, timeout_s: float = 120) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for events in run_dir_parent.glob("*/events.jsonl"):
            if f'"phase":"{phase}"' in events.read_text():
                return events.parent
        time.sleep(0.2)
    raise AssertionError(f"phase {phase} never started")


def test_sigint_halfway_writes_a_partial_summary_and_report(tmp_path):
    process = subprocess.Popen(WATTLEDGER + ["bench", *SHORT, "--output", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run_dir = wait_for_phase(tmp_path, "chat")
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert summary["status"] == "partial"
    assert "training" in summary["regimes"] and "agentic" not in summary["regimes"]
    assert (run_dir / "report.html").exists()


def test_sigkill_of_the_process_group_leaves_a_run_report_can_rebuild(tmp_path):
    process = subprocess.Popen(WATTLEDGER + ["bench", *SHORT, "--output", str(tmp_path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = wait_for_phase(tmp_path, "training")
    time.sleep(6)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (run_dir / "summary.json").exists()
    result = subprocess.run(WATTLEDGER + ["report", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert summary["status"] == "partial" and summary["idle"]["power_watts"] > 0
    assert (run_dir / "report.html").exists()


def test_bad_usage_is_one_line(tmp_path):
    result = subprocess.run(WATTLEDGER + ["bench", "--duration", "2s", "--output", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    missing = subprocess.run(WATTLEDGER + ["report", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a wattledger run directory" in missing.stderr


def test_the_bench_report_loads_in_headless_chromium(bench_run, tmp_path):
    from browser import check_page, require_chromium

    require_chromium()
    _, run_dir, _ = bench_run
    screenshot_dir = Path(os.environ.get("WATTLEDGER_SCREENSHOT_DIR", tmp_path))
    screenshot = screenshot_dir / "bench-report.png"
    page = check_page(run_dir / "report.html", screenshot)
    assert page.all_images_loaded and len(page.images) >= 5, page.images
    assert page.severe == []
    assert screenshot.stat().st_size > 10_000
    assert "SIMULATED" in page.title
