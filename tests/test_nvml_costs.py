"""probes/nvml_costs.py against the pynvml stub: the structure of the timings, error names, budgets.

Pure timing code: no figure is judged here. Clocks are injected, so the arithmetic (ns -> us, the
interval between energy-counter changes) is checked exactly, never against the wall clock.
"""

from __future__ import annotations

import dataclasses
import json

import pynvml
import pytest

from nvml_stub import make_nvml_stub
from wattledger.probes.nvml import NvmlBackend
from wattledger.probes.nvml_costs import (
    ROLE_DETAIL,
    ROLE_OPEN,
    ROLE_PROCESS,
    ROLE_SLOW,
    ROLE_TICK,
    SUCCESS,
    CallCost,
    backend_field_requests,
    measure_call_costs,
    measure_energy_update_period,
    p99,
    tick_cost_us,
)

ROLES = {ROLE_TICK, ROLE_SLOW, ROLE_PROCESS, ROLE_OPEN, ROLE_DETAIL}


class SteppingClock:
    """A nanosecond clock that moves on by ``step_ns`` each time it is read."""

    def __init__(self, step_ns: int) -> None:
        self.now = 1_000_000_000
        self.step_ns = step_ns

    def __call__(self) -> int:
        self.now += self.step_ns
        return self.now


def opened_stub():
    nvml = make_nvml_stub()
    nvml.nvmlInit()
    return nvml, nvml.nvmlDeviceGetHandleByIndex(0)


def costs_by_name(costs: list[CallCost]) -> dict[str, CallCost]:
    names = [c.name for c in costs]
    assert len(set(names)) == len(names), "every entry has its own name"
    return {c.name: c for c in costs}


def no_sleep(_seconds: float) -> None:
    pass


def test_every_call_is_timed_repeats_times_with_its_return_code():
    nvml, handle = opened_stub()
    costs = measure_call_costs(nvml, handle, repeats=3, clock_ns=SteppingClock(5_000), sleep=no_sleep)
    for cost in costs:
        assert cost.role in ROLES
        assert (cost.return_code, cost.calls) == (SUCCESS, 3), cost
        assert cost.return_codes == {SUCCESS: 3}
        assert cost.median_us == cost.p99_us == 5.0  # one clock step between the reads around a call
    json.dumps([dataclasses.asdict(c) for c in costs])  # ready for the GPU check's record
    assert nvml.fake.gpm_samples == {}  # the GPM buffers are freed again
    by_name = costs_by_name(costs)
    assert by_name["nvmlDeviceGetEnforcedPowerLimit(power_limit_watts)"].role == ROLE_SLOW
    assert by_name["nvmlDeviceGetClockInfo(SM)"].role == ROLE_TICK
    ticks = [c for c in costs if c.role == ROLE_TICK]
    assert tick_cost_us(costs) == 5.0 * len(ticks)
    assert tick_cost_us(costs, (ROLE_SLOW,)) == 5.0 * 3  # the power limit and two ECC counters


def test_it_times_every_call_the_backend_makes():
    # What NvmlBackend calls while sampling (every cadence due on each tick) must all be in the costs,
    # so the record cannot silently miss a call added to the backend later.
    nvml = make_nvml_stub()
    backend = NvmlBackend(nvml, process_interval_s=0.0, slow_interval_s=0.0, enable_xid=False)
    opened = len(nvml.mock_calls)
    backend.sample()
    backend.sample()
    sampled = {c[0] for c in nvml.mock_calls[opened:]}
    first_batch = nvml.fake.field_requests[0]
    backend.close()

    nvml, handle = opened_stub()
    costs = measure_call_costs(nvml, handle, repeats=1, sleep=no_sleep)
    # Allocating the two GPM buffers happens once per GPU (the costs allocate theirs untimed too).
    assert sampled - {c.function for c in costs} == {"nvmlGpmSampleAlloc"}
    requests = backend_field_requests(nvml, nvml.fake.driver_version)
    assert [(field_id, scope) for _, field_id, scope in requests] == first_batch


def test_unsupported_calls_fields_and_metrics_report_the_error_name():
    nvml, handle = opened_stub()
    gpu = nvml.fake.gpus[0]
    gpu.errors["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    gpu.field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_ERROR_NOT_SUPPORTED
    gpu.gpm_metric_errors[pynvml.NVML_GPM_METRIC_SM_UTIL] = pynvml.NVML_ERROR_NO_PERMISSION
    gpu.raises["nvmlDeviceGetClockInfo"] = TypeError("a binding surprise")
    del nvml.nvmlDeviceGetTemperature  # an older or newer pynvml without this binding
    costs = measure_call_costs(nvml, handle, repeats=4, sleep=no_sleep)
    by_name = costs_by_name(costs)

    ecc = by_name["nvmlDeviceGetTotalEccErrors(ecc_corrected_errors)"]
    assert (ecc.return_code, ecc.calls) == ("NVML_ERROR_NOT_SUPPORTED", 4)  # failures are timed too
    assert by_name["nvmlDeviceGetFieldValues[power_watts]"].return_code == "NVML_ERROR_NOT_SUPPORTED"
    assert by_name["nvmlDeviceGetFieldValues[power_average_watts]"].return_code == SUCCESS
    # The per-tick batch is the one the backend settles on: without the field that answered NotSupported.
    fields = len(backend_field_requests(nvml, nvml.fake.driver_version))
    assert by_name[f"nvmlDeviceGetFieldValues({fields - 1} answered)"].return_code == SUCCESS
    assert by_name[f"nvmlDeviceGetFieldValues(all {fields} fields)"].return_code == SUCCESS
    assert by_name["nvmlGpmMetricsGet[sm_activity_ratio]"].return_code == "NVML_ERROR_NO_PERMISSION"
    assert by_name["nvmlGpmMetricsGet[dram_activity_ratio]"].return_code == SUCCESS
    clock = by_name["nvmlDeviceGetClockInfo(SM)"]
    assert (clock.return_code, clock.calls) == ("TypeError", 1)  # not repeated: the binding is broken
    absent = by_name["nvmlDeviceGetTemperature"]
    assert (absent.return_code, absent.calls, absent.median_us) == ("pynvml has no nvmlDeviceGetTemperature", 0,
                                                                    None)


def test_a_gpu_without_gpm_reports_not_supported_and_skips_the_metrics():
    nvml, handle = opened_stub()
    nvml.fake.gpus[0].gpm_supported = False
    by_name = costs_by_name(measure_call_costs(nvml, handle, repeats=2, sleep=no_sleep))
    assert by_name["nvmlGpmSampleGet"].return_code == "NVML_ERROR_NOT_SUPPORTED"
    metrics = by_name["nvmlGpmMetricsGet"]
    assert metrics.calls == 0 and metrics.return_code.startswith("not timed: nvmlGpmSampleGet returned")
    assert nvml.fake.gpm_samples == {}


def test_a_slow_call_stops_at_its_time_budget():
    nvml, handle = opened_stub()
    # Each call takes 1 ms by this clock; a 3.5 ms budget allows four calls of the 100 asked for.
    costs = measure_call_costs(nvml, handle, repeats=100, budget_s_per_call=0.0035,
                               clock_ns=SteppingClock(1_000_000), sleep=no_sleep)
    assert {c.calls for c in costs if c.median_us is not None} == {4}
    with pytest.raises(ValueError, match="repeats"):
        measure_call_costs(nvml, handle, repeats=0)


def test_p99_is_the_nearest_rank():
    assert p99([float(v) for v in range(1, 101)]) == 99.0
    assert p99([float(v) for v in range(10, 0, -1)]) == 10.0  # fewer than 100 values: the largest
    assert p99([7.0]) == 7.0


# --------------------------------------------------------------------------------------------------------
# The energy counter's update period


class EnergyClock(SteppingClock):
    """Moves on ``step_ns`` per read; the stub GPU's energy counter moves ``step_mj`` every ``period_ns``."""

    def __init__(self, gpu, step_ns: int, period_ns: int, step_mj: int) -> None:
        super().__init__(step_ns)
        self.gpu, self.period_ns, self.step_mj = gpu, period_ns, step_mj
        self.next_update_ns = self.now + period_ns // 3  # the counter's phase is not the poller's

    def __call__(self) -> int:
        now = super().__call__()
        while now >= self.next_update_ns:
            self.gpu.energy_mj += self.step_mj
            self.next_update_ns += self.period_ns
        return now


def test_energy_update_period_is_the_median_interval_between_changes():
    nvml, handle = opened_stub()
    step_ns = 100_000  # 0.1 ms per clock read, three reads per poll
    clock = EnergyClock(nvml.fake.gpus[0], step_ns, period_ns=25_000_000, step_mj=8_750)
    period = measure_energy_update_period(nvml, handle, duration_s=0.5, clock_ns=clock)
    assert period.return_code == SUCCESS
    assert abs(period.median_interval_ms - 25.0) <= 3 * step_ns / 1e6  # exact to one poll
    assert period.min_interval_ms <= period.median_interval_ms <= period.max_interval_ms
    assert period.changes in (19, 20)  # 0.5 s / 25 ms, depending on the phase
    assert period.median_step_mj == 8_750
    assert period.median_poll_us == pytest.approx(step_ns / 1e3)
    assert period.polls > period.changes


def test_energy_counter_that_never_moves_or_fails_is_reported():
    nvml, handle = opened_stub()
    still = measure_energy_update_period(nvml, handle, duration_s=0.01, clock_ns=SteppingClock(100_000))
    assert (still.return_code, still.changes, still.median_interval_ms) == (SUCCESS, 0, None)

    nvml.fake.gpus[0].errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    unsupported = measure_energy_update_period(nvml, handle, duration_s=0.01, clock_ns=SteppingClock(100_000))
    assert (unsupported.return_code, unsupported.polls, unsupported.median_interval_ms) == (
        "NVML_ERROR_NOT_SUPPORTED", 0, None)

    # Lost half-way: the polls so far are kept and the error named.
    nvml.fake.gpus[0].errors.clear()
    clock = SteppingClock(100_000)
    lose_at = clock.now + 5_000_000

    def losing_clock() -> int:
        now = clock()
        if now >= lose_at:
            nvml.fake.lose(0)
        return now

    lost = measure_energy_update_period(nvml, handle, duration_s=1.0, clock_ns=losing_clock)
    assert lost.return_code == "NVML_ERROR_GPU_IS_LOST" and 0 < lost.polls < 100
