"""agent/engines.py: an engine's tokens charged to the owner of the process listening on its port, the
resolver wrap that makes the engine's processes that owner, the settings, and the agent on the mock end
to end (docs/attribution.md "Engines off Kubernetes").

The fake engines are real HTTP servers (http.server in a thread) in this test process, serving vLLM's own
exposition (tests/fixtures/engines/vllm.prom with the token counts replaced), so the real /proc finds this
process as their listener.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import FakeClock, run_ticks
from metrics_server import MetricsServer
from test_attribution_wiring import owner_rows, scrape_metrics
from test_listening_socket import FakeProc
from wattledger.agent.config import ConfigError, build_config
from wattledger.agent.daemon import Agent
from wattledger.agent.engines import EngineAwareResolver, EngineWatcher, ModelCounters, parse_engine_url
from wattledger.agent.http_api import make_app
from wattledger.agent.owners import OwnerLabels
from wattledger.probes.engine_counters import ENGINES, EngineReading, SeriesValue
from wattledger.probes.listening_socket import ListeningSocketFinder

VLLM_FIXTURE = (Path(__file__).parent / "fixtures" / "engines" / "vllm.prom").read_text()
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VLLM_UNIT = OwnerLabels("unit", group="vllm.service", command="python3")
UNIT_KEY = ("unit", "", "", "", "vllm.service")


def vllm_metrics(prompt: int, generated: int, created_s: float = 1.7646e9) -> str:
    """vllm.prom with its engine's prompt and generated totals (and their _created) replaced."""
    text = VLLM_FIXTURE
    for name, value in (("prompt_tokens", prompt), ("generation_tokens", generated)):
        text = re.sub(rf"^(vllm:{name}_total\{{[^}}]*\}}) \S+$", rf"\g<1> {float(value)!r}", text, flags=re.M)
        text = re.sub(rf"^(vllm:{name}_created\{{[^}}]*\}}) \S+$", rf"\g<1> {created_s!r}", text, flags=re.M)
    return text


class FakeEngine(MetricsServer):
    """A /metrics endpoint whose body the test sets (``body``); ``stop()`` and ``start()`` take it down and
    bring it back on the same port."""

    def __init__(self, body: str = ""):
        super().__init__(lambda: self.body)
        self.body = body


@pytest.fixture
def engine():
    fake = FakeEngine(vllm_metrics(1000, 100)).start()
    yield fake
    fake.stop()


class FakeResolver:
    def __init__(self, by_pid: dict[int, OwnerLabels]):
        self.by_pid = by_pid
        self.refreshed = 0

    def resolve(self, pid, gpu_uuid=None):
        return self.by_pid.get(pid)

    def refresh(self, now_ns):
        self.refreshed += 1

    def status(self):
        return None


def read_and_charge(watcher: EngineWatcher, resolver) -> None:
    watcher.poll()
    watcher.settle(resolver.resolve)


def tokens(watcher: EngineWatcher) -> dict[tuple, int]:
    return {(row.owner, row.engine, row.model, row.kind): row.tokens for row in watcher.tokens()}


def test_tokens_after_the_baseline_go_to_the_listeners_owner_through_restarts_and_outages(engine):
    resolver = FakeResolver({os.getpid(): VLLM_UNIT})
    watcher = EngineWatcher([engine.url])
    read_and_charge(watcher, resolver)  # the baseline: the engine's history is not ours
    assert watcher.tokens() == [] and [s.up for s in watcher.statuses()] == [True]
    engine.body = vllm_metrics(1500, 300)
    read_and_charge(watcher, resolver)
    assert tokens(watcher) == {(UNIT_KEY, "vllm", MODEL, "prompt"): 500, (UNIT_KEY, "vllm", MODEL, "generated"): 200}
    engine.body = vllm_metrics(40, 10, created_s=1.7647e9)  # the engine restarted: its counters start again
    read_and_charge(watcher, resolver)
    assert tokens(watcher)[(UNIT_KEY, "vllm", MODEL, "generated")] == 210
    engine.stop()  # down ...
    read_and_charge(watcher, resolver)
    status = watcher.statuses()[0]
    assert not status.up and status.reason.startswith("unreachable: cannot reach") and status.engine == "vllm"
    engine.body = vllm_metrics(90, 35, created_s=1.7647e9)
    engine.start()  # ... and up again, on the same port, having counted meanwhile
    read_and_charge(watcher, resolver)
    assert tokens(watcher) == {(UNIT_KEY, "vllm", MODEL, "prompt"): 590, (UNIT_KEY, "vllm", MODEL, "generated"): 235}
    assert watcher.statuses()[0].reason == "ok" and watcher.unplaced() == {}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_port_nobody_listens_on_leaves_the_tokens_unplaced_and_says_so():
    bodies = iter([vllm_metrics(0, 0), vllm_metrics(70, 7)])
    port = free_port()
    watcher = EngineWatcher([f"http://127.0.0.1:{port}/metrics"], fetch=lambda url: next(bodies))
    resolver = FakeResolver({os.getpid(): VLLM_UNIT})
    read_and_charge(watcher, resolver)
    read_and_charge(watcher, resolver)
    status = watcher.statuses()[0]
    assert (status.up, status.reason) == (False, f"no process listens on port {port} (in the agent's network "
                                                 "namespace)")
    assert watcher.tokens() == []
    assert watcher.unplaced() == {(f"http://127.0.0.1:{port}/metrics", "vllm", "prompt"): 70,
                                  (f"http://127.0.0.1:{port}/metrics", "vllm", "generated"): 7}


def test_a_listener_whose_owner_is_unknown_is_said_and_not_charged(engine):
    watcher = EngineWatcher([engine.url])
    read_and_charge(watcher, FakeResolver({}))
    engine.body = vllm_metrics(1010, 101)
    read_and_charge(watcher, FakeResolver({}))
    status = watcher.statuses()[0]
    assert not status.up and f"owner of pid {os.getpid()}" in status.reason and watcher.tokens() == []


def test_something_that_is_not_an_engine_says_so(engine):
    engine.body = "<html>hello</html>\n"
    watcher = EngineWatcher([engine.url])
    watcher.poll()
    assert watcher.statuses()[0].reason.startswith("not an engine: ")


def test_a_failed_first_read_counts_only_what_the_engine_counted_after_the_agent_started():
    started_s = 1.8e9
    bodies = iter([OSError("refused"), vllm_metrics(300, 30, created_s=started_s + 5)])

    def fetch(url):
        body = next(bodies)
        if isinstance(body, Exception):
            raise body
        return body

    watcher = EngineWatcher(["http://localhost:9/metrics"], fetch=fetch, clock_s=lambda: started_s,
                            finder=FixedFinder(os.getpid()))
    resolver = FakeResolver({os.getpid(): VLLM_UNIT})
    read_and_charge(watcher, resolver)
    assert watcher.statuses()[0].reason == "unreachable: cannot read http://localhost:9/metrics: refused"
    read_and_charge(watcher, resolver)  # the engine (re)started after the agent did: all of it is ours
    assert tokens(watcher) == {(UNIT_KEY, "vllm", MODEL, "prompt"): 300, (UNIT_KEY, "vllm", MODEL, "generated"): 30}


class FixedFinder:
    """A ListeningSocketFinder that always names one pid, on a fake or real tree."""

    def __init__(self, pid: int, procfs_root: str = "/proc"):
        self.pid = pid
        self.tree = ListeningSocketFinder(procfs_root).tree

    def find(self, port, host=""):
        from wattledger.probes.listening_socket import Listener

        return Listener(self.pid, 1, 1)


def reading(at_s: float, counts: dict[str, tuple[int, int]]) -> EngineReading:
    """A vLLM reading: model -> (prompt, generated)."""
    series = {"prompt": {}, "generated": {}}
    for model, (prompt, generated) in counts.items():
        labels = (("engine", "0"), ("model_name", model))
        series["prompt"][("vllm:prompt_tokens_total", labels)] = SeriesValue(prompt, None)
        series["generated"][("vllm:generation_tokens_total", labels)] = SeriesValue(generated, None)
    return EngineReading(ENGINES["vllm"], at_s, series)


def test_models_are_counted_apart_and_a_model_loaded_later_counts_whole():
    counters = ModelCounters()
    counters.set_baseline(reading(10, {"llama": (100, 10)}))
    assert counters.update(reading(15, {"llama": (150, 20)})) == {"llama": {"prompt": 50, "generated": 10}}
    increases = counters.update(reading(20, {"llama": (150, 25), "qwen": (40, 4)}))
    assert increases == {"llama": {"prompt": 0, "generated": 5}, "qwen": {"prompt": 40, "generated": 4}}
    counters.note_failed_read()
    assert counters.update(reading(30, {"qwen": (45, 9)}))["qwen"] == {"prompt": 5, "generated": 5}


def test_the_engines_processes_resolve_to_the_listeners_owner(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(1, "systemd", ppid=0, start_ticks=1)
    proc.add(500, "python3", start_ticks=5000, sockets=(41001,))  # vLLM's API server, on 127.0.0.1:8000
    proc.add(501, "VLLM::EngineCor", ppid=500, start_ticks=5100)  # its engine core holds the GPU
    proc.add(502, "pt_main_thread", ppid=501, start_ticks=5200)
    proc.add(600, "sglang", start_ticks=6000)
    inner = FakeResolver({500: VLLM_UNIT, 501: OwnerLabels("command", group="VLLM::EngineCor"),
                          502: OwnerLabels("command", group="pt_main_thread"),
                          600: OwnerLabels("command", group="sglang")})
    watcher = EngineWatcher(["http://127.0.0.1:8000/metrics"], fetch=lambda url: vllm_metrics(5, 5),
                            finder=ListeningSocketFinder(str(proc.root), byteorder="little"))
    resolver = EngineAwareResolver(inner, watcher)
    assert resolver.resolve(501).group == "VLLM::EngineCor"  # before the engine was read: nothing to join
    watcher.poll()
    assert [resolver.resolve(pid, gpu_uuid="GPU-0").group for pid in (500, 501, 502, 600)] == [
        "vllm.service", "vllm.service", "vllm.service", "sglang"]
    assert resolver.resolve(4242) is None and resolver.status() is None  # the rest is the inner resolver's
    resolver.refresh(123)
    assert inner.refreshed == 1


def test_a_slow_engine_never_holds_up_the_sampler():
    entered, release = threading.Event(), threading.Event()

    def slow_fetch(url):
        entered.set()
        release.wait(10)
        return vllm_metrics(1, 1)

    watcher = EngineWatcher(["http://127.0.0.1:9/metrics"], fetch=slow_fetch, interval_s=0.01,
                            finder=FixedFinder(os.getpid()))
    resolver = EngineAwareResolver(FakeResolver({os.getpid(): VLLM_UNIT}), watcher)
    watcher.start()
    try:
        assert entered.wait(5)
        resolver.refresh(1)  # the sampler's tick while the read is in flight: returns, the read still hangs
        assert resolver.resolve(os.getpid()) == VLLM_UNIT and not release.is_set()
    finally:
        release.set()
        watcher.stop()


def test_the_thread_reads_the_engine_until_stopped(engine):
    watcher = EngineWatcher([engine.url], interval_s=0.02)
    resolver = FakeResolver({os.getpid(): VLLM_UNIT})
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while watcher.statuses()[0].reason != "ok" and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.body = vllm_metrics(1000, 164)
        while not watcher.tokens() and time.monotonic() < deadline:
            watcher.settle(resolver.resolve)
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert tokens(watcher) == {(UNIT_KEY, "vllm", MODEL, "generated"): 64}


@pytest.mark.parametrize("url, message", [
    ("ftp://127.0.0.1:21/metrics", "expected an http:// or https:// URL"),
    ("http://:8000/metrics", "expected an http:// or https:// URL"),
    ("http://127.0.0.1:99999/metrics", "is not a URL"),
    ("127.0.0.1:8000", "expected an http:// or https:// URL"),
])
def test_bad_engine_urls_are_one_line_errors(url, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config({"attribution": True, "engines": [url]}, {})
    assert "\n" not in str(err.value)


def test_engine_settings_from_flags_environment_and_file(tmp_path):
    assert parse_engine_url("https://vllm.local/metrics").port == 443
    assert parse_engine_url("http://[::1]:8000/metrics").host == "::1"
    with pytest.raises(ConfigError, match="needs attribution"):
        build_config({"engines": ["http://127.0.0.1:8000/metrics"]}, {})
    with pytest.raises(ConfigError, match="given twice"):
        build_config({"attribution": True, "engines": ["http://a:1/metrics", "http://a:1/metrics"]}, {})
    config = build_config({}, {"WATTLEDGER_ATTRIBUTION": "1",
                               "WATTLEDGER_ENGINES": "http://127.0.0.1:8000/metrics,http://127.0.0.1:30000/metrics"})
    assert config.engines == ["http://127.0.0.1:8000/metrics", "http://127.0.0.1:30000/metrics"]
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nattribution = true\nengines = ["http://127.0.0.1:8000/metrics"]\n')
    assert build_config({}, {}, str(path)).engines == ["http://127.0.0.1:8000/metrics"]
    path.write_text('[agent]\nattribution = true\nengines = "http://127.0.0.1:8000/metrics"\n')  # one: a string
    assert build_config({}, {}, str(path)).engines == ["http://127.0.0.1:8000/metrics"]
    path.write_text("[agent]\nattribution = true\nengines = [8000]\n")
    with pytest.raises(ConfigError, match="engines: expected a list of strings"):
        build_config({}, {}, str(path))


def test_the_command_line_refuses_an_engine_without_attribution_with_exit_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTLEDGER_")}
    done = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "agent", "--backend", "mock",
                           "--engine", "http://127.0.0.1:8000/metrics"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and "needs attribution" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_on_the_mock_the_engines_tokens_and_energy_share_one_owner(engine, tmp_path):
    """A fake engine listened on by this process, which the mock scripts as a GPU process of vllm.service,
    and a child of this process scripted as its engine core (comm-named owner "VLLM::EngineCor") holding
    most of the GPU: the agent reads the engine's tokens and charges them to vllm.service, and the wrap
    gives the child's energy to vllm.service too, so one owner carries both."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spec = [{"gpu": 0, "pid": os.getpid(), "sm_share": 0.05, "memory_bytes": 2**30,
             "labels": {"group": "vllm.service"}},
            {"gpu": 0, "pid": child.pid, "sm_share": 0.8, "memory_bytes": 40 * 2**30,
             "labels": {"group": "VLLM::EngineCor"}}]
    path = tmp_path / "processes.json"
    path.write_text(json.dumps(spec))
    clock = FakeClock()
    config = build_config({"backend": "mock", "mock_delay": "0", "attribution": True, "mock_processes": str(path),
                           "engines": [engine.url]}, {})
    agent = Agent(config, host=None, clock_ns=clock.ns, serve_http=False)
    try:
        app = make_app(agent.accounting, agent.registry, lambda: True)
        agent.engine_watcher.poll()  # the baseline (the agent's thread is not started: the test reads)
        run_ticks(agent.sampler, clock, 1.0)
        served = {"prompt": 0, "generated": 0}
        for step in range(1, 4):
            served = {"prompt": 250 * step, "generated": 60 * step}
            engine.body = vllm_metrics(1000 + served["prompt"], 100 + served["generated"])
            agent.engine_watcher.poll()
            run_ticks(agent.sampler, clock, 1.0)
        metrics = scrape_metrics(app)
    finally:
        agent.stop()
        child.kill()
        child.wait()
    rows = {(s["owner_kind"], s["namespace"], s["pod"], s["container"], s["group"], s["engine"], s["model"],
             s["kind"]): v for s, v in metrics["wattledger_owner_tokens_total"]}
    assert rows == {(*UNIT_KEY, "vllm", MODEL, "prompt"): 750, (*UNIT_KEY, "vllm", MODEL, "generated"): 180}
    energy = owner_rows(metrics, "wattledger_owner_energy_joules_total")
    gpu_joules = sum(v for _, v in metrics["wattledger_gpu_energy_joules_total"])
    assert energy[UNIT_KEY] > 0.99 * gpu_joules > 0  # the engine core's share included: one owner
    assert ("command", "", "", "", "VLLM::EngineCor") not in energy
    assert metrics["wattledger_engine_up"] == [({"url": engine.url, "engine": "vllm"}, 1.0)]
    assert metrics["wattledger_engine_status"] == [({"url": engine.url, "engine": "vllm", "reason": "ok"}, 1.0)]
