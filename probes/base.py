"""What every probe returns, and the two protocols the rest of wattledger depends on.

Samples are frozen dataclasses whose field names carry their units. Units are converted once, in the
probe that reads the hardware, to SI base units: watts, joules, bytes, hertz, degrees Celsius, seconds,
and ratios from 0 to 1. ``None`` always means "not available on this device or not readable now";
it is never replaced by 0 or a sentinel.

Timestamps are ``monotonic_ns``: ``time.monotonic_ns()`` on Linux, which is CLOCK_MONOTONIC and so the
same clock in every process on the host. Workloads reporting spans from another process use it too.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

_Frozen = TypeVar("_Frozen")

# The __init__ each frozen sample class had from @dataclass, before ``direct_slot_init`` replaced it:
# the straightforward reference the fast one is tested against (tests/test_tick_fast_paths.py).
DATACLASS_INITS: dict[type, object] = {}


def _parameters(function: object) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter: what a caller may pass, annotations aside."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def direct_slot_init(cls: type[_Frozen]) -> type[_Frozen]:
    """Give a frozen, slotted dataclass an ``__init__`` that writes each slot through its descriptor.

    Why: the ``__init__`` that ``@dataclass(frozen=True)`` generates must get past the ``__setattr__``
    that raises FrozenInstanceError, so it calls ``object.__setattr__(self, "name", value)`` for every
    field, a lookup by name each time: for GpuSample's 36 fields about 5 us per sample, paid per GPU per
    tick by every backend (NVML too). A slot's own descriptor (``cls.__dict__[name].__set__``) stores the
    same value in the same slot without that lookup. Only ``__init__`` changes: the signature, defaults,
    equality, hashing, repr, ``dataclasses.replace`` and the frozen ``__setattr__`` stay the dataclass's.
    Fields with a default_factory, init=False or keyword-only, and __post_init__, are refused (TypeError)
    rather than handled differently from @dataclass.
    """
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__ or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}: direct_slot_init is for frozen dataclasses with slots=True")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: direct_slot_init does not run __post_init__")
    namespace: dict[str, object] = {}
    parameters, stores = [], []
    for number, field in enumerate(dataclasses.fields(cls)):
        if field.default_factory is not dataclasses.MISSING or not field.init or field.kw_only:
            raise TypeError(f"{cls.__name__}.{field.name}: direct_slot_init handles plain fields only")
        slot = cls.__dict__.get(field.name)
        if type(slot).__name__ != "member_descriptor":  # a slot inherited from a base class, say
            raise TypeError(f"{cls.__name__}.{field.name}: not a slot of this class")
        namespace[f"_store{number}"] = slot.__set__
        if field.default is dataclasses.MISSING:
            parameters.append(field.name)
        else:
            namespace[f"_default{number}"] = field.default
            parameters.append(f"{field.name}=_default{number}")
        stores.append(f"    _store{number}(self, {field.name})")
    exec(f"def __init__(self, {', '.join(parameters)}):\n" + "\n".join(stores) + "\n", namespace)
    init = namespace["__init__"]
    original = cls.__init__
    if _parameters(init) != _parameters(original):  # e.g. an InitVar, which fields() leaves out
        raise TypeError(f"{cls.__name__}: the direct __init__ would not take the dataclass's arguments")
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = original.__doc__
    DATACLASS_INITS[cls] = original
    cls.__init__ = init
    return cls


# Engines whose busy time the ledger integrates. "gpu" and "memory_controller" are NVML's classic
# utilization rates; "sm", "tensor" and "dram" are GPM activity ratios (Hopper and newer, or the mock).
ENGINES: tuple[str, ...] = ("gpu", "memory_controller", "sm", "tensor", "dram")

# Clock-event (throttle) reasons, as exported in the `reason` label.
THROTTLE_REASONS: tuple[str, ...] = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)


class ProbeUnavailable(Exception):
    """A probe cannot run on this machine at all (library missing, no permission, no device).

    The message is one line that says what and why; the agent runs without that probe and prints it.
    """


class FatalProbeError(RuntimeError):
    """A probe cannot go on in this process, and only a new process can fix it (NVML's library and kernel
    driver differ after a driver update). Raised from a backend's ``sample()``; the sampler does not count
    it as a failed read but stops, and the agent exits so that its supervisor restarts it."""


@direct_slot_init
@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static facts about one GPU, read once when the backend opens it."""

    index: int
    uuid: str
    model_name: str  # nvidia-smi --query-gpu=name
    driver_version: str  # nvidia-smi --query-gpu=driver_version
    memory_total_bytes: int | None  # nvidia-smi --query-gpu=memory.total (MiB there)
    power_limit_default_watts: float | None  # nvidia-smi --query-gpu=power.default_limit
    simulated: bool = False
    pci_bus_id: str | None = None
    mig_enabled: bool = False


@direct_slot_init
@dataclass(frozen=True, slots=True)
class GpuProcess:
    """One compute process on a GPU (nvidia-smi --query-compute-apps=pid,used_memory).

    The utilization ratios are the process's share of the GPU's time over the last process interval (about
    1 s; NVML's per-process samples, probes/nvml_processes.py): fraction of the time its kernels ran on the
    SMs, and its memory controller was busy with it. On a MIG instance they are shares of that instance.
    None: not measured (unsupported, or no interval yet); 0.0: measured, and the process did not run.
    """

    pid: int
    memory_used_bytes: int | None
    sm_utilization_ratio: float | None = None  # nvidia-smi pmon "sm" / 100
    memory_controller_utilization_ratio: float | None = None  # nvidia-smi pmon "mem" / 100
    gpu_instance_id: int | None = None  # MIG GPU instance the process runs in; None without MIG
    compute_instance_id: int | None = None  # MIG compute instance inside it


@direct_slot_init
@dataclass(frozen=True, slots=True)
class MigInstance:
    """One MIG instance on a GPU with MIG mode enabled."""

    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    sm_activity_ratio: float | None = None  # GPM, where the driver supports it per instance


@direct_slot_init
@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU.

    Cumulative fields (``*_total`` / energy / byte counters / throttle seconds) are the hardware's own
    counters as read: they may reset (driver reload) and the ledger turns them into monotonic counters.
    """

    index: int
    uuid: str
    monotonic_ns: int
    up: bool = True  # False: the device is lost or being re-acquired; every other field is None
    # Fraction of the sample period in which a kernel ran (nvidia-smi utilization.gpu / 100).
    utilization_gpu_ratio: float | None = None
    # Fraction of time the memory controller was busy (nvidia-smi utilization.memory / 100).
    utilization_memory_controller_ratio: float | None = None
    # GPM activity (Hopper+): SM busy, SM occupancy, any tensor pipe busy, DRAM bandwidth used.
    sm_activity_ratio: float | None = None
    sm_occupancy_ratio: float | None = None
    tensor_activity_ratio: float | None = None
    dram_activity_ratio: float | None = None
    memory_used_bytes: int | None = None  # nvidia-smi memory.used
    memory_total_bytes: int | None = None  # nvidia-smi memory.total
    memory_reserved_bytes: int | None = None  # nvidia-smi memory.reserved (v2 memory info only)
    power_watts: float | None = None  # instantaneous (nvidia-smi power.draw.instant)
    power_average_watts: float | None = None  # trailing 1 s mean (nvidia-smi power.draw.average)
    energy_joules: float | None = None  # counter since driver load (total_energy_consumption)
    power_limit_watts: float | None = None  # enforced limit (nvidia-smi enforced.power.limit)
    sm_clock_hertz: float | None = None  # nvidia-smi clocks.sm (MHz there)
    memory_clock_hertz: float | None = None  # nvidia-smi clocks.mem (MHz there)
    temperature_gpu_celsius: float | None = None  # nvidia-smi temperature.gpu
    temperature_memory_celsius: float | None = None  # nvidia-smi temperature.memory (HBM)
    pcie_transmit_bytes: int | None = None  # counter
    pcie_receive_bytes: int | None = None  # counter
    nvlink_transmit_bytes: int | None = None  # counter, summed over links
    nvlink_receive_bytes: int | None = None  # counter, summed over links
    pcie_transmit_bytes_per_second: float | None = None  # GPM rate
    pcie_receive_bytes_per_second: float | None = None  # GPM rate
    nvlink_transmit_bytes_per_second: float | None = None  # GPM rate
    nvlink_receive_bytes_per_second: float | None = None  # GPM rate
    # Active clock-event reasons (nvidia-smi clocks_event_reasons.*), names from THROTTLE_REASONS.
    throttle_reasons: frozenset[str] | None = None
    # Cumulative time per reason, in seconds, where the driver keeps such counters.
    throttle_seconds: dict[str, float] | None = None
    ecc_corrected_errors: int | None = None  # volatile count (nvidia-smi ecc.errors.corrected.volatile.total)
    ecc_uncorrected_errors: int | None = None  # volatile (ecc.errors.uncorrected.volatile.total)
    processes: tuple[GpuProcess, ...] | None = None  # refreshed about once a second
    mig_instances: tuple[MigInstance, ...] | None = None


@direct_slot_init
@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One registered workload process, read from /proc/PID."""

    pid: int
    rss_bytes: int | None  # VmRSS
    cpu_seconds: float | None  # utime + stime
    locked_bytes: int | None  # VmLck: mlock()ed memory
    pinned_bytes: int | None  # VmPin: pages pinned by drivers (RDMA, some pinned host buffers)
    root_pid: int | None = None  # the watched process this one is (or descends from)


@direct_slot_init
@dataclass(frozen=True, slots=True)
class HostSample:
    """One reading of the host."""

    monotonic_ns: int
    # Counter: all cores, seconds not idle, iowait or steal (node_exporter's usual utilisation).
    cpu_busy_seconds: float | None = None
    cpu_busy_seconds_per_core: tuple[float, ...] | None = None  # online cores, ascending core number
    # The core number of each entry above (N of /proc/stat's cpuN); None: positions 0, 1, ... An offline
    # core has no entry, so without these the cores after it would shift onto its counter.
    cpu_core_ids: tuple[int, ...] | None = None
    cpu_count: int | None = None
    memory_total_bytes: int | None = None  # MemTotal
    memory_used_bytes: int | None = None  # MemTotal - MemAvailable
    memory_available_bytes: int | None = None  # MemAvailable
    memory_locked_bytes: int | None = None  # Mlocked: mlock()ed pages, machine-wide
    # RAPL energy per zone ("package-0", "dram-0", ...), joules, wraparound already unwrapped: these
    # only go down if the probe itself restarts.
    rapl_energy_joules: dict[str, float] | None = None
    processes: tuple[ProcessSample, ...] = ()


@direct_slot_init
@dataclass(frozen=True, slots=True)
class FieldStatus:
    """Whether one field or probe works on a device, and why not (for `wattledger devices`)."""

    name: str
    supported: bool
    reason: str | None = None


@direct_slot_init
@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """How one of a backend's sub-probes did on its last read, as node_exporter reports each collector
    (``node_scrape_collector_success``): exported as ``wattledger_probe_success{probe=name}`` and
    ``wattledger_probe_duration_seconds``. A sub-probe that cannot work on this machine (no RAPL, no GPM)
    is a failure with the reason, not an absent series."""

    name: str  # "host.stat", "host.rapl", "gpu.gpm", ...
    success: bool
    duration_seconds: float  # on the backend's own clock
    error: str | None = None  # one line: why it failed; None on success


@runtime_checkable
class GpuBackend(Protocol):
    """Reads GPUs. Every call happens on the sampler thread, except ``xid_counts`` and ``error_counts``
    (any thread). Backends without XID events, counted errors or sub-probes return empty results."""

    name: str  # "nvml", "mock" or "replay"
    simulated: bool
    # Moves on when ``devices()`` changes after open (NVML opened late, by a retrying backend); the
    # sampler then hands the new list to the ledger. Backends whose devices are fixed keep it at 0.
    devices_generation: int

    def devices(self) -> list[GpuInfo]:
        """The GPUs this backend reads, in index order."""
        ...

    def sample(self) -> list[GpuSample]:
        """One reading of every device. A lost device gives a sample with ``up=False``."""
        ...

    def field_status(self, index: int) -> list[FieldStatus]:
        """Which fields work on a device, after at least one ``sample()``."""
        ...

    def xid_counts(self) -> dict[tuple[int, int], int]:
        """XID critical errors since start: ``(gpu index, xid) -> count``; cumulative."""
        ...

    def error_counts(self) -> dict[tuple[int | None, str, str], int]:
        """Unexpected read errors since start: ``(gpu index or None, probe, error name) -> count``."""
        ...

    def probe_status(self) -> list[ProbeOutcome]:
        """Each sub-probe's outcome on the last ``sample()`` (``gpu.fields``, ``gpu.gpm``, ``gpu.xid``)."""
        ...

    def close(self) -> None:
        ...


class FixedGpuBackend:
    """The optional ``GpuBackend`` parts for a backend that has none of them: devices fixed at open, no XID
    events, no counted read errors, no sub-probes. The mock and replay backends (and test stubs) inherit
    it; NVML implements each."""

    devices_generation = 0

    def xid_counts(self) -> dict[tuple[int, int], int]:
        return {}

    def error_counts(self) -> dict[tuple[int | None, str, str], int]:
        return {}

    def probe_status(self) -> list[ProbeOutcome]:
        return []


@runtime_checkable
class HostBackend(Protocol):
    """Reads the host: CPU, DRAM, RAPL energy and registered workload processes."""

    name: str

    def sample(self) -> HostSample:
        ...

    def watch_process(self, pid: int) -> None:
        """Report this process (and its descendants) in ``HostSample.processes`` from now on."""
        ...

    def unwatch_process(self, pid: int) -> None:
        ...

    def field_status(self) -> list[FieldStatus]:
        ...

    def probe_status(self) -> list[ProbeOutcome]:
        """Each sub-probe's outcome on the last ``sample()`` (``host.stat``, ``host.meminfo``,
        ``host.processes``, ``host.rapl``)."""
        ...

    def close(self) -> None:
        ...


@dataclass(slots=True)
class ProbeStats:
    """Self-metrics of one probe, kept by the sampler."""

    success: bool = False
    duration_seconds: float = 0.0
    failures_total: int = 0
    last_error: str | None = None
