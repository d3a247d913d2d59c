"""What each NVML call of the backend costs on this GPU, and how often the energy counter moves.

For the GPU check (tests/gpu/check.py): ``measure_call_costs`` times every call ``NvmlBackend`` makes for
one GPU (per tick, on the slow cadence, with the process list, and once at open), each field of the
field-value batch and each GPM metric on its own too, and says what each returned (``NVML_SUCCESS`` or the
NVML error name). ``measure_energy_update_period`` polls ``nvmlDeviceGetTotalEnergyConsumption`` in a tight
loop and reports how often its value changes, which bounds how finely energy can be attributed in time.

Pure timing: nothing here judges a figure. Like ``nvml_gpm.py``, this module does not import ``pynvml``;
the caller passes the module (or the test stub) and a device handle, with NVML initialised. A call that
fails is reported, never raised: an unsupported call reads "NVML_ERROR_NOT_SUPPORTED", and a Python
exception from a binding reads as the exception's type name.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .nvml import _FIELD_SPECS, SLOW_FIELD_CALLS, _ErrorCodes, throttle_field_ids
from .nvml_gpm import DEVICE_METRICS, metrics_answer, metrics_request
from .nvml_processes import UTILIZATION_FUNCTIONS

DEFAULT_REPEATS = 200  # calls timed per NVML function (fewer when one runs past its time budget)
DEFAULT_BUDGET_S = 0.5  # wall time one function may take in all, so a slow call (a process list) stays short
# Time between the two GPM samples that nvmlGpmMetricsGet is timed over: a tick of the 10 Hz sampler.
GPM_SAMPLE_GAP_S = 0.1
ENERGY_POLL_S = 2.0  # how long measure_energy_update_period polls by default
SUCCESS = "NVML_SUCCESS"

# When the backend makes each call (CallCost.role).
ROLE_TICK = "tick"  # every tick, for every GPU
ROLE_SLOW = "slow"  # every SLOW_FIELDS_INTERVAL_S (nvml.py)
ROLE_PROCESS = "process"  # every process_interval_s (the process list, MIG mode)
ROLE_OPEN = "open"  # once per GPU
ROLE_DETAIL = "detail"  # not called as such: one field or metric of a batch alone, or an older variant


@dataclass(frozen=True, slots=True)
class CallCost:
    """The cost of one NVML call, timed ``calls`` times back to back.

    ``return_code`` is the most frequent outcome ("NVML_SUCCESS", an NVML error name, the type name of a
    Python exception, or "pynvml has no <function>"); ``return_codes`` counts every outcome seen. For one
    field of the field-value batch (or one GPM metric) it is that entry's own return code. Times are in
    microseconds, from the call until it returned; None when nothing was timed.
    """

    name: str  # e.g. "nvmlDeviceGetClockInfo(SM)", "nvmlDeviceGetFieldValues[power_watts]"
    function: str  # the pynvml function timed
    role: str  # ROLE_*: when the backend makes this call
    return_code: str
    return_codes: dict[str, int]
    calls: int
    median_us: float | None
    p99_us: float | None


@dataclass(frozen=True, slots=True)
class EnergyUpdatePeriod:
    """How often ``nvmlDeviceGetTotalEnergyConsumption`` changed value while polled for ``duration_s``.

    ``median_interval_ms`` is the median time between consecutive changes (None with fewer than two
    changes); min/max bound it. ``median_step_mj``: the median change, millijoules. ``median_poll_us``: the
    cost of one poll, which is the resolution of the intervals.
    """

    return_code: str
    duration_s: float
    polls: int
    changes: int
    median_interval_ms: float | None
    min_interval_ms: float | None
    max_interval_ms: float | None
    median_step_mj: float | None
    median_poll_us: float | None


# ---------------------------------------------------------------------------------------------------------
# Timing one call


def p99(values: list[float]) -> float:
    """99th percentile by nearest rank: the smallest value with at least 99% of values at or below it
    (Hyndman & Fan 1996, "Sample quantiles in statistical packages", definition 1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class _Timer:
    """Times calls back to back and names their outcomes."""

    def __init__(self, nvml: Any, repeats: int, budget_s: float, clock_ns: Callable[[], int]) -> None:
        self._nvml = nvml
        self._codes = _ErrorCodes(nvml)
        self._repeats = repeats
        self._budget_ns = int(budget_s * 1e9)
        self._clock = clock_ns

    def code_name(self, code: int) -> str:
        return SUCCESS if code == self._nvml.NVML_SUCCESS else self._codes.name(code)

    def attempt(self, call: Callable[[], Any]) -> tuple[str, Any, bool]:
        """(outcome name, result or None, whether a Python exception other than NVMLError was raised)."""
        try:
            return SUCCESS, call(), False
        except self._nvml.NVMLError as err:
            return self.code_name(err.value), None, False
        except Exception as err:  # noqa: BLE001 - a binding's surprise is a finding to report, not a crash
            return type(err).__name__, None, True

    def outcome(self, call: Callable[[], Any]) -> tuple[str, Any]:
        """(outcome name, result or None) of one untimed call."""
        name, result, _ = self.attempt(call)
        return name, result

    def time(self, name: str, function: str, role: str, call: Callable[[], Any],
             entry_code: Callable[[Any], int] | None = None) -> CallCost:
        """``call()`` up to ``repeats`` times; ``entry_code`` names the outcome of a call that returned."""
        elapsed_us: list[float] = []
        outcomes: Counter[str] = Counter()
        spent_ns = 0
        while len(elapsed_us) < self._repeats and (not elapsed_us or spent_ns < self._budget_ns):
            started_ns = self._clock()
            outcome, result, python_exception = self.attempt(call)
            took_ns = self._clock() - started_ns
            spent_ns += took_ns
            elapsed_us.append(took_ns / 1e3)
            if outcome == SUCCESS and entry_code is not None:
                outcome = self.code_name(entry_code(result))
            outcomes[outcome] += 1
            if python_exception:
                break  # the binding itself is broken here: repeating it measures nothing
        return CallCost(name, function, role, outcomes.most_common(1)[0][0], dict(outcomes), len(elapsed_us),
                        statistics.median(elapsed_us), p99(elapsed_us))

    @staticmethod
    def not_timed(name: str, function: str, role: str, why: str) -> CallCost:
        return CallCost(name, function, role, why, {why: 0}, 0, None, None)

    def absent(self, name: str, function: str, role: str) -> CallCost:
        return self.not_timed(name, function, role, f"pynvml has no {function}")

    def function(self, name: str, function: str, role: str, *args: Any, **kwargs: Any) -> CallCost:
        """Time ``nvml.<function>(*args, **kwargs)``, or say that this pynvml lacks it."""
        bound = getattr(self._nvml, function, None)
        if bound is None:
            return self.absent(name, function, role)
        return self.time(name, function, role, lambda: bound(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------------
# The backend's calls


def backend_field_requests(nvml: Any, driver_version: str) -> list[tuple[str, int, int]]:
    """(probe, field id, scope id) of the field-value batch NvmlBackend sends first with this driver."""
    throttle_ids, _ = throttle_field_ids(driver_version)
    requests = []
    for spec in _FIELD_SPECS:
        if spec.throttle_reason is not None:
            field_id = throttle_ids.get(spec.throttle_reason)
        else:
            field_id = next((getattr(nvml, c) for c in spec.constants if hasattr(nvml, c)), None)
        if field_id is not None:
            requests.append((spec.probe, field_id, spec.scope))
    return requests


def _field_value_costs(timer: _Timer, nvml: Any, handle: Any, driver_version: str) -> list[CallCost]:
    """The batch as first sent, each field alone, and the batch of the fields that answered (later ticks)."""
    function = "nvmlDeviceGetFieldValues"
    requests = backend_field_requests(nvml, driver_version)
    costs = [
        timer.time(f"{function}[{probe}]", function, ROLE_DETAIL,
                   lambda request=(field_id, scope): nvml.nvmlDeviceGetFieldValues(handle, [request]),
                   entry_code=lambda entries: entries[0].nvmlReturn)
        for probe, field_id, scope in requests
    ]
    answered = [(f, s) for (_, f, s), cost in zip(requests, costs) if cost.return_code == SUCCESS]
    costs.append(timer.time(f"{function}(all {len(requests)} fields)", function, ROLE_OPEN,
                            lambda: nvml.nvmlDeviceGetFieldValues(handle, [(f, s) for _, f, s in requests])))
    name = f"{function}({len(answered)} answered)"
    if not answered:  # the backend stops calling once every field is dropped
        costs.append(timer.not_timed(name, function, ROLE_TICK, "not timed: no field answered"))
    else:
        costs.append(timer.time(name, function, ROLE_TICK,
                                lambda: nvml.nvmlDeviceGetFieldValues(handle, answered)))
    return costs


def _device_call_costs(timer: _Timer, nvml: Any, handle: Any) -> list[CallCost]:
    """The single-value calls of a tick, in the backend's order, older variants as details."""
    costs = [timer.function("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetUtilizationRates", ROLE_TICK, handle)]
    if hasattr(nvml, "nvmlMemory_v2"):
        costs.append(timer.function("nvmlDeviceGetMemoryInfo(v2)", "nvmlDeviceGetMemoryInfo", ROLE_TICK, handle,
                                    version=nvml.nvmlMemory_v2))
    costs.append(timer.function("nvmlDeviceGetMemoryInfo(v1)", "nvmlDeviceGetMemoryInfo", ROLE_DETAIL, handle))
    costs.append(timer.function("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetTotalEnergyConsumption",
                                ROLE_TICK, handle))
    for label, constant in (("SM", "NVML_CLOCK_SM"), ("MEM", "NVML_CLOCK_MEM")):
        costs.append(timer.function(f"nvmlDeviceGetClockInfo({label})", "nvmlDeviceGetClockInfo", ROLE_TICK,
                                    handle, getattr(nvml, constant)))
    for role, function in ((ROLE_TICK, "nvmlDeviceGetTemperatureV"), (ROLE_DETAIL, "nvmlDeviceGetTemperature")):
        costs.append(timer.function(function, function, role, handle, nvml.NVML_TEMPERATURE_GPU))
    for role, function in ((ROLE_TICK, "nvmlDeviceGetCurrentClocksEventReasons"),
                           (ROLE_DETAIL, "nvmlDeviceGetCurrentClocksThrottleReasons")):
        costs.append(timer.function(function, function, role, handle))
    for probe, function, constants, _ in SLOW_FIELD_CALLS:
        costs.append(timer.function(f"{function}({probe})", function, ROLE_SLOW, handle,
                                    *(getattr(nvml, c) for c in constants)))
    for role, function in ((ROLE_PROCESS, "nvmlDeviceGetComputeRunningProcesses_v3"),
                           (ROLE_DETAIL, "nvmlDeviceGetComputeRunningProcesses_v2")):
        costs.append(timer.function(function, function, role, handle))
    for role, function in zip((ROLE_PROCESS, ROLE_DETAIL), UTILIZATION_FUNCTIONS):
        # lastSeenTimeStamp 0: every sample in the driver's buffer, the most one read can return
        costs.append(timer.function(function, function, role, handle, 0))
    costs.append(timer.function("nvmlDeviceGetMigMode", "nvmlDeviceGetMigMode", ROLE_PROCESS, handle))
    return costs


def _gpm_costs(timer: _Timer, nvml: Any, handle: Any, sleep: Callable[[float], None]) -> list[CallCost]:
    """GPM support (asked once), a sample, and the metrics over two samples: all together and each alone."""
    costs = [timer.function("nvmlGpmQueryDeviceSupport", "nvmlGpmQueryDeviceSupport", ROLE_OPEN, handle)]
    if not hasattr(nvml, "nvmlGpmSampleAlloc"):
        return [*costs, timer.absent("nvmlGpmSampleAlloc", "nvmlGpmSampleAlloc", ROLE_OPEN)]
    samples = []
    try:
        for _ in range(2):
            outcome, sample = timer.outcome(nvml.nvmlGpmSampleAlloc)
            if outcome != SUCCESS:
                return [*costs, CallCost("nvmlGpmSampleAlloc", "nvmlGpmSampleAlloc", ROLE_OPEN, outcome,
                                         {outcome: 1}, 1, None, None)]
            samples.append(sample)
        older, newer = samples
        # The older sample is the last one the timing loop takes; the newer one is taken a tick later.
        sample_cost = timer.function("nvmlGpmSampleGet", "nvmlGpmSampleGet", ROLE_TICK, handle, older)
        costs.append(sample_cost)
        if sample_cost.return_code != SUCCESS:
            # Metrics over samples that were never filled say nothing (and are not what the backend does).
            why = f"not timed: nvmlGpmSampleGet returned {sample_cost.return_code}"
            return [*costs, timer.not_timed("nvmlGpmMetricsGet", "nvmlGpmMetricsGet", ROLE_TICK, why)]
        sleep(GPM_SAMPLE_GAP_S)
        timer.outcome(lambda: nvml.nvmlGpmSampleGet(handle, newer))
        costs.extend(_gpm_metric_costs(timer, nvml, older, newer))
    finally:
        for sample in samples:
            timer.outcome(lambda sample=sample: nvml.nvmlGpmSampleFree(sample))
    return costs


def _gpm_metric_costs(timer: _Timer, nvml: Any, older: Any, newer: Any) -> list[CallCost]:
    function = "nvmlGpmMetricsGet"
    present = [m for m in DEVICE_METRICS if hasattr(nvml, m.constant)]
    costs = [timer.absent(f"{function}[{m.field}]", m.constant, ROLE_DETAIL)
             for m in DEVICE_METRICS if m not in present]

    def metrics_get(metric_ids: list[int]) -> Any:
        request = metrics_request(nvml, older, newer, metric_ids)
        nvml.nvmlGpmMetricsGet(request)
        return request

    for metric in present:
        metric_id = getattr(nvml, metric.constant)
        costs.append(timer.time(f"{function}[{metric.field}]", function, ROLE_DETAIL,
                                lambda metric_id=metric_id: metrics_get([metric_id]),
                                entry_code=lambda request, metric_id=metric_id: metrics_answer(request)[metric_id][0]))
    all_ids = [getattr(nvml, m.constant) for m in present]
    costs.append(timer.time(f"{function}({len(all_ids)} metrics)", function, ROLE_TICK,
                            lambda: metrics_get(all_ids)))
    return costs


def measure_call_costs(
    nvml: Any,
    handle: Any,
    repeats: int = DEFAULT_REPEATS,
    *,
    driver_version: str | None = None,
    budget_s_per_call: float = DEFAULT_BUDGET_S,
    clock_ns: Callable[[], int] = time.perf_counter_ns,
    sleep: Callable[[float], None] = time.sleep,
) -> list[CallCost]:
    """Time each NVML call NvmlBackend makes for the GPU ``handle``, ``repeats`` times each.

    ``nvml`` is the pynvml module (or the test stub), already initialised. ``driver_version`` picks the
    throttle-counter field ids as the backend does (read from NVML when None). Each function stops early
    once it has taken ``budget_s_per_call`` seconds in all. Never raises for an NVML call that fails: the
    failure is the CallCost's ``return_code``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    timer = _Timer(nvml, repeats, budget_s_per_call, clock_ns)
    if driver_version is None:
        _, version = timer.outcome(nvml.nvmlSystemGetDriverVersion)
        driver_version = version.decode() if isinstance(version, bytes) else str(version or "unknown")
    return [
        *_field_value_costs(timer, nvml, handle, driver_version),
        *_device_call_costs(timer, nvml, handle),
        *_gpm_costs(timer, nvml, handle, sleep),
    ]


def tick_cost_us(costs: list[CallCost], roles: tuple[str, ...] = (ROLE_TICK,)) -> float:
    """Sum of the median times of the calls in ``roles``: NVML time per GPU per tick, microseconds."""
    return sum(c.median_us for c in costs if c.role in roles and c.median_us is not None)


# ---------------------------------------------------------------------------------------------------------
# The energy counter


def measure_energy_update_period(
    nvml: Any,
    handle: Any,
    duration_s: float = ENERGY_POLL_S,
    *,
    clock_ns: Callable[[], int] = time.perf_counter_ns,
) -> EnergyUpdatePeriod:
    """Poll ``nvmlDeviceGetTotalEnergyConsumption`` back to back for ``duration_s``; time its changes.

    A change is stamped when the poll that saw it returned, so intervals are exact to one poll's cost.
    The first change is only a start mark (polling began at an arbitrary phase of the counter's period).
    Stops at the first failing poll and reports its error name.
    """
    timer = _Timer(nvml, 1, 0.0, clock_ns)

    def read() -> Any:
        return nvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    started_ns = clock_ns()
    outcome, last = timer.outcome(read)
    polls_us: list[float] = []
    changed_at_ns: list[int] = []
    steps_mj: list[float] = []
    while outcome == SUCCESS and clock_ns() - started_ns < duration_s * 1e9:
        poll_ns = clock_ns()
        outcome, value = timer.outcome(read)
        now_ns = clock_ns()
        polls_us.append((now_ns - poll_ns) / 1e3)
        if outcome == SUCCESS and value != last:
            changed_at_ns.append(now_ns)
            steps_mj.append(float(value - last))
            last = value
    intervals_ms = [(b - a) / 1e6 for a, b in zip(changed_at_ns, changed_at_ns[1:])]
    return EnergyUpdatePeriod(
        return_code=outcome,
        duration_s=(clock_ns() - started_ns) / 1e9,
        polls=len(polls_us),
        changes=len(changed_at_ns),
        median_interval_ms=statistics.median(intervals_ms) if intervals_ms else None,
        min_interval_ms=min(intervals_ms) if intervals_ms else None,
        max_interval_ms=max(intervals_ms) if intervals_ms else None,
        median_step_mj=statistics.median(steps_mj) if steps_mj else None,
        median_poll_us=statistics.median(polls_us) if polls_us else None,
    )
