"""Each process's share of the GPU's activity (probes/nvml_processes.py) through NvmlBackend and the stub."""

from __future__ import annotations

import pynvml
import pytest

from nvml_stub import GIB, FakeMig, FakeProcess, FakeUtilizationSample, make_nvml_stub
from wattledger.probes.nvml import NvmlBackend
from wattledger.probes.nvml_processes import (
    SHORTEST_DRIVER_PERIOD_US,
    ProcessActivity,
    UtilizationSample,
    driver_period_us,
    samples_from_nvml,
)

S_NS = 1_000_000_000
S_US = 1_000_000
START_US = 1_700_000_000_000_000  # the realtime clock NVML stamps samples with, microseconds
NEWER, OLDER = "nvmlDeviceGetProcessesUtilizationInfo", "nvmlDeviceGetProcessUtilization"
PERIOD_US = 200_000  # a driver sampling every 1/5 s (NVML documents periods from 1/6 s to 1 s)


class Clocks:
    """The backend's monotonic clock (ns) and the realtime clock (us), moved together."""

    def __init__(self) -> None:
        self.ns = 100 * S_NS
        self.us = START_US

    def monotonic(self) -> int:
        return self.ns

    def wall(self) -> int:
        return self.us

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * S_NS)
        self.us += int(seconds * S_US)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def open_backend(clocks):
    created: list[NvmlBackend] = []

    def factory(nvml) -> NvmlBackend:
        backend = NvmlBackend(nvml, clock_ns=clocks.monotonic, wall_clock_us=clocks.wall, enable_xid=False,
                              enable_gpm=False)
        created.append(backend)
        return backend

    yield factory
    for backend in created:
        backend.close()


def ticks(start_us: int, pid: int, sm_percents: list[int], memory_percent: int = 0) -> list[FakeUtilizationSample]:
    """One sample per driver period after ``start_us``; a 0 leaves that period out (the pid did not run)."""
    return [
        FakeUtilizationSample(pid, start_us + (k + 1) * PERIOD_US, sm_percent=sm, memory_percent=memory_percent)
        for k, sm in enumerate(sm_percents) if sm
    ]


def shares(backend: NvmlBackend, gpu: int = 0) -> dict[int, tuple[float | None, float | None]]:
    sample = backend.sample()[gpu]
    return {p.pid: (p.sm_utilization_ratio, p.memory_controller_utilization_ratio) for p in sample.processes}


def status(backend: NvmlBackend, name: str, gpu: int = 0):
    return {row.name: row for row in backend.field_status(gpu)}[name]


def two_processes_stub():
    nvml = make_nvml_stub()
    nvml.fake.gpus[0].processes = [FakeProcess(10, 4 * GIB), FakeProcess(20, 2 * GIB)]
    return nvml


def test_shares_are_time_weighted_over_the_interval_not_the_mean_of_samples(open_backend, clocks):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    # The first read covers the second before it. pid 10 runs every period at 60 %; pid 20 in one period
    # of five at 90 %: 0.9 x 1/5 of the interval = 0.18 (the mean of its samples would say 0.9).
    window_start = clocks.us - S_US
    gpu.utilization_samples = ticks(window_start, 10, [60] * 5, memory_percent=30) + ticks(
        window_start, 20, [0, 0, 90, 0, 0], memory_percent=50)
    backend = open_backend(nvml)
    got = shares(backend)
    assert got[10] == (pytest.approx(0.6), pytest.approx(0.3))
    assert got[20] == (pytest.approx(0.18), pytest.approx(0.1))


def test_each_read_asks_for_samples_after_the_newest_seen_and_counts_them_once(open_backend, clocks):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    gpu.utilization_samples = ticks(clocks.us - S_US, 10, [50] * 5)
    backend = open_backend(nvml)
    assert shares(backend)[10][0] == pytest.approx(0.5)
    newest_us = gpu.utilization_samples[-1].timestamp_us
    clocks.advance(1.0)
    # The driver's buffer keeps the old samples; the new second has pid 10 at 100 %.
    gpu.utilization_samples += ticks(clocks.us - S_US, 10, [100] * 5)
    assert shares(backend)[10][0] == pytest.approx(1.0)
    call = getattr(nvml, NEWER).call_args_list[-1]
    assert call.args[1] == newest_us  # lastSeenTimeStamp: only the samples after it come back


@pytest.mark.parametrize("no_samples", ["empty_buffer", "success_without_samples"])
def test_no_sample_is_not_found_meaning_no_process_ran_and_idle_is_not_carried(open_backend, clocks, no_samples):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    gpu.utilization_samples = []  # the driver answers NOT_FOUND
    if no_samples == "success_without_samples":
        # pynvml raises NVMLError(NVML_SUCCESS) when the size query succeeds with no samples
        gpu.errors[NEWER] = pynvml.NVML_SUCCESS
    backend = open_backend(nvml)
    assert shares(backend) == {10: (0.0, 0.0), 20: (0.0, 0.0)}  # measured, nobody ran
    assert status(backend, "process_utilization").supported
    assert not backend.error_counts()
    gpu.errors.pop(NEWER, None)
    clocks.advance(1.0)
    gpu.utilization_samples = ticks(clocks.us - S_US, 20, [100] * 5)
    # The idle second before is not averaged into this one.
    assert shares(backend) == {10: (0.0, 0.0), 20: (pytest.approx(1.0), 0.0)}


def test_shares_are_read_on_the_process_list_cadence(open_backend, clocks):
    nvml = two_processes_stub()
    backend = open_backend(nvml)
    for _ in range(25):  # 2.5 s at 10 Hz
        backend.sample()
        clocks.advance(0.1)
    assert nvml.fake.calls(NEWER, gpu=0) == 3 == nvml.fake.calls("nvmlDeviceGetComputeRunningProcesses_v3", gpu=0)


@pytest.mark.parametrize("how", ["function_not_found", "not_supported", "binding_missing"])
def test_the_older_function_is_the_fallback(open_backend, clocks, how):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    if how == "binding_missing":
        delattr(nvml, NEWER)  # a pynvml from before the newer function
    else:
        gpu.errors[NEWER] = {"function_not_found": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                             "not_supported": pynvml.NVML_ERROR_NOT_SUPPORTED}[how]
    gpu.utilization_samples = ticks(clocks.us - S_US, 10, [40] * 5)
    backend = open_backend(nvml)
    assert shares(backend)[10][0] == pytest.approx(0.4)
    clocks.advance(1.0)
    gpu.utilization_samples += ticks(clocks.us - S_US, 10, [80] * 5)
    assert shares(backend)[10][0] == pytest.approx(0.8)
    assert nvml.fake.calls(OLDER, gpu=0) == 2
    if how != "binding_missing":
        assert nvml.fake.calls(NEWER, gpu=0) == 1  # asked once, then the older one only
    assert status(backend, "process_utilization").supported
    assert not backend.error_counts()


def test_a_driver_without_per_process_utilization_leaves_the_list_and_drops_the_field(open_backend, clocks):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    gpu.errors[NEWER] = gpu.errors[OLDER] = pynvml.NVML_ERROR_NOT_SUPPORTED
    backend = open_backend(nvml)
    for _ in range(3):
        sample = backend.sample()[0]
        clocks.advance(1.0)
    assert [(p.pid, p.memory_used_bytes, p.sm_utilization_ratio) for p in sample.processes] == [
        (10, 4 * GIB, None), (20, 2 * GIB, None)]
    row = status(backend, "process_utilization")
    assert not row.supported and "NVML_ERROR_NOT_SUPPORTED" in row.reason
    assert nvml.fake.calls(OLDER, gpu=0) == 1  # dropped: never asked again
    assert not backend.error_counts()
    assert backend.sample()[1].processes[0].sm_utilization_ratio == 0.0  # the other GPU is unaffected


def test_an_unexpected_error_is_counted_and_the_next_read_covers_both_intervals(open_backend, clocks):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    backend = open_backend(nvml)
    backend.sample()
    clocks.advance(1.0)
    gpu.errors[NEWER] = pynvml.NVML_ERROR_IRQ_ISSUE
    gpu.utilization_samples = ticks(clocks.us - S_US, 10, [100] * 5)
    assert shares(backend)[10] == (None, None)
    assert backend.error_counts() == {(0, "process_utilization", "NVML_ERROR_IRQ_ISSUE"): 1}
    del gpu.errors[NEWER]
    clocks.advance(1.0)
    gpu.utilization_samples += ticks(clocks.us - S_US, 10, [0] * 5)
    assert shares(backend)[10][0] == pytest.approx(0.5)  # 1 s at 100 % in the 2 s since the last good read


def test_a_process_that_leaves_is_dropped_and_forgotten(open_backend, clocks):
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    gpu.utilization_samples = ticks(clocks.us - S_US, 10, [50] * 5) + ticks(clocks.us - S_US, 20, [50] * 5)
    backend = open_backend(nvml)
    assert set(shares(backend)) == {10, 20}
    clocks.advance(1.0)
    gpu.processes = [FakeProcess(10, 4 * GIB)]
    # pid 20 exits; its last samples are still in the driver's buffer: not charged to anyone on the list.
    gpu.utilization_samples += ticks(clocks.us - S_US, 20, [90] * 5) + ticks(clocks.us - S_US, 10, [30] * 5)
    assert shares(backend) == {10: (pytest.approx(0.3), 0.0)}


def mig_stub(supported: bool, window_start_us: int):
    nvml = make_nvml_stub()
    gpu = nvml.fake.gpus[0]
    gpu.mig_enabled = True
    gpu.mig_instances = [
        FakeMig(gpu_instance_id=1, process_utilization_supported=supported,
                utilization_samples=ticks(window_start_us, 10, [70] * 5)),
        FakeMig(gpu_instance_id=2, process_utilization_supported=supported,
                utilization_samples=ticks(window_start_us, 10, [20] * 5)),  # pid 10 of this instance's view
    ]
    gpu.processes = [FakeProcess(10, 4 * GIB, gpu_instance_id=1, compute_instance_id=0),
                     FakeProcess(20, 2 * GIB, gpu_instance_id=2, compute_instance_id=0)]
    return nvml


def test_mig_processes_take_the_shares_of_their_own_instance(open_backend, clocks):
    nvml = mig_stub(supported=True, window_start_us=clocks.us - S_US)
    backend = open_backend(nvml)
    by_pid = {p.pid: p for p in backend.sample()[0].processes}
    assert (by_pid[10].gpu_instance_id, by_pid[10].compute_instance_id) == (1, 0)
    assert by_pid[10].sm_utilization_ratio == pytest.approx(0.7)
    # Instance 2 has samples only for a pid that is not its process: pid 20 ran 0 % there.
    assert by_pid[20].sm_utilization_ratio == 0.0
    assert status(backend, "mig_process_utilization").supported
    # The GPU's own handle is not asked in MIG mode, so its field is not dropped for when MIG goes off.
    assert nvml.fake.calls(NEWER, gpu=0) == 2  # the two MIG handles, not the GPU's
    assert "read per MIG device" in status(backend, "process_utilization").reason


def test_mig_devices_without_per_process_utilization_give_none(open_backend, clocks):
    backend = open_backend(mig_stub(supported=False, window_start_us=clocks.us - S_US))
    for _ in range(2):
        processes = backend.sample()[0].processes
        clocks.advance(1.0)
    assert [p.sm_utilization_ratio for p in processes] == [None, None]
    assert [p.memory_used_bytes for p in processes] == [4 * GIB, 2 * GIB]
    assert not status(backend, "mig_process_utilization").supported
    assert not backend.error_counts()


def test_without_mig_the_instance_ids_are_none(open_backend):
    backend = open_backend(make_nvml_stub())
    process = backend.sample()[0].processes[0]
    assert (process.gpu_instance_id, process.compute_instance_id) == (None, None)


def test_the_driver_period_is_the_median_spacing_and_never_below_the_shortest_documented():
    def pid_at(*offsets_us):
        return [UtilizationSample(1, START_US + t, 50.0, None) for t in offsets_us]

    # A pid that skipped two periods (it did not run in them) does not stretch the period.
    assert driver_period_us({1: pid_at(0, 200_000, 400_000, 1_000_000, 1_200_000)}) == 200_000
    assert driver_period_us({1: pid_at(0, 1_000)}) == SHORTEST_DRIVER_PERIOD_US  # 1 ms apart: not a period
    assert driver_period_us({1: pid_at(0), 2: pid_at(500)}) is None  # one sample per process


def test_one_sample_per_process_is_the_drivers_own_figure(open_backend, clocks):
    # What the NVML reference describes: one entry per process, its utilization since the timestamp passed.
    nvml = two_processes_stub()
    gpu = nvml.fake.gpus[0]
    gpu.utilization_samples = [FakeUtilizationSample(10, clocks.us - 300_000, sm_percent=70, memory_percent=20),
                               FakeUtilizationSample(20, clocks.us - 100_000, sm_percent=25, memory_percent=5)]
    backend = open_backend(nvml)
    assert shares(backend) == {10: (pytest.approx(0.7), pytest.approx(0.2)),
                               20: (pytest.approx(0.25), pytest.approx(0.05))}


def test_a_realtime_clock_step_back_neither_hides_samples_nor_bends_the_interval():
    activity = ProcessActivity(interval_us=S_US)
    now_us, now_ns = START_US, 100 * S_NS
    activity.interval([UtilizationSample(1, now_us - 100_000, 50.0, 50.0)], now_us, now_ns)
    # NTP steps the realtime clock back 10 s while 1 s passes: the interval is still 1 s long, and samples
    # stamped after the step are asked for (not only those after the newest seen, 10 s in the future).
    now_us, now_ns = now_us - 9 * S_US, now_ns + S_NS
    assert activity.query_after_us(now_us, now_ns) == now_us - S_US
    stepped = [UtilizationSample(1, now_us - S_US + k * PERIOD_US, 100.0, None) for k in range(1, 6)]
    assert activity.interval(stepped, now_us, now_ns)[1].sm_ratio == pytest.approx(1.0)
    assert activity.interval([], now_us, now_ns) is None  # no time passed: no interval


@pytest.mark.parametrize("bad_percent", [0xFFFFFFFF, 4_000])  # NVML "not available"; a driver's garbage
def test_percentages_no_percentage_can_have_stay_none(bad_percent):
    entry = pynvml.c_nvmlProcessUtilizationInfo_v1_t(timeStamp=START_US, pid=7, smUtil=bad_percent, memUtil=12)
    [sample] = samples_from_nvml([entry])
    assert (sample.pid, sample.sm_percent, sample.memory_percent) == (7, None, 12.0)
    shares = ProcessActivity(interval_us=S_US).interval([sample], START_US, 100 * S_NS)
    assert shares[7].sm_ratio is None and shares[7].memory_controller_ratio == pytest.approx(0.12)
