"""Issue 12 item 6: one regime's failure does not lose the bench.

A regime whose workload raises (here: a CUDA error, between two toy regimes that work) is recorded as
failed with a one-line reason, its reporter stopped and CUDA memory released, and the bench goes on: the
summary, the report and the closing table hold the regimes that finished and name the one that failed.
The fast tests drive ``_run_regime`` alone: what is caught, what is not (KeyboardInterrupt).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from wattledger.workloads import registry
from wattledger.workloads.bench import bench_command

ROOT = Path(__file__).resolve().parents[1]
CUDA_ERROR = ("CUDA error: an illegal memory access was encountered\n"
              "CUDA kernel errors might be asynchronously reported at some other API call.")


# -- a regime that fails: this module is its own workload module (registry.Regime's ``module``) --------

@dataclass
class FailingConfig:
    seconds_before_failing: float = 0.3


RAISES: dict[str, BaseException] = {"next": RuntimeError(CUDA_ERROR)}  # what the next run raises
REPORTERS: list = []  # the reporters it was given, to check they were stopped


def add_arguments(parser) -> None:  # the workload protocol; no flags of its own
    pass


def config_from_args(args) -> FailingConfig:
    return FailingConfig()


def run(config: FailingConfig, options, reporter, stop) -> dict:
    """Reports a little work, then raises what RAISES holds, as a workload hitting a CUDA error would."""
    REPORTERS.append(reporter)
    start_ns = time.monotonic_ns()
    stop.wait(config.seconds_before_failing)
    reporter.span("compute", start_ns, time.monotonic_ns())
    reporter.add_tokens("generated", 8)
    raise RAISES["next"]


BOOM = registry.Regime("boom", __name__, "FailingConfig", "a regime that fails", "generated", "#aa0000")
TOY = registry.Regime("toy", "toy_regime", "ToyConfig", "a toy regime", "generated", "#777777")
TOY_AFTER = registry.Regime("toy_after", "toy_regime", "ToyConfig", "a toy regime, after the failure",
                            "generated", "#555555")


@pytest.fixture
def regimes(monkeypatch):
    for regime in (BOOM, TOY, TOY_AFTER):
        monkeypatch.setitem(registry.REGIMES, regime.name, regime)
    REPORTERS.clear()


class _FakeReporter:
    def __init__(self, accounting, workload, gpus):
        self.workload, self.gpus, self.stopped = workload, gpus, False

    def start(self, pid=None):
        pass

    def stop(self):
        self.stopped = True

    def span(self, *args):
        pass

    def add_tokens(self, kind, count):
        pass


def _run_alone(monkeypatch, error: BaseException) -> tuple[dict, dict]:
    pytest.importorskip("torch")  # the run options (workloads.common) are torch's
    monkeypatch.setattr(bench_command, "AccountingReporter", _FakeReporter)
    monkeypatch.setitem(RAISES, "next", error)
    session = SimpleNamespace(agent=SimpleNamespace(accounting_api=lambda: None), simulated=False, mock_preset=None)
    options = bench_command.BenchOptions(device="cpu")
    return bench_command._run_regime(session, "boom", 0.1, "tiny", options, bench_command.StopRequest(), (0,))


def test_a_cuda_out_of_memory_is_caught_with_a_one_line_reason_and_the_reporter_stopped(regimes, monkeypatch):
    torch = pytest.importorskip("torch")
    summary, failure = _run_alone(monkeypatch, torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has a total capacity of 139.8 GiB"))
    assert summary == {} and failure["failed"] is True
    assert failure["failure_reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB."
    assert 'raise RAISES["next"]' in failure["failure_traceback"]
    assert REPORTERS[-1].stopped


def test_keyboard_interrupt_is_not_a_regime_failure_it_stops_the_bench(regimes, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _run_alone(monkeypatch, KeyboardInterrupt())
    assert REPORTERS[-1].stopped


@pytest.mark.slow
def test_a_failing_regime_between_two_that_work_leaves_their_summary_report_and_table(regimes, monkeypatch,
                                                                                      tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    torch = pytest.importorskip("torch")
    from wattledger.workloads.bench import table
    from wattledger.workloads.bench.economics import load_pricing

    # On CPU torch has no CUDA context: pretend one, to see the failure hand the cached blocks back.
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    options = bench_command.BenchOptions(workloads=("toy", "boom", "toy_after"), backend="mock", quick=True,
                                         duration_s=1.5, idle_s=1.0, cooldown_s=0.0, output_dir=tmp_path)
    out = io.StringIO()
    console = table.console(file=out)
    run_dir, summary = bench_command.run_bench(options, bench_command.StopRequest(), load_pricing(), console)
    jsonschema.validate(summary, json.loads((ROOT / "docs" / "summary.schema.json").read_text()))

    assert summary["status"] == "partial" and set(summary["regimes"]) == {"toy", "toy_after"}
    for name in ("toy", "toy_after"):
        regime = summary["regimes"][name]
        assert regime["phase"]["finished"] is True and regime["tokens"]["generated"] > 0, name
        assert regime["gpus"] == [0] and regime["gpu_attribution"] == "mock"
    [failed] = summary["failed_regimes"]
    assert failed["regime"] == "boom"
    assert failed["reason"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert failed["phase"]["stopped_by"] == "failed" and failed["phase"]["finished"] is False
    assert REPORTERS[-1].stopped_ns is not None and emptied == [True]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    boom_end = next(e for e in events if e["type"] == "phase_end" and e["phase"] == "boom")
    assert boom_end["failed"] is True and 'raise RAISES["next"]' in boom_end["failure_traceback"]
    assert next(e for e in events if e["type"] == "run_end")["failed_regimes"] == ["boom"]
    # Item 8 on the mock: both idle baselines measured, the context step skipped and said so.
    assert summary["idle"]["power_watts"] > 0 and summary["idle_end"]["power_watts"] > 0
    assert summary["idle"]["cuda_context_held"] is False and "mock" in summary["idle"]["cuda_context_note"]
    assert any(c["check"] == "idle drift" for c in summary["validity"])

    page = (run_dir / "report.html").read_text()
    assert "FAILED regime: boom: RuntimeError: CUDA error: an illegal memory access was encountered" in page
    assert "PARTIAL run: it was interrupted" not in page  # nothing was interrupted: a regime failed
    table.print_table(summary, console)
    text = out.getvalue()
    assert "wattledger: bench: the boom regime failed (RuntimeError: CUDA error: an illegal" in " ".join(text.split())
    assert any(line.split()[:2] == ["boom", "FAILED"] for line in text.splitlines())
    flat = " ".join(text.split())
    assert "- regime failed: boom: RuntimeError: CUDA error: an illegal memory access was encountered" in flat
    assert "wattledger bench partial" in flat


@pytest.mark.parametrize("failed_regimes, exit_code", [([], 0), ([{"regime": "boom", "reason": "x"}], 1)])
def test_the_bench_exits_1_when_a_regime_failed_and_0_when_none_did(monkeypatch, tmp_path, failed_regimes,
                                                                   exit_code):
    from wattledger.workloads.bench import cli, table

    summary = {"failed_regimes": failed_regimes}
    monkeypatch.setattr(bench_command, "run_bench", lambda *args: (tmp_path, summary))
    monkeypatch.setattr(cli, "print_table", lambda *args: None)
    monkeypatch.setattr(cli, "_console", lambda: table.console(file=io.StringIO()))
    assert cli.bench_main(["--backend", "mock", "--quick", "--output", str(tmp_path)]) == exit_code


# -- issue 14: the regimes run on the simulated GPU's time on the mock, unless --cpu-timing -------------


class _RecordingRegime:
    """Stands in for a registry regime: records how the bench asked it to run."""

    def __init__(self):
        self.calls: list[dict] = []

    def run_as_benchmarked(self, reporter, stop, **kwargs) -> dict:
        self.calls.append(kwargs)
        return {"workload": "recorded"}


def _run_recorded(monkeypatch, simulated: bool, cpu_timing: bool) -> dict:
    recording = _RecordingRegime()
    monkeypatch.setattr(bench_command, "AccountingReporter", _FakeReporter)
    monkeypatch.setattr(registry, "regime", lambda name: recording)
    session = SimpleNamespace(agent=SimpleNamespace(accounting_api=lambda: None), simulated=simulated,
                              mock_preset="h200-141gb" if simulated else None)
    options = bench_command.BenchOptions(device="cpu", cpu_timing=cpu_timing)
    summary, failure = bench_command._run_regime(session, "chat", 0.1, "tiny", options, bench_command.StopRequest(),
                                                 (0,))
    assert failure == {} and summary == {"workload": "recorded"}
    (call,) = recording.calls
    return call


def test_on_the_mock_every_regime_runs_on_the_mock_presets_simulated_time_by_default(monkeypatch):
    call = _run_recorded(monkeypatch, simulated=True, cpu_timing=False)
    assert call["simulated_device"] == "h200-141gb" and call["timing_preset"] == "8b"


def test_cpu_timing_keeps_the_cpus_own_time_on_the_mock(monkeypatch):
    assert _run_recorded(monkeypatch, simulated=True, cpu_timing=True)["simulated_device"] is None


def test_on_real_gpus_nothing_is_simulated(monkeypatch):
    assert _run_recorded(monkeypatch, simulated=False, cpu_timing=False)["simulated_device"] is None


def test_the_timing_settings_say_which_clock_the_regimes_ran_on():
    mock = SimpleNamespace(simulated=True, mock_preset="h100-sxm-80gb")
    assert bench_command.timing_settings(mock, bench_command.BenchOptions()) == {
        "timing": "simulated", "simulated_device": "h100-sxm-80gb", "timing_preset": "8b"}
    assert bench_command.timing_settings(mock, bench_command.BenchOptions(cpu_timing=True)) == {"timing": "cpu"}
    assert bench_command.timing_settings(SimpleNamespace(simulated=False, mock_preset=None),
                                         bench_command.BenchOptions()) == {}


def test_the_cpu_timing_flag_reaches_the_bench_options(monkeypatch, tmp_path):
    from wattledger.workloads.bench import cli, table

    seen = []
    monkeypatch.setattr(bench_command, "run_bench", lambda options, *args: (seen.append(options), (tmp_path, {}))[1])
    monkeypatch.setattr(cli, "print_table", lambda *args: None)
    monkeypatch.setattr(cli, "_console", lambda: table.console(file=io.StringIO()))
    cli.bench_main(["--backend", "mock", "--quick", "--cpu-timing", "--output", str(tmp_path)])
    cli.bench_main(["--backend", "mock", "--quick", "--output", str(tmp_path)])
    assert [options.cpu_timing for options in seen] == [True, False]


def test_run_as_benchmarked_builds_the_simulation_into_the_run_options(monkeypatch):
    pytest.importorskip("torch")
    from wattledger.workloads import common

    seen = []
    module = SimpleNamespace(ToyConfig=lambda: SimpleNamespace(), run=lambda config, options, reporter, stop:
                             seen.append(options) or {})
    toy = registry.Regime("toy", "toy_regime", "ToyConfig", "a toy regime", "generated", "#777777")
    monkeypatch.setattr(registry.Regime, "load", lambda self: module)
    monkeypatch.setattr(common, "configure_cpu_threads", lambda options: None)
    kwargs = dict(preset="tiny", duration_s=1.0, device="cpu", seed=0, gpus=[0])
    toy.run_as_benchmarked(None, None, simulated_device="h100-sxm-80gb", timing_preset="8b", **kwargs)
    toy.run_as_benchmarked(None, None, **kwargs)
    assert seen[0].simulation == common.SimulatedTiming(device="h100-sxm-80gb", timing_preset="8b")
    assert seen[1].simulation is None
