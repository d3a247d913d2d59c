"""Host probe benchmark: the cost of one procfs host sample. Prints figures; asserts nothing.

    python tests/benchmarks/bench_host_sample.py              # the fixture tree, 2000 samples
    python tests/benchmarks/bench_host_sample.py --live       # this machine's /proc and /sys

At the agent's 100 Hz ceiling a sample has 10 ms; the machine-wide reads should take well under 1 ms.
(Moved here from the unit tests: a stopwatch in a unit test fails on a busy machine, not on slow code.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from host_tree import FIXTURE_PROC, FIXTURE_SYS  # noqa: E402

from wattledger.probes.host import ProcfsHostBackend  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--live", action="store_true", help="sample this machine instead of the fixture tree")
    args = parser.parse_args()
    if args.live:
        backend = ProcfsHostBackend("/proc", "/sys")
        backend.watch_process(os.getpid())
        where = "this machine's /proc"
    else:
        backend = ProcfsHostBackend(str(FIXTURE_PROC), str(FIXTURE_SYS), clk_tck=100)
        backend.watch_process(4242)
        where = "the fixture tree (tests/fixtures)"
    backend.sample()
    costs = []
    for _ in range(args.samples):
        start = time.perf_counter()
        backend.sample()
        costs.append(time.perf_counter() - start)
    costs.sort()
    print(f"host sample on {where}, {args.samples} samples, {os.cpu_count()} CPUs:")
    print(f"  median {statistics.median(costs) * 1e6:.0f} us, p99 {costs[int(0.99 * len(costs))] * 1e6:.0f} us, "
          f"mean {statistics.fmean(costs) * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
