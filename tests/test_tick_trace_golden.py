"""Every figure of a scripted run, tick by tick, against a checked-in trace: the sampler tick's fast paths
(the mock's physics, GpuSample construction, the ledger's per-sample work and its snapshot copy) must
not move any figure, down to the last bit of a float.

The run: 3 mock GPUs, 8 s of a scripted load (bursts, a load above the power limit, PCIe traffic,
declared memory), two workloads that start, overlap and stop, and faults of every kind the mock has (an
energy counter reset, a GPU lost and back, fields unsupported for a while and for good), sampled at
10 Hz and at 100 Hz. After every tick the test writes down every GpuSample field and every figure of a
ledger snapshot (counter totals and previous readings, busy seconds, histograms, throttle seconds,
lost fields, workload and unattributed energy, cursors) exactly (floats by ``repr``), and keeps one
digest per tick; the whole exposition at the end is kept in full. ``tests/golden/tick_trace.json`` was
written by the code before the fast paths; regenerate it only for a deliberate change of the physics
or the ledger: ``WATTLEDGER_UPDATE_GOLDEN=1 pytest tests/test_tick_trace_golden.py``, and review why.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fakes import FakeClock
from wattledger.agent.accounting import Accounting
from wattledger.agent.ledger import HardwareCounter, Ledger
from wattledger.agent.sampler import Sampler
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.mock import Fault, MockGpuBackend

GOLDEN = Path(__file__).parent / "golden" / "tick_trace.json"
RUN_SECONDS = 8.0
RATES_HZ = (10, 100)


def canonical(value: object) -> object:
    """``value`` as JSON that tells every figure apart exactly: floats by repr (so 1 and 1.0, and any
    two floats that differ in the last bit, differ), sets sorted, dataclasses and counters field by field."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, dict):
        return sorted([canonical(k), canonical(v)] for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, HardwareCounter):
        return {"kind": type(value).__name__, "total": canonical(value.total),
                "previous": canonical(value._previous)}
    if dataclasses.is_dataclass(value):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"no canonical form for {type(value).__name__}")


def snapshot_figures(ledger: Ledger) -> object:
    """Every figure a snapshot carries, but the wall-clock-free parts only (the clock is fake anyway)."""
    snapshot = ledger.snapshot()
    return canonical({
        "gpus": snapshot.gpus,
        "workload_energy_joules": snapshot.workload_energy_joules,
        "workload_active_seconds": snapshot.workload_active_seconds,
        "overruns": snapshot.overruns,
        "sample_age_seconds": snapshot.sample_age_seconds,
    })


def scripted_run(hz: int) -> dict:
    """The run described in the module docstring at ``hz``: per-tick digests and the final exposition."""
    clock = FakeClock()
    timeline = (
        ScriptedTimeline(clock.ns())
        .bursts(0, RUN_SECONDS, 0.7, 0.23, Activity(gpu=1.0, sm=0.8, tensor=0.6, dram=0.5), gpus=[0])
        .add(1.05, 6.5, Activity(gpu=1.0, sm=1.0, tensor=1.0, dram=1.0), gpus=[1])  # above the limit
        .add(2.0, 7.0, Activity(gpu=0.4, sm=0.3, dram=0.2, pcie_transmit_bytes_per_second=3.5e9,
                                pcie_receive_bytes_per_second=1.25e9), gpus=[2])
        .add(3.3, 3.9, Activity(gpu=0.9, sm=0.7, tensor=0.2, dram=0.9), gpus=[2])  # overlaps the one above
        .allocate(0, 20 * 2**30)
        .allocate(2, 3 * 2**30 + 17)
    )
    faults = [
        Fault("energy_reset", at_s=3.05, gpu=0),
        Fault("gpu_lost", at_s=4.0, until_s=5.55, gpu=1),
        Fault("field_unsupported", field="power_watts", at_s=2.0, until_s=3.5, gpu=2),
        Fault("field_unsupported", field="utilization_gpu_ratio", at_s=6.0, gpu=0),
        Fault("field_unsupported", field="energy_joules", at_s=5.0, until_s=6.4, gpu=2),
        Fault("field_unsupported", field="throttle_reasons", at_s=1.0, until_s=2.5),
    ]
    gpu = MockGpuBackend(3, activity=timeline, clock_ns=clock.ns, faults=faults, power_limit_watts=600)
    accounting = Accounting([0, 1, 2], clock_ns=clock.ns)
    ledger = Ledger(accounting, clock_ns=clock.ns)
    sampler = Sampler(ledger, gpu, None, 1.0 / hz, clock=clock.seconds)
    events = {  # tick number -> what the workloads do just before it
        round(0.5 * hz): lambda: accounting.start("training", [0, 1]),
        round(2.2 * hz): lambda: accounting.start("chat", [1, 2]),
        round(5.0 * hz): lambda: accounting.stop("training"),
        round(7.3 * hz): lambda: accounting.stop("chat"),
    }
    samples: list = []
    sampler.add_sink(lambda gpu_samples, _host: samples.extend(gpu_samples), name="trace")
    digests = []
    for tick in range(round(RUN_SECONDS * hz)):
        if tick in events:
            events[tick]()
        clock.advance(1.0 / hz)
        samples.clear()
        sampler.tick()
        assert len(samples) == 3, "every tick reads every GPU (a lost one as up=False)"
        record = {"samples": canonical(samples), "ledger": snapshot_figures(ledger)}
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        digests.append(hashlib.sha256(text.encode()).hexdigest()[:16])
    return {"digests": digests, "exposition": generate_latest(make_registry(ledger, "0.0.0-trace")).decode()}


@pytest.mark.parametrize("hz", RATES_HZ)
def test_every_figure_of_a_scripted_run_matches_the_trace(hz):
    run = scripted_run(hz)
    if os.environ.get("WATTLEDGER_UPDATE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[str(hz)] = run
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())[str(hz)]
    if run["exposition"] != expected["exposition"]:
        diff = "".join(list(difflib.unified_diff(
            expected["exposition"].splitlines(True), run["exposition"].splitlines(True), "golden", "now"))[:40])
        pytest.fail(f"the exposition after the {hz} Hz run changed:\n{diff}")
    for tick, (now, then) in enumerate(zip(run["digests"], expected["digests"])):
        assert now == then, f"at {hz} Hz, tick {tick} ({(tick + 1) / hz:.2f} s) a sample or ledger figure changed"
    assert len(run["digests"]) == len(expected["digests"])
