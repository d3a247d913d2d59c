"""NVML that does not work at start (issue 8, item 7).

``--backend nvml`` exits 1 with one line. ``--backend auto`` on a GPU node (device nodes, the kernel
module, or an NVML library that loaded) keeps the host probes, retries NVML with backoff, exports
``wattledger_probe_success{probe="gpu"} 0`` meanwhile, and picks the GPUs up when NVML opens; on a
machine with no sign of an NVIDIA driver it is the mock, as before.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from fakes import FakeClock
from nvml_stub import make_nvml_stub
from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent, open_gpu_backend
from wattledger.probes.base import GpuBackend, ProbeUnavailable
from wattledger.probes.mock import MockGpuBackend
from wattledger.probes.nvml import NvmlBackend
from wattledger.probes.nvml_retry import RETRY_MAX_S, NvmlNotReady, RetryingNvmlBackend, nvidia_driver_evidence

S = 1_000_000_000
P = pynvml



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50 * S)


@pytest.fixture
def driver_not_loaded():
    """A stub whose nvmlInit fails like a node whose kernel module is not loaded yet."""
    return make_nvml_stub(init_error=P.NVML_ERROR_DRIVER_NOT_LOADED)


def _config(**settings):
    return build_config({"port": 0, "address": "127.0.0.1", **settings}, {})


def _opener(nvml, clock):
    def open_nvml() -> GpuBackend:
        return NvmlBackend(nvml, clock_ns=clock, enable_xid=False)

    return open_nvml


def _samples(registry) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


# --------------------------------------------------------------------------------------------------------
# Which machine is a GPU node


def test_driver_evidence(tmp_path):
    dev, proc = tmp_path / "dev", tmp_path / "proc"
    dev.mkdir()
    proc.mkdir()
    no_library = ProbeUnavailable("NVML unavailable: libnvidia-ml.so.1 not found")
    assert nvidia_driver_evidence(no_library, dev, proc) is None  # a laptop
    (dev / "nvidia-uvm").touch()  # not a GPU node by itself (the uvm module can load without GPUs)
    assert nvidia_driver_evidence(no_library, dev, proc) is None
    (dev / "nvidia0").touch()
    assert "nvidia0 exists" in nvidia_driver_evidence(no_library, dev, proc)
    (dev / "nvidia0").unlink()
    (proc / "driver" / "nvidia").mkdir(parents=True)
    assert "kernel module is loaded" in nvidia_driver_evidence(no_library, dev, proc)
    from wattledger.probes.nvml import NvmlUnavailable

    assert nvidia_driver_evidence(NvmlUnavailable("driver not loaded", library_found=True), tmp_path / "x",
                                  tmp_path / "y") == "the NVML library is installed"


def test_nvml_backend_says_whether_the_library_loaded():
    from wattledger.probes.nvml import NvmlUnavailable

    for code, found in ((P.NVML_ERROR_LIBRARY_NOT_FOUND, False), (P.NVML_ERROR_DRIVER_NOT_LOADED, True),
                        (P.NVML_ERROR_NO_PERMISSION, True)):
        with pytest.raises(NvmlUnavailable) as caught:
            NvmlBackend(make_nvml_stub(init_error=code), enable_xid=False)
        assert caught.value.library_found is found


# --------------------------------------------------------------------------------------------------------
# open_gpu_backend


def test_backend_nvml_without_nvml_raises_one_line(driver_not_loaded, clock, tmp_path):
    with pytest.raises(ProbeUnavailable) as caught:
        open_gpu_backend(_config(backend="nvml"), clock, open_nvml=_opener(driver_not_loaded, clock),
                         dev_root=str(tmp_path))
    assert str(caught.value).startswith("NVML unavailable: the NVIDIA kernel driver is not loaded")
    assert "\n" not in str(caught.value)


def test_auto_on_a_machine_without_a_driver_is_the_mock(clock, tmp_path):
    nvml = make_nvml_stub(init_error=P.NVML_ERROR_LIBRARY_NOT_FOUND)
    opened = open_gpu_backend(_config(backend="auto", procfs=str(tmp_path)), clock,
                              open_nvml=_opener(nvml, clock), dev_root=str(tmp_path))
    try:
        assert isinstance(opened.backend, MockGpuBackend)
        assert "using the mock GPU backend instead (SIMULATED figures)" in opened.notes[0]
    finally:
        opened.backend.close()


def test_auto_on_a_gpu_node_retries_and_never_simulates(driver_not_loaded, clock, tmp_path):
    opened = open_gpu_backend(_config(backend="auto", procfs=str(tmp_path)), clock,
                              open_nvml=_opener(driver_not_loaded, clock), dev_root=str(tmp_path))
    assert isinstance(opened.backend, RetryingNvmlBackend) and not opened.backend.simulated
    assert opened.backend.name == "nvml" and opened.backend.devices() == []
    (note,) = opened.notes
    assert "retrying NVML with backoff" in note and "SIMULATED" not in note
    # `wattledger devices` reads once: there it is the one line, not a wait.
    with pytest.raises(ProbeUnavailable, match="no simulated GPU either"):
        open_gpu_backend(_config(backend="auto"), clock, retry_nvml=False,
                         open_nvml=_opener(driver_not_loaded, clock), dev_root=str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# RetryingNvmlBackend


def test_retries_with_backoff_until_nvml_opens(driver_not_loaded, clock, caplog):
    backend = RetryingNvmlBackend(_opener(driver_not_loaded, clock), "NVML unavailable: driver not loaded", clock,
                                  logger=logging.getLogger("test.retry"))
    assert isinstance(backend, GpuBackend)
    start = clock.now_ns
    attempts_at = []
    with caplog.at_level(logging.INFO, logger="test.retry"):
        for _ in range(1200):  # two minutes at 10 Hz
            clock.advance(0.1)
            before = driver_not_loaded.fake.calls("nvmlInit")
            with pytest.raises(NvmlNotReady, match="retrying NVML with backoff"):
                backend.sample()
            if driver_not_loaded.fake.calls("nvmlInit") > before:
                attempts_at.append(round((clock.now_ns - start) / S, 1))
    gaps = [round(b - a, 1) for a, b in zip([0.0] + attempts_at, attempts_at)]
    assert gaps[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, RETRY_MAX_S, RETRY_MAX_S]
    assert backend.devices() == [] and backend.devices_generation == 0
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1  # reason changed once
    # Not open: no sub-probes, XIDs or counted errors (the "gpu" probe itself says NVML is not open).
    assert (backend.probe_status(), backend.xid_counts(), backend.error_counts()) == ([], {}, {})

    driver_not_loaded.fake.init_error = None  # the driver container finished
    clock.advance(RETRY_MAX_S)
    samples = backend.sample()
    assert [s.up for s in samples] == [True, True] and samples[0].power_watts == pytest.approx(350.0)
    assert [d.index for d in backend.devices()] == [0, 1] and backend.devices_generation == 1
    assert backend.field_status(0)
    assert {o.name for o in backend.probe_status()} == {"gpu.fields", "gpu.gpm", "gpu.xid"}  # the real one's
    backend.close()
    assert driver_not_loaded.fake.calls("nvmlShutdown") >= 1


def test_agent_exports_no_gpu_then_learns_the_gpus(driver_not_loaded, clock, tmp_path):
    """The whole agent: host probes go on, probe_success{probe="gpu"} is 0, then the GPUs appear."""
    gpu = RetryingNvmlBackend(_opener(driver_not_loaded, clock), "NVML unavailable: driver not loaded", clock)
    agent = Agent(_config(backend="auto"), gpu=gpu, clock_ns=clock, serve_http=False)
    try:
        for _ in range(5):
            clock.advance(0.1)
            agent.sampler.tick()
        before = _samples(agent.registry)
        assert before[("wattledger_probe_success", frozenset({("probe", "gpu")}))] == 0.0
        assert not any(name == "wattledger_gpu_info" for name, _ in before)
        assert before[("wattledger_build_info", frozenset({("version", agent_version()), ("backend", "nvml")}))]
        with pytest.raises(Exception, match="does not exist"):
            agent.accounting.start("train", gpus=[0])

        driver_not_loaded.fake.init_error = None
        clock.advance(1.0)
        agent.sampler.tick()
        after = _samples(agent.registry)
        assert after[("wattledger_probe_success", frozenset({("probe", "gpu")}))] == 1.0
        up = {dict(labels)["gpu"]: v for (name, labels), v in after.items() if name == "wattledger_gpu_up"}
        assert up == {"0": 1.0, "1": 1.0}
        agent.accounting.start("train", gpus=[0])  # GPU 0 exists for workloads now
    finally:
        agent.stop()


def agent_version() -> str:
    from wattledger.agent import version

    return version.VERSION


# --------------------------------------------------------------------------------------------------------
# The command line, on this machine (no NVIDIA driver here, or a working one: then there is nothing to test)


def test_cli_backend_nvml_without_nvml_exits_1_with_one_line():
    try:
        NvmlBackend(enable_xid=False).close()
        pytest.skip("this machine has a working NVML")
    except ProbeUnavailable:
        pass
    for command in ("agent", "devices"):
        done = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", command, "--backend", "nvml"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert done.stderr.startswith("wattledger: NVML unavailable:") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
