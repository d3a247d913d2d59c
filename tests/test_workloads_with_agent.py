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
from wattledger.workloads.common import RunOptions  # noqa: E402
from wattledger.workloads.telemetry import AccountingReporter  # noqa: E402

pytestmark = pytest.mark.integration
MOCK_DELAY_S = 0.5
RUN_S = 4.0


class UtilizationLog:
    """A sampler sink keeping (time ns, utilization.gpu) of GPU 0, as the mock reported it."""

    def __init__(self):
        self.samples: list[tuple[int, float]] = []

    def __call__(self, gpu_samples, host_sample):
        for sample in gpu_samples:
            if sample.index == 0 and sample.utilization_gpu_ratio is not None:
                self.samples.append((sample.monotonic_ns, sample.utilization_gpu_ratio))

    def mean_between(self, start_ns: int, end_ns: int) -> float:
        inside = [u for t, u in self.samples if start_ns < t <= end_ns]
        return sum(inside) / len(inside)


def run_workload(agent: Agent, log: UtilizationLog, module, config) -> dict:
    torch.set_num_threads(1)  # tiny ops gain nothing from threads; they only add scheduling noise
    reporter = AccountingReporter(agent.accounting, module.__name__.rsplit(".", 1)[1], [0], keep_spans=True)
    reporter.start()
    summary = module.run(config, RunOptions(preset="tiny", duration_s=RUN_S, device="cpu"), reporter, threading.Event())
    reporter.stop()
    time.sleep(MOCK_DELAY_S + 0.3)  # the mock simulates MOCK_DELAY_S behind the clock
    # The regime's steady state: from its first span to its last (model setup and imports left out).
    first = min(span.start_ns for span in reporter.spans)
    last = max(span.end_ns for span in reporter.spans)
    summary["mock_busy_fraction"] = log.mean_between(first, last)
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
            "chat": run_workload(agent, log, chat, chat.ChatConfig()),
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
        assert snapshot.workload_active_seconds[(name, 0)] == pytest.approx(RUN_S, abs=1.5)


def test_the_mock_gpu_busy_fraction_follows_each_regime(results):
    busy = {name: results[name]["mock_busy_fraction"] for name in ("training", "chat", "agentic")}
    print("mock busy fractions:", busy)
    assert busy["training"] > 0.8, busy
    assert busy["chat"] < 0.5, busy
    assert busy["training"] > busy["agentic"] > busy["chat"], busy


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
        time.sleep(1.0)
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        generated = re.search(r'wattledger_workload_tokens_total\{kind="generated",workload="chat"\} (\S+)', text)
        assert generated and float(generated.group(1)) == summary["tokens"]["generated"] > 0
        assert 'wattledger_workload_energy_joules_total{gpu="0",workload="chat"}' in text
    finally:
        agent.terminate()
        agent.communicate(timeout=10)


def test_workload_cli_bad_usage_is_one_line():
    result = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "workload", "chat", "--duration", "soon"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
