"""Joules per token for engines that know nothing of wattledger, end to end: a real Prometheus scrapes the
agent (mock backend, attribution on, scripted processes standing for two pods) and two fake engines that
serve vLLM's and SGLang's real exposition text (tests/fixtures/engines/) with token counters that grow;
the scrape config attaches each engine's `namespace` and `pod` labels, as a ServiceMonitor would; the
shipped rules (deploy/prometheus/rules/*.yml) join the two. Checked: each pod's J/token
(`wattledger:pod_energy_per_token:joules_rate5m`) equals the energy the agent charged to that pod over
the tokens its engine served, within 2%; off Kubernetes, an engine the agent is told the URL of (--engine)
gets the same check on its owner (a systemd unit) through wattledger:owner_energy_per_token:joules_rate5m;
and every query of the fleet dashboard's engine row returns data (a pod holding a GPU with no process
included).

Everything listens on 127.0.0.1 and is stopped at the end. Missing Prometheus: fails in CI, skips
elsewhere (prometheus_server.require_tools).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import prometheus_server
from metrics_server import MetricsServer
from prometheus_server import REPO, Agent, PrometheusServer, http_get, parse_exposition, require_tools
from test_prometheus_integration import concrete, dashboard_variables

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
FLEET = REPO / "deploy" / "grafana" / "dashboards" / "fleet.json"
ENGINE_ROW_TITLE = "Engines: "  # the fleet dashboard's row that rules/engines.yml feeds
TOLERANCE = 0.02
# The rules' windows are 5m, longer than the run: rate() then reads each series from its first scrape,
# extrapolated by half a scrape interval before it and up to the evaluation after its last. So the agent's
# and the engines' counters are compared over the whole run, read right after Prometheus is ready (its
# first scrapes) and at the end. A short scrape interval keeps the phase between the agent's and the
# engines' scrapes small against the run (measured: within 1% over 20 s at 100 ms; the scrape timeout,
# 100 ms too, is ten times an agent scrape).
SPAN_S = 20.0
SCRAPE = "100ms"

# The two pods: one process each on its own GPU of the mock, and the engine that serves the tokens.
PODS = {
    "vllm-0": {"gpu": 0, "pid": 4242, "sm_share": 0.6, "fixture": "vllm.prom",
               "counter": "vllm:generation_tokens_total", "prompt": "vllm:prompt_tokens_total",
               "tokens_per_s": 420.0},
    "sglang-0": {"gpu": 1, "pid": 4343, "sm_share": 0.8, "fixture": "sglang.prom",
                 "counter": "sglang:generation_tokens_total", "prompt": "sglang:prompt_tokens_total",
                 "tokens_per_s": 250.0},
}
NAMESPACE = "llm"


class FakeEngine(MetricsServer):
    """An HTTP server whose /metrics is an engine's fixture with its token counters growing linearly in
    time from the fixture's values (prompt tokens 4 per generated token)."""

    def __init__(self, fixture: Path, counter: str, prompt: str, tokens_per_s: float):
        super().__init__(self.render)
        self.text = fixture.read_text()
        self.counter, self.prompt, self.tokens_per_s = counter, prompt, tokens_per_s
        self.started = time.monotonic()

    def render(self) -> str:
        served = self.tokens_per_s * (time.monotonic() - self.started)
        lines = []
        for line in self.text.splitlines():
            name = re.split(r"[{\s]", line, maxsplit=1)[0]
            if name in (self.counter, self.prompt) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                added = served if name == self.counter else 4 * served
                line = f"{head} {float(value) + added!r}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def generated(self) -> float:
        """The generated-token counter as the engine serves it now (summed over its series)."""
        metrics = parse_exposition(http_get(self.url).decode())
        family = self.counter.removesuffix("_total")
        return sum(v for (name, _), v in metrics.items() if name in (self.counter, family + "_total"))


# The agent on the mock with attribution on and the scripted processes of a JSON file (argv[1]), started
# through the daemon's own API (Agent(config, gpu=MockGpuBackend(processes=...))), which the command line
# has no flag for; it prints the line prometheus_server.Agent waits for, and stops on SIGTERM. The mock has
# no kubelet: argv[3] lists the pods its resolver reports as holding GPUs without a process (what
# ProcOwnerResolver.pods_without_processes gives on a node), so the idle-holders query has a pod to show.
SCRIPTED_AGENT = """
import json, signal, sys, threading
from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent
from wattledger.probes.mock import MockGpuBackend
from wattledger.probes.mock_processes import ScriptedProcesses
from wattledger.probes.pod_resources import PodGpuAllocation, parse_device_id

processes = ScriptedProcesses.from_spec(json.load(open(sys.argv[1])))
gpus = int(sys.argv[2])
idle = tuple(PodGpuAllocation(a["namespace"], a["pod"], a["container"], "nvidia.com/gpu",
                              tuple(parse_device_id(d) for d in a["devices"])) for a in json.loads(sys.argv[3]))
config = build_config({"backend": "mock", "mock_gpus": gpus, "address": "127.0.0.1", "port": 0,
                       "attribution": True, "engines": json.loads(sys.argv[4]), "engine_interval": "100ms"}, {})
agent = Agent(config, gpu=MockGpuBackend(gpus, processes=processes))
agent._owner_resolver.pods_without_processes = lambda: idle
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
agent.start()
print(f"scripted agent: metrics at {agent.metrics_url}", flush=True)
stop.wait()
agent.stop()
"""


class ScriptedAgent(Agent):
    """prometheus_server.Agent, started with SCRIPTED_AGENT on ``spec`` instead of the command line."""

    def __init__(self, spec: Path, gpus: int, idle_pods: list[dict], engine_urls: list[str]):
        super().__init__(gpus=gpus)
        self.args = [sys.executable, "-c", SCRIPTED_AGENT, str(spec), str(gpus), json.dumps(idle_pods),
                     json.dumps(engine_urls)]


# A notebook pod the "kubelet" allocated a GPU to, with no process on it: who holds an idle GPU.
IDLE_PODS = [{"namespace": "research", "pod": "notebook-3", "container": "lab", "devices": ["GPU-idle-0"]}]


# Off Kubernetes: a vLLM engine the agent is told the URL of (--engine). It listens in this test process,
# which the mock scripts as the process holding the third GPU, owned by a systemd unit: the agent finds the
# listener through /proc/net/tcp and charges the engine's tokens to that unit, whose energy it charges too.
HOST_ENGINE = {"gpu": len(PODS), "sm_share": 0.5, "labels": {"kind": "unit", "group": "vllm.service"},
               "tokens_per_s": 300.0}


def _process_spec() -> list[dict]:
    pods = [{"gpu": pod["gpu"], "pid": pod["pid"], "sm_share": pod["sm_share"], "memory_bytes": 20 << 30,
             "labels": {"namespace": NAMESPACE, "pod": name, "container": name.split("-")[0]}}
            for name, pod in PODS.items()]
    host = {"gpu": HOST_ENGINE["gpu"], "pid": os.getpid(), "sm_share": HOST_ENGINE["sm_share"],
            "memory_bytes": 30 << 30, "labels": HOST_ENGINE["labels"]}
    return pods + [host]


def _prometheus_config(agent: str, engines: dict[str, FakeEngine]) -> dict:
    """The repo's configuration (its rule files, the wattledger job) pointed at the agent, plus one job per
    engine whose target carries the pod's namespace and pod labels."""
    config = prometheus_server.render_config(agent, SCRAPE)
    for name, engine in engines.items():
        config["scrape_configs"].append({
            "job_name": PODS[name]["counter"].split(":")[0], "scrape_interval": SCRAPE, "scrape_timeout": SCRAPE,
            "static_configs": [{"targets": [engine.address], "labels": {"namespace": NAMESPACE, "pod": name}}]})
    return config


def _unit_energy(metrics: dict) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "wattledger_owner_energy_joules_total" and ("group", "vllm.service") in labels)


def _pod_energy(metrics: dict, pod: str) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "wattledger_owner_energy_joules_total" and ("pod", pod) in labels
               and ("namespace", NAMESPACE) in labels)


def _engine_row_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target in the fleet dashboard's engine row."""
    panels = json.loads(FLEET.read_text())["panels"]
    (row_y,) = [p["gridPos"]["y"] for p in panels if p["type"] == "row" and p["title"].startswith(ENGINE_ROW_TITLE)]
    rows_after = sorted(p["gridPos"]["y"] for p in panels if p["type"] == "row" and p["gridPos"]["y"] > row_y)
    end_y = rows_after[0] if rows_after else float("inf")
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" and row_y < p["gridPos"]["y"] < end_y
            for t in p.get("targets", [])]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return result


def test_pod_joules_per_token_from_engine_counters_and_attribution(tmp_path, monkeypatch) -> None:
    prometheus_bin = require_tools("prometheus")["prometheus"]
    spec = tmp_path / "processes.json"
    spec.write_text(json.dumps(_process_spec()))

    host_engine = FakeEngine(FIXTURES / "vllm.prom", PODS["vllm-0"]["counter"], PODS["vllm-0"]["prompt"],
                             HOST_ENGINE["tokens_per_s"])
    with (host_engine, ScriptedAgent(spec, gpus=len(PODS) + 1, idle_pods=IDLE_PODS,
                                     engine_urls=[f"http://{host_engine.address}/metrics"]) as agent,
          _engine("vllm-0") as vllm, _engine("sglang-0") as sglang):
        engines = {"vllm-0": vllm, "sglang-0": sglang}
        config = _prometheus_config(agent.address, engines)
        monkeypatch.setattr(prometheus_server, "render_config", lambda target, interval: config)
        with PrometheusServer(prometheus_bin, target=agent.address, interval=SCRAPE) as prom:
            # Prometheus is ready: its first scrapes are now, so the agent's and the engines' counters read
            # here start the same span as the series the rules read.
            a_wall = time.time()
            a_metrics, a_tokens = agent.metrics(), {pod: engines[pod].generated() for pod in PODS}
            a_host = host_engine.generated()
            _wait_for(lambda: all(prom.query(f'wattledger:pod_energy_per_token:joules_rate5m{{pod="{pod}"}}')
                                  for pod in PODS), 30, "J/token of both pods")
            _wait_for(lambda: prom.query('wattledger:owner_energy_per_token:joules_rate5m{group="vllm.service"}'),
                      30, "J/token of the engine off Kubernetes")
            bad = [r["name"] for g in prom.api("rules")["groups"] for r in g["rules"] if r.get("health") == "err"]
            assert not bad, f"rules failing to evaluate: {bad}"

            time.sleep(max(0.0, a_wall + SPAN_S - time.time()))
            b_wall = time.time()
            b_metrics, b_tokens = agent.metrics(), {pod: engines[pod].generated() for pod in PODS}
            b_host = host_engine.generated()
            time.sleep(0.5)  # let Prometheus ingest the scrapes and evaluate the rules up to b
            for pod in PODS:
                energy = _pod_energy(b_metrics, pod) - _pod_energy(a_metrics, pod)
                tokens = b_tokens[pod] - a_tokens[pod]
                assert energy > 0 and tokens > 0, (pod, energy, tokens)
                ledger = energy / tokens
                (sample,) = prom.query(f'wattledger:pod_energy_per_token:joules_rate5m{{namespace="{NAMESPACE}",'
                                       f'pod="{pod}"}}', at=b_wall)
                recorded = float(sample["value"][1])
                print(f"J/token {pod}: agent/engine {ledger:.6g}, recorded {recorded:.6g} "
                      f"({recorded / ledger - 1:+.2%})")
                assert recorded == pytest.approx(ledger, rel=TOLERANCE), (pod, recorded, ledger)
                assert sample["metric"]["model_name"]  # the engine's own model label came through

            # Off Kubernetes: the unit's energy over the tokens its engine served, as the agent counted them.
            energy, tokens = _unit_energy(b_metrics) - _unit_energy(a_metrics), b_host - a_host
            assert energy > 0 and tokens > 0, (energy, tokens)
            (sample,) = prom.query('wattledger:owner_energy_per_token:joules_rate5m{group="vllm.service"}', at=b_wall)
            recorded, ledger = float(sample["value"][1]), energy / tokens
            print(f"J/token vllm.service (--engine): agent/engine {ledger:.6g}, recorded {recorded:.6g} "
                  f"({recorded / ledger - 1:+.2%})")
            assert recorded == pytest.approx(ledger, rel=TOLERANCE), (recorded, ledger)
            assert sample["metric"]["owner_kind"] == "unit" and sample["metric"]["model_name"]

            variables = dashboard_variables()
            queries = _engine_row_queries()
            assert queries
            empty = [f"{title}: {expr}" for title, expr in queries if not prom.query(concrete(expr, variables))]
            assert not empty, "engine row queries with no data:\n" + "\n".join(empty)


def _engine(pod: str) -> FakeEngine:
    spec = PODS[pod]
    return FakeEngine(FIXTURES / spec["fixture"], spec["counter"], spec["prompt"], spec["tokens_per_s"])


def test_fixtures_are_the_engines_formats() -> None:
    """The fixtures parse as Prometheus text, and hold the series rules/engines.yml reads with the labels
    it joins on (the model), HELP and TYPE for each."""
    from prometheus_client.parser import text_string_to_metric_families

    expected = {"vllm.prom": ("vllm:generation_tokens", "vllm:prompt_tokens", {"model_name", "engine"}),
                "sglang.prom": ("sglang:generation_tokens", "sglang:prompt_tokens", {"model_name"}),
                "tgi.prom": ("tgi_request_generated_tokens", "tgi_request_input_length", set())}
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules" / "engines.yml").read_text())
    rule_text = json.dumps(rules)
    for fixture, (generated, prompt, labels) in expected.items():
        text = (FIXTURES / fixture).read_text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for family in (generated, prompt):
            assert f"# TYPE {family}" in text and f"# HELP {family}" in text, (fixture, family)
            samples = families[family].samples
            assert samples and all(labels <= set(s.labels) for s in samples), (fixture, family)
            read = family + ("_sum" if families[family].type == "histogram" else "_total")
            assert read in rule_text, f"rules/engines.yml does not read {read}"
