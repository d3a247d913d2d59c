"""Times ``wattledger bench --quick`` on this machine (the issue's target: under 3 minutes on 2 cores).

    python tests/benchmarks/bench_quick.py [--output /tmp/runs]

Prints the wall time, where the run directory is, and the regimes' headline figures (SIMULATED on a
machine without an NVIDIA GPU). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    output = args.output or Path(tempfile.mkdtemp(prefix="wattledger-bench-"))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "bench", "--quick", "--output", str(output)],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        sys.exit(result.returncode)
    run_dir = (output / "latest").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    label = "SIMULATED " if summary["simulated"] else ""
    print(f"{label}wattledger bench --quick: {seconds:.1f} s wall on {os.cpu_count()} cores; {run_dir}")
    for name, regime in summary["regimes"].items():
        util = regime["gpu_utilization"]
        jpt = regime["joules_per_token"]
        print(f"  {name:9s} utilization mean {util['mean']:.2f} (idle {util['idle_fraction']:.2f}), "
              f"J/{regime['main_token_kind']} token gross {jpt['gross']:.4g} dynamic {jpt['dynamic']:.4g}, "
              f"${regime['cost_usd_per_million_tokens']['measured']:.3g}/Mtok")


if __name__ == "__main__":
    main()
