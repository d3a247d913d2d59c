"""One bad entry, one bad variant, one bad device: each costs that much and no more (issue 8, item 8).

- A per-entry return code of nvmlDeviceGetFieldValues or of a GPM metric drops or skips that entry:
  NVML_ERROR_UNKNOWN in one field used to take the whole device down, and it flapped up and down every
  second (re-acquired after the 1 s backoff, down again on the next read).
- NVML_ERROR_ARGUMENT_VERSION_MISMATCH tries the next, older variant of a function, or drops the field.
- An unexpected exception while reading one device loses that device's sample for that tick only.
- A failure that would repeat every tick is logged once, then counted.
"""

from __future__ import annotations

import logging

import pynvml
import pytest

from fakes import FakeClock
from nvml_stub import FakeGpu, default_gpus, make_nvml_stub
from wattledger.agent.ledger import Ledger
from wattledger.probes.nvml import EXCEPTIONS_BEFORE_DOWN, NvmlBackend

S = 1_000_000_000
P = pynvml
TICK_S = 0.1



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100 * S)


@pytest.fixture
def backend_of(clock):
    made: list[NvmlBackend] = []

    def make(nvml, **kwargs) -> NvmlBackend:
        backend = NvmlBackend(nvml, clock_ns=clock, enable_xid=False, logger=logging.getLogger("test.partial"),
                              **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def _ticks(backend, nvml, clock, count: int):
    out = []
    for _ in range(count):
        clock.advance(TICK_S)
        nvml.fake.advance(TICK_S)
        out.append(backend.sample())
    return out


def _row(backend, index: int, name: str):
    return {r.name: r for r in backend.field_status(index)}[name]


def warnings_about(caplog, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


# --------------------------------------------------------------------------------------------------------
# Per-entry return codes


def test_one_field_answering_unknown_leaves_the_device_up(backend_of, clock, caplog):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].field_errors[P.NVML_FI_DEV_MEMORY_TEMP] = P.NVML_ERROR_UNKNOWN
    backend = backend_of(nvml)
    with caplog.at_level(logging.INFO, logger="test.partial"):
        ticks = _ticks(backend, nvml, clock, 30)  # 3 s: the old code went down and came back 3 times
    assert all(tick[0].up for tick in ticks)
    assert all(tick[0].temperature_memory_celsius is None for tick in ticks)
    assert all(tick[0].power_watts == pytest.approx(350.0) and tick[0].energy_joules for tick in ticks)
    assert nvml.fake.calls("nvmlDeviceGetHandleByUUID") == 0  # never re-acquired: never lost
    assert backend.error_counts() == {(0, "temperature_memory_celsius", "NVML_ERROR_UNKNOWN"): 30}
    assert len(warnings_about(caplog, "temperature_memory_celsius")) == 1  # logged once, then counted
    assert _row(backend, 0, "device").supported
    assert _row(backend, 0, "temperature_memory_celsius").supported  # still asked: it may answer again
    nvml.fake.gpus[0].field_errors.clear()
    assert _ticks(backend, nvml, clock, 1)[0][0].temperature_memory_celsius == 52.0


@pytest.mark.parametrize("code", [P.NVML_ERROR_UNKNOWN, P.NVML_ERROR_GPU_IS_LOST, P.NVML_ERROR_UNINITIALIZED,
                                  P.NVML_ERROR_LIB_RM_VERSION_MISMATCH, P.NVML_ERROR_TIMEOUT])
def test_no_per_entry_code_takes_the_device_or_nvml_down(backend_of, clock, code):
    nvml = make_nvml_stub()
    nvml.fake.gpus[1].field_errors[P.NVML_FI_DEV_POWER_INSTANT] = code
    backend = backend_of(nvml)
    for tick in _ticks(backend, nvml, clock, 12):
        assert [s.up for s in tick] == [True, True]
        assert tick[1].power_watts is None and tick[1].power_average_watts is not None
    assert backend.error_counts()[(1, "power_watts", NAME[code])] == 12
    assert nvml.fake.calls("nvmlInit") == 1


NAME = {getattr(P, n): n for n in dir(P) if n.startswith("NVML_ERROR_")}


def test_one_gpm_metric_failing_leaves_the_others_and_the_device(backend_of, clock, caplog):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].gpm_metric_errors[P.NVML_GPM_METRIC_SM_OCCUPANCY] = P.NVML_ERROR_UNKNOWN
    nvml.fake.gpus[1].gpm_metric_errors[P.NVML_GPM_METRIC_DRAM_BW_UTIL] = P.NVML_ERROR_NOT_SUPPORTED
    backend = backend_of(nvml)
    with caplog.at_level(logging.INFO, logger="test.partial"):
        ticks = _ticks(backend, nvml, clock, 20)
    for tick in ticks[1:]:  # the first GPM read has no earlier sample
        assert [s.up for s in tick] == [True, True]
        assert tick[0].sm_occupancy_ratio is None and tick[0].sm_activity_ratio == pytest.approx(0.45)
        assert tick[1].dram_activity_ratio is None and tick[1].tensor_activity_ratio == pytest.approx(0.25)
    assert backend.error_counts() == {(0, "sm_occupancy_ratio", "NVML_ERROR_UNKNOWN"): 19}
    assert len(warnings_about(caplog, "sm_occupancy_ratio")) == 1
    assert not _row(backend, 1, "dram_activity_ratio").supported  # NotSupported: dropped for that GPU
    assert _row(backend, 1, "sm_activity_ratio").supported


# --------------------------------------------------------------------------------------------------------
# ARGUMENT_VERSION_MISMATCH


def test_version_mismatch_tries_the_older_variant(backend_of, clock):
    nvml = make_nvml_stub()
    gpu = nvml.fake.gpus[0]
    gpu.errors["nvmlDeviceGetTemperatureV"] = P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    gpu.errors["nvmlDeviceGetComputeRunningProcesses_v3"] = P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    backend = backend_of(nvml, process_interval_s=0.0)
    ticks = _ticks(backend, nvml, clock, 3)
    assert all(t[0].temperature_gpu_celsius == 45.0 and t[0].processes[0].pid == 4242 for t in ticks)
    assert nvml.fake.calls("nvmlDeviceGetTemperatureV", gpu=0) == 1  # not asked again
    assert nvml.fake.calls("nvmlDeviceGetTemperature", gpu=0) == 3
    assert nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v2", gpu=0) == 3
    assert backend.error_counts() == {}


def test_version_mismatch_without_an_older_variant_drops_the_field(backend_of, clock):
    nvml = make_nvml_stub()
    gpu = nvml.fake.gpus[0]
    gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    gpu.field_errors[P.NVML_FI_DEV_PCIE_COUNT_TX_BYTES] = P.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    backend = backend_of(nvml)
    ticks = _ticks(backend, nvml, clock, 5)
    assert all(t[0].up and t[0].energy_joules is None and t[0].pcie_transmit_bytes is None for t in ticks)
    assert nvml.fake.calls("nvmlDeviceGetTotalEnergyConsumption", gpu=0) == 1
    assert P.NVML_FI_DEV_PCIE_COUNT_TX_BYTES not in dict(nvml.fake.field_requests[-2])  # GPU 0, last tick
    for name in ("energy_joules", "pcie_transmit_bytes"):
        row = _row(backend, 0, name)
        assert (row.supported, row.reason) == (False, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH")
    assert ticks[-1][1].energy_joules is not None  # the other GPU keeps it
    assert backend.error_counts() == {}


def test_gpm_metrics_get_version_mismatch_drops_gpm(backend_of, clock, monkeypatch):
    nvml = make_nvml_stub([FakeGpu()])
    monkeypatch.setattr(nvml, "NVML_GPM_METRICS_GET_VERSION", 99)  # a pynvml newer than the driver
    backend = backend_of(nvml)
    ticks = _ticks(backend, nvml, clock, 5)
    assert all(t[0].up and t[0].power_watts is not None for t in ticks)
    assert not _row(backend, 0, "gpm").supported
    calls = nvml.fake.calls("nvmlGpmMetricsGet")
    _ticks(backend, nvml, clock, 3)
    assert nvml.fake.calls("nvmlGpmMetricsGet") == calls == 1  # dropped after the first answer
    assert nvml.fake.gpm_samples == {}  # and its buffers freed
    assert backend.error_counts() == {}


# --------------------------------------------------------------------------------------------------------
# An unexpected exception on one device


def test_an_exception_on_one_device_costs_that_device_one_tick(backend_of, clock, caplog):
    nvml = make_nvml_stub(default_gpus(3))
    backend = backend_of(nvml)
    ledger = Ledger()
    ledger.set_devices("nvml", False, backend.devices())
    for tick in _ticks(backend, nvml, clock, 3):
        ledger.record_gpus(tick)
    before = {g.info.index: (g.energy.total, g.busy_seconds["gpu"]) for g in ledger.snapshot().gpus}

    nvml.fake.gpus[1].raises["nvmlDeviceGetClockInfo"] = TypeError("an int was expected, got c_uint")
    with caplog.at_level(logging.INFO, logger="test.partial"):
        broken = _ticks(backend, nvml, clock, 4)
    for tick in broken:
        assert [s.index for s in tick] == [0, 2] and all(s.up for s in tick)  # GPU 1 absent, not down
        ledger.record_gpus(tick)
    assert backend.error_counts() == {(1, "device", "TypeError"): 4}
    assert len(warnings_about(caplog, "TypeError")) == 1

    nvml.fake.gpus[1].raises.clear()
    for tick in _ticks(backend, nvml, clock, 2):
        assert [s.up for s in tick] == [True, True, True]
        ledger.record_gpus(tick)
    after = {g.info.index: g for g in ledger.snapshot().gpus}
    # GPU 1 was never "down": the ledger integrated across the gap (busy time at 60% utilization over all 6
    # ticks, energy from the hardware counter at 375 W), as for the GPUs that never failed.
    for index in (0, 1, 2):
        energy_before, busy_before = before[index]
        watts = 350.0 + 25.0 * index
        assert after[index].energy.total - energy_before == pytest.approx(6 * TICK_S * watts, rel=1e-6)
        assert after[index].busy_seconds["gpu"] - busy_before == pytest.approx(6 * TICK_S * 0.6)
        assert after[index].up


def test_an_exception_that_never_goes_away_marks_the_device_down(backend_of, clock):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].raises["nvmlDeviceGetUtilizationRates"] = ValueError("bad struct")
    backend = backend_of(nvml)
    ticks = _ticks(backend, nvml, clock, EXCEPTIONS_BEFORE_DOWN)
    assert all([s.index for s in t] == [1] for t in ticks[:-1])
    assert ticks[-1][0].index == 0 and ticks[-1][0].up is False  # shows as a lost GPU, not a frozen one
    assert "ValueError" in _row(backend, 0, "device").reason
    nvml.fake.gpus[0].raises.clear()
    clock.advance(1.0)  # the 1 s re-acquire backoff
    assert [s.up for s in backend.sample()] == [True, True]


def test_the_counted_failures_reach_the_exposition(backend_of, clock):
    # Logged once, then counted: the count must be visible to Prometheus, or the failure is only in a log.
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from wattledger.agent.sampler import Sampler
    from wattledger.exporters.prometheus import make_registry

    nvml = make_nvml_stub()
    nvml.fake.gpus[0].field_errors[P.NVML_FI_DEV_MEMORY_TEMP] = P.NVML_ERROR_UNKNOWN
    backend = backend_of(nvml)
    ledger = Ledger()
    sampler = Sampler(ledger, backend, None, clock=lambda: clock() / S)
    for _ in range(5):
        clock.advance(TICK_S)
        nvml.fake.advance(TICK_S)
        sampler.tick()
    text = generate_latest(make_registry(ledger, "test")).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("wattledger_gpu_read_errors_total", (("error", "NVML_ERROR_UNKNOWN"), ("gpu", "0"),
                                                ("probe", "temperature_memory_celsius"),
                                                ("uuid", backend.devices()[0].uuid)))
    assert samples[key] == 5
