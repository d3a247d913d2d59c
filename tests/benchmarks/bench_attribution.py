"""What owner attribution (issue 13) adds: 8 mock GPUs, 50 owners. Prints figures; asserts nothing.

    python tests/benchmarks/bench_attribution.py
    python tests/benchmarks/bench_attribution.py --repeats 50 --ticks 300

Parts:

- exposition: the agent's families over 8 mock GPUs after 10 simulated seconds, attribution off and on,
  with 50 owners (40 pods, 5 systemd units, 5 commands) spread over the GPUs (6 or 7 each): lines and
  bytes of the text format and of OpenMetrics, and what attribution adds (the golden's layout with
  attribution off is unchanged; this is the rest of it).
- render: in-process, as bench_scrape.py's encoder line: the direct renderer writing already collected
  families, and a whole scrape's in-process part (ledger snapshot + collect + render); median thread CPU ms.
- tick: the ledger's own CPU time per tick (``Ledger.record_gpus``, thread_time) on the same recorded
  samples, attribution off and on, with the 50 owners spread over the GPUs and with all 50 on every GPU.
  The mock's physics are left out: the samples are recorded first, then fed to each ledger.

Figures are of this machine and of simulated GPUs (the mock backend, probes/mock_processes.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for fakes.py
from fakes import FakeClock  # noqa: E402 - a clock that moves only when told

from wattledger.agent.ledger import Ledger, OwnerAttribution  # noqa: E402
from wattledger.agent.owners import ScriptedOwnerResolver  # noqa: E402
from wattledger.agent.sampler import Sampler  # noqa: E402
from wattledger.exporters import render  # noqa: E402
from wattledger.exporters.prometheus import make_registry  # noqa: E402
from wattledger.probes.mock import MockGpuBackend  # noqa: E402
from wattledger.probes.mock_processes import ScriptedProcess, ScriptedProcesses  # noqa: E402

GPUS = 8
OWNERS = 50
NS_PER_S = 1_000_000_000
TICK_S = 0.1  # the sampler's default interval
RETENTION_NS = 600 * NS_PER_S  # the agent's default retention
GIB = 2**30


def owner_labels(number: int) -> dict[str, str]:
    """40 pods in 5 namespaces, 5 systemd units, 5 commands: label values of realistic lengths."""
    if number < 40:
        return {"namespace": f"team-{number % 5}", "pod": f"vllm-llama-3-8b-{number:02d}-7d9f8c6b5-x2k4p",
                "container": "vllm"}
    if number < 45:
        return {"group": f"trainer-{number}.service"}
    return {"group": f"python{number}"}


def scripted(layout: str) -> ScriptedProcesses:
    """``spread``: owner i on GPU i % 8 alone; ``crowded``: every owner on every GPU."""
    processes = []
    for number in range(OWNERS):
        gpus = [number % GPUS] if layout == "spread" else range(GPUS)
        per_gpu_share = 0.9 / (OWNERS / GPUS if layout == "spread" else OWNERS)
        for gpu in gpus:
            processes.append(ScriptedProcess(gpu, 10_000 + number, per_gpu_share + 0.001 * (number % 7),
                                             GIB * (1 + number % 4), owner_labels(number)))
    return ScriptedProcesses(processes)


def recorded_run(layout: str, ticks: int) -> tuple[MockGpuBackend, list[list], FakeClock]:
    """The mock's samples over ``ticks`` ticks (recorded, so that each ledger is fed the same ones)."""
    clock = FakeClock()
    gpu = MockGpuBackend(GPUS, clock_ns=clock.ns, processes=scripted(layout))
    samples = []
    for _ in range(ticks):
        clock.advance(TICK_S)
        samples.append(gpu.sample())
    return gpu, samples, clock


def make_ledger(gpu: MockGpuBackend, clock: FakeClock, attribution: bool) -> Ledger:
    owners = (OwnerAttribution(ScriptedOwnerResolver(gpu.scripted_owner_labels()), OWNERS, RETENTION_NS)
              if attribution else None)
    ledger = Ledger(None, clock_ns=clock.ns, attribution=owners)
    ledger.set_devices(gpu.name, gpu.simulated, gpu.devices())
    return ledger


def tick_cpu_us(layout: str, ticks: int) -> dict[str, float]:
    """Median thread CPU us of ``Ledger.record_gpus`` per tick, attribution off and on."""
    gpu, samples, clock = recorded_run(layout, ticks)
    out = {}
    for attribution in (False, True):
        ledger = make_ledger(gpu, clock, attribution)
        per_tick = []
        for tick in samples:
            started = time.thread_time_ns()
            ledger.record_gpus(tick)
            per_tick.append(time.thread_time_ns() - started)
        out["on" if attribution else "off"] = statistics.median(per_tick[ticks // 10:]) / 1e3  # past the warm-up
    return out


def exposition_ledger(attribution: bool) -> Ledger:
    """The ledger behind a scrape: 8 mock GPUs after 10 simulated seconds, the 50 owners spread."""
    clock = FakeClock()
    gpu = MockGpuBackend(GPUS, clock_ns=clock.ns, processes=scripted("spread"))
    ledger = make_ledger(gpu, clock, attribution)
    sampler = Sampler(ledger, gpu, None, TICK_S, clock=clock.seconds)
    for _ in range(100):
        clock.advance(TICK_S)
        sampler.tick()
    return ledger


def median_ms(function, repeats: int) -> float:
    """Median thread CPU ms of ``function()`` (CPU time: other processes on a shared machine stretch wall
    time, not this)."""
    times = []
    for _ in range(repeats):
        started = time.thread_time_ns()
        function()
        times.append(time.thread_time_ns() - started)
    return statistics.median(times) / 1e6


def exposition_figures(repeats: int) -> dict[str, dict]:
    out = {}
    for attribution in (False, True):
        registry = make_registry(exposition_ledger(attribution), "bench")
        families = list(registry.collect())
        text, om = render.render_text(families), render.render_openmetrics(families)
        owner_lines = sum(1 for line in text.splitlines()
                          if line.startswith((b"wattledger_owner_", b"wattledger_attribution_")))
        out["on" if attribution else "off"] = {
            "lines": text.count(b"\n"), "text_bytes": len(text), "openmetrics_bytes": len(om),
            "owner_lines": owner_lines,
            "render_text_ms": median_ms(lambda: render.render_text(families), repeats),
            "render_openmetrics_ms": median_ms(lambda: render.render_openmetrics(families), repeats),
            "scrape_ms": median_ms(lambda: render.render_openmetrics(list(registry.collect())), repeats),
        }
    return out


def print_figures(exposition: dict, ticks: dict) -> None:
    off, on = exposition["off"], exposition["on"]
    print(f"{GPUS} mock GPUs (SIMULATED), {OWNERS} owners (40 pods, 5 units, 5 commands), 10 simulated s")
    print(f"  {'':22}{'off':>10}{'on':>10}{'added':>10}")
    for key, name in (("lines", "lines (text)"), ("text_bytes", "bytes (text)"),
                      ("openmetrics_bytes", "bytes (OpenMetrics)")):
        print(f"  {name:22}{off[key]:>10}{on[key]:>10}{on[key] - off[key]:>+10}")
    print(f"  owner + status lines: {on['owner_lines']} (5 per owner with its series, 5 for \"other\", 1 status)")
    for key, name in (("render_text_ms", "render text, ms"), ("render_openmetrics_ms", "render OpenMetrics, ms"),
                      ("scrape_ms", "snapshot+collect+OM, ms")):
        print(f"  {name:22}{off[key]:>10.3f}{on[key]:>10.3f}{on[key] - off[key]:>+10.3f}")
    print("Ledger.record_gpus CPU per tick, us (median; the mock's physics left out):")
    for layout, figures in ticks.items():
        added_us = figures["on"] - figures["off"]
        print(f"  {layout:8} off {figures['off']:8.1f}  on {figures['on']:8.1f}  added {added_us:+8.1f}"
              f"  ({100 * added_us / (TICK_S * 1e6):.2f}% of a core at {1 / TICK_S:g} Hz)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="renders timed per figure (default 30)")
    parser.add_argument("--ticks", type=int, default=300, help="ticks fed to each ledger (default 300)")
    args = parser.parse_args()
    if args.repeats < 1 or args.ticks < 20:
        parser.error("--repeats must be at least 1 and --ticks at least 20")
    exposition = exposition_figures(args.repeats)
    ticks = {layout: tick_cpu_us(layout, args.ticks) for layout in ("spread", "crowded")}
    print_figures(exposition, ticks)


if __name__ == "__main__":
    main()
