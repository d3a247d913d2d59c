"""The whole /metrics exposition from the mock backend, against a checked-in file.

The metric names are the contract dashboards and recording rules depend on: any rename shows here as
a diff and has to be made deliberately. The file is prometheus_client's encoding of the agent's families;
/metrics writes them with the direct renderer, which must give these same bytes
(tests/test_direct_renderer.py). Regenerate with ``WATTLEDGER_UPDATE_GOLDEN=1 pytest
tests/test_golden_exposition.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from fakes import FakeClock, run_ticks
from host_tree import FIXTURE_PROC, FIXTURE_SYS
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.exporters.prometheus import LedgerCollector, make_registry
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.host import ProcfsHostBackend
from wattledger.probes.mock import MockGpuBackend

GOLDEN = Path(__file__).parent / "golden" / "metrics_mock.prom"
VERSION = "0.0.0-golden"


def render_mock_exposition() -> str:
    return generate_latest(build_mock_registry()).decode()


def build_mock_registry() -> CollectorRegistry:
    """The agent's registry over 2 mock GPUs after 10 s of a scripted load (a fresh one each call)."""
    return make_registry(build_mock_ledger(), VERSION)


def build_mock_ledger() -> Ledger:
    """The ledger behind ``build_mock_registry`` (a fresh one each call)."""
    clock = FakeClock()
    timeline = (
        ScriptedTimeline(clock.ns())
        .bursts(0, 10, 1.0, 0.3, Activity(gpu=1.0, sm=0.9, tensor=0.8, dram=0.6), gpus=[0])
        .add(2, 8, Activity(gpu=1.0, sm=1.0, tensor=1.0, dram=1.0), gpus=[1])
        .allocate(0, 20 * 2**30)
    )
    gpu = MockGpuBackend(2, activity=timeline, clock_ns=clock.ns, power_limit_watts=650)
    host = ProcfsHostBackend(str(FIXTURE_PROC), str(FIXTURE_SYS), clock_ns=clock.ns, clk_tck=100)
    accounting = Accounting([0, 1], clock_ns=clock.ns)
    accounting.start("training", [0], pid=4242)
    host.watch_process(4242)
    accounting.start("chat", [1])
    ledger = Ledger(accounting, clock_ns=clock.ns)
    sampler = Sampler(ledger, gpu, host, 0.1, clock=clock.seconds)
    run_ticks(sampler, clock, 10.0)
    accounting.add_tokens("training", "trained", 65536)
    accounting.add_tokens("chat", "prompt", 1020)
    accounting.add_tokens("chat", "generated", 129)
    return ledger


def test_exposition_matches_the_golden_file():
    text = render_mock_exposition()
    if os.environ.get("WATTLEDGER_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "the exposition changed: see the module docstring"


class _NoRecords:
    """Stands for a snapshot's ledger records (``LedgerSnapshot.gpus``): any use of it fails."""

    def __getattr__(self, name):
        raise AssertionError(f"the exporter read the ledger's own GPU records ({name})")

    def __iter__(self):
        raise AssertionError("the exporter read the ledger's own GPU records")


class _FixedLedger:
    def __init__(self, snapshot):
        self._snapshot = snapshot

    def snapshot(self):
        return self._snapshot


def test_the_exporter_reads_each_gpus_exported_figures_not_the_ledgers_records():
    blind = dataclasses.replace(build_mock_ledger().snapshot(), gpus=_NoRecords())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(_FixedLedger(blind), VERSION))
    assert generate_latest(registry).decode() == GOLDEN.read_text()


def test_contract_metric_names_are_all_present():
    text = render_mock_exposition()
    contract = [
        "wattledger_gpu_info", "wattledger_gpu_up", "wattledger_gpu_energy_joules_total",
        "wattledger_gpu_power_watts", "wattledger_gpu_power_limit_watts", "wattledger_gpu_busy_seconds_total",
        "wattledger_gpu_utilization_ratio_bucket", "wattledger_gpu_memory_used_bytes",
        "wattledger_gpu_memory_total_bytes", "wattledger_gpu_temperature_celsius", "wattledger_gpu_clock_hertz",
        "wattledger_gpu_throttle_seconds_total", "wattledger_gpu_pcie_transmit_bytes_total",
        "wattledger_gpu_pcie_receive_bytes_total", "wattledger_host_cpu_busy_seconds_total",
        "wattledger_host_memory_used_bytes", "wattledger_host_memory_total_bytes",
        "wattledger_host_memory_locked_bytes", "wattledger_host_energy_joules_total",
        "wattledger_workload_tokens_total", "wattledger_workload_energy_joules_total",
        "wattledger_workload_active_seconds_total", "wattledger_probe_success", "wattledger_probe_duration_seconds",
        "wattledger_sample_age_seconds", "wattledger_sampler_overruns_total", "wattledger_build_info",
    ]
    present = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert [name for name in contract if name not in present] == []
    assert 'simulated="true"' in text
