"""NVML GPU backend: reads NVIDIA GPUs through nvidia-ml-py (module ``pynvml``).

Only this module imports ``pynvml`` (lazily, in the constructor); tests pass a stub module instead. Units
are converted here, once: NVML's milliwatts, millijoules, MHz, percent, KiB and nanoseconds become watts,
joules, hertz, ratios 0..1, bytes and seconds.

Error handling lives in one place, ``NvmlBackend._on_error``, driven by the table ``_ACTION_BY_ERROR``:

- NotSupported / FunctionNotFound / NoPermission / ArgumentVersionMismatch: the field is dropped for that
  device (never called again), logged once at INFO, and ``field_status`` says why. FunctionNotFound and
  ArgumentVersionMismatch first try the next, older variant of a versioned function, where there is one.
- NotFound / NoData: no value this tick only.
- GpuIsLost / ResetRequired / Unknown: the device is down (``up=False``) and is re-acquired by UUID with
  exponential backoff on later ticks.
- Uninitialized / DriverNotLoaded: NVML itself is re-initialised with backoff; every device is down until then.
- LibRmVersionMismatch: ``NvmlFatalError`` (the driver changed under a running agent; restart it).
- Anything else: no value this tick, counted in ``error_counts()``.

Those are the outcomes of whole calls. A per-entry return code (one ``nvmlFieldValue_t`` of a
``nvmlDeviceGetFieldValues`` batch, one metric of ``nvmlGpmMetricsGet``) speaks for that entry alone: it
drops or skips that field, or is counted, and never takes the device or NVML down (a GPU that is really
lost fails the whole calls of the same tick). A Python exception while reading one device (a binding that
returns something unexpected) loses that device's sample for the tick, counted; the other GPUs are read
as usual, and a device that fails that way on ``EXCEPTIONS_BEFORE_DOWN`` reads in a row is marked down.
Every error is logged the first time it happens (per device, field and error) and counted from then on.

Throttle-time field ids are chosen from the driver's version, not from pynvml's constants: the driver
interprets the id, and the ids moved between driver releases (see ``throttle_field_ids``).

GPM rates live in ``nvml_gpm.py``, the XID event thread in ``nvml_xid.py``, and each process's share of
the GPU's activity (read with the process list) in ``nvml_processes.py``.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import (
    THROTTLE_REASONS,
    FatalProbeError,
    FieldStatus,
    GpuInfo,
    GpuProcess,
    GpuSample,
    MigInstance,
    ProbeOutcome,
    ProbeUnavailable,
)
from .nvml_gpm import DEVICE_METRICS, MIG_METRICS, GpmMetric, GpmPair
from .nvml_processes import UTILIZATION_FUNCTIONS, ProcessActivity, ProcessShares, samples_from_nvml, with_activity
from .nvml_xid import ERROR_PAUSE_S, XidWatcher

BACKOFF_INITIAL_S = 1.0  # first retry of a lost device or of nvmlInit
BACKOFF_MAX_S = 30.0  # the delay doubles up to this
# A device whose reads raise a Python exception this many ticks in a row is marked down (re-acquired with
# backoff), so that a read that can never succeed shows as wattledger_gpu_up 0 instead of a frozen GPU.
EXCEPTIONS_BEFORE_DOWN = 10
UINT_MAX = 0xFFFFFFFF  # scopeId meaning "all NVLink links, summed" (nvml.h, NVLink throughput fields)
POWER_SCOPE_GPU = 0  # NVML_POWER_SCOPE_GPU: the GPU alone, not the module (GPU + CPU on Grace Hopper)
# ECC error counts and the enforced power limit change rarely (an ECC event; nvidia-smi -pl or a data
# centre's power-capping controller) yet cost an NVML call each, three per GPU per tick at 10 Hz. They are
# read this often instead, and each sample carries the last value in between, so their series never flap.
# A double-bit ECC error still shows at once as XID 48 through the event thread (nvml_xid.py).
SLOW_FIELDS_INTERVAL_S = 10.0
# The slow-cadence reads: (probe, pynvml function, pynvml constants passed after the handle, NVML unit -> SI).
SLOW_FIELD_CALLS: tuple[tuple[str, str, tuple[str, ...], float], ...] = (
    ("power_limit_watts", "nvmlDeviceGetEnforcedPowerLimit", (), 1e-3),  # mW -> W
    ("ecc_corrected_errors", "nvmlDeviceGetTotalEccErrors",
     ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_VOLATILE_ECC"), 1),
    ("ecc_uncorrected_errors", "nvmlDeviceGetTotalEccErrors",
     ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC"), 1),
)

# Values NVML uses for "not available" in unsigned results (NVML_VALUE_NOT_AVAILABLE_uint / _ulonglong).
_NOT_AVAILABLE = (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


class NvmlUnavailable(ProbeUnavailable):
    """NVML cannot be used now. ``library_found``: libnvidia-ml loaded (a driver is installed) but failed."""

    def __init__(self, message: str, library_found: bool) -> None:
        super().__init__(message)
        self.library_found = library_found


class NvmlFatalError(FatalProbeError):
    """NVML cannot go on in this process: the user-space library and the kernel driver differ in version.

    Raised from ``sample()`` on NVML_ERROR_LIB_RM_VERSION_MISMATCH, which happens when the driver is updated
    under a running agent. Nothing but a new process (after the new kernel module is loaded) fixes it, so
    the agent exits and its supervisor restarts it: a ``FatalProbeError``, which the sampler does not swallow.
    """


# The sub-probes ``probe_status`` reports. Failures of these probes (GPM as a whole, the MIG instances'
# GPM, one GPM metric) count against "gpu.gpm"; every other failure against "gpu.fields".
SUB_PROBES = ("gpu.fields", "gpu.gpm", "gpu.xid")
_GPM_PROBES = frozenset({"gpm", "mig_gpm", *(m.field for m in DEVICE_METRICS)})
# An XID event-wait failure keeps "gpu.xid" failing this long after it (the thread pauses between tries).
XID_FAILURE_HOLD_S = 2 * ERROR_PAUSE_S


# ---------------------------------------------------------------------------------------------------------
# The translation table: what each NVML error means for the field or device that returned it.


class _Action(enum.Enum):
    DROP = "drop"  # this field does not exist on this device: stop reading it
    SKIP = "skip"  # no value right now (no samples yet): None this tick only
    DEVICE_DOWN = "device_down"  # re-acquire the device by UUID, with backoff
    LIBRARY_DOWN = "library_down"  # re-initialise NVML, with backoff
    FATAL = "fatal"  # exit for a supervisor restart
    COUNT = "count"  # unexpected: None this tick, counted


_ACTION_BY_ERROR: dict[str, _Action] = {
    "NVML_ERROR_NOT_SUPPORTED": _Action.DROP,
    "NVML_ERROR_FUNCTION_NOT_FOUND": _Action.DROP,  # the installed driver predates the function
    "NVML_ERROR_NO_PERMISSION": _Action.DROP,  # will not change without a restart as another user
    # The driver does not know the struct version this pynvml sends (pynvml newer than the driver), after
    # any older variant of the function was tried: it will not start knowing it while the driver is loaded.
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": _Action.DROP,
    "NVML_ERROR_NOT_FOUND": _Action.SKIP,
    "NVML_ERROR_NO_DATA": _Action.SKIP,
    "NVML_ERROR_GPU_IS_LOST": _Action.DEVICE_DOWN,
    "NVML_ERROR_RESET_REQUIRED": _Action.DEVICE_DOWN,
    "NVML_ERROR_UNKNOWN": _Action.DEVICE_DOWN,  # in practice a GPU that stopped answering
    "NVML_ERROR_UNINITIALIZED": _Action.LIBRARY_DOWN,
    "NVML_ERROR_DRIVER_NOT_LOADED": _Action.LIBRARY_DOWN,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": _Action.FATAL,
}


class _ErrorCodes:
    """Names and actions of NVML return codes, read from the pynvml module in use (real or stub)."""

    def __init__(self, nvml: Any) -> None:
        self._names: dict[int, str] = {}
        for attr in dir(nvml):
            if attr.startswith("NVML_ERROR_"):
                code = getattr(nvml, attr)
                if isinstance(code, int):
                    self._names.setdefault(code, attr)
        self._actions = {getattr(nvml, n): a for n, a in _ACTION_BY_ERROR.items() if hasattr(nvml, n)}

    def name(self, code: int) -> str:
        return self._names.get(code, f"NVML error {code}")

    def action(self, code: int) -> _Action:
        return self._actions.get(code, _Action.COUNT)

    def entry_action(self, code: int) -> _Action:
        """What a per-entry return code means: the same as for a call, but it never escalates.

        One field of a batch (or one GPM metric) answering Unknown, GpuIsLost or even a version mismatch
        says nothing certain about the device: the whole calls in the same tick do. So codes that would
        take a device or NVML down only count against that entry.
        """
        action = self.action(code)
        if action in (_Action.DEVICE_DOWN, _Action.LIBRARY_DOWN, _Action.FATAL):
            return _Action.COUNT
        return action


class _DeviceDown(Exception):
    """Internal: unwinds one device's read when NVML says the GPU is gone. The message is the error name."""


class _LibraryDown(Exception):
    """Internal: unwinds the tick when NVML itself is uninitialised or the driver is not loaded."""


# ---------------------------------------------------------------------------------------------------------
# What is read, and how it is named in field_status.


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    """One nvmlDeviceGetFieldValues entry."""

    probe: str  # field_status name (a GpuSample field, or "throttle_seconds.<reason>")
    constants: tuple[str, ...]  # pynvml names of the field id, newest first
    scope: int  # scopeId on the request
    scale: float  # NVML unit -> SI unit
    integer: bool  # counters stay integers
    throttle_reason: str | None = None  # set for the cumulative throttle-time fields


_FIELD_SPECS: tuple[_FieldSpec, ...] = (
    # nvidia-smi power.draw.instant / power.draw.average, milliwatts.
    _FieldSpec("power_watts", ("NVML_FI_DEV_POWER_INSTANT",), POWER_SCOPE_GPU, 1e-3, False),
    _FieldSpec("power_average_watts", ("NVML_FI_DEV_POWER_AVERAGE",), POWER_SCOPE_GPU, 1e-3, False),
    _FieldSpec("temperature_memory_celsius", ("NVML_FI_DEV_MEMORY_TEMP",), 0, 1.0, False),  # HBM
    _FieldSpec("pcie_transmit_bytes", ("NVML_FI_DEV_PCIE_COUNT_TX_BYTES",), 0, 1, True),
    _FieldSpec("pcie_receive_bytes", ("NVML_FI_DEV_PCIE_COUNT_RX_BYTES",), 0, 1, True),
    # Payload only (DATA, not RAW with protocol overhead), KiB, all links summed via scopeId UINT_MAX.
    _FieldSpec("nvlink_transmit_bytes", ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX",), UINT_MAX, 1024, True),
    _FieldSpec("nvlink_receive_bytes", ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX",), UINT_MAX, 1024, True),
    # Cumulative time clocks were held down for each reason, nanoseconds. No constants: the field ids come
    # from the driver's version (throttle_field_ids), because they moved between driver releases.
    *(
        _FieldSpec(f"throttle_seconds.{reason}", (), 0, 1e-9, False, reason)
        for reason in ("sw_power_cap", "sync_boost", "sw_thermal_slowdown", "hw_thermal_slowdown",
                       "hw_power_brake_slowdown")
    ),
)

# ---------------------------------------------------------------------------------------------------------
# Throttle-time field ids, by driver version.
#
# The driver interprets a field id, so the id must be the one the running driver's nvml.h defines, whatever
# pynvml is installed (nvidia-ml-py >= 12.535 allows bindings of every numbering below against any driver).
# Checked against nvml.h (NVIDIA/go-nvml, NVML 12.6 - 13.3) and the pynvml.py of nvidia-ml-py 12.535.161,
# 12.560.30, 12.570.172, 12.575.51, 13.580.65, 13.580.82, 13.580.126, 13.590.48, 13.595.45, 13.610.43
# and 13.615.71 (each binding is generated from the nvml.h of the driver release it is numbered after):
#
# - 74 (SW power cap) and 76 (sync boost) are NVML_FI_DEV_PERF_POLICY_POWER / _SYNC_BOOST, the same ids
#   in every release (the CLOCKS_EVENT_REASON names are aliases of them since 575).
# - Drivers before 575 have no SW/HW thermal or power-brake counters. In 570, 251-268 are power smoothing
#   (NVML_FI_PWR_SMOOTHING_ENABLED = 251, ...), and 269 and up do not exist.
# - 575.x and 580.65: SW thermal 251, HW thermal 252, HW power brake 253 (power smoothing moved to 256+).
# - 580.82 and newer (590, 595, 610, 615): SW thermal 269, HW thermal 270, HW power brake 271, and 251-268
#   are power smoothing again, as in 570.
# - Between 580.65 and 580.82 (580.76) and after the newest branch checked, the numbering is not known, and
#   a wrong guess would read a power-smoothing setting as nanoseconds of throttling: those counters are
#   dropped, with the reason in field_status. SW power cap and sync boost are read on every driver.
#
# Update NEWEST_CHECKED_DRIVER_BRANCH (and the table, if the ids moved) after checking a new branch's nvml.h.
NEWEST_CHECKED_DRIVER_BRANCH = 615
_STABLE_THROTTLE_IDS: dict[str, int] = {"sw_power_cap": 74, "sync_boost": 76}
_THERMAL_AND_BRAKE = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
_DriverVersion = tuple[int, ...]
# [first, end) driver versions -> ids of _THERMAL_AND_BRAKE, or why there are none.
_THERMAL_IDS_BY_DRIVER: tuple[tuple[_DriverVersion, _DriverVersion, tuple[int, int, int] | str], ...] = (
    ((0,), (575,), "the driver has no such counter before 575 (251-268 are power-smoothing fields in 570)"),
    ((575,), (580, 66), (251, 252, 253)),
    ((580, 66), (580, 82), "field ids unknown for drivers between 580.65 and 580.82 (they moved from 251-253 "
                           "to 269-271)"),
    ((580, 82), (NEWEST_CHECKED_DRIVER_BRANCH + 1,), (269, 270, 271)),
)
# The value types an unsigned 64-bit nanosecond counter can come in (c_ulong is 64 bits on Linux): a
# throttle-time id answering another type names some other field on this driver.
_THROTTLE_VALUE_TYPES = ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG",) + (
    ("NVML_VALUE_TYPE_UNSIGNED_LONG",) if ctypes.sizeof(ctypes.c_ulong) == 8 else ()
)


def parse_driver_version(text: str) -> _DriverVersion | None:
    """``"580.82.07"`` -> ``(580, 82, 7)``; None when it is not dot-separated numbers."""
    parts = text.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def throttle_field_ids(driver_version: str) -> tuple[dict[str, int], dict[str, str]]:
    """Field ids of the cumulative throttle-time counters that ``driver_version`` defines.

    Returns ({reason: field id}, {reason: why it has no id}) over every reason with a counter. The ids are
    the driver's (see the table above), never pynvml's constants.
    """
    ids = dict(_STABLE_THROTTLE_IDS)
    version = parse_driver_version(driver_version)
    if version is None:
        why: tuple[int, int, int] | str = f"driver version {driver_version!r} could not be read, so its " \
                                          "throttle-counter field ids are not known"
    else:
        why = (f"driver {driver_version} is newer than the newest whose field ids wattledger knows "
               f"({NEWEST_CHECKED_DRIVER_BRANCH}.x)")
        for first, end, entry in _THERMAL_IDS_BY_DRIVER:
            if first <= version < end:
                why = entry
                break
    if isinstance(why, str):
        return ids, {reason: why for reason in _THERMAL_AND_BRAKE}
    ids.update(zip(_THERMAL_AND_BRAKE, why))
    return ids, {}


# THROTTLE_REASONS name -> suffix of the bit constant (nvmlClocksEventReason<X>, or older
# nvmlClocksThrottleReason<X>). Bits without a THROTTLE_REASONS name (board limit, reliability) are ignored.
_REASON_BITS: dict[str, str] = {
    "gpu_idle": "GpuIdle",
    "applications_clocks_setting": "ApplicationsClocksSetting",
    "sw_power_cap": "SwPowerCap",
    "hw_slowdown": "HwSlowdown",
    "sync_boost": "SyncBoost",
    "sw_thermal_slowdown": "SwThermalSlowdown",
    "hw_thermal_slowdown": "HwThermalSlowdown",
    "hw_power_brake_slowdown": "HwPowerBrakeSlowdown",
    "display_clock_setting": "DisplayClockSetting",
}

# Field-value union member for each NVML_VALUE_TYPE_*, and the all-ones "not available" value of the
# unsigned ones (c_ulong is 32 or 64 bits depending on the platform).
_UNION_MEMBERS: dict[str, tuple[str, int | None]] = {
    "NVML_VALUE_TYPE_DOUBLE": ("dVal", None),
    "NVML_VALUE_TYPE_UNSIGNED_INT": ("uiVal", 0xFFFFFFFF),
    "NVML_VALUE_TYPE_UNSIGNED_LONG": ("ulVal", (1 << (8 * ctypes.sizeof(ctypes.c_ulong))) - 1),
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": ("ullVal", 0xFFFFFFFFFFFFFFFF),
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": ("sllVal", None),
    "NVML_VALUE_TYPE_SIGNED_INT": ("siVal", None),
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": ("usVal", 0xFFFF),
}

# field_status rows: (name, probes whose failure makes it unavailable). Names are GpuInfo / GpuSample
# fields where one exists; "gpm", "mig_memory", "mig_gpm", "xid_events" and "device" describe probes.
_STATUS_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model_name", ("model_name",)),
    ("pci_bus_id", ("pci_bus_id",)),
    ("power_limit_default_watts", ("power_limit_default_watts",)),
    ("utilization_gpu_ratio", ("utilization",)),
    ("utilization_memory_controller_ratio", ("utilization",)),
    *((m.field, ("gpm", m.field)) for m in DEVICE_METRICS if m.field.endswith("_ratio")),
    ("memory_used_bytes", ("memory",)),
    ("memory_total_bytes", ("memory",)),
    ("memory_reserved_bytes", ("memory", "memory_reserved_bytes")),
    ("power_watts", ("power_watts",)),
    ("power_average_watts", ("power_average_watts",)),
    ("energy_joules", ("energy_joules",)),
    ("power_limit_watts", ("power_limit_watts",)),
    ("sm_clock_hertz", ("sm_clock_hertz",)),
    ("memory_clock_hertz", ("memory_clock_hertz",)),
    ("temperature_gpu_celsius", ("temperature_gpu_celsius",)),
    ("temperature_memory_celsius", ("temperature_memory_celsius",)),
    ("pcie_transmit_bytes", ("pcie_transmit_bytes",)),
    ("pcie_receive_bytes", ("pcie_receive_bytes",)),
    ("nvlink_transmit_bytes", ("nvlink_transmit_bytes",)),
    ("nvlink_receive_bytes", ("nvlink_receive_bytes",)),
    *((m.field, ("gpm", m.field)) for m in DEVICE_METRICS if not m.field.endswith("_ratio")),
    ("throttle_reasons", ("throttle_reasons",)),
    ("ecc_corrected_errors", ("ecc_corrected_errors",)),
    ("ecc_uncorrected_errors", ("ecc_uncorrected_errors",)),
    ("processes", ("processes",)),
    # Per-process SM / memory-controller shares (GpuProcess ratios): on the GPU without MIG, per MIG device.
    ("process_utilization", ("processes", "process_utilization")),
    ("mig_instances", ("mig_instances",)),
    ("mig_memory", ("mig_instances", "mig_memory")),
    ("mig_gpm", ("mig_instances", "mig_gpm")),
    ("mig_process_utilization", ("processes", "mig_instances", "mig_process_utilization")),
    ("gpm", ("gpm",)),
)


def _available(value: Any) -> Any:
    """None for NVML's all-ones "not available" values, else the value."""
    if value is None or value in _NOT_AVAILABLE:
        return None
    return value


def _scaled(value: Any, scale: float) -> float | None:
    value = _available(value)
    return None if value is None else value * scale


def _ratio(percent: Any) -> float | None:
    """NVML integer percent -> ratio 0..1."""
    percent = _available(percent)
    if percent is None:
        return None
    return min(max(percent / 100.0, 0.0), 1.0)


def _instance_id(process: Any, attribute: str) -> int | None:
    """A MIG instance id of a process entry; None without MIG (all-ones) or on bindings without the field."""
    value = _available(getattr(process, attribute, None))
    return None if value is None else int(value)


def _text(value: Any) -> str:
    """pynvml returns str since 11.5 and bytes before; ctypes char arrays in structs are always bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@dataclass(frozen=True, slots=True)
class _MigSlot:
    handle: Any
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str


@dataclass(eq=False)
class _Device:
    """Everything the backend keeps about one GPU between ticks."""

    index: int
    uuid: str
    handle: Any
    model_name: str = "unknown"
    pci_bus_id: str | None = None
    memory_total_bytes: int | None = None
    power_limit_default_watts: float | None = None
    mig_enabled: bool = False
    up: bool = True
    down_reason: str | None = None
    retry_at_ns: int = 0
    backoff_s: float = BACKOFF_INITIAL_S
    dropped: dict[str, str] = field(default_factory=dict)  # probe -> why it is never read again
    transient: dict[str, str] = field(default_factory=dict)  # probe -> why it had no value last read
    newest: dict[str, int] = field(default_factory=dict)  # probe -> index of the function variant in use
    memory_v1: bool = False  # nvmlDeviceGetMemoryInfo v2 failed once: use v1 from then on
    gpm_supported: bool | None = None  # nvmlGpmQueryDeviceSupport, asked once
    gpm: GpmPair | None = None
    processes: tuple[GpuProcess, ...] | None = None
    processes_at_ns: int | None = None
    # Per-process utilization state: key None for the whole GPU, else the MIG device's UUID.
    activity: dict[str | None, ProcessActivity] = field(default_factory=dict)
    mig_slots: tuple[_MigSlot, ...] | None = None
    mig_at_ns: int | None = None
    mig_gpm: dict[int, GpmPair] = field(default_factory=dict)  # GPU instance id -> sample pair
    # Slow-cadence probe -> (monotonic ns of its last successful read, the value read then).
    slow_reads: dict[str, tuple[int, Any]] = field(default_factory=dict)
    exceptions_in_a_row: int = 0  # reads that raised a Python exception, reset by a read that did not


class NvmlBackend:
    """Reads every NVIDIA GPU on the host through NVML. Implements ``GpuBackend``.

    ``nvml`` is the pynvml module (imported here when None). ``clock_ns`` stamps samples and paces the
    slow reads and the backoffs. Compute process lists and the MIG instance list are refreshed every
    ``process_interval_s`` (their calls cost milliseconds), with each process's share of the GPU's activity
    over that interval (``nvml_processes.py``; ``wall_clock_us`` is the realtime clock NVML stamps those
    samples with); between refreshes a sample carries the last list. ECC error counts and the enforced
    power limit are read every ``slow_interval_s`` seconds (``SLOW_FIELDS_INTERVAL_S``) and carried the
    same way. ``enable_gpm`` / ``enable_xid`` switch off GPM rates and the XID event thread.

    Raises ``NvmlUnavailable`` (a ``ProbeUnavailable``, one line) when NVML cannot be used at all.
    ``sample()`` raises ``NvmlFatalError`` when the driver was replaced under the running process.
    """

    name = "nvml"
    simulated = False
    devices_generation = 0  # the GPUs are found once, at open (a lost one stays in the list, down)

    def __init__(
        self,
        nvml: Any = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        process_interval_s: float = 1.0,
        slow_interval_s: float = SLOW_FIELDS_INTERVAL_S,
        enable_gpm: bool = True,
        enable_xid: bool = True,
        logger: logging.Logger | None = None,
        wall_clock_us: Callable[[], int] | None = None,
    ) -> None:
        self._log = logger or logging.getLogger(__name__)
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise NvmlUnavailable(
                    "NVML unavailable: the Python package nvidia-ml-py (module pynvml) is not installed",
                    library_found=False,
                ) from None
        self._nvml = nvml
        self._codes = _ErrorCodes(nvml)
        self._next_variant_codes = {
            getattr(nvml, name) for name in ("NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_ARGUMENT_VERSION_MISMATCH")
            if hasattr(nvml, name)
        }
        self._clock = clock_ns
        # NVML stamps per-process utilization samples with the host's realtime clock, in microseconds.
        self._wall_clock_us = wall_clock_us or (lambda: time.time_ns() // 1000)
        self._interval_ns = int(process_interval_s * 1e9)
        self._slow_interval_ns = int(slow_interval_s * 1e9)
        self._enable_gpm = enable_gpm
        self._errors: dict[tuple[int | None, str, str], int] = {}
        self._errors_lock = threading.Lock()
        self._library_down: str | None = None  # error name while NVML needs re-initialising
        self._library_retry_ns = 0
        self._library_backoff_s = BACKOFF_INITIAL_S
        self._closed = False
        self._xid: XidWatcher | None = None
        # The sub-probes' outcomes of the last sample() (probe_status), and what the tick gathers for them.
        self._outcomes: list[ProbeOutcome] = []
        self._tick_problems: dict[str, str] = {}  # sub-probe -> the first problem of this tick
        self._gpm_ns = 0  # nanoseconds spent reading GPM this tick
        self._xid_errors_seen = 0
        self._xid_failed_at_ns: int | None = None
        # Per-process utilization: "no sample since the timestamp" (NOT_FOUND; NVML_SUCCESS is how pynvml
        # raises a size query that answered success with no samples: pynvml.py, nvmlDeviceGetProcessUtilization)
        # and the codes that move on to the older function.
        self._no_sample_codes = {
            getattr(nvml, name) for name in ("NVML_ERROR_NOT_FOUND", "NVML_SUCCESS") if hasattr(nvml, name)
        }
        self._utilization_fallback_codes = self._next_variant_codes | (
            {nvml.NVML_ERROR_NOT_SUPPORTED} if hasattr(nvml, "NVML_ERROR_NOT_SUPPORTED") else set())
        self._resolve_constants()

        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            library_found = err.value != getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", None)
            raise NvmlUnavailable(self._unavailable("nvmlInit", err.value), library_found) from None
        try:
            self._driver_version = self._read_driver_version()
            self._resolve_throttle_ids(self._driver_version)
            self._devices = self._open_devices()
        except (nvml.NVMLError, _LibraryDown) as err:
            self._shutdown_quietly()
            code = err.value if isinstance(err, nvml.NVMLError) else None
            raise NvmlUnavailable(self._unavailable("opening the GPUs", code, str(err)), True) from None
        except (ProbeUnavailable, NvmlFatalError) as err:
            self._shutdown_quietly()
            raise NvmlUnavailable(str(err).splitlines()[0], True) from None
        if enable_xid:
            self._xid = XidWatcher(nvml, self._codes.name, self._log)
            self._xid.register([(d.index, d.handle) for d in self._devices if d.up])
            self._xid.start()

    # ----------------------------------------------------------------------------------------------------
    # GpuBackend

    def devices(self) -> list[GpuInfo]:
        """One GpuInfo per GPU in NVML index order (GPUs that could not be opened at all are left out).

        model_name: nvidia-smi name; driver_version: driver_version; memory_total_bytes: memory.total
        (bytes, MiB there); power_limit_default_watts: power.default_limit (W); pci_bus_id: pci.bus_id;
        mig_enabled: mig.mode.current, as of the last MIG refresh.
        """
        return [
            GpuInfo(
                index=d.index,
                uuid=d.uuid,
                model_name=d.model_name,
                driver_version=self._driver_version,
                memory_total_bytes=d.memory_total_bytes,
                power_limit_default_watts=d.power_limit_default_watts,
                simulated=False,
                pci_bus_id=d.pci_bus_id,
                mig_enabled=d.mig_enabled,
            )
            for d in self._devices
        ]

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU, in index order. A lost GPU gives ``up=False`` and no values."""
        if self._closed:
            raise RuntimeError("NvmlBackend.sample() after close()")
        started_ns = self._clock()
        self._tick_problems = {}
        self._gpm_ns = 0
        if self._library_down is not None:
            self._try_reinit()
        samples = []
        for dev in self._devices:
            if self._library_down is not None:
                samples.append(self._down_sample(dev))
                continue
            sample = self._sample_device_guarded(dev)
            if sample is not None:
                samples.append(sample)
        self._outcomes = self._sub_probe_outcomes(started_ns)
        return samples

    def field_status(self, index: int) -> list[FieldStatus]:
        """Which fields work on GPU ``index`` and why not, as of the last ``sample()``.

        Unsupported fields carry the NVML error name (e.g. "NVML_ERROR_NOT_SUPPORTED"); supported fields
        that had no value on the last read carry the reason for that read.
        """
        dev = self._device(index)
        rows = [self._status_row(dev, name, probes) for name, probes in _STATUS_ROWS]
        if not dev.mig_enabled:
            rows = [
                FieldStatus(r.name, r.supported, r.reason or "MIG mode is disabled on this GPU")
                if r.name.startswith("mig_") and r.supported else r
                for r in rows
            ]
        else:  # the GPU's own per-process samples are not kept in MIG mode: see mig_process_utilization
            rows = [
                FieldStatus(r.name, r.supported, r.reason or "read per MIG device (MIG mode is enabled)")
                if r.name == "process_utilization" and r.supported else r
                for r in rows
            ]
        rows.extend(self._throttle_status(dev))
        rows.append(self._xid_status(dev))
        rows.append(FieldStatus("device", dev.up, dev.down_reason))
        return rows

    def close(self) -> None:
        """Stop the XID thread, free GPM samples and shut NVML down. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._xid is not None:
            self._xid.close()
        for dev in self._devices:
            self._free_gpm(dev)
        self._shutdown_quietly()

    # ----------------------------------------------------------------------------------------------------
    # Extras

    def xid_counts(self) -> dict[tuple[int, int], int]:
        """XID critical errors seen since start: (gpu index, xid) -> count. Safe from any thread."""
        return self._xid.counts() if self._xid is not None else {}

    def probe_status(self) -> list[ProbeOutcome]:
        """How the last ``sample()`` went for each sub-probe (``SUB_PROBES``):

        - ``gpu.fields``: every GPU up and read without an unexpected error (the first problem otherwise);
          its duration is the whole read but GPM's.
        - ``gpu.gpm``: GPM read on every GPU that is up; a GPU without GPM (before Hopper, or disabled) is a
          failure with the reason, as a host without RAPL is.
        - ``gpu.xid``: the XID event thread registered on every GPU that is up and waiting without errors
          (failing for ``XID_FAILURE_HOLD_S`` after a failed wait); the thread waits on its own, so the
          duration is that of checking on it.
        """
        return self._outcomes

    def error_counts(self) -> dict[tuple[int | None, str, str], int]:
        """Unexpected NVML errors: (gpu index, probe, error name) -> count. Index None: the XID thread.

        Expected outcomes (unsupported fields, no data yet, lost devices) are not counted here; they show
        in ``field_status`` and in ``up``.
        """
        with self._errors_lock:
            counts = dict(self._errors)
        if self._xid is not None:
            for name, n in self._xid.errors().items():
                counts[(None, "xid_events", name)] = n
        return counts

    # ----------------------------------------------------------------------------------------------------
    # The one translation point

    def _on_error(self, dev: _Device, probe: str, code: int) -> None:
        """Turn an NVML return code from reading ``probe`` on ``dev`` into what happens next.

        Returns normally when the field just has no value this tick (the caller leaves it None); raises
        ``_DeviceDown`` / ``_LibraryDown`` to abandon the device or the tick, ``NvmlFatalError`` to exit.
        """
        name = self._codes.name(code)
        action = self._codes.action(code)
        if action is _Action.FATAL:
            raise NvmlFatalError(
                f"NVML: {name} while reading GPU {dev.index}: the NVML library and the loaded kernel "
                "driver differ in version (driver updated under a running agent); restart the agent"
            )
        if action is _Action.DEVICE_DOWN:
            raise _DeviceDown(name)
        if action is _Action.LIBRARY_DOWN:
            raise _LibraryDown(name)
        self._affect_one_probe(dev, probe, action, name)

    def _on_entry_error(self, dev: _Device, probe: str, code: int) -> None:
        """A per-entry return code (one field of a batch, one GPM metric): that entry alone is affected."""
        self._affect_one_probe(dev, probe, self._codes.entry_action(code), self._codes.name(code))

    def _affect_one_probe(self, dev: _Device, probe: str, action: "_Action", name: str) -> None:
        """Drop the probe for good, skip it this tick, or count an unexpected failure of it."""
        if action is _Action.DROP:
            self._drop(dev, probe, name)
        elif action is _Action.SKIP:
            dev.transient[probe] = name
        else:
            self._count(dev, probe, name)

    def _drop(self, dev: _Device, probe: str, reason: str) -> None:
        if probe in dev.dropped:
            return
        dev.dropped[probe] = reason
        self._log.info(
            "GPU %d (%s): %s unavailable (%s); not reading it again", dev.index, dev.uuid, probe, reason
        )

    def _count(self, dev: _Device, probe: str, reason: str, detail: str = "") -> None:
        """Count an unexpected failure; only the first of each (device, probe, reason) is logged.

        A failure that repeats every tick would otherwise log ten lines a second: the count (in
        ``error_counts``) says how often it happened since.
        """
        self._tick_problems.setdefault("gpu.gpm" if probe in _GPM_PROBES else "gpu.fields",
                                       f"GPU {dev.index}: reading {probe} failed: {reason}")
        dev.transient[probe] = reason
        key = (dev.index, probe, reason)
        with self._errors_lock:
            first = key not in self._errors
            self._errors[key] = self._errors.get(key, 0) + 1
        if first:
            self._log.warning("GPU %d (%s): reading %s failed: %s%s; counting further failures, not logging "
                              "them", dev.index, dev.uuid, probe, reason, f" ({detail})" if detail else "")

    def _call(self, dev: _Device, probe: str, functions: str | tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
        """Call the first of ``functions`` (pynvml names, newest first) that the driver has.

        Returns its result, or None when the probe is dropped or failed (after ``_on_error``). A variant
        that answers FunctionNotFound (the driver predates it) or ArgumentVersionMismatch (the driver does
        not know the struct version this pynvml sends) is skipped for this device from then on.
        """
        if probe in dev.dropped:
            return None
        nvml = self._nvml
        names = (functions,) if isinstance(functions, str) else functions
        for position in range(dev.newest.get(probe, 0), len(names)):
            function = getattr(nvml, names[position], None)
            if function is None:  # an older pynvml without this binding
                continue
            try:
                value = function(*args, **kwargs)
            except nvml.NVMLError as err:
                if err.value in self._next_variant_codes and position + 1 < len(names):
                    dev.newest[probe] = position + 1
                    continue
                self._on_error(dev, probe, err.value)
                return None
            dev.newest[probe] = position
            return value
        self._drop(dev, probe, f"pynvml has none of {', '.join(names)}")
        return None

    # ----------------------------------------------------------------------------------------------------
    # Opening

    def _resolve_constants(self) -> None:
        """Look up the ids this pynvml version uses; what it lacks is reported unsupported."""
        nvml = self._nvml
        self._field_ids: dict[str, int] = {}
        self._missing: dict[str, str] = {}
        for spec in _FIELD_SPECS:
            if spec.throttle_reason is not None:
                continue  # by driver version, once NVML is up: _resolve_throttle_ids
            found = next((getattr(nvml, c) for c in spec.constants if hasattr(nvml, c)), None)
            if found is None:
                self._missing[spec.probe] = f"pynvml has no {spec.constants[0]}"
            else:
                self._field_ids[spec.probe] = found
        self._gpm_ids: dict[str, int] = {}
        for metric in DEVICE_METRICS + MIG_METRICS:
            if hasattr(nvml, metric.constant):
                self._gpm_ids[metric.constant] = getattr(nvml, metric.constant)
        for metric in DEVICE_METRICS:
            if metric.constant not in self._gpm_ids:
                self._missing[metric.field] = f"pynvml has no {metric.constant}"
        self._value_members = {
            getattr(nvml, name): member for name, member in _UNION_MEMBERS.items() if hasattr(nvml, name)
        }
        self._reason_bits: dict[str, int] = {}
        for reason in THROTTLE_REASONS:
            suffix = _REASON_BITS.get(reason)
            for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
                if suffix is not None and hasattr(nvml, prefix + suffix):
                    self._reason_bits[reason] = getattr(nvml, prefix + suffix)
                    break

    def _resolve_throttle_ids(self, driver_version: str) -> None:
        """Throttle-time field ids from the driver's version; reasons without one are unsupported."""
        ids, missing = throttle_field_ids(driver_version)
        for reason, field_id in ids.items():
            self._field_ids[f"throttle_seconds.{reason}"] = field_id
        for reason, why in missing.items():
            self._missing[f"throttle_seconds.{reason}"] = why
        self._throttle_value_types = {getattr(self._nvml, n) for n in _THROTTLE_VALUE_TYPES if hasattr(self._nvml, n)}

    def _unavailable(self, during: str, code: int | None, detail: str = "") -> str:
        """The one-line ProbeUnavailable message for a failure while starting."""
        nvml = self._nvml
        known = {
            getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", None):
                "libnvidia-ml.so.1 not found (no NVIDIA driver on this machine)",
            getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", None):
                "the NVIDIA kernel driver is not loaded (nvidia-smi fails too; load the nvidia module)",
            getattr(nvml, "NVML_ERROR_NO_PERMISSION", None):
                "no permission to open /dev/nvidia* (run with access to the GPU device files)",
            getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", None):
                "the NVML library and the kernel driver differ in version (reboot or reload the nvidia module)",
        }
        if code is not None and code in known:
            return f"NVML unavailable: {known[code]}"
        what = self._codes.name(code) if code is not None else detail
        return f"NVML unavailable: {during} failed with {what}"

    def _read_driver_version(self) -> str:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except self._nvml.NVMLError as err:
            # GpuInfo.driver_version is a plain str; say plainly that it could not be read.
            self._log.warning("nvmlSystemGetDriverVersion failed: %s", self._codes.name(err.value))
            return "unknown"

    def _open_devices(self) -> list[_Device]:
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise ProbeUnavailable("NVML unavailable: the NVIDIA driver reports no GPUs")
        devices = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as err:
                # Without a UUID the GPU cannot be re-acquired or told apart later; leave it out.
                self._log.warning(
                    "GPU %d: cannot be opened (%s); it is left out", index, self._codes.name(err.value)
                )
                continue
            dev = _Device(index=index, uuid=uuid, handle=handle)
            for probe, reason in self._missing.items():
                dev.dropped[probe] = reason
            try:
                self._read_static(dev)
            except _DeviceDown as down:
                self._mark_down(dev, str(down))
            devices.append(dev)
        if not devices:
            raise ProbeUnavailable(f"NVML unavailable: none of the {count} GPUs could be opened")
        return devices

    def _read_static(self, dev: _Device) -> None:
        """Facts that do not change while the driver is loaded (MIG mode is refreshed later)."""
        h = dev.handle
        name = self._call(dev, "model_name", "nvmlDeviceGetName", h)
        if name is not None:
            dev.model_name = _text(name)
        pci = self._call(dev, "pci_bus_id", "nvmlDeviceGetPciInfo", h)
        if pci is not None:
            dev.pci_bus_id = _text(pci.busId)
        dev.power_limit_default_watts = _scaled(
            self._call(dev, "power_limit_default_watts", "nvmlDeviceGetPowerManagementDefaultLimit", h), 1e-3
        )
        memory = self._read_memory(dev)
        if memory is not None:
            dev.memory_total_bytes = memory[0]
        self._refresh_mig_mode(dev)

    # ----------------------------------------------------------------------------------------------------
    # Device loss and NVML re-initialisation

    def _sample_device_guarded(self, dev: _Device) -> GpuSample | None:
        """``_sample_device``, where an unexpected exception loses this device's sample for this tick only.

        The device is left out of the tick rather than reported down: the ledger then integrates the next
        sample over both intervals (counters are exact across the gap) instead of restarting, and the
        other GPUs are read as usual. A device that fails like this EXCEPTIONS_BEFORE_DOWN times in a row
        is marked down, so a read that can never work shows as a lost GPU, not as a frozen one.
        """
        try:
            sample = self._sample_device(dev)
        except NvmlFatalError:
            raise
        except Exception as err:  # noqa: BLE001 - one device's surprise must not cost every GPU its sample
            dev.exceptions_in_a_row += 1
            self._count(dev, "device", type(err).__name__, detail=str(err))
            if dev.exceptions_in_a_row >= EXCEPTIONS_BEFORE_DOWN:
                dev.exceptions_in_a_row = 0
                self._mark_down(dev, f"{type(err).__name__} on {EXCEPTIONS_BEFORE_DOWN} reads in a row")
                return self._down_sample(dev)
            return None
        dev.exceptions_in_a_row = 0
        return sample

    def _sample_device(self, dev: _Device) -> GpuSample:
        if not dev.up and not self._reacquire(dev):
            return self._down_sample(dev)
        try:
            sample = self._read_device(dev)
        except _DeviceDown as down:
            self._mark_down(dev, str(down))
            return self._down_sample(dev)
        except _LibraryDown as down:
            self._mark_library_down(str(down))
            return self._down_sample(dev)
        dev.backoff_s = BACKOFF_INITIAL_S  # a full read worked: the next loss starts from 1 s again
        return sample

    def _down_sample(self, dev: _Device) -> GpuSample:
        return GpuSample(index=dev.index, uuid=dev.uuid, monotonic_ns=self._clock(), up=False)

    def _schedule_retry(self, dev: _Device) -> float:
        """Next re-acquire attempt after the current delay, which then doubles (up to 30 s)."""
        delay_s = dev.backoff_s
        dev.retry_at_ns = self._clock() + int(delay_s * 1e9)
        dev.backoff_s = min(delay_s * 2, BACKOFF_MAX_S)
        return delay_s

    def _mark_down(self, dev: _Device, reason: str) -> None:
        dev.up = False
        dev.down_reason = f"{reason}; re-acquiring by UUID"
        delay_s = self._schedule_retry(dev)
        self._log.warning("GPU %d (%s) is down (%s); retrying in %.0f s", dev.index, dev.uuid, reason, delay_s)

    def _reacquire(self, dev: _Device) -> bool:
        """Look the GPU up again by UUID once its backoff has passed. True when it is back."""
        if self._clock() < dev.retry_at_ns:
            return False
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(dev.uuid)
        except nvml.NVMLError as err:
            action = self._codes.action(err.value)
            if action is _Action.FATAL:
                self._on_error(dev, "device", err.value)  # raises NvmlFatalError
            if action is _Action.LIBRARY_DOWN:
                self._mark_library_down(self._codes.name(err.value))
            else:
                self._schedule_retry(dev)
            return False
        dev.handle = handle
        dev.up = True
        dev.down_reason = None
        # Counters and lists from before the loss say nothing about the device now.
        if dev.gpm is not None:
            dev.gpm.reset()
        for pair in dev.mig_gpm.values():
            pair.reset()
        dev.processes = None
        dev.processes_at_ns = None
        dev.activity.clear()  # timestamps from before the loss
        dev.mig_at_ns = None
        dev.slow_reads.clear()
        if self._xid is not None:
            self._xid.reregister(dev.index, handle)
        self._log.info("GPU %d (%s) re-acquired", dev.index, dev.uuid)
        return True

    def _mark_library_down(self, reason: str) -> None:
        self._library_down = reason
        self._library_retry_ns = self._clock() + int(self._library_backoff_s * 1e9)
        self._log.warning("NVML is down (%s); re-initialising in %.0f s", reason, self._library_backoff_s)
        self._library_backoff_s = min(self._library_backoff_s * 2, BACKOFF_MAX_S)
        for dev in self._devices:
            dev.up = False
            dev.down_reason = f"{reason}; re-initialising NVML"

    def _try_reinit(self) -> None:
        now = self._clock()
        if now < self._library_retry_ns:
            return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            if self._codes.action(err.value) is _Action.FATAL:
                raise NvmlFatalError(
                    f"NVML: {self._codes.name(err.value)} on re-initialisation: the NVML library and the "
                    "loaded kernel driver differ in version; restart the agent"
                ) from None
            self._mark_library_down(self._codes.name(err.value))
            return
        self._log.info("NVML re-initialised")
        self._library_down = None
        self._library_backoff_s = BACKOFF_INITIAL_S
        for dev in self._devices:  # old handles are void: look every GPU up again now
            dev.retry_at_ns = now

    def _shutdown_quietly(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as err:
            self._log.debug("nvmlShutdown failed: %s", self._codes.name(err.value))

    # ----------------------------------------------------------------------------------------------------
    # One device, one tick

    def _read_device(self, dev: _Device) -> GpuSample:
        """One GpuSample, stamped with the injected clock just before the reads.

        Field: NVML source (conversion) -> nvidia-smi --query-gpu equivalent.

        - power_watts, power_average_watts: fields 186 / 185, scope GPU (mW / 1e3) -> power.draw.instant
          / power.draw.average
        - temperature_memory_celsius: field 82 (deg C) -> temperature.memory
        - pcie_transmit_bytes, pcie_receive_bytes: fields 197 / 198 (byte counters) -> none
        - nvlink_transmit_bytes, nvlink_receive_bytes: fields 138 / 139, scope UINT_MAX (KiB * 1024)
          -> none (nvidia-smi nvlink -gt d)
        - throttle_seconds: fields 74, 76 and, by driver version, 251-253 (575 - 580.65) or 269-271
          (580.82+) (ns / 1e9) -> none (nvidia-smi -q -d PERFORMANCE)
        - utilization ratios: nvmlDeviceGetUtilizationRates (% / 100) -> utilization.gpu / .memory
        - memory_*_bytes: nvmlDeviceGetMemoryInfo v2, else v1 (bytes) -> memory.total / .used / .reserved
        - energy_joules: nvmlDeviceGetTotalEnergyConsumption (mJ / 1e3) -> none (total energy since load)
        - power_limit_watts: nvmlDeviceGetEnforcedPowerLimit (mW / 1e3), every slow_interval_s
          -> enforced.power.limit
        - sm_clock_hertz, memory_clock_hertz: nvmlDeviceGetClockInfo (MHz * 1e6) -> clocks.sm / clocks.mem
        - temperature_gpu_celsius: nvmlDeviceGetTemperatureV, else nvmlDeviceGetTemperature -> temperature.gpu
        - throttle_reasons: nvmlDeviceGetCurrentClocksEventReasons bits -> clocks_event_reasons.*
        - ecc_*_errors: nvmlDeviceGetTotalEccErrors, volatile, every slow_interval_s
          -> ecc.errors.corrected/uncorrected.volatile.total
        - GPM ratios and rates: see nvml_gpm.DEVICE_METRICS (% / 100; MiB/s * 2**20) -> none
        - processes: nvmlDeviceGetComputeRunningProcesses_v3, else _v2 -> --query-compute-apps=pid,used_memory;
          their SM / memory shares: nvmlDeviceGetProcessesUtilizationInfo, else nvmlDeviceGetProcessUtilization
          (% / 100, over the interval: nvml_processes.py) -> nvidia-smi pmon -s u
        - mig_instances: MIG device handles, their memory info, GPM per GPU instance -> none (nvidia-smi mig)
        """
        nvml = self._nvml
        dev.transient.clear()
        now = self._clock()
        h = dev.handle
        values: dict[str, Any] = {}
        self._read_field_values(dev, values)

        utilization = self._call(dev, "utilization", "nvmlDeviceGetUtilizationRates", h)
        if utilization is not None:
            values["utilization_gpu_ratio"] = _ratio(utilization.gpu)
            values["utilization_memory_controller_ratio"] = _ratio(utilization.memory)

        memory = self._read_memory(dev)
        if memory is not None:
            values["memory_total_bytes"], values["memory_used_bytes"], values["memory_reserved_bytes"] = memory
            if memory[0] is not None:
                dev.memory_total_bytes = memory[0]  # devices() too, in case it could not be read at open

        values["energy_joules"] = _scaled(
            self._call(dev, "energy_joules", "nvmlDeviceGetTotalEnergyConsumption", h), 1e-3
        )
        values["sm_clock_hertz"] = _scaled(
            self._call(dev, "sm_clock_hertz", "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM), 1e6
        )
        values["memory_clock_hertz"] = _scaled(
            self._call(dev, "memory_clock_hertz", "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_MEM), 1e6
        )
        values["temperature_gpu_celsius"] = _scaled(
            self._call(
                dev, "temperature_gpu_celsius",
                ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"), h, nvml.NVML_TEMPERATURE_GPU,
            ),
            1.0,
        )
        reasons = self._call(
            dev, "throttle_reasons",
            ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"), h,
        )
        if _available(reasons) is not None:
            values["throttle_reasons"] = frozenset(r for r, bit in self._reason_bits.items() if reasons & bit)
        self._read_slow_fields(dev, now, values)
        gpm_started_ns = self._clock()
        self._read_gpm(dev, values)
        self._gpm_ns += self._clock() - gpm_started_ns
        values["mig_instances"] = self._read_mig(dev, now)  # first: processes use this tick's MIG devices
        values["processes"] = self._read_processes(dev, now)
        return GpuSample(index=dev.index, uuid=dev.uuid, monotonic_ns=now, **values)

    def _read_slow_fields(self, dev: _Device, now: int, values: dict[str, Any]) -> None:
        """ECC counts and the enforced power limit (W): read every slow_interval_s, else the last value."""
        for probe, function, constants, scale in SLOW_FIELD_CALLS:
            last = dev.slow_reads.get(probe)
            if last is not None and now - last[0] < self._slow_interval_ns:
                values[probe] = last[1]
                continue
            arguments = [getattr(self._nvml, name) for name in constants]
            values[probe] = _scaled(self._call(dev, probe, function, dev.handle, *arguments), scale)
            # A read that failed (no data, an unexpected error: the probe is in ``transient``) is not
            # stamped, so it is tried again next tick and the field is None for that tick only, as for
            # every per-tick field. A dropped probe is never called again (``_call`` checks).
            if probe in dev.transient or probe in dev.dropped:
                dev.slow_reads.pop(probe, None)
            else:
                dev.slow_reads[probe] = (now, values[probe])

    def _read_field_values(self, dev: _Device, values: dict[str, Any]) -> None:
        """Power, HBM temperature, PCIe/NVLink byte counters and throttle times in one NVML call."""
        specs = [s for s in _FIELD_SPECS if s.probe not in dev.dropped]
        if not specs:
            return
        nvml = self._nvml
        request = [(self._field_ids[s.probe], s.scope) for s in specs]
        try:
            entries = nvml.nvmlDeviceGetFieldValues(dev.handle, request)
        except nvml.NVMLError as err:
            for spec in specs:  # the whole batch failed: every field in it shares the outcome
                self._on_error(dev, spec.probe, err.value)
            return
        throttle: dict[str, float] = {}
        for spec, entry in zip(specs, entries):
            if entry.nvmlReturn != nvml.NVML_SUCCESS:
                self._on_entry_error(dev, spec.probe, entry.nvmlReturn)
                continue
            if spec.throttle_reason is not None and entry.valueType not in self._throttle_value_types:
                # Throttle counters are unsigned 64-bit nanoseconds: another type means the id names some
                # other field on this driver (a power-smoothing setting, say). Never read it as time.
                self._drop(dev, spec.probe, f"field {entry.fieldId} answered value type {entry.valueType}, "
                                            "not a nanosecond counter")
                continue
            raw = self._field_value(dev, spec.probe, entry)
            if raw is None:
                continue
            value = int(raw * spec.scale) if spec.integer else raw * spec.scale
            if spec.throttle_reason is not None:
                throttle[spec.throttle_reason] = value
            else:
                values[spec.probe] = value
        if throttle:
            values["throttle_seconds"] = throttle

    def _field_value(self, dev: _Device, probe: str, entry: Any) -> float | int | None:
        """The union member that the entry's valueType names; None for "not available"."""
        member = self._value_members.get(entry.valueType)
        if member is None:
            self._count(dev, probe, f"unknown valueType {entry.valueType}")
            return None
        attribute, not_available = member
        value = getattr(entry.value, attribute)
        if value == not_available or (isinstance(value, float) and math.isnan(value)):
            dev.transient[probe] = "NVML_VALUE_NOT_AVAILABLE"
            return None
        return value

    def _read_memory(self, dev: _Device) -> tuple[int | None, int | None, int | None] | None:
        """(total, used, reserved) bytes: nvidia-smi memory.total / memory.used / memory.reserved.

        The v2 struct reports reserved (driver/firmware) memory separately; v1 counts it as used and has
        no reserved figure, so after a fallback to v1 ``memory_reserved_bytes`` is unsupported.
        """
        if "memory" in dev.dropped:
            return None
        nvml = self._nvml
        if not dev.memory_v1 and hasattr(nvml, "nvmlMemory_v2"):
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(dev.handle, version=nvml.nvmlMemory_v2)
            except nvml.NVMLError as err:
                fallback = {
                    getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", None),
                    getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", None),
                    getattr(nvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", None),
                }
                if err.value not in fallback:
                    self._on_error(dev, "memory", err.value)
                    return None
                dev.memory_v1 = True
                self._drop(dev, "memory_reserved_bytes", f"memory info v2: {self._codes.name(err.value)}")
            else:
                return _available(info.total), _available(info.used), _available(info.reserved)
        elif not dev.memory_v1:
            dev.memory_v1 = True
            self._drop(dev, "memory_reserved_bytes", "pynvml has no nvmlMemory_v2")
        info = self._call(dev, "memory", "nvmlDeviceGetMemoryInfo", dev.handle)
        if info is None:
            return None
        return _available(info.total), _available(info.used), None

    # ----------------------------------------------------------------------------------------------------
    # GPM

    def _gpm_ready(self, dev: _Device) -> bool:
        """Ask nvmlGpmQueryDeviceSupport once per device; drop "gpm" and "mig_gpm" when it says no."""
        if dev.gpm_supported is not None:
            return dev.gpm_supported
        if not self._enable_gpm:
            reason = "disabled (enable_gpm=False)"
        else:
            support = self._call(dev, "gpm", "nvmlGpmQueryDeviceSupport", dev.handle)
            if support is None:
                if "gpm" in dev.dropped:
                    dev.gpm_supported = False
                    self._drop(dev, "mig_gpm", dev.dropped["gpm"])
                return False  # a transient failure asks again next tick
            if support.isSupportedDevice:
                dev.gpm_supported = True
                return True
            reason = "not supported on this GPU (nvmlGpmQueryDeviceSupport; Hopper or newer)"
        dev.gpm_supported = False
        self._drop(dev, "gpm", reason)
        self._drop(dev, "mig_gpm", reason)
        return False

    def _read_gpm(self, dev: _Device, values: dict[str, Any]) -> None:
        """SM / tensor / DRAM activity and PCIe / NVLink rates over the time since the last tick."""
        if "gpm" in dev.dropped or not self._gpm_ready(dev):
            return
        nvml = self._nvml
        if dev.gpm is None:
            try:
                dev.gpm = GpmPair(nvml)
            except nvml.NVMLError as err:
                self._on_error(dev, "gpm", err.value)
                return
        wanted = [m for m in DEVICE_METRICS if m.field not in dev.dropped]
        try:
            result = dev.gpm.tick(dev.handle, [self._gpm_ids[m.constant] for m in wanted])
        except nvml.NVMLError as err:
            try:
                self._on_error(dev, "gpm", err.value)
            finally:
                if "gpm" in dev.dropped:
                    self._free_pair(dev.gpm)
                    dev.gpm = None
            return
        if result is None:
            for metric in wanted:
                dev.transient[metric.field] = "first GPM sample; rates start on the next read"
            return
        for metric in wanted:
            value = self._gpm_value(dev, metric.field, metric, result)
            if value is not None:
                values[metric.field] = value

    def _gpm_value(
        self, dev: _Device, probe: str, metric: GpmMetric, result: dict[int, tuple[int, float]]
    ) -> float | None:
        entry = result.get(self._gpm_ids[metric.constant])
        if entry is None:
            self._count(dev, probe, "metric missing from the nvmlGpmMetricsGet answer")
            return None
        code, value = entry
        if code != self._nvml.NVML_SUCCESS:
            self._on_entry_error(dev, probe, code)
            return None
        return metric.convert(value)

    def _free_pair(self, pair: GpmPair) -> None:
        try:
            pair.free()
        except self._nvml.NVMLError as err:
            self._log.debug("nvmlGpmSampleFree failed: %s", self._codes.name(err.value))

    def _free_gpm(self, dev: _Device) -> None:
        if dev.gpm is not None:
            self._free_pair(dev.gpm)
            dev.gpm = None
        for pair in dev.mig_gpm.values():
            self._free_pair(pair)
        dev.mig_gpm.clear()

    # ----------------------------------------------------------------------------------------------------
    # Processes and MIG (slow calls, refreshed every process_interval_s)

    def _read_processes(self, dev: _Device, now: int) -> tuple[GpuProcess, ...] | None:
        """Compute processes and their GPU memory (nvidia-smi --query-compute-apps=pid,used_memory)."""
        if "processes" in dev.dropped:
            return None
        if dev.processes_at_ns is not None and now - dev.processes_at_ns < self._interval_ns:
            return dev.processes
        # Stamped even when the call fails, so a failing call is not repeated every tick either.
        dev.processes_at_ns = now
        found = self._call(
            dev, "processes",
            ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"), dev.handle,
        )
        if found is None:
            dev.processes = None
        else:
            # usedGpuMemory is None (pynvml) or all-ones (NVML) where the driver cannot tell, e.g. WDDM; the
            # instance ids are all-ones without MIG.
            listed = tuple(
                GpuProcess(
                    pid=int(p.pid), memory_used_bytes=_available(p.usedGpuMemory),
                    gpu_instance_id=_instance_id(p, "gpuInstanceId"),
                    compute_instance_id=_instance_id(p, "computeInstanceId"),
                )
                for p in found
            )
            dev.processes = self._with_utilization(dev, listed, now)
        return dev.processes

    def _with_utilization(
        self, dev: _Device, listed: tuple[GpuProcess, ...], now_ns: int
    ) -> tuple[GpuProcess, ...]:
        """The list with each process's SM / memory-controller share of the last interval (ratios 0..1).

        Without MIG, from the GPU's samples. With MIG the driver keeps them per MIG device (the GPU's handle
        answers NotSupported, as for its utilization rates), so each MIG device is read, and a process takes
        the shares of the instance its (GPU instance, compute instance) ids name.
        """
        now_us = self._wall_clock_us()
        if not dev.mig_enabled:
            for stale in [key for key in dev.activity if key is not None]:
                del dev.activity[stale]  # MIG devices from before MIG was switched off
            shares = self._read_utilization(dev, "process_utilization", None, dev.handle, now_us, now_ns)
            return with_activity(listed, shares)
        by_instance: dict[tuple[int, int], dict[int, ProcessShares] | None] = {}
        live = set()
        for slot in dev.mig_slots or ():
            live.add(slot.uuid)
            # One probe for every MIG device of the GPU: support is the driver's and the GPU's, not an
            # instance's, so one MIG device answering NotSupported drops it for all of them.
            by_instance[(slot.gpu_instance_id, slot.compute_instance_id)] = self._read_utilization(
                dev, "mig_process_utilization", slot.uuid, slot.handle, now_us, now_ns)
        for gone in [key for key in dev.activity if key not in live]:
            del dev.activity[gone]  # a destroyed MIG device, or the whole GPU's from before MIG was on
        return tuple(
            with_activity((p,), by_instance.get((p.gpu_instance_id, p.compute_instance_id)))[0] for p in listed
        )

    def _read_utilization(
        self, dev: _Device, probe: str, key: str | None, handle: Any, now_us: int, now_ns: int
    ) -> dict[int, ProcessShares] | None:
        """pid -> shares of the interval since the last read of this GPU or MIG device; None: not measured."""
        activity = dev.activity.get(key)
        if activity is None:
            activity = dev.activity[key] = ProcessActivity(interval_us=self._interval_ns // 1000)
        if probe in dev.dropped:
            return None
        entries = self._call_utilization(dev, probe, handle, activity.query_after_us(now_us, now_ns))
        if entries is None:
            # Failed this time: the next read's interval starts where this one did, so its samples still count.
            return None
        shares = activity.interval(samples_from_nvml(entries), now_us, now_ns)
        if shares is None:
            dev.transient[probe] = "no time passed since the last read"
        return shares

    def _call_utilization(self, dev: _Device, probe: str, handle: Any, after_us: int) -> list[Any] | None:
        """The newest per-process utilization function the driver answers; [] when it has no new sample.

        As ``_call``, plus: NotSupported from the newer function moves on to the older one too (the older has
        been there since Maxwell), and NOT_FOUND is "no process ran since ``after_us``", not a failure.
        """
        nvml = self._nvml
        for position in range(dev.newest.get(probe, 0), len(UTILIZATION_FUNCTIONS)):
            function = getattr(nvml, UTILIZATION_FUNCTIONS[position], None)
            if function is None:  # an older pynvml without this binding
                continue
            try:
                found = function(handle, after_us)
            except nvml.NVMLError as err:
                if err.value in self._no_sample_codes:
                    dev.newest[probe] = position
                    return []
                if err.value in self._utilization_fallback_codes and position + 1 < len(UTILIZATION_FUNCTIONS):
                    dev.newest[probe] = position + 1
                    continue
                self._on_error(dev, probe, err.value)
                return None
            dev.newest[probe] = position
            return list(found)
        self._drop(dev, probe, f"pynvml has none of {', '.join(UTILIZATION_FUNCTIONS)}")
        return None

    def _refresh_mig_mode(self, dev: _Device) -> None:
        mode = self._call(dev, "mig_instances", "nvmlDeviceGetMigMode", dev.handle)
        if mode is not None:
            dev.mig_enabled = mode[0] == self._nvml.NVML_DEVICE_MIG_ENABLE

    def _refresh_mig(self, dev: _Device) -> None:
        """Re-enumerate MIG devices: handles, GPU/compute instance ids and UUIDs."""
        nvml = self._nvml
        self._refresh_mig_mode(dev)
        if "mig_instances" in dev.dropped or not dev.mig_enabled:
            dev.mig_slots = None
            for pair in dev.mig_gpm.values():
                self._free_pair(pair)
            dev.mig_gpm.clear()
            return
        count = self._call(dev, "mig_instances", "nvmlDeviceGetMaxMigDeviceCount", dev.handle)
        if count is None:
            return
        slots = []
        for slot in range(count):
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(dev.handle, slot)
            except nvml.NVMLError as err:
                if err.value == nvml.NVML_ERROR_NOT_FOUND:
                    continue  # an empty slot: fewer instances exist than the maximum
                self._on_error(dev, "mig_instances", err.value)
                return
            gpu_instance = self._call(dev, "mig_instances", "nvmlDeviceGetGpuInstanceId", handle)
            compute_instance = self._call(dev, "mig_instances", "nvmlDeviceGetComputeInstanceId", handle)
            uuid = self._call(dev, "mig_instances", "nvmlDeviceGetUUID", handle)
            if gpu_instance is None or compute_instance is None or uuid is None:
                return  # keep the previous list; the reason is in field_status
            slots.append(_MigSlot(handle, int(gpu_instance), int(compute_instance), _text(uuid)))
        dev.mig_slots = tuple(slots)
        live = {s.gpu_instance_id for s in slots}
        for gpu_instance in [g for g in dev.mig_gpm if g not in live]:
            self._free_pair(dev.mig_gpm.pop(gpu_instance))

    def _read_mig(self, dev: _Device, now: int) -> tuple[MigInstance, ...] | None:
        """MIG instances with memory (per tick) and GPM SM activity per GPU instance; None if MIG is off."""
        if "mig_instances" in dev.dropped:
            return None
        if dev.mig_at_ns is None or now - dev.mig_at_ns >= self._interval_ns:
            dev.mig_at_ns = now
            self._refresh_mig(dev)
        if dev.mig_slots is None:
            return None
        sm_by_gpu_instance: dict[int, float | None] = {}
        instances = []
        for slot in dev.mig_slots:
            memory = self._call(dev, "mig_memory", "nvmlDeviceGetMemoryInfo", slot.handle)
            if slot.gpu_instance_id not in sm_by_gpu_instance:
                # Compute instances of one GPU instance share its GPM counters: one tick per GPU instance.
                sm_by_gpu_instance[slot.gpu_instance_id] = self._read_mig_gpm(dev, slot.gpu_instance_id)
            instances.append(
                MigInstance(
                    gpu_instance_id=slot.gpu_instance_id,
                    compute_instance_id=slot.compute_instance_id,
                    uuid=slot.uuid,
                    memory_used_bytes=_available(memory.used) if memory is not None else None,
                    memory_total_bytes=_available(memory.total) if memory is not None else None,
                    sm_activity_ratio=sm_by_gpu_instance[slot.gpu_instance_id],
                )
            )
        return tuple(instances)

    def _read_mig_gpm(self, dev: _Device, gpu_instance_id: int) -> float | None:
        if "mig_gpm" in dev.dropped or not self._gpm_ready(dev):
            return None
        nvml = self._nvml
        metric = MIG_METRICS[0]
        if metric.constant not in self._gpm_ids:
            self._drop(dev, "mig_gpm", f"pynvml has no {metric.constant}")
            return None
        pair = dev.mig_gpm.get(gpu_instance_id)
        try:
            if pair is None:
                pair = dev.mig_gpm[gpu_instance_id] = GpmPair(nvml, gpu_instance_id)
            result = pair.tick(dev.handle, [self._gpm_ids[metric.constant]])
        except nvml.NVMLError as err:
            try:
                self._on_error(dev, "mig_gpm", err.value)
            finally:
                if "mig_gpm" in dev.dropped:
                    for stale in dev.mig_gpm.values():
                        self._free_pair(stale)
                    dev.mig_gpm.clear()
            return None
        if result is None:
            dev.transient["mig_gpm"] = "first GPM sample; rates start on the next read"
            return None
        return self._gpm_value(dev, "mig_gpm", metric, result)

    # ----------------------------------------------------------------------------------------------------
    # probe_status helpers

    def _sub_probe_outcomes(self, started_ns: int) -> list[ProbeOutcome]:
        total_s = (self._clock() - started_ns) / 1e9
        gpm_s = self._gpm_ns / 1e9
        up = [dev for dev in self._devices if dev.up]
        fields_problem = self._tick_problems.get("gpu.fields") or next(
            (f"GPU {dev.index} down: {dev.down_reason}" for dev in self._devices if not dev.up), None)
        gpm_problem = self._tick_problems.get("gpu.gpm") or next(
            (f"GPU {dev.index}: GPM {dev.dropped['gpm']}" for dev in up if "gpm" in dev.dropped), None)
        if not up:
            gpm_problem = gpm_problem or "no GPU is up"
        return [
            ProbeOutcome("gpu.fields", fields_problem is None, max(0.0, total_s - gpm_s), fields_problem),
            ProbeOutcome("gpu.gpm", gpm_problem is None, gpm_s, gpm_problem),
            self._xid_outcome(up),
        ]

    def _xid_outcome(self, up: list[_Device]) -> ProbeOutcome:
        started_ns = self._clock()
        problem = None
        if self._xid is None:
            problem = "XID events disabled (enable_xid=False)"
        else:
            errors = self._xid.errors()
            if sum(errors.values()) > self._xid_errors_seen:
                self._xid_errors_seen = sum(errors.values())
                self._xid_failed_at_ns = started_ns
            missing = [dev.index for dev in up if dev.index not in self._xid.registered]
            if (self._xid_failed_at_ns is not None
                    and started_ns - self._xid_failed_at_ns < XID_FAILURE_HOLD_S * 1e9):
                problem = f"XID event wait failed: {', '.join(sorted(errors))}"
            elif missing:
                problem = f"GPU {missing[0]}: XID events {self._xid.unsupported.get(missing[0], 'not registered')}"
            elif not up:
                problem = "no GPU is up"
        return ProbeOutcome("gpu.xid", problem is None, (self._clock() - started_ns) / 1e9, problem)

    # ----------------------------------------------------------------------------------------------------
    # field_status helpers

    def _device(self, index: int) -> _Device:
        for dev in self._devices:
            if dev.index == index:
                return dev
        raise IndexError(f"no GPU with NVML index {index} in this backend")

    @staticmethod
    def _status_row(dev: _Device, name: str, probes: tuple[str, ...]) -> FieldStatus:
        for probe in probes:
            if probe in dev.dropped:
                reason = dev.dropped[probe]
                return FieldStatus(name, False, reason if probe == name else f"{probe}: {reason}")
        for probe in probes:
            if probe in dev.transient:
                return FieldStatus(name, True, f"no value on the last read: {dev.transient[probe]}")
        return FieldStatus(name, True)

    def _throttle_status(self, dev: _Device) -> list[FieldStatus]:
        rows = [self._status_row(dev, s.probe, (s.probe,)) for s in _FIELD_SPECS if s.throttle_reason]
        missing = [f"{r.name.split('.', 1)[1]}: {r.reason}" for r in rows if not r.supported]
        summary = FieldStatus(
            "throttle_seconds", any(r.supported for r in rows), "; ".join(missing) if missing else None
        )
        return [summary, *rows]

    def _xid_status(self, dev: _Device) -> FieldStatus:
        if self._xid is None:
            return FieldStatus("xid_events", False, "disabled (enable_xid=False)")
        if dev.index in self._xid.registered:
            return FieldStatus("xid_events", True)
        return FieldStatus("xid_events", False, self._xid.unsupported.get(dev.index, "not registered"))
