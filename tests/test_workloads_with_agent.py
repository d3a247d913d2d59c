"""The bundled workloads report to an agent on the mock GPU, and the mock's telemetry takes each one's shape.

Training keeps the GPU busy, chat under the diurnal load leaves it mostly idle, agentic sessions fall in
between (their tool calls leave the GPU waiting). Runs on CPU with the tiny preset.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

torch = pytest.importorskip("torch")

from wattledger.agent.config import build_config  # noqa: E402
from wattledger.agent.daemon import Agent  # noqa: E402
from wattledger.workloads import agentic, chat, training  # noqa: E402
from wattledger.workloads.arrivals import CONVERSATION_MEAN_RATE_PER_S  # noqa: E402
from wattledger.workloads.common import RunOptions  # noqa: E402
from wattledger.workloads.reporter import AccountingReporter  # noqa: E402

from span_truth import busy_fraction, reported  # noqa: E402

pytestmark = pytest.mark.integration
MOCK_DELAY_S = 0.5
RUN_S = 4.0


class UtilizationLog:
    """A sampler sink keeping (time ns, utilization.gpu) of GPU 0, as the mock reported it."""

    def __init__(self):
        self.samples: list[tuple[int, float]] = []
        self._seen = threading.Condition()

    def __call__(self, gpu_samples, host_sample):
        for sample in gpu_samples:
            if sample.index == 0 and sample.utilization_gpu_ratio is not None:
                with self._seen:
                    self.samples.append((sample.monotonic_ns, sample.utilization_gpu_ratio))
                    self._seen.notify_all()

    def wait_past(self, ns: int, samples: int = 2, timeout_s: float = 60.0) -> None:
        """Block until ``samples`` samples stamped after ``ns`` arrived: the mock (which runs its delay
        behind the clock) and the ledger have then simulated and charged everything up to ``ns``. Waits on
        the samples themselves, not a guessed number of seconds; the timeout only ends a hung sampler."""
        with self._seen:
            if not self._seen.wait_for(lambda: sum(t > ns for t, _ in self.samples) >= samples, timeout_s):
                raise AssertionError(f"the sampler produced no samples past {ns} within {timeout_s:g} s")

    def mean_between(self, start_ns: int, end_ns: int) -> float:
        inside = [u for t, u in self.samples if start_ns < t <= end_ns]
        return sum(inside) / len(inside)


def run_workload(agent: Agent, log: UtilizationLog, module, config) -> dict:
    reporter = AccountingReporter(agent.accounting, module.__name__.rsplit(".", 1)[1], [0], keep_spans=True)
    before_start = time.monotonic_ns()
    reporter.start()
    after_start = time.monotonic_ns()
    summary = module.run(config, RunOptions(preset="tiny", duration_s=RUN_S, device="cpu"), reporter, threading.Event())
    before_stop = time.monotonic_ns()
    reporter.stop()
    after_stop = time.monotonic_ns()
    log.wait_past(after_stop)
    # The regime's steady state: from its first span to its last (model setup and imports left out, and
    # chat's warm-up pass, its first span, reported before its serving clock starts).
    ordered = sorted(reporter.spans, key=lambda span: span.start_ns)
    first = ordered[0].end_ns if summary.get("warm_up_seconds") else ordered[0].start_ns
    last = max(span.end_ns for span in reporter.spans)
    summary["mock_busy_fraction"] = log.mean_between(first, last)
    summary["span_busy_fraction"] = busy_fraction(reported(reporter.spans), first, last)
    # The accounting registered the workload between these readings of the clock it reads.
    summary["registered_seconds"] = ((before_stop - after_start) / 1e9, (after_stop - before_start) / 1e9)
    return summary


@pytest.fixture(scope="module")
def results():
    config = build_config({"backend": "mock", "mock_gpus": 1, "mock_delay": MOCK_DELAY_S, "interval": "50ms"}, {})
    agent = Agent(config, serve_http=False)
    log = UtilizationLog()
    agent.sampler.add_sink(log)
    agent.sampler.start()
    try:
        out = {
            "training": run_workload(agent, log, training, training.TrainingConfig()),
            # Half the shipped arrival rate: on CPU the "GPU" time per request is the host's CPU time, so
            # chat's busy fraction grows with the host's load (0.24 on a quiet 2-core host, 0.41 with two
            # busy processes beside it at the full rate); at half the rate it stays mostly idle under load.
            "chat": run_workload(agent, log, chat, chat.ChatConfig(mean_rate_per_s=CONVERSATION_MEAN_RATE_PER_S / 2)),
            "agentic": run_workload(agent, log, agentic, agentic.AgenticConfig()),
        }
        out["snapshot"] = agent.ledger.snapshot()
    finally:
        agent.stop()
    return out


def test_each_workload_has_tokens_and_energy_in_the_ledger(results):
    snapshot = results["snapshot"]
    tokens = snapshot.workload_tokens
    assert tokens[("training", "trained")] == results["training"]["tokens"]["trained"] > 0
    assert tokens[("chat", "generated")] == results["chat"]["tokens"]["generated"] > 0
    assert tokens[("chat", "prompt")] == results["chat"]["tokens"]["prompt"] > 0
    assert tokens[("agentic", "prompt")] == results["agentic"]["tokens"]["prompt"] > 0
    for name in ("training", "chat", "agentic"):
        assert snapshot.workload_energy_joules[(name, 0)] > 0
        # Active from the workload's start to its stop, as registered (model setup included: on a busy host
        # that is seconds more than the run's own duration, so the bounds are the test's clock readings).
        shortest, longest = results[name]["registered_seconds"]
        assert shortest <= snapshot.workload_active_seconds[(name, 0)] <= longest


def test_each_regime_has_its_shape_in_its_own_spans(results):
    # The simulator's truth for each regime, from the spans it reported: flat training, mostly idle chat,
    # agentic in between (compute broken by tool calls). CPU load stretches every span alike.
    busy = {name: results[name]["span_busy_fraction"] for name in ("training", "chat", "agentic")}
    print("span busy fractions:", busy)
    assert busy["training"] > 0.8, busy
    assert busy["chat"] < 0.5, busy
    assert busy["training"] > busy["agentic"] > busy["chat"], busy


def test_the_mock_shows_no_more_activity_than_the_spans_hold(results):
    # The mock's utilization over each regime comes from those spans and nothing else: it never exceeds
    # their truth (it may fall short where a span reached it too late to be simulated; that delivery delay
    # is the simulator's own tests' business) and it saw every regime's activity.
    for name in ("training", "chat", "agentic"):
        mock, truth = results[name]["mock_busy_fraction"], results[name]["span_busy_fraction"]
        print(f"{name}: mock {mock:.3f}, spans {truth:.3f}")
        assert 0 < mock <= truth + 0.05, (name, mock, truth)


def metrics_once(url: str, ready, timeout_s: float = 60.0) -> str:
    """The agent's /metrics once ``ready(text)`` holds (the mock runs its delay behind the clock, so the
    workload's energy appears a little after its tokens), or the last text read when the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_workload_cli_reports_to_a_running_agent_over_http(tmp_path):
    agent = subprocess.Popen([sys.executable, "-m", "wattledger.agent.cli", "agent", "--backend", "mock",
                              "--address", "127.0.0.1", "--port", "0", "--mock-delay", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in agent.stdout:
            match = re.search(r"metrics at (http://\S+)/metrics", line)
            if match:
                url = match.group(1)
                break
        assert url
        result = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "workload", "chat", "--preset", "tiny",
                                 "--duration", "3s", "--device", "cpu", "--agent", url, "--json"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        energy_line = 'wattledger_workload_energy_joules_total{gpu="0",workload="chat"}'
        text = metrics_once(url, lambda text: energy_line in text)
        generated = re.search(r'wattledger_workload_tokens_total\{kind="generated",workload="chat"\} (\S+)', text)
        assert generated and float(generated.group(1)) == summary["tokens"]["generated"] > 0
        assert energy_line in text
    finally:
        agent.terminate()
        agent.communicate(timeout=10)


def test_workload_cli_bad_usage_is_one_line():
    result = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "workload", "chat", "--duration", "soon"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
