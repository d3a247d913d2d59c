"""tests/gpu/check.py, the one command for a real GPU, on CPU: its dry run (mock GPU, tiny preset) passes
with every step in the record and at most 8 files; its runner keeps going past a failing step and skips
what the budget no longer allows; its comparisons catch a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parent / "gpu"
CHECK = GPU_DIR / "check.py"
sys.path.insert(0, str(GPU_DIR))

import gpucheck_nvml as nvml_steps  # noqa: E402 - tests/gpu is not a package
import gpucheck_runner as runner  # noqa: E402

STEP_NAMES = ("environment", "devices", "nvml_costs", "attention", "agentic_spill", "torchrun", "bench_energy",
              "model_bench", "compiled_decode")


def check_command(*args: str) -> list[str]:
    return [sys.executable, str(CHECK), *args]


@pytest.mark.slow
def test_the_dry_run_passes_with_every_step_recorded(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(check_command("--dry-run", str(out)), capture_output=True, text=True, timeout=300,
                          check=False)
    record = json.loads((out / runner.RECORD_JSON).read_text())
    failed = [(s["name"], s["status"], s["reason"], [c for c in s["checks"] if not c["passed"]], s["error"])
              for s in record["steps"] if not s["passed"]]
    assert done.returncode == 0, (failed, done.stdout[-2000:], done.stderr[-2000:])
    assert [s["name"] for s in record["steps"]] == list(STEP_NAMES)
    assert record["passed"] and record["dry_run"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= runner.MAX_OUTPUT_FILES
    assert {"record.json", "record.md", "log.txt", "recording.jsonl"} <= set(files)
    assert all((out / name).stat().st_size < 4 * 2**20 for name in files)
    markdown = (out / runner.RECORD_MARKDOWN).read_text()
    assert all(f"## {name}: " in markdown for name in STEP_NAMES)
    skipped = {s["name"]: s["reason"] for s in record["steps"] if s["status"] == "skipped"}
    assert set(skipped) == {"torchrun", "compiled_decode"}
    assert all("no GPU" in reason for reason in skipped.values())
    # The recording slice replays: a header, then samples of the mock GPU.
    lines = [json.loads(line) for line in (out / "recording.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "header" and any(line["type"] == "gpu" for line in lines[1:])


def test_an_isolated_step_runs_in_its_own_process(tmp_path):
    # `devices` imports no torch, so its child process starts fast.
    out = tmp_path / "out"
    done = subprocess.run(check_command("--dry-run", "--isolate", "yes", "--steps", "devices", str(out)),
                          capture_output=True, text=True, timeout=120, check=False)
    record = json.loads((out / runner.RECORD_JSON).read_text())
    assert done.returncode == 0, record
    assert record["isolated"] and [s["name"] for s in record["steps"]] == ["devices"]
    assert record["steps"][0]["status"] == "pass"
    assert "step-devices.log" in (out / runner.LOG_FILE).read_text()


def _fake_step(name, action, estimate_s=0.0):
    return runner.Step(name, action, estimate_s, name, isolate=False)


def test_one_failing_step_never_stops_the_rest_and_the_budget_skips_gracefully(tmp_path):
    def crash(ctx):
        raise RuntimeError("CUDA error: out of memory")

    def judged(ctx):
        ctx.figure("tokens_per_s", 10.0)
        ctx.check_range("tokens_per_s", 10.0, 20.0, None)

    def fine(ctx):
        ctx.check("ok", 1, "1", True)

    steps = [_fake_step("crash", crash), _fake_step("judged", judged), _fake_step("fine", fine),
             _fake_step("too_long", fine, estimate_s=10_000)]
    record = runner.run_steps(steps, tmp_path, tmp_path, dry_run=False, budget_s=60, isolate=False,
                              script=CHECK, header=runner.header_fields(["test"]))
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status == {"crash": "error", "judged": "fail", "fine": "pass", "too_long": "skipped"}
    assert "out of memory" in record["steps"][0]["reason"]
    assert record["steps"][3]["reason"].startswith("budget:")
    assert not record["passed"]
    on_disk = json.loads((tmp_path / runner.RECORD_JSON).read_text())
    assert [s["status"] for s in on_disk["steps"]] == ["error", "fail", "pass", "skipped"]
    assert "| judged | fail" in (tmp_path / runner.RECORD_MARKDOWN).read_text()


def test_a_dry_run_skip_for_no_gpu_counts_as_a_pass_and_a_real_one_does_not():
    def no_gpu(ctx):
        raise runner.Skip("skipped: no GPU", counts_as_pass=ctx.dry_run)

    for dry_run in (True, False):
        ctx = runner.Context(Path("."), Path("."), dry_run, time.monotonic() + 10)
        result = runner.run_in_process(_fake_step("needs_gpu", no_gpu), ctx)
        assert (result["status"], result["passed"]) == ("skipped", dry_run)


def test_devices_against_nvidia_smi_catch_a_mismatch():
    gpu = {"index": 0, "model_name": "NVIDIA H200", "uuid": "GPU-1", "driver_version": "580.65.06",
           "memory_total_bytes": 143771 * 2**20, "power_limit_default_watts": 700.0}
    smi = nvml_steps.parse_smi_devices("0, NVIDIA H200, GPU-1, 143771, 700.00, 580.65.06\n")
    ctx = runner.Context(Path("."), Path("."), False, time.monotonic() + 10)
    nvml_steps.compare_devices(ctx, [gpu], smi)
    assert all(c.passed for c in ctx.checks) and len(ctx.checks) == 6
    other = nvml_steps.parse_smi_devices("0, NVIDIA H200, GPU-2, 143771, [N/A], 580.65.06\n")
    ctx = runner.Context(Path("."), Path("."), False, time.monotonic() + 10)
    nvml_steps.compare_devices(ctx, [gpu], other)
    assert sorted(c.name for c in ctx.checks if not c.passed) == ["GPU 0 default power limit W", "GPU 0 uuid"]


def test_counter_energy_and_integrated_power_agree_on_a_steady_ramp(tmp_path):
    # Power ramps 100 -> 200 W over 10 s (energy 1500 J); the counter is its exact integral.
    rows = [(t / 10, 100 + 10 * t / 10, 100 * t / 10 + 5 * (t / 10) ** 2) for t in range(101)]
    assert nvml_steps.trapezoid_joules([(t, p) for t, p, _ in rows]) == pytest.approx(1500)
    assert nvml_steps.energy_between(rows, 0.0, 10.0) == pytest.approx(1500)
    assert nvml_steps.energy_between(rows, 2.05, 4.05) == pytest.approx(
        (100 * 4.05 + 5 * 4.05**2) - (100 * 2.05 + 5 * 2.05**2), rel=1e-3)
    assert nvml_steps.energy_between(rows, -1.0, 4.0) is None
    smi = tmp_path / "smi.csv"
    smi.write_text("2026/12/02 03:14:15.500, 0, 150.25\n2026/12/02 03:14:16.500, 0, [N/A]\n2026/12/02 03:14:1")
    (moment, watts), = nvml_steps.read_smi_power(smi)[0]
    assert watts == 150.25 and moment % 1 == pytest.approx(0.5)


def test_bad_arguments_are_one_line_and_exit_2():
    for args in ([], ["--budget-s", "0", "/tmp/x"], ["--steps", "nope", "/tmp/x"]):
        done = subprocess.run(check_command(*args), capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, args
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_the_bench_summary_fails_a_regime_charged_every_gpu_or_an_idle_without_the_context():
    good = {"failed_regimes": [], "idle": {"cuda_context_held": True, "power_watts": 90.0},
            "idle_end": {"power_watts": 95.0},
            "regimes": {"chat": {"gpu_attribution": "uuid", "gpus": [3]}}}
    ctx = runner.Context(Path("."), Path("."), False, time.monotonic() + 10)
    nvml_steps.judge_bench_summary(ctx, good)
    assert all(check.passed for check in ctx.checks) and len(ctx.checks) == 3
    bad = {"failed_regimes": [{"regime": "agentic", "reason": "OutOfMemoryError"}],
           "idle": {"cuda_context_held": False},
           "regimes": {"chat": {"gpu_attribution": "unmatched", "gpus": list(range(8))}}}
    ctx = runner.Context(Path("."), Path("."), False, time.monotonic() + 10)
    nvml_steps.judge_bench_summary(ctx, bad)
    assert not any(check.passed for check in ctx.checks) and len(ctx.checks) == 3
