"""The measurement (workloads/bench/) uses the in-process Agent only through its public face.

The face is what ``agent/daemon.py`` offers in-process users: the Agent's methods and properties (its
class attributes that do not start with ``_``), its ``notes``, and the module's ``__all__``. Its parts
(the sampler, ledger, accounting, backends, server, registry, recorder, config) are instance attributes,
so they are not part of it. The check reads the source with ``ast``; the layer test
(``test_layers.py``) checks which modules may be imported at all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from wattledger.agent import daemon
from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent, MockLateness, WorkloadFigures
from wattledger.probes.mock import MockGpuBackend
from fakes import FakeClock

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "workloads" / "bench"
PUBLIC_FACE = frozenset(name for name in dir(Agent) if not name.startswith("_")) | {"notes"}
# The agent's parts: reaching one of these, on whatever object, is reaching into an agent.
PARTS = frozenset({"sampler", "ledger", "accounting"})
AGENT_MODULES = frozenset({"wattledger.agent.config", "wattledger.agent.version", "wattledger.agent.client",
                           "wattledger.agent.daemon"})
# An expression that is an agent: ``agent``, ``self.agent``, ``self._agent``, ``session.agent``...
IS_AGENT = re.compile(r"(^|\.)_?agent$")


def reach_ins(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that goes past the Agent's public face, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if IS_AGENT.search(owner) and node.attr not in PUBLIC_FACE:
                found.append(f"{where}: {owner}.{node.attr} is not on the Agent's public face")
            elif node.attr in PARTS:
                found.append(f"{where}: {owner}.{node.attr} reaches an agent's part")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            owner, name = ast.unparse(node.args[0]), node.args[1]
            if IS_AGENT.search(owner) and isinstance(name, ast.Constant) and name.value not in PUBLIC_FACE:
                found.append(f"{where}: getattr({owner}, {name.value!r}) is not on the Agent's public face")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += _import_reach_ins(where, node.module, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found += _import_reach_ins(where, alias.name, [])
    return found


def _import_reach_ins(where: str, module: str, names: list[str]) -> list[str]:
    if module == "wattledger.agent":
        modules = [f"wattledger.agent.{name}" for name in names]
    elif module.startswith("wattledger.agent."):
        modules = [module]
    else:
        return []
    found = [f"{where}: imports {m}, not the agent's face" for m in modules if m not in AGENT_MODULES]
    if module == "wattledger.agent.daemon":
        found += [f"{where}: imports {name} from agent.daemon, not in its __all__" for name in names
                  if name not in daemon.__all__]
    return found


def test_the_measurement_reaches_the_agent_only_through_its_public_face():
    found = [line for path in sorted(BENCH.glob("*.py"))
             for line in reach_ins(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("source", [
    "agent.sampler.add_sink(sink)",
    "self.agent.accounting.tokens()",
    "isinstance(session.agent.gpu, object)",
    "self._agent.ledger.snapshot()",
    "agent.config.interval_seconds",
    "getattr(agent, 'host')",
    "agent._clock_ns()",
    "snapshot = something.ledger.snapshot()",
    "from wattledger.agent.accounting import MAX_TOKENS_PER_CALL",
    "from wattledger.agent import http_api",
    "from wattledger.agent.daemon import open_host_backend",
])
def test_the_check_finds_each_kind_of_reach_in(source):
    assert len(reach_ins(source)) == 1, reach_ins(source)


def test_the_check_passes_the_public_face():
    source = ("from wattledger.agent.daemon import Agent, ServerStartError\n"
              "agent.add_sample_sink(sink); session.agent.workload_figures('w').tokens; self.agent.simulated\n"
              "agent.accounting_api().start('w', [0]); agent.notes\n")
    assert reach_ins(source) == []


def test_the_errors_and_limits_the_measurement_needs_are_on_the_face():
    from wattledger.agent.accounting import MAX_SPANS_PER_CALL, MAX_TOKENS_PER_CALL
    from wattledger.agent.client import MAX_SPANS_PER_REQUEST
    from wattledger.agent.http_api import ServerStartError
    from wattledger.probes.base import ProbeUnavailable

    assert daemon.ProbeUnavailable is ProbeUnavailable and daemon.ServerStartError is ServerStartError
    assert daemon.MAX_TOKENS_PER_CALL == MAX_TOKENS_PER_CALL
    assert MAX_SPANS_PER_REQUEST == MAX_SPANS_PER_CALL  # the client's copy (it stays standard library only)
    assert all(hasattr(daemon, name) for name in daemon.__all__)


def _mock_agent(clock: FakeClock, gpus: int = 2, delay_s: float = 1.0) -> Agent:
    mock = MockGpuBackend(gpus, clock_ns=clock.ns, delay_s=delay_s)
    return Agent(build_config({"backend": "mock", "mock_gpus": gpus}, {}), gpu=mock, clock_ns=clock.ns,
                 serve_http=False)


def test_the_face_reports_a_workloads_figures_the_simulators_truth_and_the_mocks_lateness():
    clock = FakeClock()
    agent = _mock_agent(clock)
    ticks = []
    agent.add_sample_sink(lambda gpu_samples, host_sample: ticks.append(len(gpu_samples)))
    spans = []
    agent.add_span_listener(spans.append)
    api = agent.accounting_api()
    api.start("w", [0, 1])
    api.add_tokens("w", "generated", 40)
    api.add_spans([api.make_span("w", "compute", clock.ns(), clock.ns() + 2_000_000_000, [0, 1], None)])
    for _ in range(40):
        clock.advance(0.1)
        agent.sampler.tick()  # the test drives the sampler itself, on the fake clock
    figures = agent.workload_figures("w")
    assert isinstance(figures, WorkloadFigures) and figures.tokens == {"generated": 40}
    assert agent.tokens() == {("w", "generated"): 40}
    assert set(figures.energy_joules_by_gpu) == {0, 1} and min(figures.energy_joules_by_gpu.values()) > 0
    assert set(figures.active_seconds_by_gpu) == {0, 1} and min(figures.active_seconds_by_gpu.values()) > 0
    truth = agent.simulator_truth()
    assert len(truth) == 2 and sum(figures.energy_joules_by_gpu.values()) <= sum(truth)
    assert agent.mock_lateness() == MockLateness(spans=0, seconds=0.0, lag_seconds=1.0)
    assert agent.power_watts() > 0 and ticks == [2] * 40 and len(spans) == 1
    assert agent.gpu_backend_name == "mock" and [d.index for d in agent.devices()] == [0, 1]
    assert agent.base_url is None and agent.metrics_url is None  # not serving
    assert all(st.name == "rapl" or st.name.startswith("rapl:") for st in agent.rapl_status())
    assert agent.workload_figures("never-seen") == WorkloadFigures({}, {}, {}, None)
    agent.stop()


def test_a_replayed_gpu_has_no_simulator_truth_and_no_mock_lateness():
    from wattledger.probes.replay import ReplayGpuBackend

    clock = FakeClock()
    replay = ReplayGpuBackend(ROOT / "tests" / "fixtures" / "mock_recording.jsonl", clock_ns=clock.ns)
    agent = Agent(build_config({"backend": "mock"}, {}), gpu=replay, clock_ns=clock.ns, serve_http=False)
    assert agent.gpu_backend_name == "replay"
    assert agent.simulator_truth() is None and agent.mock_lateness() is None
    agent.stop()
