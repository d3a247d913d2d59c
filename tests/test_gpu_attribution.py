"""Issue 12 item 7: each workload is charged only the GPUs it runs on, found by UUID, never by index.

torch numbers the GPUs it can see (``CUDA_VISIBLE_DEVICES=3``: NVML's GPU 3 is ``cuda:0``); NVML numbers
them all. The bench ties the two by UUID (``session.attribute_gpus``). The end-to-end test runs the bench
on the NVML stub as an 8-GPU node, with torch's CUDA lookups replaced by a fake that renumbers as the CUDA
runtime does, and checks that the toy regime is charged GPU 3 alone: its reporter, its energy, its J/token
and its idle baseline are one GPU's, not eight.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from wattledger.workloads.bench.session import GpuAttribution, attribute_gpus, uuid_key

NODE_GPUS = 8
VISIBLE_GPU = 3  # CUDA_VISIBLE_DEVICES=3: torch's cuda:0


def nvml_uuid(index: int) -> str:
    """The stub's UUID of GPU ``index`` (tests/nvml_stub.default_gpus), as NVML gives it."""
    return f"GPU-{index:08x}-1111-2222-3333-444444444444"


def devices(count: int = NODE_GPUS) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, uuid=nvml_uuid(i)) for i in range(count)]


def test_uuid_key_ignores_nvmls_prefix_case_and_dashes():
    torch_text = "00000003-1111-2222-3333-444444444444"  # str(cudaDeviceProp.uuid): no "GPU-"
    assert uuid_key(nvml_uuid(3)) == uuid_key(torch_text) == uuid_key(torch_text.upper().replace("-", ""))
    assert uuid_key(nvml_uuid(3)) != uuid_key(nvml_uuid(4))
    assert uuid_key("MIG-" + torch_text) == uuid_key(torch_text)


def test_a_cuda_device_is_matched_to_its_nvml_gpu_by_uuid_not_by_index():
    got = attribute_gpus([(0, "00000003-1111-2222-3333-444444444444")], devices(), simulated=False)
    assert got == GpuAttribution((3,), "uuid")


def test_a_uuid_nvml_does_not_list_charges_every_gpu_and_says_so_in_one_line():
    got = attribute_gpus([(0, "deadbeef-0000-0000-0000-000000000000")], devices(), simulated=False)
    assert got.gpus == tuple(range(NODE_GPUS)) and got.method == "unmatched"
    assert "cuda:0 (deadbeef-0000-0000-0000-000000000000) is not among the GPUs NVML lists" in got.note
    assert "charged all 8 GPUs, an upper bound" in got.note and "\n" not in got.note
    no_uuid = attribute_gpus([(0, None)], devices(2), simulated=False)
    assert no_uuid.method == "unmatched" and "no UUID from torch" in no_uuid.note


def test_the_mock_and_cpu_workloads_are_charged_gpu_0_alone_and_say_so():
    mock = attribute_gpus([], devices(4), simulated=True)
    assert mock.gpus == (0,) and mock.method == "mock" and "mock GPU 0 alone" in mock.note
    cpu = attribute_gpus([], devices(), simulated=False)
    assert cpu.gpus == (0,) and cpu.method == "cpu" and "runs on the CPU" in cpu.note
    none_yet = attribute_gpus([(0, "00000003-1111-2222-3333-444444444444")], [], simulated=False)
    assert none_yet.gpus == (0,) and none_yet.method == "no-devices"


class _FakeCuUuid:
    """What ``torch.cuda.get_device_properties(i).uuid`` is: an object whose str() is 8-4-4-4-12 hex."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def _fake_device_properties(index: int) -> SimpleNamespace:
    """The CUDA runtime's view: device ``index`` is the index-th GPU of CUDA_VISIBLE_DEVICES."""
    import os

    visible = [int(part) for part in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
    return SimpleNamespace(uuid=_FakeCuUuid(nvml_uuid(visible[index]).removeprefix("GPU-")))


@pytest.fixture
def eight_gpu_node(monkeypatch):
    """The NVML stub as 8 GPUs whose energy counters advance with the clock, in place of pynvml; torch
    seeing one CUDA device under CUDA_VISIBLE_DEVICES=3; the CUDA context step recorded, not run."""
    torch = pytest.importorskip("torch")
    from nvml_stub import default_gpus, make_nvml_stub

    from wattledger.workloads import common

    nvml = make_nvml_stub(default_gpus(NODE_GPUS))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(VISIBLE_GPU))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", _fake_device_properties)
    contexts: list[list[int]] = []
    monkeypatch.setattr(common, "hold_cuda_context", lambda indices: contexts.append(list(indices)))
    stop = threading.Event()

    def advance() -> None:  # the counters move as time passes, as on a real GPU
        last = time.monotonic()
        while not stop.wait(0.01):
            now = time.monotonic()
            nvml.fake.advance(now - last)
            last = now

    clock = threading.Thread(target=advance, daemon=True)
    clock.start()
    yield SimpleNamespace(nvml=nvml, contexts=contexts)
    stop.set()
    clock.join(5)


@pytest.mark.slow
def test_on_an_8_gpu_node_the_workload_is_charged_only_its_one_gpu(eight_gpu_node, monkeypatch, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    from toy_regime import ToyConfig  # noqa: F401 - the regime module must import

    from wattledger.workloads import registry
    from wattledger.workloads.bench import report, table
    from wattledger.workloads.bench.bench_command import BenchOptions, StopRequest, run_bench
    from wattledger.workloads.bench.economics import load_pricing

    monkeypatch.setitem(registry.REGIMES, "toy", registry.Regime(
        "toy", "toy_regime", "ToyConfig", "a toy regime", "generated", "#777777"))
    monkeypatch.setattr(report, "render_report", lambda *args: None)  # the page: tests/test_bench_failures.py
    # Short phases: the figures asserted are means over whatever window there is, not the 5 s rule's.
    options = BenchOptions(workloads=("toy",), backend="nvml", device="auto", duration_s=2.5, idle_s=1.0,
                           cooldown_s=0.0, output_dir=tmp_path, preset="tiny")
    run_dir, summary = run_bench(options, StopRequest(), load_pricing(), table.console(file=open("/dev/null", "w")))
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "summary.schema.json").read_text())
    jsonschema.validate(summary, schema)

    assert summary["backend"] == "nvml" and len(summary["gpus"]) == NODE_GPUS
    toy = summary["regimes"]["toy"]
    assert toy["gpus"] == [VISIBLE_GPU] and toy["gpu_attribution"] == "uuid"
    # The reporter registered GPU 3 alone: every span of the toy names it and nothing else.
    spans = [json.loads(line) for line in (run_dir / "spans.jsonl").read_text().splitlines()]
    assert spans and {tuple(s["gpus"]) for s in spans if s["workload"] == "toy"} == {(VISIBLE_GPU,)}
    # Energy, power and J/token are GPU 3's (its constant stub power), not the node's eight.
    gpu3_watts = eight_gpu_node.nvml.fake.gpus[VISIBLE_GPU].power_mw / 1000
    node_watts = sum(g.power_mw for g in eight_gpu_node.nvml.fake.gpus) / 1000
    seconds = toy["duration_seconds"]
    assert toy["energy_joules"] == pytest.approx(gpu3_watts * seconds, rel=0.05)
    assert toy["power_watts"]["mean"] == pytest.approx(gpu3_watts, rel=0.05)
    tokens = toy["tokens"]["generated"]
    assert tokens > 0 and toy["joules_per_token"]["gross"] == pytest.approx(gpu3_watts * seconds / tokens, rel=0.05)
    # The idle baseline subtracted is GPU 3's own; the run's baseline covers the whole node.
    assert toy["idle_power_watts"] == pytest.approx(gpu3_watts, rel=0.05)
    assert summary["idle"]["power_watts"] == pytest.approx(node_watts, rel=0.05)
    assert summary["idle"]["per_gpu_watts"][str(VISIBLE_GPU)] == pytest.approx(gpu3_watts, rel=0.05)
    # Item 8: the CUDA context was created on torch's device 0 before the idle baseline, and recorded.
    assert eight_gpu_node.contexts == [[0]]
    assert summary["idle"]["cuda_context_held"] is True and summary["idle_end"]["cuda_context_held"] is True


def test_torchs_uuid_bytes_read_as_nvmls_uuid(monkeypatch):
    """``_CUuuid.bytes`` (16 ints) is read in preference to its text: the same key as NVML's UUID."""
    torch = pytest.importorskip("torch")
    from wattledger.workloads import common

    raw = list(bytes.fromhex(nvml_uuid(5).removeprefix("GPU-").replace("-", "")))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(
        uuid=SimpleNamespace(bytes=raw)))
    assert common.cuda_uuid(0) == nvml_uuid(5).removeprefix("GPU-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace())
    assert common.cuda_uuid(0) is None  # a torch without the field: no UUID, so the bench charges every GPU
