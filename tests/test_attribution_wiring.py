"""Owner attribution wired through the ledger and /metrics (issue 13; docs/attribution.md).

The samples are built by hand (each GPU's processes with constant SM shares, utilization their sum, power
linear in it, the energy counter integrated exactly, the process list refreshed once a second as NVML's
is) and owners come from a fake resolver, so what is checked is the wiring: the ledger feeding each GPU
interval to the accumulator, and the series /metrics serves (parsed with prometheus_client's parser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fakes import FakeClock, run_ticks
from test_direct_renderer import call_wsgi
from test_golden_exposition import GOLDEN, build_mock_ledger
from wattledger.agent.accounting import Accounting
from wattledger.agent.config import AgentConfig
from wattledger.agent.daemon import Agent
from wattledger.agent.http_api import make_app
from wattledger.agent.ledger import ATTRIBUTION_OK, Ledger, OwnerAttribution
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.base import GpuInfo, GpuProcess, GpuSample

NS_PER_S = 1_000_000_000
GIB = 2**30
TICK_S = 0.1
IDLE_WATTS, DYNAMIC_WATTS = 70.0, 500.0  # power = idle + dynamic x utilization (any linear law will do)


@dataclass(frozen=True)
class Labels:
    """What a resolver answers, shaped as agent.owners.OwnerLabels."""

    kind: str
    namespace: str = ""
    pod: str = ""
    container: str = ""
    group: str = ""
    command: str = ""

    def series(self) -> tuple[str, str, str, str, str]:
        return (self.kind, self.namespace, self.pod, self.container, self.group)


class FakeResolver:
    def __init__(self, by_pid: dict[int, Labels]):
        self.by_pid = dict(by_pid)
        self.refreshes = 0
        self.status_line: str | None = None
        self.failure: Exception | None = None
        self.idle: tuple = ()  # what pods_without_processes answers (PodGpuAllocation records)
        self.idle_failure: Exception | None = None

    def resolve(self, pid: int, gpu_uuid: str | None = None) -> Labels | None:
        if self.failure is not None:
            raise self.failure
        return self.by_pid.get(pid)

    def refresh(self, now_ns: int) -> None:
        self.refreshes += 1

    def status(self) -> str | None:
        return self.status_line

    def pods_without_processes(self) -> tuple:
        if self.idle_failure is not None:
            raise self.idle_failure
        return self.idle


@dataclass(frozen=True)
class Proc:
    gpu: int
    pid: int
    share: float
    memory_bytes: int
    labels: Labels | None  # None: a pid no resolver can place
    end_s: float | None = None  # it exits then (its process list entry goes at the next refresh)


VLLM_0 = Labels("pod", "llm", "vllm-0", "vllm", command="python3")
VLLM_1 = Labels("pod", "llm", "vllm-1", "vllm", command="python3")
JOB = Labels("pod", "batch", "job-7", "train", command="torchrun")
TRAINER = Labels("unit", group="trainer.service", command="python")
NOTEBOOK = Labels("command", group="jupyter", command="jupyter")

# Three owners sharing GPU 0 (and a process nobody can place), two on GPU 1.
SHARED = (
    Proc(0, 101, 0.45, 30 * GIB, VLLM_0), Proc(0, 102, 0.30, 20 * GIB, VLLM_1), Proc(0, 103, 0.10, 10 * GIB, JOB),
    Proc(0, 104, 0.05, 1 * GIB, None),
    Proc(1, 201, 0.60, 40 * GIB, TRAINER), Proc(1, 202, 0.20, 8 * GIB, NOTEBOOK),
)


class HandBuiltGpus:
    """GPUs whose samples follow ``procs``; ``losses`` maps a GPU to the [lo, hi) seconds it is lost."""

    def __init__(self, procs, losses=None, gpus: int = 2, start_ns: int = 1_000 * NS_PER_S):
        self.procs, self.losses, self.start_ns = procs, losses or {}, start_ns
        self.infos = [GpuInfo(i, f"GPU-{i:04d}", "hand-built", "0", 80 * GIB, 700.0, simulated=True)
                      for i in range(gpus)]
        self.energy = [0.0] * gpus
        self.lists: dict[int, tuple] = {}
        self.last_ns: int | None = None

    def alive(self, gpu: int, t_s: float) -> list[Proc]:
        return [p for p in self.procs if p.gpu == gpu and (p.end_s is None or t_s < p.end_s)]

    def utilization(self, gpu: int, t_s: float) -> float:
        return min(1.0, sum(p.share for p in self.alive(gpu, t_s)))

    def samples(self, now_ns: int) -> list[GpuSample]:
        t_s = (now_ns - self.start_ns) / NS_PER_S
        if self.last_ns is not None:  # energy counted since the last sample, lost or not (the counter runs on)
            dt = (now_ns - self.last_ns) / NS_PER_S
            for gpu in range(len(self.infos)):
                self.energy[gpu] += (IDLE_WATTS + DYNAMIC_WATTS * self.utilization(gpu, t_s - dt)) * dt
        self.last_ns = now_ns
        out = []
        for info in self.infos:
            lo, hi = self.losses.get(info.index, (math.inf, math.inf))
            if lo <= t_s < hi:
                out.append(GpuSample(info.index, info.uuid, now_ns, up=False))
                continue
            if round(t_s / TICK_S) % 10 == 0 or info.index not in self.lists:  # a new list once a second
                self.lists[info.index] = tuple(GpuProcess(p.pid, p.memory_bytes, sm_utilization_ratio=p.share)
                                               for p in self.alive(info.index, t_s))
            out.append(GpuSample(info.index, info.uuid, now_ns, utilization_gpu_ratio=self.utilization(info.index, t_s),
                                 energy_joules=self.energy[info.index], processes=self.lists[info.index]))
        return out


class Rig:
    """A ledger with attribution fed by ``HandBuiltGpus``, scraped through the agent's /metrics."""

    def __init__(self, procs, losses=None, max_owners: int = 50, retention_s: float = 600.0, accounting=None,
                 gpus: int = 2):
        self.clock = FakeClock()
        self.gpus = HandBuiltGpus(procs, losses, gpus, self.clock.now_ns)
        self.resolver = FakeResolver({p.pid: p.labels for p in procs if p.labels is not None})
        self.attribution = OwnerAttribution(self.resolver, max_owners, round(retention_s * NS_PER_S))
        self.accounting = accounting or Accounting(list(range(gpus)), clock_ns=self.clock.ns)
        self.ledger = Ledger(self.accounting, clock_ns=self.clock.ns, attribution=self.attribution)
        self.ledger.set_devices("hand-built", True, self.gpus.infos)
        self.app = make_app(self.accounting, make_registry(self.ledger, "0.0.0-test"), lambda: True)
        self.ledger.record_gpus(self.gpus.samples(self.clock.now_ns))  # t = 0: the energy baseline

    @property
    def t_s(self) -> float:
        return (self.clock.now_ns - self.gpus.start_ns) / NS_PER_S

    def run_to(self, t_s: float) -> None:
        while self.t_s < t_s - 1e-9:
            self.clock.advance(TICK_S)
            self.ledger.record_gpus(self.gpus.samples(self.clock.now_ns))

    def scrape(self) -> dict[str, list]:
        return scrape_metrics(self.app)


def scrape_metrics(app) -> dict[str, list]:
    """/metrics as prometheus_client parses it: sample name -> [(labels, value)]."""
    status, _, body = call_wsgi(app, "/metrics")
    assert status.startswith("200")
    out: dict[str, list] = {}
    for family in parse_text(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def owner_rows(metrics: dict, name: str) -> dict[tuple, float]:
    return {(s["owner_kind"], s["namespace"], s["pod"], s["container"], s["group"]): v
            for s, v in metrics.get(name, [])}


def total(metrics: dict, name: str) -> float:
    return math.fsum(v for _, v in metrics.get(name, []))


def assert_identity(metrics: dict, dropped_joules: float = 0.0) -> None:
    """Owners + unattributed == the GPUs' energy; ``dropped_joules``: what owners that left the exposition
    were last shown with (their series stopped there, docs/attribution.md "Retention")."""
    gpu_energy = total(metrics, "wattledger_gpu_energy_joules_total")
    charged = total(metrics, "wattledger_owner_energy_joules_total") + dropped_joules
    unattributed = total(metrics, "wattledger_gpu_unattributed_energy_joules_total")
    assert charged + unattributed == pytest.approx(gpu_energy, rel=1e-9, abs=1e-12)


def test_owners_plus_unattributed_is_the_gpus_energy_on_every_scrape_and_shares_are_followed():
    rig = Rig(SHARED, losses={1: (3.0, 5.0)})
    for step in range(1, 21):
        rig.run_to(step * 0.5)
        lost = 3.0 <= rig.t_s < 5.0
        # Charged up to each GPU's newest sample: GPU 1's gap only once it is back.
        last_up_s = {0: rig.t_s, 1: 3.0 - TICK_S if lost else rig.t_s}
        metrics = rig.scrape()
        assert_identity(metrics)
        busy = owner_rows(metrics, "wattledger_owner_busy_seconds_total")
        energy = owner_rows(metrics, "wattledger_owner_energy_joules_total")
        for gpu in (0, 1):
            placed = [p for p in SHARED if p.gpu == gpu and p.labels is not None]
            utilization = rig.gpus.utilization(gpu, 0.0)
            elapsed_s = last_up_s[gpu]
            gpu_joules = (IDLE_WATTS + DYNAMIC_WATTS * utilization) * elapsed_s
            held = sum(p.memory_bytes for p in placed)
            for p in placed:
                # Busy time by its share; energy: the active part by share, the idle part by memory held.
                assert busy[p.labels.series()] == pytest.approx(p.share * elapsed_s, rel=0.02)
                expected_joules = gpu_joules * (p.share + (1.0 - utilization) * p.memory_bytes / held)
                assert energy[p.labels.series()] == pytest.approx(expected_joules, rel=0.02)
        # Nothing guessed for pid 104: its share of GPU 0's busy time is nobody's.
        assert set(busy) == {p.labels.series() for p in SHARED if p.labels} | {("other", "", "", "", "")}
        gpus = owner_rows(metrics, "wattledger_owner_gpus")
        memory = owner_rows(metrics, "wattledger_owner_gpu_memory_bytes")
        assert gpus[TRAINER.series()] == (0 if lost else 1) and gpus[VLLM_0.series()] == 1
        assert memory[TRAINER.series()] == (0 if lost else 40 * GIB) and memory[VLLM_1.series()] == 20 * GIB
    info = {tuple(s[k] for k in ("owner_kind", "namespace", "pod", "container", "group", "command"))
            for s, _ in metrics["wattledger_owner_info"]}
    assert ("pod", "llm", "vllm-0", "vllm", "", "python3") in info and ("other", "", "", "", "", "") in info
    assert metrics["wattledger_attribution_status"] == [({"reason": ATTRIBUTION_OK}, 1.0)]
    assert rig.resolver.refreshes == 101  # every tick


def test_owners_beyond_the_cap_go_to_other():
    rig = Rig(SHARED, max_owners=2)
    for step in range(1, 11):
        rig.run_to(step)
        metrics = rig.scrape()
        energy = owner_rows(metrics, "wattledger_owner_energy_joules_total")
        own = [labels for labels in energy if labels[0] != "other"]
        assert len(own) <= 2 and len(energy) == len(own) + 1
        assert set(own) <= {p.labels.series() for p in SHARED if p.labels}
    assert energy[("other", "", "", "", "")] > 0
    gpus = owner_rows(metrics, "wattledger_owner_gpus")
    assert gpus[("other", "", "", "", "")] == 2  # the folded owners hold both GPUs


def test_an_owner_that_left_is_dropped_after_the_retention():
    procs = SHARED[:2] + (Proc(0, 103, 0.10, 10 * GIB, JOB, end_s=3.5),)
    rig = Rig(procs, retention_s=2.0, gpus=1)
    job_joules = None
    for step in range(1, 15):
        rig.run_to(step * 0.5)
        metrics = rig.scrape()
        energy = owner_rows(metrics, "wattledger_owner_energy_joules_total")
        # Listed until the refresh at 4 s (the sample at 3.9 s is its last interval); the first read past
        # 3.9 + 2 s still shows it, and drops it after.
        assert (JOB.series() in energy) == (rig.t_s <= 6.0), rig.t_s
        if JOB.series() in energy:
            job_joules = energy[JOB.series()]
            assert_identity(metrics)
        else:  # its series stopped at what the last scrape showed, and nothing else moved
            assert_identity(metrics, dropped_joules=job_joules)
    assert VLLM_0.series() in energy and job_joules > 0


def test_registered_workloads_are_owners_and_their_processes_are_not_charged_twice():
    clock = FakeClock()
    accounting = Accounting([0], clock_ns=clock.ns)
    procs = (Proc(0, 301, 0.4, 10 * GIB, Labels("command", group="python3")), Proc(0, 302, 0.4, 10 * GIB, VLLM_0))
    rig = Rig(procs, accounting=accounting, gpus=1)
    rig.clock = clock  # (the rig's clock stands aside: the accounting's is the one)
    clock.now_ns = rig.gpus.start_ns
    accounting.start("chat", [0], pid=301, at_ns=clock.now_ns)
    rig.run_to(5.0)
    metrics = rig.scrape()
    busy = owner_rows(metrics, "wattledger_owner_busy_seconds_total")
    assert set(busy) == {("workload", "", "", "", "chat"), VLLM_0.series(), ("other", "", "", "", "")}
    assert busy[("workload", "", "", "", "chat")] == pytest.approx(0.4 * 5.0, rel=1e-6)
    assert_identity(metrics)


def test_a_sole_registered_workload_gets_what_the_workload_series_give_it():
    rig = Rig((), gpus=1)
    rig.accounting.start("training", [0], at_ns=rig.clock.now_ns + NS_PER_S)
    rig.run_to(4.0)
    metrics = rig.scrape()
    (workload_joules,) = [v for _, v in metrics["wattledger_workload_energy_joules_total"]]
    owner = owner_rows(metrics, "wattledger_owner_energy_joules_total")[("workload", "", "", "", "training")]
    assert owner == pytest.approx(workload_joules, rel=1e-9)
    assert_identity(metrics)


def test_a_resolver_that_cannot_place_owners_says_why_and_one_that_fails_stops_nothing():
    rig = Rig(SHARED, gpus=2)
    rig.resolver.status_line = "no host PIDs: the agent runs in its own PID namespace (hostPID: true)"
    rig.run_to(1.0)
    assert rig.scrape()["wattledger_attribution_status"] == [({"reason": rig.resolver.status_line}, 0.0)]
    rig.resolver.status_line = None
    rig.resolver.failure = OSError("boom")
    rig.run_to(3.0)  # new process lists at 2 s and 3 s: resolved again, and every resolve raises
    metrics = rig.scrape()
    assert metrics["wattledger_attribution_status"] == [({"reason": "owner resolver failed: OSError: boom"}, 0.0)]
    assert_identity(metrics)
    rig.resolver.failure = None
    rig.run_to(4.0)  # the next lists resolve again
    assert rig.scrape()["wattledger_attribution_status"] == [({"reason": ATTRIBUTION_OK}, 1.0)]


def test_pods_holding_gpus_without_processes_are_exported_and_follow_the_kubelet():
    from wattledger.probes.pod_resources import PodGpuAllocation, parse_device_id

    def allocation(namespace, pod, container, resource, *ids):
        return PodGpuAllocation(namespace, pod, container, resource, tuple(parse_device_id(i) for i in ids))

    rig = Rig(SHARED, gpus=2)
    rig.run_to(0.5)
    assert "wattledger_pod_gpus_without_processes" not in rig.scrape()  # off Kubernetes: no rows
    rig.resolver.idle = (allocation("research", "notebook-3", "lab", "nvidia.com/gpu", "GPU-aa", "GPU-bb"),
                         allocation("llm", "vllm-2", "vllm", "nvidia.com/gpu.shared", "GPU-cc::1"))
    rig.run_to(1.0)
    rows = {(s["namespace"], s["pod"], s["container"], s["resource"]): v
            for s, v in rig.scrape()["wattledger_pod_gpus_without_processes"]}
    assert rows == {("research", "notebook-3", "lab", "nvidia.com/gpu"): 2.0,
                    ("llm", "vllm-2", "vllm", "nvidia.com/gpu.shared"): 1.0}
    rig.resolver.idle_failure = OSError("kubelet view broken")  # a failing call lists nobody, stops nothing
    rig.run_to(1.5)
    metrics = rig.scrape()
    assert "wattledger_pod_gpus_without_processes" not in metrics
    assert_identity(metrics)
    rig.resolver.idle_failure, rig.resolver.idle = None, ()  # the notebook got a process: it leaves the list
    rig.run_to(2.0)
    assert "wattledger_pod_gpus_without_processes" not in rig.scrape()


def test_with_attribution_off_nothing_changes():
    ledger = build_mock_ledger()
    assert not ledger.attribution_enabled
    from prometheus_client import generate_latest
    assert generate_latest(make_registry(ledger, "0.0.0-golden")).decode() == GOLDEN.read_text()
    agent = Agent(AgentConfig(backend="mock"), host=None, serve_http=False)
    try:
        assert not agent.ledger.attribution_enabled
        text = generate_latest(agent.registry).decode()
        assert "wattledger_owner_" not in text and "wattledger_attribution_status" not in text
    finally:
        agent.stop()


def test_the_agent_wires_the_mocks_scripted_processes_to_owner_series():
    from wattledger.probes.mock import MockGpuBackend
    from wattledger.probes.mock_processes import ScriptedProcess, ScriptedProcesses

    clock = FakeClock()
    script = ScriptedProcesses([
        ScriptedProcess(0, 4242, 0.5, 20 * GIB, {"namespace": "llm", "pod": "vllm-0", "container": "vllm"}),
        ScriptedProcess(0, 4243, 0.25, 10 * GIB, {"group": "trainer.service"}),
    ])
    gpu = MockGpuBackend(1, clock_ns=clock.ns, processes=script)
    agent = Agent(AgentConfig(backend="mock", attribution=True), gpu=gpu, host=None, clock_ns=clock.ns,
                  serve_http=False)
    try:
        assert agent.ledger.attribution_enabled
        run_ticks(agent.sampler, clock, 6.0)
        metrics = scrape_metrics(make_app(agent.accounting, agent.registry, lambda: True))
        assert_identity(metrics)
        busy = owner_rows(metrics, "wattledger_owner_busy_seconds_total")
        # The process list's shares lag its refresh (about a second, as NVML's): compare from the first one.
        assert busy[("pod", "llm", "vllm-0", "vllm", "")] == pytest.approx(0.5 * 6.0, rel=0.2)
        assert busy[("pod", "llm", "vllm-0", "vllm", "")] / busy[("unit", "", "", "", "trainer.service")] == \
            pytest.approx(2.0, rel=0.02)
        assert metrics["wattledger_attribution_status"] == [({"reason": ATTRIBUTION_OK}, 1.0)]
    finally:
        agent.stop()


@pytest.mark.parametrize("socket, note", [("", "kubelet pod-resources off"),
                                          ("/no/such/kubelet/dir/kubelet.sock", "no kubelet pod-resources directory")])
def test_on_nvml_the_agent_resolves_owners_from_proc_and_says_what_it_does_without_a_kubelet(socket, note):
    from nvml_stub import make_nvml_stub
    from wattledger.agent.owners import ProcOwnerResolver
    from wattledger.probes.nvml import NvmlBackend

    clock = FakeClock()
    gpu = NvmlBackend(make_nvml_stub(), clock_ns=clock, enable_xid=False)
    agent = Agent(AgentConfig(backend="nvml", attribution=True, kubelet_socket=socket), gpu=gpu, host=None,
                  clock_ns=clock.ns, serve_http=False)
    try:
        assert isinstance(agent._owner_resolver, ProcOwnerResolver) and agent._pod_resources is None
        assert any(note in line for line in agent.notes), agent.notes
        run_ticks(agent.sampler, clock, 2.0)
        metrics = scrape_metrics(make_app(agent.accounting, agent.registry, lambda: True))
        # Whoever /proc says the stub's pid is on this machine (if anyone), the energy adds up.
        assert_identity(metrics)
        assert len(metrics["wattledger_attribution_status"]) == 1
    finally:
        agent.stop()
