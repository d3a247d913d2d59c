"""The Prometheus exporter: a custom collector that builds every family from a ledger snapshot.

It never touches hardware, so a scrape costs the same whatever the GPUs are doing, and any number of
scrapes may run at once (each works on its own snapshot). The metric names here are the contract the
dashboards and recording rules use; ``tests/golden/`` holds the exposition they must keep producing.
A series that cannot be read is absent, never zero: each GPU's values come from the snapshot's
``gpu_figures`` (``agent.ledger.GpuFigures``), where the ledger has already made an absent series None,
so nothing here decides what is present.

The families are ``exporters/render.py``'s row families: prometheus_client's encoders read them as any
family (the golden file is written that way), and /metrics writes their rows straight to bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate
from operator import attrgetter

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from wattledger.agent.ledger import (
    OWNER_LABEL_NAMES,
    UTILIZATION_BUCKETS,
    GpuFigures,
    Histogram,
    Ledger,
    LedgerSnapshot,
)
from wattledger.exporters.render import CounterFamily, GaugeFamily, HistogramFamily

P = "wattledger_"
_GPU = ["gpu", "uuid"]
_LE = tuple(repr(bound) for bound in UTILIZATION_BUCKETS)  # the le values, as Histogram.cumulative spells them


def _cumulative(histogram: Histogram) -> list[tuple[str, int]]:
    """``histogram.cumulative()``, without spelling the bounds again: a scrape of 64 GPUs writes 320
    histograms, and spelling their bounds was a tenth of collecting them."""
    return [*zip(_LE, accumulate(histogram.bucket_counts)), ("+Inf", histogram.count)]


def _ids(gpu: GpuFigures) -> list[str]:
    """The ``gpu`` and ``uuid`` label values of a GPU."""
    return [str(gpu.info.index), gpu.info.uuid]


def _gauge_fields(snapshot: LedgerSnapshot) -> Iterator[Metric]:
    """Last-value gauges: each GPU's figures from its newest sample (None, absent, while it is lost)."""
    simple = (
        ("gpu_power_watts", "power_watts", "Instantaneous board power draw (nvidia-smi power.draw.instant)."),
        ("gpu_power_average_watts", "power_average_watts",
         "Board power averaged by the driver over the trailing second (nvidia-smi power.draw.average)."),
        ("gpu_power_limit_watts", "power_limit_watts", "Enforced board power limit (nvidia-smi enforced.power.limit)."),
        ("gpu_memory_used_bytes", "memory_used_bytes", "GPU memory in use (nvidia-smi memory.used)."),
        ("gpu_memory_total_bytes", "memory_total_bytes", "GPU memory size (nvidia-smi memory.total)."),
        ("gpu_memory_reserved_bytes", "memory_reserved_bytes",
         "GPU memory reserved by the driver and firmware (nvidia-smi memory.reserved)."),
        ("gpu_sm_occupancy_ratio", "sm_occupancy_ratio",
         "Resident warps over the maximum, averaged over the last sample interval (GPM)."),
    )
    for metric, attribute, doc in simple:
        family = GaugeFamily(P + metric, doc, labels=_GPU)
        figure = attrgetter(attribute)
        for gpu in snapshot.gpu_figures:
            value = figure(gpu)
            if value is not None:
                family.add_metric(_ids(gpu), value)
        yield family

    temperature = GaugeFamily(P + "gpu_temperature_celsius",
                              "Die (sensor=gpu) and HBM (sensor=memory) temperature.",
                              labels=_GPU + ["sensor"])
    clock = GaugeFamily(P + "gpu_clock_hertz", "Current SM and memory clock.", labels=_GPU + ["clock"])
    throttle_active = GaugeFamily(P + "gpu_throttle_active",
                                  "1 for each clock-event reason active at the newest sample.",
                                  labels=_GPU + ["reason"])
    for gpu in snapshot.gpu_figures:
        ids = _ids(gpu)
        for sensor, value in (("gpu", gpu.temperature_gpu_celsius), ("memory", gpu.temperature_memory_celsius)):
            if value is not None:
                temperature.add_metric(ids + [sensor], value)
        for name, value in (("sm", gpu.sm_clock_hertz), ("memory", gpu.memory_clock_hertz)):
            if value is not None:
                clock.add_metric(ids + [name], value)
        for reason in gpu.throttle_reasons_active:
            throttle_active.add_metric(ids + [reason], 1.0)
    yield temperature
    yield clock
    yield throttle_active


_UNATTRIBUTED_HELP = ("GPU energy charged to no workload: time no workload held the GPU, and gaps (device lost, "
                      "energy unreadable) no workload held throughout. Workload energy plus this is the GPU's "
                      "energy.")
_UNATTRIBUTED_TO_OWNERS_HELP = ("GPU energy charged to no owner (attribution on; registered workloads are owners): "
                                "time nobody held the GPU, activity of processes no owner claims, gaps. Owner "
                                "energy plus this is the GPUs' energy.")


def _gpu_counters(snapshot: LedgerSnapshot) -> Iterator[Metric]:
    energy = CounterFamily(P + "gpu_energy_joules", "Energy used by the GPU, from the hardware counter; "
                           "kept monotonic across driver resets.", labels=_GPU)
    unattributed = CounterFamily(P + "gpu_unattributed_energy_joules", _UNATTRIBUTED_HELP if snapshot.attribution
                                 is None else _UNATTRIBUTED_TO_OWNERS_HELP, labels=_GPU)
    busy = CounterFamily(P + "gpu_busy_seconds", "Seconds the engine was busy, integrated at the sample "
                         "rate: rate() is the exact mean utilization over any window.", labels=_GPU + ["engine"])
    throttle = CounterFamily(P + "gpu_throttle_seconds", "Seconds the clocks were held back, by reason.",
                             labels=_GPU + ["reason"])
    pcie_tx = CounterFamily(P + "gpu_pcie_transmit_bytes", "Bytes sent over PCIe by the GPU.", labels=_GPU)
    pcie_rx = CounterFamily(P + "gpu_pcie_receive_bytes", "Bytes received over PCIe by the GPU.", labels=_GPU)
    nvlink_tx = CounterFamily(P + "gpu_nvlink_transmit_bytes", "Bytes sent over NVLink, all links.",
                              labels=_GPU)
    nvlink_rx = CounterFamily(P + "gpu_nvlink_receive_bytes", "Bytes received over NVLink, all links.",
                              labels=_GPU)
    ecc = CounterFamily(P + "gpu_ecc_errors", "Volatile ECC errors since the agent started.",
                        labels=_GPU + ["type"])
    histogram = HistogramFamily(P + "gpu_utilization_ratio", "Per-sample utilization by engine: the "
                                "bursts a scrape-time gauge misses.", labels=_GPU + ["engine"])
    for gpu in snapshot.gpu_figures:
        ids = _ids(gpu)
        for family, value in ((energy, gpu.energy_joules), (unattributed, gpu.unattributed_energy_joules)):
            if value is not None:
                family.add_metric(ids, value)
        for engine, seconds in gpu.busy_seconds.items():
            busy.add_metric(ids + [engine], seconds)
        for reason, seconds in sorted(gpu.throttle_seconds.items()):
            throttle.add_metric(ids + [reason], seconds)
        for family, value in ((pcie_tx, gpu.pcie_transmit_bytes), (pcie_rx, gpu.pcie_receive_bytes),
                              (nvlink_tx, gpu.nvlink_transmit_bytes), (nvlink_rx, gpu.nvlink_receive_bytes)):
            if value is not None:
                family.add_metric(ids, value)
        for kind, value in (("corrected", gpu.ecc_corrected_errors), ("uncorrected", gpu.ecc_uncorrected_errors)):
            if value is not None:
                ecc.add_metric(ids + [kind], value)
        for engine, hist in gpu.utilization_histograms.items():
            histogram.add_metric(ids + [engine], _cumulative(hist), hist.total)
    yield from (energy, unattributed, busy, throttle, pcie_tx, pcie_rx, nvlink_tx, nvlink_rx, ecc, histogram)

    lost = GaugeFamily(P + "gpu_field_lost", "1 for each field that was read and no longer is (unsupported "
                       "or failing for over a second): its counters are absent, not frozen.",
                       labels=_GPU + ["field"])
    for gpu in snapshot.gpu_figures:
        for name in gpu.lost_fields:
            lost.add_metric(_ids(gpu) + [name], 1.0)
    yield lost

    xid = CounterFamily(P + "gpu_xid_errors", "XID errors reported by the driver, by code.",
                        labels=_GPU + ["xid"])
    uuids = {g.info.index: g.info.uuid for g in snapshot.gpu_figures}
    for (index, code), count in sorted(snapshot.xid_counts.items()):
        xid.add_metric([str(index), uuids.get(index, ""), str(code)], count)
    yield xid

    # Failures that would repeat every tick are logged once by the backend and counted here instead.
    errors = CounterFamily(P + "gpu_read_errors", "Unexpected errors reading the GPU backend, by probe "
                           "and error (each logged once, then only counted; gpu is empty for the XID "
                           "event thread).", labels=_GPU + ["probe", "error"])
    for (index, probe, error), count in sorted(snapshot.backend_error_counts.items(),
                                               key=lambda item: (-1 if item[0][0] is None else item[0][0],) + item[0][1:]):
        gpu_label = "" if index is None else str(index)
        errors.add_metric([gpu_label, uuids.get(index, "") if index is not None else "", probe, error], count)
    yield errors

    mig_used = GaugeFamily(P + "mig_memory_used_bytes", "Memory used in one MIG instance.",
                           labels=_GPU + ["gpu_instance", "compute_instance", "mig_uuid"])
    mig_total = GaugeFamily(P + "mig_memory_total_bytes", "Memory size of one MIG instance.",
                            labels=_GPU + ["gpu_instance", "compute_instance", "mig_uuid"])
    mig_sm = GaugeFamily(P + "mig_sm_activity_ratio", "SM activity in one MIG instance (GPM).",
                         labels=_GPU + ["gpu_instance", "compute_instance", "mig_uuid"])
    for gpu in snapshot.gpu_figures:
        for mig in gpu.mig_instances:
            labels = _ids(gpu) + [str(mig.gpu_instance_id), str(mig.compute_instance_id), mig.uuid]
            for family, value in ((mig_used, mig.memory_used_bytes), (mig_total, mig.memory_total_bytes),
                                  (mig_sm, mig.sm_activity_ratio)):
                if value is not None:
                    family.add_metric(labels, value)
    yield from (mig_used, mig_total, mig_sm)


def _host(snapshot: LedgerSnapshot) -> Iterator[Metric]:
    host = snapshot.host
    cpu = CounterFamily(P + "host_cpu_busy_seconds", "CPU time spent busy, all cores: every /proc/stat "
                        "column but idle, iowait and steal (guest time is inside user and nice).")
    if snapshot.host_cpu_busy_seconds is not None:
        cpu.add_metric([], snapshot.host_cpu_busy_seconds)
    yield cpu
    core = CounterFamily(P + "host_cpu_core_busy_seconds", "CPU time spent busy, per online core "
                         "(columns as host_cpu_busy_seconds).", labels=["core"])
    for index, seconds in sorted(snapshot.host_cpu_core_busy_seconds.items()):
        core.add_metric([str(index)], seconds)
    yield core
    for metric, attribute, doc in (
        ("host_cpus", "cpu_count", "Logical CPUs."),  # not host_cpu_count: promtool reserves _count for histograms
        ("host_memory_total_bytes", "memory_total_bytes", "Host DRAM size (MemTotal)."),
        ("host_memory_used_bytes", "memory_used_bytes", "Host DRAM in use (MemTotal - MemAvailable)."),
        ("host_memory_available_bytes", "memory_available_bytes", "Host DRAM available (MemAvailable)."),
        ("host_memory_locked_bytes", "memory_locked_bytes", "Host DRAM locked with mlock (Mlocked)."),
    ):
        family = GaugeFamily(P + metric, doc)
        value = getattr(host, attribute) if host is not None else None
        if value is not None:
            family.add_metric([], value)
        yield family
    energy = CounterFamily(P + "host_energy_joules", "RAPL energy by zone (package-N, dram-N), "
                           "wraparound unwrapped.", labels=["zone"])
    for zone, joules in sorted(snapshot.host_energy_joules.items()):
        energy.add_metric([zone], joules)
    yield energy


def _workloads(snapshot: LedgerSnapshot) -> Iterator[Metric]:
    tokens = CounterFamily(P + "workload_tokens", "Tokens reported by each workload, by kind.",
                           labels=["workload", "kind"])
    for (name, kind), count in sorted(snapshot.workload_tokens.items()):
        tokens.add_metric([name, kind], count)
    energy = CounterFamily(P + "workload_energy_joules", "GPU energy used while the workload held the GPU, "
                           "idle gaps included.", labels=["workload", "gpu"])
    for (name, gpu), joules in sorted(snapshot.workload_energy_joules.items()):
        energy.add_metric([name, str(gpu)], joules)
    active = CounterFamily(P + "workload_active_seconds", "Seconds the workload held the GPU.",
                           labels=["workload", "gpu"])
    for (name, gpu), seconds in sorted(snapshot.workload_active_seconds.items()):
        active.add_metric([name, str(gpu)], seconds)
    yield from (tokens, energy, active)

    gpu_memory = GaugeFamily(P + "workload_gpu_memory_used_bytes", "GPU memory held by the workload's "
                             "processes.", labels=["workload", "gpu"])
    for (name, gpu), used in sorted(snapshot.workload_gpu_memory_bytes.items()):
        gpu_memory.add_metric([name, str(gpu)], used)
    yield gpu_memory
    resident = GaugeFamily(P + "workload_resident_bytes", "Resident memory of the workload's processes.",
                           labels=["workload"])
    cpu = CounterFamily(P + "workload_cpu_seconds", "CPU time of the workload's processes.",
                        labels=["workload"])
    locked = GaugeFamily(P + "workload_locked_bytes", "mlock()ed memory of the workload's processes (VmLck).",
                         labels=["workload"])
    pinned = GaugeFamily(P + "workload_pinned_bytes", "Pinned memory of the workload's processes (VmPin).",
                         labels=["workload"])
    for name, figures in sorted(snapshot.workload_processes.items()):
        resident.add_metric([name], figures.resident_bytes)
        cpu.add_metric([name], figures.cpu_seconds)
        locked.add_metric([name], figures.locked_bytes)
        pinned.add_metric([name], figures.pinned_bytes)
    yield from (resident, cpu, locked, pinned)


_OWNER = list(OWNER_LABEL_NAMES)


def _owners(snapshot: LedgerSnapshot) -> Iterator[Metric]:
    """Who used the GPUs (issue 13, docs/attribution.md): only with attribution on, so that with it off
    the exposition is what it was. One row per owner with a series of its own, and "other"."""
    figures = snapshot.attribution
    if figures is None:
        return
    energy = CounterFamily(P + "owner_energy_joules", "GPU energy charged to the owner since its series began "
                           "(all GPUs). Owners plus the GPUs' unattributed energy add up to the GPUs' energy.",
                           labels=_OWNER)
    busy = CounterFamily(P + "owner_busy_seconds", "Seconds of GPU busy time charged to the owner, summed over "
                         "GPUs: its share of each GPU's busy time (NVML per-process utilization).", labels=_OWNER)
    memory = GaugeFamily(P + "owner_gpu_memory_bytes", "GPU memory the owner's processes hold now, summed over "
                         "GPUs.", labels=_OWNER)
    gpus = GaugeFamily(P + "owner_gpus", "GPUs the owner held in its newest interval.", labels=_OWNER)
    info = GaugeFamily(P + "owner_info", "The owner's command name (its first process seen; value 1).",
                       labels=_OWNER + ["command"])
    for owner in figures.owners:
        labels = list(owner.labels)
        energy.add_metric(labels, owner.energy_joules)
        busy.add_metric(labels, owner.busy_seconds)
        if owner.gpu_memory_bytes is not None:
            memory.add_metric(labels, owner.gpu_memory_bytes)
        gpus.add_metric(labels, owner.gpus)
        info.add_metric(labels + [owner.command], 1.0)
    yield from (energy, busy, memory, gpus, info)
    yield _idle_allocations(figures)
    status = GaugeFamily(P + "attribution_status", "1 while owners can be found; 0 with the reason why not "
                         "(no host PIDs, no kubelet, ...).", labels=["reason"])
    status.add_metric([figures.status_reason], 1.0 if figures.working else 0.0)
    yield status


def _idle_allocations(figures) -> Metric:
    """Who holds idle GPUs on Kubernetes: allocations with no process behind them (one row per container
    and resource, so bounded by the node's GPU pods)."""
    idle = GaugeFamily(P + "pod_gpus_without_processes", "GPUs (device ids) the kubelet allocated to the "
                       "container whose pod ran no process on a GPU lately: held, and idle.",
                       labels=["namespace", "pod", "container", "resource"])
    for allocation in figures.idle_allocations:
        idle.add_metric([allocation.namespace, allocation.pod, allocation.container, allocation.resource],
                        allocation.devices)
    return idle


def _self(snapshot: LedgerSnapshot, version: str) -> Iterator[Metric]:
    success = GaugeFamily(P + "probe_success", "1 if the probe's last read succeeded.", labels=["probe"])
    duration = GaugeFamily(P + "probe_duration_seconds", "How long the probe's last read took.",
                           labels=["probe"])
    for name, stats in sorted(snapshot.probes.items()):
        success.add_metric([name], 1.0 if stats.success else 0.0)
        duration.add_metric([name], stats.duration_seconds)
    yield success
    yield duration
    age = GaugeFamily(P + "sample_age_seconds", "Seconds since the sampler last recorded a sample.")
    if snapshot.sample_age_seconds is not None:
        age.add_metric([], snapshot.sample_age_seconds)
    yield age
    overruns = CounterFamily(P + "sampler_overruns", "Ticks that ended after the next deadline.")
    overruns.add_metric([], snapshot.overruns)
    yield overruns
    build = GaugeFamily(P + "build_info", "The running wattledger version and GPU backend (value 1).",
                        labels=["version", "backend"])
    build.add_metric([version, snapshot.backend or "none"], 1.0)
    yield build


class LedgerCollector(Collector):
    """Builds the wattledger families from a ledger at scrape time."""

    def __init__(self, ledger: Ledger, version: str):
        self._ledger = ledger
        self._version = version

    def collect(self) -> Iterator[Metric]:
        snapshot = self._ledger.snapshot()
        info = GaugeFamily(P + "gpu_info", "Static facts about each GPU (value 1).",
                           labels=_GPU + ["model_name", "driver_version", "simulated"])
        up = GaugeFamily(P + "gpu_up", "1 while the GPU answers, 0 while it is lost.", labels=_GPU)
        for gpu in snapshot.gpu_figures:
            i = gpu.info
            info.add_metric([str(i.index), i.uuid, i.model_name, i.driver_version, "true" if i.simulated else "false"],
                            1.0)
            up.add_metric([str(i.index), i.uuid], 1.0 if gpu.up else 0.0)
        yield info
        yield up
        yield from _gauge_fields(snapshot)
        yield from _gpu_counters(snapshot)
        yield from _host(snapshot)
        yield from _workloads(snapshot)
        yield from _owners(snapshot)
        yield from _self(snapshot, self._version)


class SinkStatusCollector(Collector):
    """The sampler's sinks (the ``--record`` file as ``sink="record"``): whether each still runs, and
    how often one failed. ``statuses()`` returns objects with ``name``, ``active`` and ``failures``."""

    def __init__(self, statuses: Callable[[], list]):
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        active = GaugeFamily(P + "sink_active", "1 while the sink (e.g. the --record file) is written, "
                             "0 once a failure (a full disk) switched it off.", labels=["sink"])
        failures = CounterFamily(P + "sink_failures", "Failures that switched a sink off.", labels=["sink"])
        for status in sorted(self._statuses(), key=lambda s: s.name):
            active.add_metric([status.name], 1.0 if status.active else 0.0)
            failures.add_metric([status.name], status.failures)
        yield active
        yield failures


class LateSpansCollector(Collector):
    """The span-driven mock GPU's late spans: activity that reached it after it had simulated that time,
    so it was counted here and not simulated (SIMULATED figures only; a real GPU has no such thing).
    ``late()`` returns an object with ``spans`` and ``seconds``, both cumulative."""

    def __init__(self, late: Callable[[], object]):
        self._late = late

    def collect(self) -> Iterator[Metric]:
        late = self._late()
        spans = CounterFamily(P + "mock_late_spans", "Span-GPU entries that reached the mock GPU after it had "
                              "simulated their time (raise --mock-delay, or report spans sooner).", labels=[])
        seconds = CounterFamily(P + "mock_late_span_seconds", "Seconds of span activity the mock GPU did not "
                                "simulate because it arrived late.", labels=[])
        spans.add_metric([], late.spans)
        seconds.add_metric([], late.seconds)
        yield spans
        yield seconds


def make_registry(ledger: Ledger, version: str) -> CollectorRegistry:
    """A fresh registry holding only the wattledger collector (never the global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, version))
    return registry
