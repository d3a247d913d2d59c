"""A stand-in for the ``pynvml`` module, driven by fake GPUs, for tests of the NVML backend.

``make_nvml_stub()`` returns ``unittest.mock.create_autospec(pynvml)``: every NVML function keeps the real
signature (a call with wrong arguments fails as it would against the real module) and records its calls.
The real constants, ctypes structs and ``NVMLError`` classes are copied in, so the backend catches the same
exception classes and fills the same structs as in production. Functions the stub does not implement raise
``NVMLError_FunctionNotFound``, as on a driver that predates them.

Typical use::

    nvml = make_nvml_stub()                         # two H100-like GPUs with plausible values
    gpu0 = nvml.fake.gpus[0]
    gpu0.errors["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    gpu0.field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_ERROR_NO_PERMISSION
    gpu0.field_errors[pynvml.NVML_FI_DEV_MEMORY_TEMP] = pynvml.NVML_ERROR_UNKNOWN   # one entry of the batch
    gpu0.gpm_metric_errors[pynvml.NVML_GPM_METRIC_SM_UTIL] = pynvml.NVML_ERROR_UNKNOWN  # one GPM metric
    gpu0.raises["nvmlDeviceGetClockInfo"] = TypeError("odd")  # a binding surprise, not an NVMLError
    make_nvml_stub(driver_version="575.57.08", binding_numbering="269")  # driver and pynvml disagree
    nvml.fake.lose(0)                               # GpuIsLost on every call; old handles stay dead
    nvml.fake.recover(0)                            # nvmlDeviceGetHandleByUUID works again (new handle)
    nvml.fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND   # nvmlInit fails
    nvml.fake.uninitialize()                        # every call: Uninitialized until nvmlInit again
    nvml.fake.advance(1.0)                          # energy, PCIe and NVLink counters move on
    nvml.fake.inject_xid(0, 79)                     # nvmlEventSetWait delivers an XID event
    nvml.fake.calls("nvmlDeviceGetUtilizationRates", gpu=0)   # how often it was called for GPU 0
    gpu0.utilization_samples = [FakeUtilizationSample(4242, 1_700_000_000_000_000, sm_percent=60)]
    gpu0.errors["nvmlDeviceGetProcessesUtilizationInfo"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND  # older driver
    del nvml.nvmlDeviceGetCurrentClocksEventReasons # an older pynvml without that binding (or constant)

Fake GPUs are plain dataclasses read at call time: change a field and the next call sees it. Handles are
real ctypes pointers (``c_nvmlDevice_t``), so they can travel in NVML structs (event data) like real ones.
What the stub records for assertions: ``fake.field_requests`` ((fieldId, scopeId) per GetFieldValues
call), ``fake.gpm_samples`` (live GPM sample buffers), ``fake.event_sets`` / ``fake.freed_event_sets``,
and every mock's own ``call_args_list``. ``nvmlGpmMetricsGet`` refuses (InvalidArgument) sample pairs that
are not (older, newer) samples of one device, as NVML does; values are those current at the newer one.

Per-process utilization (``nvmlDeviceGetProcessesUtilizationInfo`` and ``nvmlDeviceGetProcessUtilization``)
answers from a scripted driver buffer, ``FakeGpu.utilization_samples`` (``FakeMig.utilization_samples`` on a
MIG handle): the samples stamped after the timestamp passed, NOT_FOUND when there is none, as NVML does. On
a GPU in MIG mode the GPU's handle answers NotSupported; a MIG handle answers only with
``FakeMig.process_utilization_supported``. Unsupported on a plain GPU: ``gpu.errors[name] = NOT_SUPPORTED``.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import types
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pynvml

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * 1024 * 1024

OLD_SAMPLE_US = 1_600_000_000_000_000  # a realtime-clock timestamp (us) from 2020: before any test's "now"
_ALL_LINKS = 0xFFFFFFFF  # scopeId that sums the NVLink throughput fields over all links

# How each driver generation numbers the throttle-time and power-smoothing fields (nvml.h of that driver;
# the FAKE DRIVER interprets ids by these, whatever constants the stub module carries, as a real driver
# does). Generation -> ({field id: FakeGpu.throttle_ns key}, first power-smoothing field id or None).
_STABLE_THROTTLE = {74: "sw_power_cap", 76: "sync_boost"}  # NVML_FI_DEV_PERF_POLICY_POWER / _SYNC_BOOST
_THERMAL_KEYS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
POWER_SMOOTHING_COUNT = 18  # NVML_FI_PWR_SMOOTHING_ENABLED ... _ADMIN_OVERRIDE_RAMP_DOWN_HYST_VAL
DRIVER_NUMBERINGS: dict[str, tuple[dict[int, str], int | None]] = {
    "before-570": (dict(_STABLE_THROTTLE), None),  # 535-560: no power smoothing, no thermal counters
    "570": (dict(_STABLE_THROTTLE), 251),  # power smoothing 251-268, nothing at 269+
    "575": ({**_STABLE_THROTTLE, **dict(zip((251, 252, 253), _THERMAL_KEYS))}, 256),  # 575.x, 580.65
    "580.82": ({**_STABLE_THROTTLE, **dict(zip((269, 270, 271), _THERMAL_KEYS))}, 251),  # 580.82 and later
}
# The pynvml constants of each binding numbering (nvidia-ml-py 12.575.51 / 13.580.65 vs 13.580.82+).
BINDING_NUMBERINGS: dict[str, dict[str, int]] = {
    "251": {"NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN": 251,
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN": 252,
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN": 253,
            "NVML_FI_PWR_SMOOTHING_ENABLED": 256},
    "269": {"NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN": 269,
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN": 270,
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN": 271,
            "NVML_FI_PWR_SMOOTHING_ENABLED": 251},
}


def driver_numbering(driver_version: str) -> str:
    """The DRIVER_NUMBERINGS key of a driver version such as "580.82.07" (the fake driver's own rule)."""
    version = tuple(int(p) for p in driver_version.split("."))
    if version < (570,):
        return "before-570"
    if version < (575,):
        return "570"
    if version < (580, 82):
        return "575"
    return "580.82"

_VALUE_MEMBER = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _default_gpm_metrics() -> dict[int, float]:
    """GPM metric id -> value (percent or MiB/s), a busy H100 in a training step."""
    return {
        pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 80.0,
        pynvml.NVML_GPM_METRIC_SM_UTIL: 45.0,
        pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 30.0,
        pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 25.0,
        pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 40.0,
        pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 1000.0,
        pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 2000.0,
        pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: 3000.0,
        pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: 4000.0,
    }


@dataclass
class FakeProcess:
    """A compute process as nvmlDeviceGetComputeRunningProcesses reports it."""

    pid: int
    used_memory: int | None  # bytes; None where the driver cannot tell (pynvml's own convention)
    gpu_instance_id: int | None = None  # MIG instance ids; None: all-ones, as without MIG
    compute_instance_id: int | None = None


@dataclass
class FakeUtilizationSample:
    """One entry of the driver's per-process utilization buffer (percent over one driver sample period)."""

    pid: int
    timestamp_us: int  # host realtime clock, microseconds
    sm_percent: int = 0
    memory_percent: int = 0
    encoder_percent: int = 0
    decoder_percent: int = 0


@dataclass
class FakeMig:
    """One MIG device (a compute instance inside a GPU instance)."""

    gpu_instance_id: int
    compute_instance_id: int = 0
    uuid: str = ""  # filled in as MIG-<gpu uuid>-<gi>-<ci> when empty
    memory_total: int = 10 * GIB
    memory_used: int = 1 * GIB
    sm_util_percent: float = 50.0  # GPM SM util per GPU instance (nvmlGpmMigSampleGet)
    process_utilization_supported: bool = False  # per-process utilization on this MIG handle
    utilization_samples: list[FakeUtilizationSample] = field(default_factory=list)


@dataclass
class FakeGpu:
    """State of one fake GPU, in NVML's own units (mW, mJ, MHz, percent, KiB, ns)."""

    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    name: str = "NVIDIA H100 80GB HBM3"
    pci_bus_id: str = "00000000:18:00.0"
    power_mw: int = 350_000  # instant power (field 186) and nvmlDeviceGetPowerUsage
    power_average_mw: int = 345_000  # field 185
    power_limit_mw: int = 700_000  # enforced limit
    power_default_limit_mw: int = 700_000
    energy_mj: int = 123_456_789  # since driver load
    utilization_gpu: int = 60  # percent
    utilization_memory: int = 35  # percent (memory controller busy)
    memory_total: int = 80 * GIB
    memory_reserved: int = 512 * MIB  # v2 only; v1 counts it as used
    memory_used: int = 20 * GIB
    memory_v2_error: int | None = None  # code raised by nvmlDeviceGetMemoryInfo(version=nvmlMemory_v2)
    sm_clock_mhz: int = 1980
    memory_clock_mhz: int = 2619
    temperature_gpu: int = 45
    temperature_memory: int = 52  # HBM, field 82
    clock_event_reasons: int = 0  # bitmask of nvmlClocksEventReason*
    ecc_corrected: int = 0  # volatile
    ecc_uncorrected: int = 0
    pcie_tx_bytes: int = 1_000_000_000  # fields 197/198
    pcie_rx_bytes: int = 2_000_000_000
    nvlink_tx_kib: int = 4_000_000  # fields 138/139, summed over links (scopeId 0xFFFFFFFF)
    nvlink_rx_kib: int = 5_000_000
    nvlink_links: int = 18  # a link index as scopeId answers total // links
    throttle_ns: dict[str, int] = field(
        default_factory=lambda: {
            "sw_power_cap": 2_500_000_000,
            "sync_boost": 0,
            "sw_thermal_slowdown": 0,
            "hw_thermal_slowdown": 1_000_000,
            "hw_power_brake_slowdown": 0,
        }
    )
    # Power-smoothing fields in the driver's numbering: (enabled, privilege level, immediate ramp-down, TMP
    # ceiling W, TMP floor W, ...). Answered as unsigned long long, so a backend that asked for them as
    # throttle time could not tell them apart by their type.
    power_smoothing: tuple[int, ...] = (1, 2, 1, 700, 350) + (0,) * (POWER_SMOOTHING_COUNT - 5)
    # Faults and overrides
    errors: dict[str, int] = field(default_factory=dict)  # pynvml function name -> NVML error code raised
    field_errors: dict[int, int] = field(default_factory=dict)  # field id -> nvmlReturn of that entry
    field_values: dict[int, Any] = field(default_factory=dict)  # field id -> raw value replacing the default
    field_value_types: dict[int, int] = field(default_factory=dict)  # field id -> NVML_VALUE_TYPE_* to use
    # pynvml function name -> exception instance raised from it (not an NVMLError: a binding surprise)
    raises: dict[str, BaseException] = field(default_factory=dict)
    # GPM (Hopper+)
    gpm_supported: bool = True
    gpm_mig_supported: bool = True
    gpm_metrics: dict[int, float] = field(default_factory=_default_gpm_metrics)
    gpm_metric_errors: dict[int, int] = field(default_factory=dict)  # metric id -> its nvmlReturn
    # MIG
    mig_supported: bool = True  # False: nvmlDeviceGetMigMode raises NotSupported (pre-Ampere, consumer)
    mig_enabled: bool = False
    mig_instances: list[FakeMig] = field(default_factory=list)
    max_mig_devices: int = 7
    processes: list[FakeProcess] = field(default_factory=lambda: [FakeProcess(4242, 8 * GIB)])
    # The driver's per-process utilization buffer. The default holds one sample from long before any test's
    # clock (OLD_SAMPLE_US): asked with lastSeenTimeStamp 0 (the whole buffer, as the cost measurement does)
    # it answers, and a backend asking for the last second gets NOT_FOUND (no process ran).
    utilization_samples: list[FakeUtilizationSample] = field(
        default_factory=lambda: [FakeUtilizationSample(4242, OLD_SAMPLE_US, sm_percent=60, memory_percent=35)])
    xid_supported: bool = True
    # Loss: set through FakeNvml.lose / recover
    lost: bool = False
    lost_code: int = pynvml.NVML_ERROR_GPU_IS_LOST
    generation: int = 0  # bumped by recover(): handles from before the loss keep failing


def default_gpus(count: int = 2) -> list[FakeGpu]:
    """``count`` H100-like GPUs with distinct UUIDs, bus ids and slightly different readings."""
    return [
        FakeGpu(
            uuid=f"GPU-{i:08x}-1111-2222-3333-444444444444",
            pci_bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
            power_mw=350_000 + 25_000 * i,
            power_average_mw=345_000 + 25_000 * i,
            energy_mj=123_456_789 + 1_000_000 * i,
            temperature_gpu=45 + i,
            processes=[FakeProcess(4242 + i, 8 * GIB)],
            utilization_samples=[FakeUtilizationSample(4242 + i, OLD_SAMPLE_US, sm_percent=60, memory_percent=35)],
        )
        for i in range(count)
    ]


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # NVMLError(code) returns the matching NVMLError_<Name> subclass


def _address(pointer: Any) -> int | None:
    try:
        return ctypes.cast(pointer, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return None


@dataclass
class _GpmSnapshot:
    gpu: int
    generation: int
    gpu_instance_id: int | None
    sequence: int
    metrics: dict[int, float]


class FakeNvml:
    """The state behind one stub module: fake GPUs, handles, GPM samples, event sets, faults."""

    def __init__(self, module: Any, gpus: list[FakeGpu], driver_version: str, legacy_bytes: bool) -> None:
        self.module = module
        self.gpus = gpus
        self.driver_version = driver_version
        self.legacy_bytes = legacy_bytes  # answer strings as bytes, like pynvml before 11.5
        self.init_error: int | None = None  # nvmlInit raises this while set
        self.initialized = False
        self.down_code: int | None = None  # while set, every call raises it until nvmlInit succeeds
        self.max_wait_s = 0.02  # nvmlEventSetWait blocks at most this long, whatever timeout it is given
        self.field_requests: list[list[tuple[int, int]]] = []  # (fieldId, scopeId) of each GetFieldValues
        self.gpm_samples: dict[int, _GpmSnapshot | None] = {}  # allocated GPM samples -> last contents
        self.event_sets: dict[int, dict[int, Any]] = {}  # live event set -> {gpu index: registered handle}
        self.freed_event_sets = 0
        self._objects: dict[int, Any] = {}  # keeps the ctypes objects behind handles alive
        self._handles: dict[int, tuple[int, int, int | None]] = {}  # address -> (gpu, generation, mig slot)
        self._handle_cache: dict[tuple[int, int, int | None], Any] = {}
        self._sequence = itertools.count(1)
        self._xids: queue.Queue[tuple[int, int]] = queue.Queue()

    # ----------------------------------------------------------------------------------------------------
    # Controls for tests

    def lose(self, index: int, code: int = pynvml.NVML_ERROR_GPU_IS_LOST) -> None:
        """GPU ``index`` falls off the bus: every call on it (and handle lookups) raise ``code``."""
        self.gpus[index].lost = True
        self.gpus[index].lost_code = code

    def recover(self, index: int) -> None:
        """GPU ``index`` is back after a reset: new handles work, handles from before stay dead."""
        self.gpus[index].lost = False
        self.gpus[index].generation += 1

    def uninitialize(self, code: int = pynvml.NVML_ERROR_UNINITIALIZED) -> None:
        """NVML loses its state (driver reloaded): every call raises ``code`` until nvmlInit succeeds."""
        self.down_code = code

    def advance(self, seconds: float) -> None:
        """Move every GPU's counters on by ``seconds`` at its current power and GPM rates."""
        for gpu in self.gpus:
            rates = gpu.gpm_metrics
            gpu.energy_mj += round(gpu.power_mw * seconds)  # mW * s = mJ
            gpu.pcie_tx_bytes += round(rates.get(pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, 0.0) * MIB * seconds)
            gpu.pcie_rx_bytes += round(rates.get(pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, 0.0) * MIB * seconds)
            gpu.nvlink_tx_kib += round(rates.get(pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC, 0.0) * KIB * seconds)
            gpu.nvlink_rx_kib += round(rates.get(pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC, 0.0) * KIB * seconds)

    def inject_xid(self, index: int, xid: int) -> None:
        """Deliver an XID critical-error event for GPU ``index`` to the next nvmlEventSetWait."""
        self._xids.put((index, xid))

    def calls(self, function: str, gpu: int | None = None) -> int:
        """Calls of ``function`` so far; with ``gpu``, only those whose first argument is a handle of it."""
        calls = getattr(self.module, function).call_args_list
        if gpu is None:
            return len(calls)
        return sum(1 for c in calls if c.args and self.gpu_of(c.args[0]) == gpu)

    def gpu_of(self, handle: Any) -> int | None:
        """The GPU index a device or MIG handle belongs to, or None."""
        entry = self._handles.get(_address(handle) or -1)
        return entry[0] if entry else None

    # ----------------------------------------------------------------------------------------------------
    # Internals shared by the fake functions

    def _text(self, value: str) -> str | bytes:
        return value.encode() if self.legacy_bytes else value

    def _check_up(self) -> None:
        if self.down_code is not None:
            raise _error(self.down_code)
        if not self.initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _handle(self, index: int, mig_slot: int | None = None) -> Any:
        key = (index, self.gpus[index].generation, mig_slot)
        if key not in self._handle_cache:
            target = pynvml.struct_c_nvmlDevice_t()
            handle = pynvml.c_nvmlDevice_t(target)
            address = ctypes.addressof(target)
            self._objects[address] = target
            self._handles[address] = key
            self._handle_cache[key] = handle
        return self._handle_cache[key]

    def _resolve(self, function: str, handle: Any) -> tuple[int, FakeGpu, FakeMig | None]:
        """Check NVML state, the handle and injected faults; return (index, gpu, mig or None)."""
        self._check_up()
        entry = self._handles.get(_address(handle) or -1)
        if entry is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        index, generation, mig_slot = entry
        gpu = self.gpus[index]
        if gpu.lost:
            raise _error(gpu.lost_code)
        if generation != gpu.generation:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)  # a handle from before a reset
        if function in gpu.errors:
            raise _error(gpu.errors[function])
        if function in gpu.raises:
            raise gpu.raises[function]
        mig = None
        if mig_slot is not None:
            if not gpu.mig_enabled or mig_slot >= len(gpu.mig_instances):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # the MIG device was destroyed
            mig = gpu.mig_instances[mig_slot]
        return index, gpu, mig

    def _new_pointer(self, struct_type: type, pointer_type: type) -> tuple[Any, int]:
        target = struct_type()
        address = ctypes.addressof(target)
        self._objects[address] = target
        return pointer_type(target), address


def _install(fake: FakeNvml) -> None:
    """Attach side effects to the autospecced functions."""
    module = fake.module
    P = pynvml

    def bind(name: str, function: Any) -> None:
        getattr(module, name).side_effect = function

    def device(name: str, parent_only: bool = True):
        """Decorator: resolve the handle (first argument) and pass (index, gpu, mig, *rest)."""

        def wrap(impl):
            def side_effect(handle, *args, **kwargs):
                index, gpu, mig = fake._resolve(name, handle)
                if parent_only and mig is not None:
                    raise _error(P.NVML_ERROR_NOT_SUPPORTED)
                return impl(index, gpu, mig, *args, **kwargs)

            bind(name, side_effect)
            return impl

        return wrap

    # -- library ------------------------------------------------------------------------------------------
    def init(*_args):
        if fake.init_error is not None:
            raise _error(fake.init_error)
        fake.initialized = True
        fake.down_code = None

    def shutdown():
        fake._check_up()
        fake.initialized = False

    def driver_version():
        fake._check_up()
        return fake._text(fake.driver_version)

    def device_count():
        fake._check_up()
        return len(fake.gpus)

    def handle_by_index(index):
        fake._check_up()
        if not 0 <= index < len(fake.gpus):
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        gpu = fake.gpus[index]
        if gpu.lost:
            raise _error(gpu.lost_code)
        if "nvmlDeviceGetHandleByIndex" in gpu.errors:
            raise _error(gpu.errors["nvmlDeviceGetHandleByIndex"])
        return fake._handle(index)

    def handle_by_uuid(uuid):
        fake._check_up()
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(fake.gpus):
            if gpu.uuid == uuid:
                if gpu.lost:
                    raise _error(gpu.lost_code)
                if "nvmlDeviceGetHandleByUUID" in gpu.errors:
                    raise _error(gpu.errors["nvmlDeviceGetHandleByUUID"])
                return fake._handle(index)
        raise _error(P.NVML_ERROR_NOT_FOUND)

    bind("nvmlInit", init)
    bind("nvmlInitWithFlags", init)
    bind("nvmlShutdown", shutdown)
    bind("nvmlSystemGetDriverVersion", driver_version)
    bind("nvmlDeviceGetCount", device_count)
    bind("nvmlDeviceGetHandleByIndex", handle_by_index)
    bind("nvmlDeviceGetHandleByUUID", handle_by_uuid)
    bind("nvmlErrorString", lambda code: P.NVMLError._errcode_to_string.get(code, f"NVML error {code}"))

    # -- identity -----------------------------------------------------------------------------------------
    @device("nvmlDeviceGetName")
    def _name(index, gpu, mig):
        return fake._text(gpu.name)

    @device("nvmlDeviceGetUUID", parent_only=False)
    def _uuid(index, gpu, mig):
        if mig is not None:
            return fake._text(mig.uuid or f"MIG-{gpu.uuid[4:]}-{mig.gpu_instance_id}-{mig.compute_instance_id}")
        return fake._text(gpu.uuid)

    @device("nvmlDeviceGetIndex")
    def _index(index, gpu, mig):
        return index

    def pci_info(index, gpu, mig):
        info = P.nvmlPciInfo_t()
        domain, bus, dev_fn = gpu.pci_bus_id.split(":")
        info.busId = gpu.pci_bus_id.encode()
        info.busIdLegacy = f"{int(domain, 16) & 0xFFFF:04X}:{bus}:{dev_fn}".encode()
        info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(dev_fn.split(".")[0], 16)
        return info

    device("nvmlDeviceGetPciInfo")(pci_info)
    device("nvmlDeviceGetPciInfo_v3")(pci_info)

    # -- power, energy, clocks, temperature ---------------------------------------------------------------
    device("nvmlDeviceGetPowerUsage")(lambda i, gpu, mig: gpu.power_mw)
    device("nvmlDeviceGetTotalEnergyConsumption")(lambda i, gpu, mig: gpu.energy_mj)
    device("nvmlDeviceGetEnforcedPowerLimit")(lambda i, gpu, mig: gpu.power_limit_mw)
    device("nvmlDeviceGetPowerManagementLimit")(lambda i, gpu, mig: gpu.power_limit_mw)
    device("nvmlDeviceGetPowerManagementDefaultLimit")(lambda i, gpu, mig: gpu.power_default_limit_mw)

    @device("nvmlDeviceGetClockInfo")
    def _clock(index, gpu, mig, clock_type):
        if clock_type in (P.NVML_CLOCK_SM, P.NVML_CLOCK_GRAPHICS):
            return gpu.sm_clock_mhz
        if clock_type == P.NVML_CLOCK_MEM:
            return gpu.memory_clock_mhz
        raise _error(P.NVML_ERROR_INVALID_ARGUMENT)

    def temperature(index, gpu, mig, sensor, *_version, **_kw):
        if sensor != P.NVML_TEMPERATURE_GPU:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_gpu

    device("nvmlDeviceGetTemperature")(temperature)
    device("nvmlDeviceGetTemperatureV")(temperature)

    device("nvmlDeviceGetCurrentClocksEventReasons")(lambda i, gpu, mig: gpu.clock_event_reasons)
    device("nvmlDeviceGetCurrentClocksThrottleReasons")(lambda i, gpu, mig: gpu.clock_event_reasons)

    @device("nvmlDeviceGetTotalEccErrors")
    def _ecc(index, gpu, mig, error_type, counter_type):
        if counter_type != P.NVML_VOLATILE_ECC:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)  # the stub only keeps volatile counts
        if error_type == P.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return gpu.ecc_corrected
        if error_type == P.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return gpu.ecc_uncorrected
        raise _error(P.NVML_ERROR_INVALID_ARGUMENT)

    # -- utilization and memory ---------------------------------------------------------------------------
    @device("nvmlDeviceGetUtilizationRates")
    def _utilization(index, gpu, mig):
        if gpu.mig_enabled:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)  # as on A100/H100 in MIG mode
        return P.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    @device("nvmlDeviceGetMemoryInfo", parent_only=False)
    def _memory(index, gpu, mig, version=None):
        if mig is not None:
            return P.c_nvmlMemory_t(
                total=mig.memory_total, free=mig.memory_total - mig.memory_used, used=mig.memory_used
            )
        if not version:
            used = gpu.memory_used + gpu.memory_reserved  # v1 counts reserved memory as used
            return P.c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_total - used, used=used)
        if gpu.memory_v2_error is not None:
            raise _error(gpu.memory_v2_error)
        if version != P.nvmlMemory_v2:
            raise _error(P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        info = P.c_nvmlMemory_v2_t()
        info.version = version
        info.total, info.reserved, info.used = gpu.memory_total, gpu.memory_reserved, gpu.memory_used
        info.free = gpu.memory_total - gpu.memory_reserved - gpu.memory_used
        return info

    # -- field values -------------------------------------------------------------------------------------
    # The fake driver's numbering, from its version: never from the module's constants (see DRIVER_NUMBERINGS).
    throttle_ids, smoothing_first = DRIVER_NUMBERINGS[driver_numbering(fake.driver_version)]

    def field_default(gpu: FakeGpu, field_id: int, scope: int) -> tuple[int, int, Any]:
        """(nvmlReturn, valueType, value) that a real H100 with this driver would give."""
        ull, uint = P.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, P.NVML_VALUE_TYPE_UNSIGNED_INT
        if field_id in (P.NVML_FI_DEV_POWER_INSTANT, P.NVML_FI_DEV_POWER_AVERAGE):
            if scope != P.NVML_POWER_SCOPE_GPU:
                return P.NVML_ERROR_NOT_SUPPORTED, 0, None  # no module/memory power rail on this board
            instant = field_id == P.NVML_FI_DEV_POWER_INSTANT
            return P.NVML_SUCCESS, uint, gpu.power_mw if instant else gpu.power_average_mw
        if field_id == P.NVML_FI_DEV_MEMORY_TEMP:
            return P.NVML_SUCCESS, uint, gpu.temperature_memory
        if field_id == P.NVML_FI_DEV_PCIE_COUNT_TX_BYTES:
            return P.NVML_SUCCESS, ull, gpu.pcie_tx_bytes
        if field_id == P.NVML_FI_DEV_PCIE_COUNT_RX_BYTES:
            return P.NVML_SUCCESS, ull, gpu.pcie_rx_bytes
        if field_id in (P.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, P.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
            total = gpu.nvlink_tx_kib if field_id == P.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX else gpu.nvlink_rx_kib
            if scope == _ALL_LINKS:
                return P.NVML_SUCCESS, ull, total
            if scope < gpu.nvlink_links:
                return P.NVML_SUCCESS, ull, total // gpu.nvlink_links
            return P.NVML_ERROR_INVALID_ARGUMENT, 0, None
        if field_id in throttle_ids:
            return P.NVML_SUCCESS, ull, gpu.throttle_ns.get(throttle_ids[field_id], 0)
        if smoothing_first is not None and 0 <= field_id - smoothing_first < POWER_SMOOTHING_COUNT:
            return P.NVML_SUCCESS, ull, gpu.power_smoothing[field_id - smoothing_first]
        return P.NVML_ERROR_NOT_SUPPORTED, 0, None

    @device("nvmlDeviceGetFieldValues")
    def _field_values(index, gpu, mig, field_ids):
        values = (P.c_nvmlFieldValue_t * len(field_ids))()
        requested = []
        for slot, request in enumerate(field_ids):
            field_id, scope = request if isinstance(request, tuple) else (request, 0)
            requested.append((field_id, scope))
            entry = values[slot]
            entry.fieldId, entry.scopeId = field_id, scope
            entry.timestamp = 1_700_000_000_000_000 + slot  # microseconds since the epoch
            if field_id in gpu.field_errors:
                entry.nvmlReturn = gpu.field_errors[field_id]
                continue
            code, value_type, value = field_default(gpu, field_id, scope)
            if field_id in gpu.field_values:
                value = gpu.field_values[field_id]
                if code != P.NVML_SUCCESS:  # a field the stub has no default for: answer it as a counter
                    code, value_type = P.NVML_SUCCESS, P.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            entry.nvmlReturn = code
            if code != P.NVML_SUCCESS:
                continue
            value_type = gpu.field_value_types.get(field_id, value_type)
            entry.valueType = value_type
            member = _VALUE_MEMBER[value_type]
            setattr(entry.value, member, float(value) if member == "dVal" else int(value))
        fake.field_requests.append(requested)
        return values

    # -- processes ----------------------------------------------------------------------------------------
    def processes(index, gpu, mig):
        # pynvml returns friendly objects, with usedGpuMemory already None where NVML said "not available".
        no_instance = 0xFFFFFFFF
        return [
            P.nvmlFriendlyObject(
                {"pid": p.pid, "usedGpuMemory": p.used_memory,
                 "gpuInstanceId": no_instance if p.gpu_instance_id is None else p.gpu_instance_id,
                 "computeInstanceId": no_instance if p.compute_instance_id is None else p.compute_instance_id}
            )
            for p in gpu.processes
        ]

    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2",
                 "nvmlDeviceGetComputeRunningProcesses_v3"):
        device(name)(processes)

    # -- per-process utilization --------------------------------------------------------------------------
    def fresh_samples(gpu: FakeGpu, mig: FakeMig | None, timestamp: int) -> list[FakeUtilizationSample]:
        """The buffer's samples stamped after ``timestamp``; NotSupported / NOT_FOUND as the driver answers."""
        if (mig is None and gpu.mig_enabled) or (mig is not None and not mig.process_utilization_supported):
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        buffer = mig.utilization_samples if mig is not None else gpu.utilization_samples
        fresh = [s for s in buffer if s.timestamp_us > timestamp]
        if not fresh:
            raise _error(P.NVML_ERROR_NOT_FOUND)
        return fresh

    @device("nvmlDeviceGetProcessUtilization", parent_only=False)
    def _process_utilization(index, gpu, mig, timestamp):
        return [
            P.c_nvmlProcessUtilizationSample_t(pid=s.pid, timeStamp=s.timestamp_us, smUtil=s.sm_percent,
                                               memUtil=s.memory_percent, encUtil=s.encoder_percent,
                                               decUtil=s.decoder_percent)
            for s in fresh_samples(gpu, mig, timestamp)
        ]

    @device("nvmlDeviceGetProcessesUtilizationInfo", parent_only=False)
    def _processes_utilization(index, gpu, mig, timestamp):
        return [
            P.c_nvmlProcessUtilizationInfo_v1_t(timeStamp=s.timestamp_us, pid=s.pid, smUtil=s.sm_percent,
                                                memUtil=s.memory_percent, encUtil=s.encoder_percent,
                                                decUtil=s.decoder_percent, jpgUtil=0, ofaUtil=0)
            for s in fresh_samples(gpu, mig, timestamp)
        ]

    # -- MIG ----------------------------------------------------------------------------------------------
    @device("nvmlDeviceGetMigMode")
    def _mig_mode(index, gpu, mig):
        if not gpu.mig_supported:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        mode = P.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else P.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    @device("nvmlDeviceGetMaxMigDeviceCount")
    def _max_mig(index, gpu, mig):
        if not gpu.mig_supported:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig_devices

    @device("nvmlDeviceGetMigDeviceHandleByIndex")
    def _mig_handle(index, gpu, mig, slot):
        if not gpu.mig_supported or not gpu.mig_enabled:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        if slot >= gpu.max_mig_devices:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        if slot >= len(gpu.mig_instances):
            raise _error(P.NVML_ERROR_NOT_FOUND)  # an empty slot
        return fake._handle(index, slot)

    @device("nvmlDeviceIsMigDeviceHandle", parent_only=False)
    def _is_mig(index, gpu, mig):
        return mig is not None

    @device("nvmlDeviceGetGpuInstanceId", parent_only=False)
    def _gi(index, gpu, mig):
        if mig is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        return mig.gpu_instance_id

    @device("nvmlDeviceGetComputeInstanceId", parent_only=False)
    def _ci(index, gpu, mig):
        if mig is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        return mig.compute_instance_id

    @device("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", parent_only=False)
    def _parent(index, gpu, mig):
        if mig is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        return fake._handle(index)

    # -- GPM ----------------------------------------------------------------------------------------------
    @device("nvmlGpmQueryDeviceSupport")
    def _gpm_support(index, gpu, mig):
        support = P.c_nvmlGpmSupport_t()
        support.version = P.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1 if gpu.gpm_supported else 0
        return support

    def gpm_alloc():
        fake._check_up()
        pointer, address = fake._new_pointer(P.struct_c_nvmlGpmSample_t, P.c_nvmlGpmSample_t)
        fake.gpm_samples[address] = None
        return pointer

    def gpm_free(sample):
        address = _address(sample)
        if address not in fake.gpm_samples:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        del fake.gpm_samples[address]

    def gpm_store(sample, snapshot: _GpmSnapshot):
        address = _address(sample)
        if address not in fake.gpm_samples:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        fake.gpm_samples[address] = snapshot
        return sample

    @device("nvmlGpmSampleGet")
    def _gpm_get(index, gpu, mig, sample):
        if not gpu.gpm_supported:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        snapshot = _GpmSnapshot(index, gpu.generation, None, next(fake._sequence), dict(gpu.gpm_metrics))
        return gpm_store(sample, snapshot)

    @device("nvmlGpmMigSampleGet")
    def _gpm_mig_get(index, gpu, mig, gpu_instance_id, sample):
        if not (gpu.gpm_supported and gpu.gpm_mig_supported and gpu.mig_enabled):
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        matching = [m for m in gpu.mig_instances if m.gpu_instance_id == gpu_instance_id]
        if not matching:
            raise _error(P.NVML_ERROR_NOT_FOUND)
        metrics = {P.NVML_GPM_METRIC_SM_UTIL: matching[0].sm_util_percent}
        return gpm_store(sample, _GpmSnapshot(index, gpu.generation, gpu_instance_id, next(fake._sequence), metrics))

    def gpm_metrics_get(request):
        fake._check_up()
        if request.version != P.NVML_GPM_METRICS_GET_VERSION:
            raise _error(P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first = fake.gpm_samples.get(_address(request.sample1) or -1)
        second = fake.gpm_samples.get(_address(request.sample2) or -1)
        # Real NVML needs two filled samples of the same source, the older one first.
        if first is None or second is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        source = (first.gpu, first.generation, first.gpu_instance_id)
        if source != (second.gpu, second.generation, second.gpu_instance_id):
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        if first.sequence >= second.sequence:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        gpu = fake.gpus[second.gpu]
        for slot in range(request.numMetrics):
            metric = request.metrics[slot]
            metric_id = metric.metricId
            if second.gpu_instance_id is None and metric_id in gpu.gpm_metric_errors:
                metric.nvmlReturn = gpu.gpm_metric_errors[metric_id]
            elif metric_id in second.metrics:
                metric.nvmlReturn = P.NVML_SUCCESS
                metric.value = second.metrics[metric_id]
            else:
                metric.nvmlReturn = P.NVML_ERROR_NOT_SUPPORTED
        return request

    bind("nvmlGpmSampleAlloc", gpm_alloc)
    bind("nvmlGpmSampleFree", gpm_free)
    bind("nvmlGpmMetricsGet", gpm_metrics_get)

    # -- events -------------------------------------------------------------------------------------------
    def event_set_create():
        fake._check_up()
        pointer, address = fake._new_pointer(P.struct_c_nvmlEventSet_t, P.c_nvmlEventSet_t)
        fake.event_sets[address] = {}
        return pointer

    @device("nvmlDeviceRegisterEvents")
    def _register(index, gpu, mig, event_types, event_set):
        registered = fake.event_sets.get(_address(event_set) or -1)
        if registered is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        if event_types & P.nvmlEventTypeXidCriticalError and not gpu.xid_supported:
            raise _error(P.NVML_ERROR_NOT_SUPPORTED)
        registered[index] = fake._handle(index)

    @device("nvmlDeviceGetSupportedEventTypes")
    def _supported_events(index, gpu, mig):
        return P.nvmlEventTypeXidCriticalError if gpu.xid_supported else P.nvmlEventTypeNone

    def event_set_wait(event_set, timeout_ms):
        fake._check_up()
        registered = fake.event_sets.get(_address(event_set) or -1)
        if registered is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        try:
            index, xid = fake._xids.get(timeout=min(timeout_ms / 1000, fake.max_wait_s))
        except queue.Empty:
            raise _error(P.NVML_ERROR_TIMEOUT) from None
        if index not in registered:
            raise _error(P.NVML_ERROR_TIMEOUT)  # an event for a GPU this set does not watch
        data = P.c_nvmlEventData_t()
        data.device = registered[index]
        data.eventType = P.nvmlEventTypeXidCriticalError
        data.eventData = xid
        data.gpuInstanceId = data.computeInstanceId = 0xFFFFFFFF
        return data

    def event_set_free(event_set):
        if fake.event_sets.pop(_address(event_set) or -1, None) is None:
            raise _error(P.NVML_ERROR_INVALID_ARGUMENT)
        fake.freed_event_sets += 1

    bind("nvmlEventSetCreate", event_set_create)
    bind("nvmlEventSetWait", event_set_wait)
    bind("nvmlEventSetWait_v2", event_set_wait)
    bind("nvmlEventSetFree", event_set_free)


def make_nvml_stub(
    devices: list[FakeGpu] | None = None,
    *,
    driver_version: str = "580.95.05",
    legacy_bytes: bool = False,
    init_error: int | None = None,
    binding_numbering: str | None = None,
) -> Any:
    """A pynvml stand-in over ``devices`` (default: two H100-like GPUs); its state is ``stub.fake``.

    ``driver_version`` decides how the fake driver numbers the throttle-time and power-smoothing fields
    (``DRIVER_NUMBERINGS``). ``binding_numbering`` ("251" or "269") gives the module the constants of a
    pynvml release of that numbering, as installed against any driver (default: the real module's).
    ``legacy_bytes`` answers names, UUIDs and the driver version as bytes, like pynvml before 11.5.
    ``init_error`` makes nvmlInit raise that NVML error code (also settable later as ``stub.fake.init_error``).
    """
    module = mock.create_autospec(pynvml)
    for name in dir(pynvml):
        value = getattr(pynvml, name)
        # Real constants, ctypes types/structs and NVMLError classes: autospec would turn them into mocks.
        if isinstance(value, (type, int, float, str, bytes, ctypes._SimpleCData)):
            setattr(module, name, value)
        elif isinstance(value, types.FunctionType) and name.startswith("nvml"):
            getattr(module, name).side_effect = _not_implemented(name)
    module.nvmlExceptionClass = pynvml.nvmlExceptionClass  # pure lookup, no library call
    for name, value in BINDING_NUMBERINGS.get(binding_numbering or "", {}).items():
        setattr(module, name, value)
    fake = FakeNvml(module, devices if devices is not None else default_gpus(), driver_version, legacy_bytes)
    fake.init_error = init_error
    _install(fake)
    module.fake = fake
    return module


def _not_implemented(name: str):
    def side_effect(*_args, **_kwargs):
        raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    side_effect.__name__ = f"{name}_not_in_stub"
    return side_effect
