"""The sampler's real loop beside another tree's, in turns: CPU share of the sampler thread with real
sleeps between ticks, 8 mock GPUs and the real host probe, the agent's own share apart from the mock's.
Prints figures; asserts nothing.

    git archive --prefix=wl-base/ 5d04950 | tar -x -C /tmp      # the tree before the tick work
    python tests/benchmarks/bench_real_loop.py --baseline /tmp/wl-base --rounds 3 --seconds 6
    python tests/benchmarks/bench_real_loop.py --wait-cost      # what one sleep costs the thread here

Where ``bench_tick.py`` times ``Sampler.tick()`` alone on a fake clock (the tick's own work, warm), this
runs ``Sampler.run()`` on the wall clock (``bench_agent.sampler_cpu``, each tree's own copy of it, in a
fresh process per round), so each tick also pays for sleeping and waking the thread and runs on cold
caches, as on a node. The trees run in turns, A B A B, and the ratio is taken round by round. The GPUs are
simulated (the mock backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tick import package_path_for  # noqa: E402 - a wattledger/ package linked to a tree's folders

THIS_TREE = Path(__file__).resolve().parent.parent.parent
RATES_HZ = (10, 100)
CHILD = """
import json, sys
sys.path[:0] = [{benchmarks!r}, {tests!r}]
from bench_agent import sampler_cpu
print(json.dumps(sampler_cpu({hz}, {seconds})))
"""


def run_round(tree: Path, package_path: Path, hz: int, seconds: float) -> dict:
    code = CHILD.format(benchmarks=str(tree / "tests" / "benchmarks"), tests=str(tree / "tests"), hz=hz,
                        seconds=seconds)
    env = dict(os.environ, PYTHONPATH=str(package_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_real_loop: a round on {tree} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_cost(interval_s: float = 0.01, waits: int = 300) -> None:
    """Thread CPU per timed wait of each kind a sampler loop could sleep with (what the platform charges
    for sleeping and waking a thread, which every real tick pays)."""
    import threading
    import time

    from wattledger.agent.sampler import StopSignal

    held = threading.Lock()
    held.acquire()
    kinds = {"time.sleep": time.sleep, "Lock.acquire(timeout)": lambda s: held.acquire(True, s),
             "threading.Event.wait": threading.Event().wait, "StopSignal.wait (the sampler's)": StopSignal().wait}
    print(f"thread CPU per timed wait of {interval_s * 1000:g} ms, {waits} waits each:")
    for name, wait in kinds.items():
        started = time.thread_time_ns()
        for _ in range(waits):
            wait(interval_s)
        print(f"  {name:34} {(time.thread_time_ns() - started) / waits / 1e3:7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another copy of the repository (required unless --wait-cost)")
    parser.add_argument("--wait-cost", action="store_true", help="only time one wait of each kind, and stop")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per tree and rate (default 3)")
    parser.add_argument("--seconds", type=float, default=6.0, help="sampler run per round (default 6)")
    args = parser.parse_args()
    if args.wait_cost:
        wait_cost()
        return
    if args.baseline is None:
        parser.error("--baseline DIR is required (or --wait-cost)")
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds above 0")
    if not (args.baseline / "tests" / "benchmarks" / "bench_agent.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a copy of the repository "
                     "(no tests/benchmarks/bench_agent.py)")
    trees = {"this": THIS_TREE, "base": args.baseline.resolve()}
    rows: dict[tuple[str, int], list[dict]] = {(name, hz): [] for name in trees for hz in RATES_HZ}
    with tempfile.TemporaryDirectory(prefix="bench-real-loop-") as scratch:
        paths = {name: package_path_for(tree, Path(scratch) / name) for name, tree in trees.items()}
        for _ in range(args.rounds):
            for hz in RATES_HZ:
                for name, tree in trees.items():
                    rows[(name, hz)].append(run_round(tree, paths[name], hz, args.seconds))
    print(f"sampler thread CPU, real loop, 8 mock GPUs (SIMULATED), real host probe; medians of {args.rounds} "
          f"rounds of {args.seconds:g} s, each a fresh process")
    for hz in RATES_HZ:
        for name in trees:
            median = lambda key: statistics.median(r[key] for r in rows[(name, hz)])  # noqa: E731
            print(f"  {hz:>3} Hz {name}: {median('cpu_percent_of_one_core'):.3f}% of one core in all, agent "
                  f"{median('agent_percent_of_one_core'):.3f}%, "
                  f"mock {median('mock_physics_percent_of_one_core'):.3f}% "
                  f"({median('cpu_us_per_tick'):.0f} us per tick)")
        ratios = [a["agent_percent_of_one_core"] / b["agent_percent_of_one_core"]
                  for a, b in zip(rows[("this", hz)], rows[("base", hz)])]
        print(f"  {hz:>3} Hz agent's own share, this / base: {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
