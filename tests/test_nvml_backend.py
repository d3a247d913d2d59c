"""NvmlBackend against the pynvml stub: values, units, every error class, GPM, MIG, processes, XID."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time

import pynvml
import pytest

from nvml_stub import GIB, MIB, FakeGpu, FakeMig, FakeProcess, default_gpus, make_nvml_stub
from wattledger.probes.base import FatalProbeError, FieldStatus, GpuBackend, GpuProcess, GpuSample, ProbeUnavailable
from wattledger.probes.nvml import BACKOFF_MAX_S, NvmlBackend, NvmlFatalError

S = 1_000_000_000  # ns per second

NAMES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: "NVML_ERROR_NOT_SUPPORTED",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "NVML_ERROR_FUNCTION_NOT_FOUND",
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH: "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
    pynvml.NVML_ERROR_NO_PERMISSION: "NVML_ERROR_NO_PERMISSION",
    pynvml.NVML_ERROR_NOT_FOUND: "NVML_ERROR_NOT_FOUND",
    pynvml.NVML_ERROR_NO_DATA: "NVML_ERROR_NO_DATA",
}


class FakeClock:
    def __init__(self, start_s: float = 100.0) -> None:
        self.now = int(start_s * S)

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_backend(clock):
    """Factory: NvmlBackend over a stub, closed after the test."""
    created: list[NvmlBackend] = []

    def factory(nvml=None, **kwargs) -> NvmlBackend:
        kwargs.setdefault("clock_ns", clock)
        kwargs.setdefault("enable_xid", False)  # the XID thread has its own tests
        backend = NvmlBackend(nvml if nvml is not None else make_nvml_stub(), **kwargs)
        created.append(backend)
        return backend

    yield factory
    for backend in created:
        backend.close()


def status(backend: NvmlBackend, index: int, name: str):
    rows = {row.name: row for row in backend.field_status(index)}
    return rows[name]


VALUE_FIELDS = [f.name for f in dataclasses.fields(GpuSample) if f.name not in ("index", "uuid", "monotonic_ns", "up")]


# --------------------------------------------------------------------------------------------------------
# Defaults, units, identity


def test_devices_report_static_facts_as_str(open_backend):
    backend = open_backend(make_nvml_stub(driver_version="560.35.03"))
    infos = backend.devices()
    assert [i.index for i in infos] == [0, 1]
    assert infos[0].uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert infos[1].pci_bus_id == "00000000:28:00.0"
    assert infos[0].model_name == "NVIDIA H100 80GB HBM3"
    assert infos[0].driver_version == "560.35.03"
    assert infos[0].memory_total_bytes == 80 * GIB
    assert infos[0].power_limit_default_watts == pytest.approx(700.0)
    assert infos[0].mig_enabled is False and infos[0].simulated is False

    # pynvml before 11.5 returns bytes for names, UUIDs and the driver version.
    nvml = make_nvml_stub(legacy_bytes=True)
    backend = open_backend(nvml)
    info = backend.devices()[0]
    assert info.uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert info.model_name == "NVIDIA H100 80GB HBM3" and info.driver_version == "580.95.05"
    assert backend.sample()[0].uuid == info.uuid


def test_units_are_converted_once_and_counters_move(open_backend, clock):
    gpu = FakeGpu(
        power_mw=412_345, power_average_mw=401_000, power_limit_mw=650_000, energy_mj=7_654_321,
        sm_clock_mhz=1755, memory_clock_mhz=2619, utilization_gpu=73, utilization_memory=8,
        temperature_gpu=61, temperature_memory=70, nvlink_tx_kib=3, nvlink_rx_kib=5,
        memory_total=80 * GIB, memory_used=10 * GIB, memory_reserved=600 * MIB,
        throttle_ns={"sw_power_cap": 1_500_000_000, "hw_thermal_slowdown": 250_000_000},
    )
    nvml = make_nvml_stub([gpu])
    backend = open_backend(nvml)
    s = backend.sample()[0]
    assert s.monotonic_ns == clock.now and s.up
    assert s.power_watts == pytest.approx(412.345)  # mW -> W
    assert s.power_average_watts == pytest.approx(401.0)
    assert s.power_limit_watts == pytest.approx(650.0)
    assert s.energy_joules == pytest.approx(7654.321)  # mJ -> J
    assert s.sm_clock_hertz == pytest.approx(1.755e9)  # MHz -> Hz
    assert s.memory_clock_hertz == pytest.approx(2.619e9)
    assert s.utilization_gpu_ratio == pytest.approx(0.73)  # percent -> ratio
    assert s.utilization_memory_controller_ratio == pytest.approx(0.08)
    assert s.temperature_gpu_celsius == 61.0 and s.temperature_memory_celsius == 70.0
    assert s.nvlink_transmit_bytes == 3 * 1024 and s.nvlink_receive_bytes == 5 * 1024  # KiB -> bytes
    assert (s.memory_total_bytes, s.memory_used_bytes, s.memory_reserved_bytes) == (80 * GIB, 10 * GIB, 600 * MIB)
    assert s.throttle_seconds["sw_power_cap"] == pytest.approx(1.5)  # ns -> s
    assert s.throttle_seconds["hw_thermal_slowdown"] == pytest.approx(0.25)
    assert s.throttle_seconds["sync_boost"] == 0.0
    assert s.ecc_corrected_errors == 0 and s.ecc_uncorrected_errors == 0
    # The stub's per-process buffer is empty (NOT_FOUND): measured, and the process did not run.
    assert s.processes == (GpuProcess(pid=4242, memory_used_bytes=8 * GIB, sm_utilization_ratio=0.0,
                                      memory_controller_utilization_ratio=0.0),)

    # Counters are the hardware's, read again each tick; the timestamp is the injected clock's.
    nvml.fake.advance(2.0)
    clock.advance(2.0)
    later = backend.sample()[0]
    assert later.energy_joules - s.energy_joules == pytest.approx(2.0 * 412.345)
    assert later.pcie_transmit_bytes - s.pcie_transmit_bytes == 2 * 1000 * MIB
    assert later.monotonic_ns - s.monotonic_ns == 2 * S


def test_is_a_gpu_backend_with_a_status_for_every_field(open_backend):
    backend = open_backend()
    assert isinstance(backend, GpuBackend)
    assert backend.name == "nvml" and backend.simulated is False
    backend.sample()
    names = {row.name for row in backend.field_status(0)}
    assert set(VALUE_FIELDS) <= names
    assert {"gpm", "xid_events", "device"} <= names
    with pytest.raises(IndexError):
        backend.field_status(7)


# --------------------------------------------------------------------------------------------------------
# Field values: batching, scope, valueType, sentinels


def test_field_values_come_in_one_batch_with_scopes(open_backend):
    nvml = make_nvml_stub()
    backend = open_backend(nvml)
    backend.sample()
    assert nvml.fake.calls("nvmlDeviceGetFieldValues", gpu=0) == 1
    request = dict(nvml.fake.field_requests[0])
    assert request[pynvml.NVML_FI_DEV_POWER_INSTANT] == pynvml.NVML_POWER_SCOPE_GPU
    assert request[pynvml.NVML_FI_DEV_POWER_AVERAGE] == pynvml.NVML_POWER_SCOPE_GPU
    # NVLink counters summed over every link need scopeId UINT_MAX; a link index gives one link's share.
    assert request[pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX] == 0xFFFFFFFF
    assert request[pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX] == 0xFFFFFFFF
    for name in ("SW_POWER_CAP", "SW_THERM_SLOWDOWN", "HW_THERM_SLOWDOWN", "HW_POWER_BRAKE_SLOWDOWN"):
        assert getattr(pynvml, f"NVML_FI_DEV_CLOCKS_EVENT_REASON_{name}") in request


def test_field_values_are_read_from_the_member_value_type_names(open_backend):
    # NVML fills one member of a union and says which in valueType; reading another member gives garbage
    # (a double's bytes read as ullVal are a huge integer), so each field here uses a different type.
    P = pynvml
    gpu = FakeGpu(power_average_mw=345_000, pcie_rx_bytes=777, temperature_memory=71, nvlink_tx_kib=3)
    gpu.field_values[P.NVML_FI_DEV_POWER_INSTANT] = 351_500.5
    gpu.field_value_types.update({
        P.NVML_FI_DEV_POWER_INSTANT: P.NVML_VALUE_TYPE_DOUBLE,
        P.NVML_FI_DEV_POWER_AVERAGE: P.NVML_VALUE_TYPE_SIGNED_INT,
        P.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: P.NVML_VALUE_TYPE_DOUBLE,
        P.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: P.NVML_VALUE_TYPE_UNSIGNED_LONG,
        P.NVML_FI_DEV_MEMORY_TEMP: P.NVML_VALUE_TYPE_SIGNED_LONG_LONG,
        P.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: P.NVML_VALUE_TYPE_UNSIGNED_SHORT,
        P.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: P.NVML_VALUE_TYPE_UNSIGNED_INT,
    })
    backend = open_backend(make_nvml_stub([gpu]))
    s = backend.sample()[0]
    assert s.power_watts == pytest.approx(351.5005)
    assert s.power_average_watts == pytest.approx(345.0)
    assert s.pcie_transmit_bytes == 1_000_000_000 and isinstance(s.pcie_transmit_bytes, int)
    assert s.pcie_receive_bytes == 777
    assert s.temperature_memory_celsius == 71
    assert s.nvlink_transmit_bytes == 3 * 1024
    assert s.nvlink_receive_bytes == 5_000_000 * 1024
    assert backend.error_counts() == {}


def test_not_available_values_become_none(open_backend):
    gpu = FakeGpu(energy_mj=0xFFFFFFFFFFFFFFFF, processes=[FakeProcess(77, None)])
    gpu.field_values[pynvml.NVML_FI_DEV_MEMORY_TEMP] = 0xFFFFFFFF
    backend = open_backend(make_nvml_stub([gpu]))
    s = backend.sample()[0]
    assert s.energy_joules is None
    assert s.temperature_memory_celsius is None
    assert s.processes[0].pid == 77 and s.processes[0].memory_used_bytes is None
    assert s.power_watts == pytest.approx(350.0)  # the rest of the batch is unaffected


# --------------------------------------------------------------------------------------------------------
# Error classes


DROP_CODES = [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND]


def test_unsupported_function_is_dropped_for_that_device_only(open_backend, caplog):
    # GPU i answers DROP_CODES[i]; the last GPU answers normally.
    nvml = make_nvml_stub(default_gpus(len(DROP_CODES) + 1))
    for gpu, code in zip(nvml.fake.gpus, DROP_CODES):
        gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = code
    backend = open_backend(nvml, logger=logging.getLogger("test.nvml"))
    with caplog.at_level(logging.INFO, logger="test.nvml"):
        ticks = [backend.sample() for _ in range(3)]
    healthy = len(DROP_CODES)
    for index, code in enumerate(DROP_CODES):
        assert all(t[index].energy_joules is None for t in ticks)
        assert nvml.fake.calls("nvmlDeviceGetTotalEnergyConsumption", gpu=index) == 1  # never asked again
        row = status(backend, index, "energy_joules")
        assert (row.supported, row.reason) == (False, NAMES[code])
    assert all(t[healthy].energy_joules is not None for t in ticks)
    assert nvml.fake.calls("nvmlDeviceGetTotalEnergyConsumption", gpu=healthy) == 3
    assert status(backend, healthy, "energy_joules") == FieldStatus("energy_joules", True, None)
    drops = [r for r in caplog.records if "energy_joules" in r.getMessage()]
    assert len(drops) == len(DROP_CODES) and all(r.levelno == logging.INFO for r in drops)
    assert backend.error_counts() == {}


def test_unsupported_field_id_leaves_the_batch(open_backend):
    nvml = make_nvml_stub(default_gpus(3))
    codes = [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION]
    for gpu, code in zip(nvml.fake.gpus, codes):
        gpu.field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT] = code
    backend = open_backend(nvml)
    first = backend.sample()
    second = backend.sample()
    requests = [dict(r) for r in nvml.fake.field_requests]  # GPUs 0, 1, 2, then 0, 1, 2
    for index, code in enumerate(codes):
        assert first[index].power_watts is None and second[index].power_watts is None
        assert second[index].power_average_watts == pytest.approx(345_000e-3 + 25 * index)
        assert pynvml.NVML_FI_DEV_POWER_INSTANT in requests[index]
        assert pynvml.NVML_FI_DEV_POWER_INSTANT not in requests[3 + index]
        assert status(backend, index, "power_watts") == FieldStatus("power_watts", False, NAMES[code])
    assert second[2].power_watts == pytest.approx(400.0)
    assert pynvml.NVML_FI_DEV_POWER_INSTANT in requests[5]


def test_unsupported_throttle_field_is_reported(open_backend):
    nvml = make_nvml_stub()  # driver 580.95: HW power brake is field 271
    nvml.fake.gpus[0].field_errors[271] = pynvml.NVML_ERROR_NOT_SUPPORTED
    # The ids come from the driver's version, so a pynvml without the names (12.535 has none of the
    # CLOCKS_EVENT_REASON ones) still reads every counter the driver has.
    del nvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST, nvml.NVML_FI_DEV_PERF_POLICY_SYNC_BOOST
    del nvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP
    backend = open_backend(nvml)
    s = backend.sample()[0]
    assert s.throttle_seconds == {"sw_power_cap": 2.5, "sync_boost": 0.0, "sw_thermal_slowdown": 0.0,
                                  "hw_thermal_slowdown": 0.001}
    assert {74, 76, 269, 270, 271} <= set(dict(nvml.fake.field_requests[0]))
    summary = status(backend, 0, "throttle_seconds")
    assert summary.supported and "hw_power_brake_slowdown: NVML_ERROR_NOT_SUPPORTED" in summary.reason
    assert not status(backend, 0, "throttle_seconds.hw_power_brake_slowdown").supported
    assert status(backend, 1, "throttle_seconds.hw_power_brake_slowdown").supported


def test_no_data_is_none_for_one_tick_only(open_backend):
    nvml = make_nvml_stub()
    codes = [pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_NO_DATA]
    for gpu, code in zip(nvml.fake.gpus, codes):
        gpu.field_errors[pynvml.NVML_FI_DEV_MEMORY_TEMP] = code
        gpu.errors["nvmlDeviceGetTotalEccErrors"] = code
    backend = open_backend(nvml)
    for index, (s, code) in enumerate(zip(backend.sample(), codes)):
        assert s.temperature_memory_celsius is None and s.ecc_corrected_errors is None
        row = status(backend, index, "temperature_memory_celsius")
        assert (row.supported, row.reason) == (True, f"no value on the last read: {NAMES[code]}")
    for gpu in nvml.fake.gpus:
        gpu.field_errors.clear()
        gpu.errors.clear()
    for index, s in enumerate(backend.sample()):
        assert s.temperature_memory_celsius == 52.0 and s.ecc_corrected_errors == 0
        assert status(backend, index, "temperature_memory_celsius").reason is None
        assert nvml.fake.calls("nvmlDeviceGetTotalEccErrors", gpu=index) == 4  # 2 ticks x 2 counters
    assert backend.error_counts() == {}


def test_other_errors_are_none_and_counted(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].errors["nvmlDeviceGetEnforcedPowerLimit"] = pynvml.NVML_ERROR_TIMEOUT
    nvml.fake.gpus[0].gpm_supported = False
    backend = open_backend(nvml)
    for _ in range(3):
        assert backend.sample()[0].power_limit_watts is None
    assert nvml.fake.calls("nvmlDeviceGetEnforcedPowerLimit", gpu=0) == 3  # not dropped: tried each tick
    assert backend.error_counts() == {(0, "power_limit_watts", "NVML_ERROR_TIMEOUT"): 3}
    row = status(backend, 0, "power_limit_watts")
    assert row.supported and "NVML_ERROR_TIMEOUT" in row.reason


def test_lost_device_is_down_then_reacquired_by_uuid_after_backoff(open_backend, clock):
    nvml = make_nvml_stub()
    fake = nvml.fake
    backend = open_backend(nvml)
    assert backend.sample()[0].up

    fake.lose(0)
    clock.advance(0.1)
    down = backend.sample()
    assert down[0].up is False and down[0].uuid == fake.gpus[0].uuid and down[0].monotonic_ns == clock.now
    assert all(getattr(down[0], name) is None for name in VALUE_FIELDS)
    assert down[1].up and down[1].power_watts is not None  # the other GPU carries on
    assert not status(backend, 0, "device").supported

    clock.advance(0.5)  # before the 1 s backoff: not even tried
    assert backend.sample()[0].up is False
    assert fake.calls("nvmlDeviceGetHandleByUUID") == 0

    clock.advance(0.5)  # 1 s after the loss: tried, still lost, next try 2 s later
    assert backend.sample()[0].up is False
    assert fake.calls("nvmlDeviceGetHandleByUUID") == 1

    fake.recover(0)  # reset done: a new handle works, the old one stays dead
    clock.advance(1.0)
    assert backend.sample()[0].up is False
    assert fake.calls("nvmlDeviceGetHandleByUUID") == 1

    clock.advance(1.0)
    back = backend.sample()[0]
    assert fake.calls("nvmlDeviceGetHandleByUUID") == 2
    assert back.up and back.power_watts == pytest.approx(350.0) and back.energy_joules is not None
    assert status(backend, 0, "device").supported
    assert status(backend, 0, "power_watts").supported  # a lost device drops nothing


def test_other_device_down_codes(open_backend, clock):
    nvml = make_nvml_stub(default_gpus(4))
    backend = open_backend(nvml)
    backend.sample()
    nvml.fake.lose(0, pynvml.NVML_ERROR_RESET_REQUIRED)
    nvml.fake.lose(1, pynvml.NVML_ERROR_UNKNOWN)
    # GpuIsLost in ONE ENTRY of the field-value batch speaks for that entry only (issue 8, item 8: this
    # used to take the device down): a GPU that is really lost fails the whole calls of the same tick.
    nvml.fake.gpus[2].field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_ERROR_GPU_IS_LOST
    samples = backend.sample()
    assert [s.up for s in samples] == [False, False, True, True]
    assert samples[2].power_watts is None and samples[2].power_average_watts is not None
    assert "NVML_ERROR_RESET_REQUIRED" in status(backend, 0, "device").reason
    assert "NVML_ERROR_UNKNOWN" in status(backend, 1, "device").reason
    nvml.fake.recover(0)
    nvml.fake.recover(1)
    nvml.fake.gpus[2].field_errors.clear()
    clock.advance(1.0)
    assert [s.up for s in backend.sample()] == [True, True, True, True]
    assert backend.error_counts() == {(2, "power_watts", "NVML_ERROR_GPU_IS_LOST"): 1}


def test_lost_device_backoff_doubles_to_30_seconds(open_backend, clock):
    nvml = make_nvml_stub([FakeGpu()])
    backend = open_backend(nvml)
    backend.sample()
    nvml.fake.lose(0)
    backend.sample()
    lost_at = clock.now
    attempts = []
    for _ in range(240):  # two minutes in 0.5 s ticks
        clock.advance(0.5)
        before = nvml.fake.calls("nvmlDeviceGetHandleByUUID")
        backend.sample()
        if nvml.fake.calls("nvmlDeviceGetHandleByUUID") > before:
            attempts.append(round((clock.now - lost_at) / S, 1))
    gaps = [round(b - a, 1) for a, b in zip([0.0] + attempts, attempts)]
    assert gaps[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S]


def test_driver_gone_reinitialises_with_backoff(open_backend, clock):
    nvml = make_nvml_stub()
    fake = nvml.fake
    backend = open_backend(nvml)
    backend.sample()
    assert fake.calls("nvmlInit") == 1

    fake.uninitialize(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert [s.up for s in backend.sample()] == [False, False]
    clock.advance(0.5)
    assert [s.up for s in backend.sample()] == [False, False]
    assert fake.calls("nvmlInit") == 1  # backoff not over

    clock.advance(0.5)
    assert [s.up for s in backend.sample()] == [False, False]
    assert fake.calls("nvmlInit") == 2  # tried, failed: next in 2 s

    fake.init_error = None  # driver loaded again
    clock.advance(1.0)
    backend.sample()
    assert fake.calls("nvmlInit") == 2
    clock.advance(1.0)
    samples = backend.sample()
    assert fake.calls("nvmlInit") == 3
    assert [s.up for s in samples] == [True, True]  # handles re-acquired in the same tick
    assert samples[0].power_watts == pytest.approx(350.0)


def test_lib_rm_version_mismatch_is_fatal(open_backend):
    nvml = make_nvml_stub()
    backend = open_backend(nvml)
    backend.sample()
    nvml.fake.gpus[1].errors["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    with pytest.raises(NvmlFatalError, match="restart the agent") as caught:
        backend.sample()
    assert isinstance(caught.value, FatalProbeError)  # the sampler re-raises these instead of counting them
    # The same code in one entry of the field-value batch is that entry's only (issue 8, item 8): the whole
    # calls of the tick would fail with it if the library really were mismatched.
    nvml.fake.gpus[1].errors.clear()
    nvml.fake.gpus[0].field_errors[pynvml.NVML_FI_DEV_POWER_AVERAGE] = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    sample = backend.sample()[0]
    assert sample.up and sample.power_average_watts is None and sample.power_watts is not None


# --------------------------------------------------------------------------------------------------------
# Start-up failures


INIT_FAILURES = [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
         "NVML unavailable: libnvidia-ml.so.1 not found (no NVIDIA driver on this machine)"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVML unavailable: the NVIDIA kernel driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "NVML unavailable: no permission to open /dev/nvidia*"),
        (pynvml.NVML_ERROR_INSUFFICIENT_POWER, "NVML unavailable: nvmlInit failed with NVML_ERROR_INSUFFICIENT_POWER"),
]


def test_init_failure_is_probe_unavailable_in_one_line():
    nvml = make_nvml_stub()
    for code, message in INIT_FAILURES:
        nvml.fake.init_error = code
        with pytest.raises(ProbeUnavailable) as caught:
            NvmlBackend(nvml, enable_xid=False)
        text = str(caught.value)
        assert text.startswith(message) and "\n" not in text
    assert nvml.fake.calls("nvmlInit") == len(INIT_FAILURES)
    assert nvml.fake.calls("nvmlDeviceGetCount") == 0

    # NVML starts but sees no GPU: unavailable too, and NVML is shut down again.
    nvml.fake.init_error = None
    nvml.fake.gpus.clear()
    with pytest.raises(ProbeUnavailable, match="reports no GPUs"):
        NvmlBackend(nvml, enable_xid=False)
    assert nvml.fake.calls("nvmlShutdown") == 1


def test_missing_pynvml_is_probe_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with pytest.raises(ProbeUnavailable, match="nvidia-ml-py"):
        NvmlBackend()


def test_gpu_without_uuid_is_left_out(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].errors["nvmlDeviceGetUUID"] = pynvml.NVML_ERROR_UNKNOWN
    backend = open_backend(nvml)
    assert [d.index for d in backend.devices()] == [1]
    assert [s.index for s in backend.sample()] == [1]


# --------------------------------------------------------------------------------------------------------
# Versioned functions


def test_memory_info_falls_back_from_v2_to_v1(open_backend):
    codes = [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
             pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH]
    nvml = make_nvml_stub(default_gpus(len(codes) + 1))
    for gpu, code in zip(nvml.fake.gpus, codes):
        gpu.memory_v2_error = code
    backend = open_backend(nvml)
    ticks = [backend.sample(), backend.sample()]
    for index, code in enumerate(codes):
        for tick in ticks:
            assert tick[index].memory_reserved_bytes is None
            assert tick[index].memory_used_bytes == 20 * GIB + 512 * MIB  # v1 counts reserved as used
            assert tick[index].memory_total_bytes == 80 * GIB
        v2_calls = [c for c in nvml.nvmlDeviceGetMemoryInfo.call_args_list
                    if nvml.fake.gpu_of(c.args[0]) == index and c.kwargs.get("version")]
        assert len(v2_calls) == 1  # at open; never again after the fallback
        row = status(backend, index, "memory_reserved_bytes")
        assert (row.supported, row.reason) == (False, f"memory info v2: {NAMES[code]}")
        assert status(backend, index, "memory_used_bytes").supported
    healthy = nvml.fake.gpus[len(codes)]
    assert ticks[1][len(codes)].memory_reserved_bytes == 512 * MIB
    assert ticks[1][len(codes)].memory_used_bytes == 20 * GIB
    # NoData from v2 is "nothing this tick", not a reason to fall back.
    healthy.memory_v2_error = pynvml.NVML_ERROR_NO_DATA
    assert backend.sample()[len(codes)].memory_used_bytes is None
    healthy.memory_v2_error = None
    assert backend.sample()[len(codes)].memory_reserved_bytes == 512 * MIB


def test_versioned_functions_newest_first_then_older(open_backend):
    nvml = make_nvml_stub()
    gpu0, gpu1 = nvml.fake.gpus
    bits = pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    gpu0.clock_event_reasons = gpu1.clock_event_reasons = bits | 0x400  # 0x400: a bit with no name here
    gpu1.errors["nvmlDeviceGetCurrentClocksEventReasons"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    gpu1.errors["nvmlDeviceGetTemperatureV"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    gpu1.errors["nvmlDeviceGetComputeRunningProcesses_v3"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    backend = open_backend(nvml, process_interval_s=0.0)
    for _ in range(2):
        samples = backend.sample()
        assert samples[0].throttle_reasons == frozenset({"sw_power_cap", "hw_thermal_slowdown"})
        assert samples[1].throttle_reasons == samples[0].throttle_reasons
    assert nvml.fake.calls("nvmlDeviceGetCurrentClocksThrottleReasons", gpu=0) == 0
    assert nvml.fake.calls("nvmlDeviceGetCurrentClocksEventReasons", gpu=1) == 1  # not retried
    assert nvml.fake.calls("nvmlDeviceGetCurrentClocksThrottleReasons", gpu=1) == 2
    assert status(backend, 1, "throttle_reasons").supported
    # Temperature: nvmlDeviceGetTemperatureV first, the deprecated unversioned call where it is missing.
    assert samples[0].temperature_gpu_celsius == 45.0 and samples[1].temperature_gpu_celsius == 46.0
    assert nvml.fake.calls("nvmlDeviceGetTemperature", gpu=0) == 0
    assert nvml.fake.calls("nvmlDeviceGetTemperature", gpu=1) == 2
    # Process lists: _v3, else _v2.
    assert samples[0].processes[0].pid == 4242 and samples[1].processes[0].pid == 4243
    assert nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v2", gpu=0) == 0
    assert nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v3", gpu=1) == 1
    assert nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v2", gpu=1) == 2


# --------------------------------------------------------------------------------------------------------
# Processes


def test_process_list_is_refreshed_about_once_a_second(open_backend, clock):
    nvml = make_nvml_stub()
    gpu0 = nvml.fake.gpus[0]
    backend = open_backend(nvml)
    seen = []
    for tick in range(30):  # 3 s at 10 Hz
        if tick == 5:
            gpu0.processes = [FakeProcess(1, 1 * GIB), FakeProcess(2, None)]
        seen.append(backend.sample()[0].processes)
        clock.advance(0.1)
    assert nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v3", gpu=0) == 3
    assert all(p == seen[0] for p in seen[:10])  # the first list is carried until the 1 s refresh
    assert [p.pid for p in seen[10]] == [1, 2]
    assert seen[10][1].memory_used_bytes is None


# --------------------------------------------------------------------------------------------------------
# Slow cadence: ECC counts and the enforced power limit


SLOW_FUNCTIONS = ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTotalEccErrors")


def nvml_calls(nvml) -> int:
    """Every NVML function call the stub has recorded so far (any function, any GPU)."""
    return len(nvml.mock_calls)


def test_ecc_and_power_limit_are_read_once_per_slow_interval_and_carried(open_backend, clock):
    nvml = make_nvml_stub()
    gpu0 = nvml.fake.gpus[0]
    backend = open_backend(nvml, slow_interval_s=10.0, process_interval_s=100.0)
    calls_per_tick = []
    seen = []
    for tick in range(25):  # 2.5 intervals at 1 Hz
        if tick == 3:  # an admin caps the GPU and ECC corrects an error: both show at the next slow read
            gpu0.power_limit_mw, gpu0.ecc_corrected, gpu0.ecc_uncorrected = 500_000, 3, 1
        before = nvml_calls(nvml)
        sample = backend.sample()[0]
        calls_per_tick.append(nvml_calls(nvml) - before)
        seen.append((sample.power_limit_watts, sample.ecc_corrected_errors, sample.ecc_uncorrected_errors))
        clock.advance(1.0)
    assert nvml.fake.calls("nvmlDeviceGetEnforcedPowerLimit", gpu=0) == 3  # ticks 0, 10, 20
    assert nvml.fake.calls("nvmlDeviceGetTotalEccErrors", gpu=0) == 6  # two counters each time
    assert seen[:10] == [(pytest.approx(700.0), 0, 0)] * 10  # carried, never None: no series flaps
    assert seen[10:] == [(pytest.approx(500.0), 3, 1)] * 15
    # Three calls fewer per GPU on the ticks between slow reads. Tick 0 also opens GPM, processes and MIG;
    # the process list is not due again in this run.
    assert calls_per_tick[10] == calls_per_tick[20]
    assert {c for t, c in enumerate(calls_per_tick) if t not in (0, 10, 20)} == {calls_per_tick[10] - 3 * 2}
    assert all(status(backend, 0, name).reason is None for name in ("power_limit_watts", "ecc_corrected_errors"))


def test_slow_interval_zero_reads_every_tick(open_backend, clock):
    nvml = make_nvml_stub()
    backend = open_backend(nvml, slow_interval_s=0.0)
    for _ in range(3):
        backend.sample()
        clock.advance(0.1)
    assert nvml.fake.calls("nvmlDeviceGetEnforcedPowerLimit", gpu=1) == 3
    assert nvml.fake.calls("nvmlDeviceGetTotalEccErrors", gpu=1) == 6


def test_a_failed_slow_read_is_none_that_tick_and_retried_next_tick(open_backend, clock):
    nvml = make_nvml_stub()
    gpu0 = nvml.fake.gpus[0]
    backend = open_backend(nvml, slow_interval_s=10.0)
    assert backend.sample()[0].power_limit_watts == pytest.approx(700.0)
    clock.advance(10.0)
    gpu0.errors["nvmlDeviceGetEnforcedPowerLimit"] = pynvml.NVML_ERROR_TIMEOUT
    gpu0.errors["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NO_DATA
    failed = backend.sample()[0]
    # As for a per-tick field: None this tick (the old value would hide the failure), counted or transient.
    assert failed.power_limit_watts is None and failed.ecc_corrected_errors is None
    assert backend.error_counts() == {(0, "power_limit_watts", "NVML_ERROR_TIMEOUT"): 1}
    assert status(backend, 0, "ecc_corrected_errors").reason == "no value on the last read: NVML_ERROR_NO_DATA"
    gpu0.errors.clear()
    gpu0.power_limit_mw = 600_000
    clock.advance(0.1)
    assert backend.sample()[0].power_limit_watts == pytest.approx(600.0)  # retried at once, not in 10 s
    calls = nvml.fake.calls("nvmlDeviceGetEnforcedPowerLimit", gpu=0)
    clock.advance(0.1)
    later = backend.sample()[0]
    assert later.power_limit_watts == pytest.approx(600.0) and later.ecc_corrected_errors == 0
    assert nvml.fake.calls("nvmlDeviceGetEnforcedPowerLimit", gpu=0) == calls  # back on the slow cadence
    assert status(backend, 0, "ecc_corrected_errors").reason is None


def test_unsupported_slow_fields_are_dropped_and_never_read_again(open_backend, clock):
    nvml = make_nvml_stub()
    nvml.fake.gpus[1].errors["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # no ECC
    backend = open_backend(nvml, slow_interval_s=1.0)
    for _ in range(3):
        samples = backend.sample()
        clock.advance(1.0)
    assert samples[1].ecc_corrected_errors is None and samples[1].power_limit_watts == pytest.approx(700.0)
    assert nvml.fake.calls("nvmlDeviceGetTotalEccErrors", gpu=1) == 2  # once per counter, then dropped
    assert nvml.fake.calls("nvmlDeviceGetTotalEccErrors", gpu=0) == 6
    assert status(backend, 1, "ecc_corrected_errors") == FieldStatus(
        "ecc_corrected_errors", False, "NVML_ERROR_NOT_SUPPORTED")


def test_slow_fields_are_read_at_once_after_a_device_comes_back(open_backend, clock):
    nvml = make_nvml_stub()
    backend = open_backend(nvml, slow_interval_s=10.0)
    backend.sample()
    nvml.fake.lose(0)
    clock.advance(0.1)
    assert not backend.sample()[0].up
    nvml.fake.recover(0)  # after a reset: the limit and the volatile ECC counts may be new
    nvml.fake.gpus[0].power_limit_mw = 450_000
    clock.advance(1.0)  # the first re-acquire is due after 1 s, well inside the slow interval
    back = backend.sample()[0]
    assert back.up and back.power_limit_watts == pytest.approx(450.0)


# --------------------------------------------------------------------------------------------------------
# GPM


def test_gpm_gives_none_first_then_ratios_and_frees_samples_on_close(open_backend, clock):
    nvml = make_nvml_stub()
    gpu0 = nvml.fake.gpus[0]
    backend = open_backend(nvml)
    first = backend.sample()[0]
    assert first.sm_activity_ratio is None and first.tensor_activity_ratio is None
    assert first.pcie_transmit_bytes_per_second is None
    assert "first GPM sample" in status(backend, 0, "sm_activity_ratio").reason

    clock.advance(1.0)
    second = backend.sample()[0]
    assert second.sm_activity_ratio == pytest.approx(0.45)  # percent -> ratio
    assert second.sm_occupancy_ratio == pytest.approx(0.30)
    assert second.tensor_activity_ratio == pytest.approx(0.25)
    assert second.dram_activity_ratio == pytest.approx(0.40)
    assert second.pcie_transmit_bytes_per_second == pytest.approx(1000 * MIB)  # MiB/s -> bytes/s
    assert second.pcie_receive_bytes_per_second == pytest.approx(2000 * MIB)
    assert second.nvlink_transmit_bytes_per_second == pytest.approx(4000 * MIB)
    assert second.nvlink_receive_bytes_per_second == pytest.approx(3000 * MIB)

    # The stub refuses metrics over samples that are not (older, newer) of one device, so a third tick
    # with new values only works if the buffers were swapped correctly.
    gpu0.gpm_metrics[pynvml.NVML_GPM_METRIC_SM_UTIL] = 100.4  # rounding above 100 is clamped
    gpu0.gpm_metrics[pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL] = 80.0
    for _ in range(3):
        clock.advance(1.0)
        later = backend.sample()[0]
        assert later.sm_activity_ratio == 1.0 and later.tensor_activity_ratio == pytest.approx(0.80)
    assert len(nvml.fake.gpm_samples) == 4  # two per GPU, reused
    assert backend.error_counts() == {}

    backend.close()
    assert nvml.fake.gpm_samples == {}
    assert nvml.fake.calls("nvmlShutdown") == 1
    backend.close()  # twice is harmless
    assert nvml.fake.calls("nvmlShutdown") == 1


def test_gpm_unsupported_device_and_unsupported_metric(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[1].gpm_supported = False
    nvml.fake.gpus[0].gpm_metric_errors[pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL] = pynvml.NVML_ERROR_NOT_SUPPORTED
    backend = open_backend(nvml)
    backend.sample()
    samples = backend.sample()
    assert samples[1].sm_activity_ratio is None and samples[1].pcie_transmit_bytes_per_second is None
    assert samples[0].sm_activity_ratio == pytest.approx(0.45)
    # One metric failing on its own takes only that field.
    assert samples[0].tensor_activity_ratio is None
    assert status(backend, 0, "tensor_activity_ratio") == FieldStatus(
        "tensor_activity_ratio", False, "NVML_ERROR_NOT_SUPPORTED"
    )
    assert status(backend, 0, "gpm").supported
    row = status(backend, 1, "tensor_activity_ratio")
    assert not row.supported and row.reason.startswith("gpm: not supported")
    assert nvml.fake.calls("nvmlGpmSampleGet", gpu=1) == 0
    assert nvml.fake.calls("nvmlGpmQueryDeviceSupport", gpu=1) == 1


def test_gpm_and_xid_can_be_switched_off(open_backend):
    nvml = make_nvml_stub()
    backend = open_backend(nvml, enable_gpm=False, enable_xid=False)
    backend.sample()
    assert backend.sample()[0].sm_activity_ratio is None
    assert nvml.fake.calls("nvmlGpmSampleAlloc") == 0
    assert status(backend, 0, "gpm").reason == "disabled (enable_gpm=False)"
    assert status(backend, 0, "sm_activity_ratio").reason == "gpm: disabled (enable_gpm=False)"
    assert nvml.fake.calls("nvmlEventSetCreate") == 0
    assert status(backend, 0, "xid_events").reason == "disabled (enable_xid=False)"


def test_gpm_restarts_after_device_loss(open_backend, clock):
    nvml = make_nvml_stub()
    backend = open_backend(nvml)
    backend.sample()
    nvml.fake.lose(0)
    backend.sample()
    nvml.fake.recover(0)
    clock.advance(1.0)
    back = backend.sample()[0]
    assert back.up and back.sm_activity_ratio is None  # no valid earlier sample
    clock.advance(1.0)
    assert backend.sample()[0].sm_activity_ratio == pytest.approx(0.45)
    assert backend.error_counts() == {}


# --------------------------------------------------------------------------------------------------------
# MIG


def mig_gpu() -> FakeGpu:
    return FakeGpu(
        mig_enabled=True,
        mig_instances=[
            FakeMig(gpu_instance_id=1, memory_total=40 * GIB, memory_used=2 * GIB, sm_util_percent=50.0),
            FakeMig(gpu_instance_id=2, memory_total=20 * GIB, memory_used=1 * GIB, sm_util_percent=20.0),
        ],
    )


def test_mig_instances_are_enumerated(open_backend, clock):
    no_mig_gpm = mig_gpu()
    no_mig_gpm.uuid, no_mig_gpm.gpm_mig_supported = "GPU-no-mig-gpm", False
    nvml = make_nvml_stub([mig_gpu(), FakeGpu(uuid="GPU-plain", mig_supported=False), no_mig_gpm])
    backend = open_backend(nvml)
    assert [d.mig_enabled for d in backend.devices()] == [True, False, True]
    samples = backend.sample()
    instances = samples[0].mig_instances
    assert [(m.gpu_instance_id, m.compute_instance_id) for m in instances] == [(1, 0), (2, 0)]
    assert instances[0].uuid.startswith("MIG-") and instances[0].uuid != instances[1].uuid
    assert (instances[0].memory_used_bytes, instances[0].memory_total_bytes) == (2 * GIB, 40 * GIB)
    assert instances[0].sm_activity_ratio is None  # GPM needs two samples
    assert samples[1].mig_instances is None
    assert not status(backend, 1, "mig_instances").supported
    # Utilization rates are not available on the parent of a MIG GPU: dropped, not an error.
    assert samples[0].utilization_gpu_ratio is None and backend.error_counts() == {}

    clock.advance(0.5)
    samples = backend.sample()
    instances = samples[0].mig_instances
    assert [m.sm_activity_ratio for m in instances] == [pytest.approx(0.5), pytest.approx(0.2)]
    # Where per-instance GPM is unsupported, instances are still listed, without SM activity.
    assert len(samples[2].mig_instances) == 2
    assert all(m.sm_activity_ratio is None for m in samples[2].mig_instances)
    assert status(backend, 2, "mig_gpm") == FieldStatus("mig_gpm", False, "NVML_ERROR_NOT_SUPPORTED")
    assert nvml.fake.calls("nvmlDeviceGetMaxMigDeviceCount", gpu=0) == 1  # list refreshed at 1 Hz only

    nvml.fake.gpus[0].mig_instances.pop()  # an instance destroyed
    clock.advance(0.6)
    instances = backend.sample()[0].mig_instances
    assert [m.gpu_instance_id for m in instances] == [1]
    assert nvml.fake.calls("nvmlDeviceGetMaxMigDeviceCount", gpu=0) == 2
    # Pairs: the three devices and GPU 0's GI 1 remain; GI 2's pair was freed with its instance.
    assert len(nvml.fake.gpm_samples) == 8


# --------------------------------------------------------------------------------------------------------
# XID events


def wait_for(predicate, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def xid_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wattledger-nvml-xid"]


def test_xid_events_are_counted_on_a_thread_that_stops_on_close(clock):
    nvml = make_nvml_stub()
    backend = NvmlBackend(nvml, clock_ns=clock)
    try:
        assert len(xid_threads()) == 1 and xid_threads()[0].daemon
        nvml.fake.inject_xid(0, 79)
        nvml.fake.inject_xid(0, 79)
        nvml.fake.inject_xid(1, 13)
        assert wait_for(lambda: backend.xid_counts() == {(0, 79): 2, (1, 13): 1})
        assert status(backend, 0, "xid_events").supported
        timeouts = {c.args[1] for c in nvml.nvmlEventSetWait.call_args_list}
        assert timeouts and all(0 < t <= 1000 for t in timeouts)  # waits are bounded, so close() works
    finally:
        backend.close()
    assert xid_threads() == []
    assert nvml.fake.freed_event_sets == 1 and nvml.fake.event_sets == {}


def test_xid_counted_after_reacquire_uses_the_new_handle(clock):
    nvml = make_nvml_stub()
    backend = NvmlBackend(nvml, clock_ns=clock)
    try:
        backend.sample()
        nvml.fake.lose(0)
        backend.sample()
        nvml.fake.recover(0)
        clock.advance(1.0)
        assert backend.sample()[0].up
        assert wait_for(lambda: nvml.fake.calls("nvmlDeviceRegisterEvents", gpu=0) == 2)
        nvml.fake.inject_xid(0, 48)
        assert wait_for(lambda: backend.xid_counts() == {(0, 48): 1})
    finally:
        backend.close()


def test_xid_unsupported_means_no_thread(clock):
    gpus = default_gpus()
    for gpu in gpus:
        gpu.xid_supported = False
    nvml = make_nvml_stub(gpus)
    backend = NvmlBackend(nvml, clock_ns=clock)
    try:
        assert xid_threads() == []
        assert backend.xid_counts() == {}
        row = status(backend, 0, "xid_events")
        assert not row.supported and "NVML_ERROR_NOT_SUPPORTED" in row.reason
        assert nvml.fake.freed_event_sets == 1
    finally:
        backend.close()


# -- sub-probes (probe_status): node_exporter's collector success, per part of the read -------------------


def outcomes(backend: NvmlBackend) -> dict:
    return {o.name: o for o in backend.probe_status()}


def test_sub_probes_all_succeed_on_healthy_gpus(open_backend):
    backend = open_backend(make_nvml_stub())
    assert backend.probe_status() == []  # before the first read
    backend.sample()
    backend.sample()
    got = outcomes(backend)
    assert set(got) == {"gpu.fields", "gpu.gpm", "gpu.xid"}
    assert got["gpu.fields"].success and got["gpu.fields"].error is None
    assert got["gpu.gpm"].success and got["gpu.gpm"].duration_seconds >= 0
    # The fixture switches the XID thread off: a failed probe with the reason, not a missing one.
    assert not got["gpu.xid"].success and "enable_xid=False" in got["gpu.xid"].error


def test_a_gpu_without_gpm_fails_the_gpm_probe_with_the_reason(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[1].gpm_supported = False
    backend = open_backend(nvml)
    backend.sample()
    got = outcomes(backend)
    assert got["gpu.fields"].success
    assert not got["gpu.gpm"].success and got["gpu.gpm"].error.startswith("GPU 1: GPM not supported")
    backend_off = open_backend(make_nvml_stub(), enable_gpm=False)
    backend_off.sample()
    assert "disabled (enable_gpm=False)" in outcomes(backend_off)["gpu.gpm"].error


def test_an_unexpected_error_fails_the_fields_probe_for_that_tick(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].errors["nvmlDeviceGetEnforcedPowerLimit"] = pynvml.NVML_ERROR_TIMEOUT
    backend = open_backend(nvml)
    backend.sample()
    fields = outcomes(backend)["gpu.fields"]
    assert not fields.success and fields.error == "GPU 0: reading power_limit_watts failed: NVML_ERROR_TIMEOUT"
    assert outcomes(backend)["gpu.gpm"].success  # a failure of another part leaves GPM's probe alone
    del nvml.fake.gpus[0].errors["nvmlDeviceGetEnforcedPowerLimit"]
    backend.sample()
    assert outcomes(backend)["gpu.fields"].success


def test_a_gpm_metric_error_fails_the_gpm_probe(open_backend):
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].gpm_metric_errors[pynvml.NVML_GPM_METRIC_SM_UTIL] = pynvml.NVML_ERROR_UNKNOWN
    backend = open_backend(nvml)
    backend.sample()
    backend.sample()  # GPM rates need two samples
    got = outcomes(backend)
    assert got["gpu.fields"].success
    assert not got["gpu.gpm"].success and "sm_activity_ratio" in got["gpu.gpm"].error


def test_a_lost_gpu_fails_the_fields_probe_until_it_is_back(open_backend, clock):
    nvml = make_nvml_stub()
    backend = open_backend(nvml)
    backend.sample()
    nvml.fake.lose(1)
    backend.sample()
    fields = outcomes(backend)["gpu.fields"]
    assert not fields.success and fields.error.startswith("GPU 1 down: NVML_ERROR_GPU_IS_LOST")
    clock.advance(1.0)
    backend.sample()
    assert not outcomes(backend)["gpu.fields"].success  # still down: the backoff has not let it back yet
    nvml.fake.recover(1)
    clock.advance(2.0)
    backend.sample()
    assert outcomes(backend)["gpu.fields"].success


def test_the_xid_probe_follows_the_event_thread(clock):
    nvml = make_nvml_stub()
    nvml.fake.gpus[1].xid_supported = False
    backend = NvmlBackend(nvml, clock_ns=clock)
    try:
        backend.sample()
        xid = outcomes(backend)["gpu.xid"]
        assert not xid.success and xid.error.startswith("GPU 1: XID events")
    finally:
        backend.close()
    healthy = NvmlBackend(make_nvml_stub(), clock_ns=clock)
    try:
        healthy.sample()
        assert outcomes(healthy)["gpu.xid"].success
    finally:
        healthy.close()
