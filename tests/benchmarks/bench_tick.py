"""CPU time per sampler tick, 8 mock GPUs: the agent's own share apart from the mock's physics. Prints
figures; asserts nothing.

    python tests/benchmarks/bench_tick.py                       # this tree, 10 Hz and 100 Hz
    python tests/benchmarks/bench_tick.py --baseline DIR        # beside another copy of the repository

A copy of the last commit to compare against (read-only for git):

    git archive --prefix=wl-base/ HEAD | tar -x -C /tmp
    python tests/benchmarks/bench_tick.py --baseline /tmp/wl-base

What is measured: ``Sampler.tick()`` driven by a fake clock (so a tick simulates exactly 1/rate s of the
bursty load bench_agent.py uses, and the host probe is read on its own 0.5 s cadence), with a ledger
that attributes energy to two workloads (4 GPUs each), as the agent does. Each tick's CPU time is the
sampler thread's own (``time.thread_time_ns``, user + system), so other processes on a busy machine do
not stretch it as they stretch wall time. It is split three ways:

- mock: inside the mock backend's ``sample()`` (the simulated GPUs; NVML's calls take its place on a
  GPU node). "(GpuSample)" is the part of it spent building the samples, which NVML pays as much: the
  same samples are built again by keyword after the run and timed apart (an estimate: warm caches);
- host probe: inside the host backend's ``sample()`` (/proc and RAPL reads, every 0.5 s);
- ledger + sampler: the rest (what the agent adds to any backend).

"agent own" is ledger + sampler + host probe, as bench_agent.py counts it. Each round runs in a fresh
process (one tree's warm caches never help the other); with ``--baseline`` the trees run in turns,
A B A B ..., and the ratio is taken round by round so that drift in the machine's speed cancels out.
Figures are medians over rounds, [min-max] beside them. The GPUs are simulated (the mock backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for fakes.py
from fakes import FakeClock  # noqa: E402 - a clock that moves only when told

GPUS = 8
WARMUP_TICKS = 50
RATES_HZ = (10.0, 100.0)
PACKAGE_FOLDERS = ("agent", "probes", "exporters", "workloads")
NS_PER_S = 1_000_000_000



class CpuTimed:
    """Forwards to a backend and adds the thread CPU time its ``sample()`` takes to ``cpu_ns``.

    Forwards by plain attributes, not ``__getattr__``: a Python ``__getattr__`` would add its own cost
    to the agent's share. The protocol's other parts are copied where the backend has them (an older
    tree's backends, with ``--baseline``, lack some)."""

    OPTIONAL = ("xid_counts", "error_counts", "probe_status", "devices_generation", "watch_process",
                "unwatch_process")

    def __init__(self, backend):
        self._backend = backend
        self.cpu_ns = 0
        self.results: list = []  # what sample() returned, when keep_results is set
        self.keep_results = False
        self.name, self.simulated = backend.name, getattr(backend, "simulated", False)
        self.devices, self.field_status, self.close = (
            getattr(backend, "devices", None), backend.field_status, backend.close)
        for name in self.OPTIONAL:
            if hasattr(backend, name):
                setattr(self, name, getattr(backend, name))

    def sample(self):
        started = time.thread_time_ns()
        result = self._backend.sample()
        self.cpu_ns += time.thread_time_ns() - started
        if self.keep_results:
            self.results.append(result)
        return result


def construction_ns(samples: list) -> int:
    """Thread CPU ns to build ``samples`` again by keyword, as the backends build them (the fields
    that are not at their default), timed apart after the run: the part of a backend's ``sample()``
    that NVML pays as much as the mock does."""
    from dataclasses import fields

    from wattledger.probes.base import GpuSample

    defaults = {f.name: f.default for f in fields(GpuSample)}
    calls = [{name: getattr(s, name) for name in defaults
              if name in ("index", "uuid", "monotonic_ns") or getattr(s, name) is not defaults[name]}
             for s in samples]
    started = time.thread_time_ns()
    for keywords in calls:
        GpuSample(**keywords)
    return time.thread_time_ns() - started


def measure_round(hz: float, ticks: int, host_kind: str) -> dict:
    """One round in this process: CPU ns per tick, in all and per share (means over ``ticks``)."""
    from wattledger.agent.accounting import Accounting
    from wattledger.agent.ledger import Ledger
    from wattledger.agent.sampler import Sampler
    from wattledger.probes.activity import Activity, ScriptedTimeline
    from wattledger.probes.mock import MockGpuBackend

    clock = FakeClock()
    interval_ns = round(NS_PER_S / hz)
    seconds = (WARMUP_TICKS + ticks) / hz + 5
    timeline = ScriptedTimeline(clock.ns()).bursts(
        0, seconds, 0.7, 0.2, Activity(gpu=1, sm=0.8, tensor=0.6, dram=0.5))
    gpu = CpuTimed(MockGpuBackend(GPUS, activity=timeline, clock_ns=clock.ns))
    host = None
    if host_kind == "real":
        from wattledger.probes.host import open_host_backend
        host = CpuTimed(open_host_backend())
    accounting = Accounting(list(range(GPUS)), clock_ns=clock.ns)
    accounting.start("training", list(range(GPUS // 2)))
    accounting.start("serving", list(range(GPUS // 2, GPUS)))
    ledger = Ledger(accounting, clock_ns=clock.ns)
    sampler = Sampler(ledger, gpu, host, 1.0 / hz, clock=clock.seconds)
    for _ in range(WARMUP_TICKS):
        clock.now_ns += interval_ns
        sampler.tick()
    gpu.cpu_ns = 0
    if host is not None:
        host.cpu_ns = 0
    per_tick: list[int] = []
    gpu.keep_results = True  # the samples, to time their construction apart after the run
    for _ in range(ticks):
        clock.now_ns += interval_ns
        started = time.thread_time_ns()
        sampler.tick()
        per_tick.append(time.thread_time_ns() - started)
    total = sum(per_tick)
    host_ns = host.cpu_ns if host is not None else 0
    return {
        "tick_us": total / ticks / 1e3,
        "tick_median_us": statistics.median(per_tick) / 1e3,
        "mock_us": gpu.cpu_ns / ticks / 1e3,
        "construction_us": construction_ns([s for tick in gpu.results for s in tick]) / ticks / 1e3,
        "host_us": host_ns / ticks / 1e3,
        "ledger_sampler_us": (total - gpu.cpu_ns - host_ns) / ticks / 1e3,
        "agent_us": (total - gpu.cpu_ns) / ticks / 1e3,
        "package": str(Path(sys.modules["wattledger.agent.ledger"].__file__).resolve().parent.parent),
    }


def package_path_for(tree: Path, scratch: Path) -> Path:
    """A folder holding ``wattledger/`` linked to ``tree``'s code folders (the package's layout)."""
    package = scratch / "wattledger"
    package.mkdir(parents=True)
    for folder in PACKAGE_FOLDERS:
        if (tree / folder).is_dir():
            (package / folder).symlink_to((tree / folder).resolve())
    return scratch


def run_child(hz: float, ticks: int, host_kind: str, python_path: Path | None) -> dict:
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--rate", str(hz), "--ticks", str(ticks), "--host", host_kind],
        env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_tick: a round failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} [{min(values):.1f}-{max(values):.1f}]"


SHARES = (("tick_us", "tick"), ("mock_us", "mock"), ("construction_us", "(GpuSample)"),
          ("agent_us", "agent own"), ("ledger_sampler_us", "ledger+sampler"), ("host_us", "host probe"))


def print_rows(label: str, rounds: list[dict]) -> None:
    cells = "  ".join(f"{name} {spread([r[key] for r in rounds])}" for key, name in SHARES)
    print(f"  {label:9} {cells}")


def print_ratios(this: list[dict], base: list[dict]) -> None:
    cells = []
    for key, name in SHARES:
        ratios = [a[key] / b[key] for a, b in zip(this, base) if b[key] > 0]
        if ratios:
            cells.append(f"{name} {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
    print(f"  {'this/base':9} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another copy of the repository to compare against")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per tree and rate (default 5)")
    parser.add_argument("--ticks", type=int, help="ticks measured per round (default 300 at 10 Hz, 1000 at 100 Hz)")
    parser.add_argument("--host", choices=("real", "none"), default="real",
                        help="real: the agent's host probe on this machine's /proc (default); none: GPUs only")
    parser.add_argument("--json", action="store_true", help="print every round as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_round(args.rate, args.ticks, args.host)))
        return
    if args.rounds < 1 or (args.ticks is not None and args.ticks < 1):
        parser.error("--rounds and --ticks must be at least 1")
    if args.baseline is not None and not (args.baseline / "agent" / "ledger.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a copy of the repository (no agent/ledger.py)")
    figures: dict = {"gpus": f"{GPUS} mock GPUs (SIMULATED)", "host": args.host, "rates": []}
    with tempfile.TemporaryDirectory(prefix="bench-tick-") as scratch:
        base_path = package_path_for(args.baseline, Path(scratch)) if args.baseline else None
        for hz in RATES_HZ:
            ticks = args.ticks or (300 if hz <= 10 else 1000)
            this, base = [], []
            for _ in range(args.rounds):
                this.append(run_child(hz, ticks, args.host, None))
                if base_path is not None:
                    base.append(run_child(hz, ticks, args.host, base_path))
            figures["rates"].append({"hz": hz, "ticks": ticks, "this": this, "baseline": base})
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"CPU time per sampler tick, us (thread_time), {figures['gpus']}, host probe: {args.host}; "
          f"median [min-max] of {args.rounds} rounds, each a fresh process")
    print(f"  this:      {figures['rates'][0]['this'][0]['package']}")
    if args.baseline:
        print(f"  base:      {figures['rates'][0]['baseline'][0]['package']}")
    for rate in figures["rates"]:
        print(f"{rate['hz']:g} Hz ({rate['ticks']} ticks a round):")
        print_rows("this", rate["this"])
        if rate["baseline"]:
            print_rows("base", rate["baseline"])
            print_ratios(rate["this"], rate["baseline"])
        core = [100 * r["tick_us"] * rate["hz"] / 1e6 for r in rate["this"]]
        agent = [100 * r["agent_us"] * rate["hz"] / 1e6 for r in rate["this"]]
        print(f"  at {rate['hz']:g} Hz this tree's sampler takes {statistics.median(core):.2f}% of one core, "
              f"the agent's own share {statistics.median(agent):.2f}%")

if __name__ == "__main__":
    main()
