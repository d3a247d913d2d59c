"""Assembles the agent: backends, accounting, ledger, sampler, exporters and the HTTP server.

``Agent`` is what ``wattledger agent`` runs, and what tests and the benchmark command start
in-process. Opening the GPU backend follows ``backend``: ``nvml`` (real GPUs), ``mock`` (simulated),
``replay`` (a recorded file) or ``auto``.

When NVML does not work at start: ``nvml`` fails with one line (the CLI exits 1, and systemd or the
kubelet restarts it). ``auto`` looks for signs of an NVIDIA driver (device nodes, /proc/driver/nvidia,
an NVML library that loaded but failed): on a machine with none, a laptop, it serves the mock, saying
so; on a GPU node it keeps the host probes, retries NVML with backoff and exports
``wattledger_probe_success{probe="gpu"} 0`` until NVML opens. It never serves simulated GPUs there.

The measurement (``workloads/bench``) builds an ``Agent`` in-process and uses only its public face: the
methods below the "public face" line, the ``notes``, and the names in ``__all__`` (the errors it may
catch, the limits it must respect). It never reaches into the sampler, ledger, accounting or backends
(``tests/test_agent_public_face.py`` checks).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from wattledger.agent import version
from wattledger.agent.accounting import MAX_TOKENS_PER_CALL, Accounting, Span, procfs_start_ticks
from wattledger.agent.config import AgentConfig, load_mock_processes
from wattledger.agent.http_api import ServerStartError
from wattledger.agent.ledger import NS_PER_S, Ledger, OwnerAttribution, WorkloadProcessFigures
from wattledger.agent.sampler import SampleSink, Sampler, SinkGuard
from wattledger.agent.span_activity import SpanActivitySource
from wattledger.exporters.engine_tokens import EngineTokensCollector
from wattledger.exporters.jsonl import JsonlRecorder
from wattledger.exporters.prometheus import LateSpansCollector, SinkStatusCollector, make_registry
from wattledger.probes.base import FieldStatus, GpuBackend, GpuInfo, HostBackend, ProbeUnavailable
from wattledger.probes.host import open_host_backend
from wattledger.probes.mock import MockGpuBackend, parse_fault
from wattledger.probes.nvml_retry import RetryingNvmlBackend, nvidia_driver_evidence
from wattledger.probes.replay import ReplayGpuBackend

# The public face: what code outside agent/ may take from this module (see the module docstring).
__all__ = ["MAX_TOKENS_PER_CALL", "Agent", "MockLateness", "OpenedGpuBackend", "ProbeUnavailable",
           "ServerStartError", "WorkloadFigures", "open_gpu_backend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkloadFigures:
    """What the ledger has attributed to one workload so far (no window cut: since it was first seen)."""

    energy_joules_by_gpu: dict[int, float]  # joules, by GPU index
    active_seconds_by_gpu: dict[int, float]  # seconds it ran on each GPU
    tokens: dict[str, int]  # tokens by kind, as the ledger counted them
    processes: WorkloadProcessFigures | None  # its processes as last sampled; None when none is watched


@dataclass(frozen=True)
class MockLateness:
    """The span-driven mock's late spans so far (cumulative) and how far behind the clock it simulates."""

    spans: int
    seconds: float  # the late spans' total length
    lag_seconds: float


@dataclass
class OpenedGpuBackend:
    backend: GpuBackend | None
    notes: list[str]  # one line each: what was chosen and why (printed at startup)


def open_gpu_backend(
    config: AgentConfig,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    *,
    retry_nvml: bool = True,
    open_nvml: Callable[[], GpuBackend] | None = None,
    dev_root: str = "/dev",
) -> OpenedGpuBackend:
    """The GPU backend the config asks for; ``backend=None`` when there is no GPU data to read.

    Raises ``ProbeUnavailable`` (one line) when ``backend`` is ``nvml`` and NVML does not open, and when
    it is ``auto`` on a machine with an NVIDIA driver but ``retry_nvml`` is off (``wattledger devices``,
    which reads once); ``ConfigError`` (one line) when the ``mock_processes`` file no longer loads.
    ``open_nvml`` (tests) replaces ``NvmlBackend(clock_ns=clock_ns)``; ``dev_root`` is where the NVIDIA
    device nodes are looked for.
    """
    notes: list[str] = []
    if config.backend in ("auto", "nvml"):
        if open_nvml is None:
            from wattledger.probes.nvml import NvmlBackend  # only this path needs pynvml

            def open_nvml() -> GpuBackend:
                return NvmlBackend(clock_ns=clock_ns)

        try:
            return OpenedGpuBackend(open_nvml(), notes)
        except ProbeUnavailable as err:
            if config.backend == "nvml":
                raise  # no fallback: exit, so that the supervisor restarts the agent
            evidence = nvidia_driver_evidence(err, dev_root=dev_root, procfs=config.procfs)
            if evidence is not None:
                if not retry_nvml:
                    raise ProbeUnavailable(f"{err} ({evidence}, so no simulated GPU either)") from None
                notes.append(f"no GPU data yet: {err}; {evidence}, so this is a GPU node: retrying NVML with "
                             'backoff, wattledger_probe_success{probe="gpu"} is 0 until it opens')
                return OpenedGpuBackend(RetryingNvmlBackend(open_nvml, str(err), clock_ns), notes)
            notes.append(f"{err}; using the mock GPU backend instead (SIMULATED figures)")
    if config.backend == "replay":
        backend = ReplayGpuBackend(config.replay, speed=config.replay_speed, loop=config.replay_loop,
                                   clock_ns=clock_ns)
        label = " (recorded from SIMULATED GPUs)" if backend.simulated else ""
        notes.append(f"replaying {config.replay} at {config.replay_speed:g}x{label}")
        return OpenedGpuBackend(backend, notes)
    faults = [parse_fault(text) for text in config.mock_faults]
    # Read again here (validate() read it too): the file is the user's, and may have changed since; a bad
    # one is a ConfigError, one line, as at validation.
    processes = load_mock_processes(config.mock_processes) if config.mock_processes else None
    try:
        backend = MockGpuBackend(config.mock_gpus, config.mock_preset, clock_ns=clock_ns, faults=faults,
                                 delay_s=config.mock_delay_seconds, processes=processes)
    except ProbeUnavailable as err:
        notes.append(f"no GPU data: {err}; running the host probes only")
        return OpenedGpuBackend(None, notes)
    notes.append(f"SIMULATED: mock GPU backend, {config.mock_gpus} x {backend.spec.model_name} "
                 f"(preset {config.mock_preset}); every GPU figure is simulated")
    if processes is not None:
        notes.append(f"SIMULATED: {len(processes)} scripted process(es) from {config.mock_processes} on GPU(s) "
                     f"{', '.join(str(gpu) for gpu in sorted(processes.gpus())) or 'none'}")
    return OpenedGpuBackend(backend, notes)


class Agent:
    """A running agent. ``start()`` begins sampling and serving; ``stop()`` ends both and flushes."""

    def __init__(
        self,
        config: AgentConfig,
        gpu: GpuBackend | None = None,
        host: HostBackend | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        serve_http: bool = True,
    ):
        self.config = config
        self._clock_ns = clock_ns
        self.notes: list[str] = []
        if gpu is None:
            opened = open_gpu_backend(config, clock_ns)
            gpu, self.notes = opened.backend, opened.notes
        self.gpu = gpu
        if host is None:
            try:
                host = open_host_backend(config.procfs, config.sysfs)
            except ProbeUnavailable as err:
                self.notes.append(f"no host data: {err}")
        self.host = host
        if host is not None:
            # RAPL is often unreadable (root-only, or not mounted into containers): say so once, up front.
            self.notes += [f"no host energy: {st.reason}" for st in host.field_status()
                           if not st.supported and st.name == "rapl"]
        gpu_indices = [info.index for info in gpu.devices()] if gpu is not None else []
        self.accounting = Accounting(gpu_indices, clock_ns=clock_ns, max_workloads=config.max_workloads,
                                     name_pattern=config.workload_name_pattern,
                                     process_start_ticks=procfs_start_ticks(config.procfs))
        span_source: SpanActivitySource | None = None
        if isinstance(gpu, MockGpuBackend):
            span_source = SpanActivitySource(self.accounting)
            gpu.set_activity_source(span_source)
        if host is not None:
            self.accounting.add_process_listener(self._on_workload_process)
        self._pod_resources = None  # the kubelet client attribution opened, closed at stop()
        self._owner_resolver = None  # attribution's resolver (its kubelet call in flight ends at stop())
        self.engine_watcher = None  # reads --engine URLs' token counters (agent/engines.py), started at start()
        attribution = self._owner_attribution(config, gpu, clock_ns) if config.attribution else None
        self.ledger = Ledger(self.accounting, clock_ns=clock_ns, attribution=attribution)
        self.accounting.add_forget_listener(self.ledger.forget_workload)
        self.sampler = Sampler(self.ledger, gpu, host, config.interval_seconds,
                               host_interval_seconds=config.host_interval_seconds,
                               housekeeping=self.accounting.maintain)
        # GPUs found after start (NVML retried with backoff) become GPUs that workloads may name.
        self.sampler.add_device_listener(lambda infos: self.accounting.set_gpus([i.index for i in infos]))
        self.registry = make_registry(self.ledger, version.VERSION)
        self.registry.register(SinkStatusCollector(self.sampler.sink_status))
        if span_source is not None:
            self.registry.register(LateSpansCollector(span_source.late))
        if self.engine_watcher is not None:
            self.registry.register(EngineTokensCollector(self.engine_watcher))
        self.recorder: JsonlRecorder | None = None
        if config.record:
            self.recorder = JsonlRecorder(config.record, gpu.name if gpu else None, bool(gpu and gpu.simulated),
                                          gpu.devices() if gpu else [], config.interval_seconds)
            # One guard for both call sites: a full disk stops the whole recording, with one line.
            guard = SinkGuard("record", on_failure=self.recorder.close)
            self.sampler.add_sink(self.recorder.write_samples, guard=guard)
            self.accounting.add_span_listener(guard.wrap(self.recorder.write_span))
        self._serve_http = serve_http
        self.server = None

    @property
    def simulated(self) -> bool:
        return bool(self.gpu is not None and self.gpu.simulated)

    def _owner_attribution(self, config: AgentConfig, gpu: GpuBackend | None,
                           clock_ns: Callable[[], int]) -> OwnerAttribution:
        """Who used the GPU (issue 13): the resolver that places a pid (the mock's scripted owners; /proc,
        cgroups and the kubelet on a real node) and the accumulator's limits."""
        from wattledger.agent.owners import ProcOwnerResolver, ScriptedOwnerResolver

        resolver, unavailable = None, None
        if isinstance(gpu, MockGpuBackend):
            resolver = ScriptedOwnerResolver(gpu.scripted_owner_labels())
        elif isinstance(gpu, ReplayGpuBackend):
            unavailable = "replayed samples: their pids are the recording machine's, so only registered workloads"
        elif gpu is None:
            unavailable = "no GPU backend"
        else:  # NVML, or NVML being retried
            self._pod_resources = self._kubelet_client(config.kubelet_socket)
            resolver = ProcOwnerResolver(procfs_root=config.procfs, pod_resources=self._pod_resources,
                                         node_gpu_uuids=lambda: self._node_device_uuids(gpu), clock_ns=clock_ns)
        resolver = self._with_engines(config, resolver, unavailable)
        self._owner_resolver = resolver
        where = unavailable or (resolver.describe() if hasattr(resolver, "describe") else None)
        if where:
            self.notes.append(f"attribution: {where}")
        self.notes.append(f"attribution on: at most {config.attribution_max_owners} owners with series of their "
                          f"own (the rest: owner_kind=\"other\"), dropped {config.attribution_retention_seconds:g}s "
                          "after they leave")
        return OwnerAttribution(resolver, config.attribution_max_owners,
                                round(config.attribution_retention_seconds * NS_PER_S), unavailable)

    def _with_engines(self, config: AgentConfig, resolver, unavailable: str | None):
        """``resolver`` wrapped so that the configured engines' processes are their owners, with the engines'
        tokens read on their own thread (agent/engines.py); ``resolver`` itself without engines."""
        if not config.engines:
            return resolver
        if resolver is None:
            self.notes.append(f"engines: not read ({unavailable}): their tokens have no owner to go to")
            return resolver
        from wattledger.agent.engines import EngineAwareResolver, EngineWatcher

        self.engine_watcher = EngineWatcher(config.engines, procfs_root=config.procfs,
                                            interval_s=config.engine_interval_seconds,
                                            retention_s=config.attribution_retention_seconds)
        self.notes.append(self.engine_watcher.describe())
        return EngineAwareResolver(resolver, self.engine_watcher)

    def _kubelet_client(self, socket: str):
        """A pod-resources client, or None (one note says why) off Kubernetes, with the socket turned off, or
        without the kubernetes extra: owners then come from /proc and cgroups alone."""
        from wattledger.probes.pod_resources import PodResourcesClient, PodResourcesError

        if not socket.strip():
            self.notes.append("attribution: kubelet pod-resources off (kubelet_socket is empty); pods named from "
                              "cgroups only")
            return None
        path = socket.strip().removeprefix("unix://").removeprefix("unix:")
        # The directory, not the socket: mounted from the host, it lets the agent reconnect after a kubelet
        # restart replaces the socket (probes/pod_resources.py).
        if not os.path.isdir(os.path.dirname(path) or "/"):
            self.notes.append(f"attribution: no kubelet pod-resources directory {os.path.dirname(path)} (not a "
                              "Kubernetes node, or not mounted); pods named from their own files (/proc/PID/root) "
                              "only")
            return None
        try:
            return PodResourcesClient(path)
        except PodResourcesError as err:  # GrpcNotInstalled: the kubernetes extra is missing
            self.notes.append(f"attribution: {err}; pods named from their own files (/proc/PID/root) only")
            return None

    def _node_device_uuids(self, gpu: GpuBackend) -> set[str]:
        """This node's GPU and MIG UUIDs, which the kubelet's device ids name."""
        return {info.uuid for info in gpu.devices()} | self.ledger.mig_uuids()

    def _on_workload_process(self, workload: str, old_pid: int | None, new_pid: int | None) -> None:
        if old_pid is not None:
            self.host.unwatch_process(old_pid)
        if new_pid is not None:
            self.host.watch_process(new_pid)

    def healthy(self) -> bool:
        return self.sampler.is_alive()

    def start(self) -> None:
        """Start sampling, then serving (raises ServerStartError if the port cannot be bound)."""
        self.sampler.start()
        if self.engine_watcher is not None:
            self.engine_watcher.start()
        if self._serve_http:
            from wattledger.agent.http_api import make_app, serve

            app = make_app(self.accounting, self.registry, self.healthy, bearer_token=self.config.token,
                           clock_ns=self._clock_ns, scrape_cache_seconds=self.config.interval_seconds)
            try:
                self.server = serve(app, self.config.address, self.config.port)
            except Exception:
                self.sampler.stop()
                if self.engine_watcher is not None:
                    self.engine_watcher.stop()
                raise

    @property
    def metrics_url(self) -> str | None:
        return f"{self.server.url}/metrics" if self.server is not None else None

    def stop(self) -> None:
        """Stop serving and sampling; flush the recording; release the hardware."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.sampler.stop()
        if self.engine_watcher is not None:
            self.engine_watcher.stop()
        if self.recorder is not None:
            self.recorder.close()
        for backend in (self.gpu, self.host):
            if backend is not None:
                backend.close()
        close_resolver = getattr(self._owner_resolver, "close", None)
        if close_resolver is not None:
            close_resolver()
        if self._pod_resources is not None:
            self._pod_resources.close()

    # -- the public face for in-process users (the measurement) -----------------------------------------

    @property
    def gpu_backend_name(self) -> str | None:
        """``nvml``, ``mock``, ``replay``...; None when no GPU backend opened."""
        return self.gpu.name if self.gpu is not None else None

    def devices(self) -> list[GpuInfo]:
        """The GPUs the backend has found (empty without one, or while NVML is being retried)."""
        return self.gpu.devices() if self.gpu is not None else []

    @property
    def base_url(self) -> str | None:
        """Where the HTTP API is served (``http://host:port``); None before ``start()`` or without HTTP."""
        return self.server.url if self.server is not None else None

    def add_sample_sink(self, sink: SampleSink, name: str | None = None) -> None:
        """Call ``sink(gpu_samples, host_sample)`` after every sampler tick (guarded: a failing sink is
        disabled with one line and shows in the self-metrics, under ``name``)."""
        self.sampler.add_sink(sink, name=name)

    def add_span_listener(self, listener: Callable[[Span], None]) -> None:
        """Call ``listener(span)`` for every span the accounting records (``span.to_json()`` is its record)."""
        self.accounting.add_span_listener(listener)

    def accounting_api(self) -> Accounting:
        """The in-process twin of the HTTP accounting API: ``start``/``stop`` a workload, ``add_tokens``,
        spans (``make_span``, ``add_spans``, ``begin_span``/``end_span``, ``announce_spans``) and
        ``set_memory``, with the same checks and limits. In-process reporters and ``wattledger run`` report
        through it; the rest of the accounting object is not part of the face."""
        return self.accounting

    def tokens(self) -> dict[tuple[str, str], int]:
        """Every workload's reported tokens so far, ``(workload, kind) -> count``."""
        return self.accounting.tokens()

    def power_watts(self) -> float | None:
        """The GPUs' summed power at their last sample, in watts; None before any GPU reported one."""
        powers = [g.last.power_watts for g in self.ledger.snapshot().gpus
                  if g.up and g.last and g.last.power_watts is not None]
        return sum(powers) if powers else None

    def workload_figures(self, name: str) -> WorkloadFigures:
        """What the ledger has attributed to workload ``name`` so far (empty figures for an unknown one)."""
        snapshot = self.ledger.snapshot()
        return WorkloadFigures(
            energy_joules_by_gpu={gpu: joules for (workload, gpu), joules in snapshot.workload_energy_joules.items()
                                  if workload == name},
            active_seconds_by_gpu={gpu: seconds for (workload, gpu), seconds in
                                   snapshot.workload_active_seconds.items() if workload == name},
            tokens={kind: n for (workload, kind), n in snapshot.workload_tokens.items() if workload == name},
            processes=snapshot.workload_processes.get(name))

    def simulator_truth(self) -> list[float] | None:
        """The mock's exact energy per GPU since it started (joules, by index: what a test compares the
        measured figures with); None when the GPUs are not simulated by the mock."""
        if not isinstance(self.gpu, MockGpuBackend):
            return None
        return [self.gpu.true_energy_joules(i) for i in range(len(self.gpu.devices()))]

    def mock_lateness(self) -> MockLateness | None:
        """The span-driven mock's late spans and lag; None when the GPU is not the span-driven mock."""
        gpu = self.gpu
        source = gpu.activity_source if isinstance(gpu, MockGpuBackend) else None
        if not isinstance(source, SpanActivitySource):
            return None
        late = source.late()
        return MockLateness(spans=late.spans, seconds=late.seconds, lag_seconds=gpu.lag_seconds)

    def record_probe(self, name: str, success: bool, duration_seconds: float, error: str | None = None) -> None:
        """One read of a probe that runs outside the sampler, as its self-metrics
        (``wattledger_probe_success{probe=name}``, ``wattledger_probe_duration_seconds``): ``wattledger run``'s
        serving-engine token poller reports each of its reads as probe ``engine``. Any thread."""
        self.ledger.record_probe(name, success, duration_seconds, error)

    def rapl_status(self) -> list[FieldStatus]:
        """The host probe's RAPL entries (readable, or why not), so a summary can say why it has no CPU
        energy; one unsupported entry when there is no host probe at all."""
        if self.host is None:
            return [FieldStatus("rapl", False, "no host probe")]
        return [st for st in self.host.field_status() if st.name == "rapl" or st.name.startswith("rapl:")]
