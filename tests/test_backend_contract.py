"""One contract, every GPU backend: NVML (against a pynvml-shaped stub), mock and replay.

Whatever the backend, the rest of wattledger relies on the same promises: one sample per device in
index order, SI units, ratios in 0..1, None (never a sentinel) for what cannot be read, counters that
do not go back while the device is up, and field statuses that explain what is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fakes import FakeClock, run_ticks
from nvml_stub import make_nvml_stub
from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.base import FieldStatus, GpuBackend, GpuInfo, GpuSample, ProbeOutcome
from wattledger.probes.mock import MockGpuBackend
from wattledger.probes.nvml import NvmlBackend
from wattledger.probes.replay import ReplayGpuBackend

RECORDING = Path(__file__).parent / "fixtures" / "mock_recording.jsonl"
SENTINELS = {0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, -1}


def open_nvml(clock):
    stub = make_nvml_stub()

    def advance(seconds):
        # The stub's counters stand still unless moved: move them as a GPU drawing 350 W would.
        for gpu in stub.fake.gpus:
            gpu.energy_mj += int(350_000 * seconds)
            gpu.pcie_tx_bytes += int(1e9 * seconds)

    return NvmlBackend(nvml=stub, clock_ns=clock.ns, enable_xid=False), advance


def open_mock(clock):
    timeline = ScriptedTimeline(clock.ns()).bursts(0, 60, 0.5, 0.2, Activity(gpu=1, sm=0.7, tensor=0.5, dram=0.4))
    return MockGpuBackend(2, activity=timeline, clock_ns=clock.ns), lambda seconds: None


def open_replay(clock):
    return ReplayGpuBackend(RECORDING, clock_ns=clock.ns), lambda seconds: None


BACKENDS = {"nvml": open_nvml, "mock": open_mock, "replay": open_replay}


@pytest.fixture(params=sorted(BACKENDS))
def opened(request):
    clock = FakeClock()
    backend, advance = BACKENDS[request.param](clock)
    yield backend, clock, advance
    backend.close()


def test_is_a_gpu_backend_with_distinct_devices(opened):
    backend, _, _ = opened
    assert isinstance(backend, GpuBackend)
    assert backend.name in ("nvml", "mock", "replay")
    infos = backend.devices()
    assert infos and all(isinstance(i, GpuInfo) for i in infos)
    assert [i.index for i in infos] == list(range(len(infos)))
    assert len({i.uuid for i in infos}) == len(infos)
    assert all(i.uuid.startswith("GPU-") and i.model_name for i in infos)
    assert all(i.memory_total_bytes is None or i.memory_total_bytes > 2**30 for i in infos)


def test_samples_are_in_si_units_with_no_sentinels(opened):
    backend, clock, advance = opened
    infos = backend.devices()
    history = []
    for _ in range(12):
        clock.advance(0.5)
        advance(0.5)
        samples = backend.sample()
        assert all(isinstance(s, GpuSample) for s in samples)
        assert [(s.index, s.uuid) for s in samples] == [(i.index, i.uuid) for i in infos]
        assert all(s.up and s.monotonic_ns == clock.ns() for s in samples)
        history.append(samples)
    for samples in history:
        for s in samples:
            for f in dataclasses.fields(s):
                value = getattr(s, f.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert value not in SENTINELS, f"{f.name} holds a sentinel"
                    assert value >= 0, f.name
                if f.name.endswith("_ratio") and value is not None:
                    assert 0.0 <= value <= 1.0, f.name
            assert s.power_watts is None or 10 <= s.power_watts <= 1500
            assert s.power_limit_watts is None or 100 <= s.power_limit_watts <= 1500
            assert s.sm_clock_hertz is None or 1e8 <= s.sm_clock_hertz <= 5e9
            assert s.temperature_gpu_celsius is None or 0 <= s.temperature_gpu_celsius <= 120
            assert s.memory_used_bytes is None or s.memory_total_bytes is None or s.memory_used_bytes <= s.memory_total_bytes
            assert s.throttle_reasons is None or isinstance(s.throttle_reasons, frozenset)
    for before, after in zip(history, history[1:]):
        for b, a in zip(before, after):
            for counter in ("energy_joules", "pcie_transmit_bytes", "pcie_receive_bytes"):
                if getattr(a, counter) is not None and getattr(b, counter) is not None:
                    assert getattr(a, counter) >= getattr(b, counter), counter
    assert history[-1][0].energy_joules > history[0][0].energy_joules


def test_field_status_names_what_is_missing_and_why(opened):
    backend, clock, advance = opened
    clock.advance(0.5)
    backend.sample()
    for info in backend.devices():
        statuses = backend.field_status(info.index)
        assert statuses and all(isinstance(s, FieldStatus) for s in statuses)
        assert all(s.supported or s.reason for s in statuses)


def test_optional_capabilities_are_part_of_the_protocol(opened):
    # Every backend answers them, empty where it has none, so the sampler calls them without looking.
    backend, clock, advance = opened
    clock.advance(0.5)
    backend.sample()
    assert backend.devices_generation == 0  # fixed devices (only the retrying NVML's moves on)
    assert all(isinstance(n, int) and n >= 0 for n in backend.xid_counts().values())
    assert all(isinstance(n, int) and n > 0 for n in backend.error_counts().values())
    outcomes = backend.probe_status()
    assert all(isinstance(o, ProbeOutcome) and o.name.startswith("gpu.") for o in outcomes)
    assert all(o.duration_seconds >= 0 and (o.success or o.error) for o in outcomes)
    assert ({o.name for o in outcomes} == {"gpu.fields", "gpu.gpm", "gpu.xid"}) is (backend.name == "nvml")


def test_feeds_the_ledger_and_the_exposition(opened):
    backend, clock, advance = opened
    ledger = Ledger(None, clock_ns=clock.ns)
    sampler = Sampler(ledger, backend, None, 0.1, clock=clock.seconds)
    run_ticks(sampler, clock, 3.0, on_tick=lambda: advance(0.1))
    registry = make_registry(ledger, "test")
    for info in backend.devices():
        labels = {"gpu": str(info.index), "uuid": info.uuid}
        assert registry.get_sample_value("wattledger_gpu_up", labels) == 1
        assert registry.get_sample_value("wattledger_gpu_energy_joules_total", labels) > 0
        assert registry.get_sample_value("wattledger_gpu_busy_seconds_total", {**labels, "engine": "gpu"}) > 0
    simulated = {s.labels["simulated"] for s in registry.collect() if s.name == "wattledger_gpu_info" for s in s.samples}
    assert simulated == {"true" if backend.simulated else "false"}
