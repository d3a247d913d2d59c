"""``wattledger bench --quick`` on a quiet machine and beside busy processes, figures side by side.

    python tests/benchmarks/bench_under_load.py                   # quiet, then 3 busy processes per core
    python tests/benchmarks/bench_under_load.py --busy-per-core 2 --output /tmp/runs

Each run is its own subprocess (``python -m wattledger.agent.cli bench --quick --backend mock``). The
loaded run has ``busy-per-core x os.cpu_count()`` processes spinning on integer arithmetic beside it
(``tests/busy.py``'s workers, ended when the run ends and bounded in time regardless). Prints, per
regime, the simulated GPU utilization (mean and idle fraction), joules per token measured from the
exported counter and from the simulator's exact energy, the "mock ground truth" and "late spans" checks,
and every failed check. The figures are SIMULATED (mock GPU) and describe this machine; nothing is asserted.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for busy.py
from busy import spinning  # noqa: E402

BUSY_BOUND_SECONDS = 900.0  # the workers end by themselves after this, whatever happens to this script


def run_quick_bench(output: Path) -> tuple[dict, float, Path]:
    """One ``bench --quick`` in a subprocess; returns its summary, wall seconds and run directory."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "bench", "--quick", "--backend", "mock",
                             "--output", str(output)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"bench --quick failed with exit {result.returncode} (run under {output})")
    run_dir = (output / "latest").resolve()
    return json.loads((run_dir / "summary.json").read_text()), seconds, run_dir


def with_busy_processes(count: int, action):
    """Run ``action()`` while ``count`` processes keep the cores busy; the workers end in every case."""
    with spinning(count, BUSY_BOUND_SECONDS):
        return action()


def _check(regime: dict, name: str) -> dict | None:
    return next((c for c in regime.get("validity", []) if c["check"] == name), None)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def regime_rows(summary: dict) -> dict[str, dict[str, str]]:
    """Per regime, the figures the table shows, as text."""
    rows = {}
    for name, regime in summary["regimes"].items():
        util = regime["gpu_utilization"]
        measured = regime["joules_per_token"]["gross"]
        truth = (regime.get("mock_truth") or {}).get("joules_per_token")
        error = (measured - truth) / truth if measured is not None and truth else None
        late = _check(regime, "late spans")
        rows[name] = {
            "utilization": _fmt(util["mean"], ".2f"),
            "idle fraction": _fmt(util["idle_fraction"], ".2f"),
            "J/token": _fmt(measured, ".4g"),
            "J/token truth": _fmt(truth, ".4g"),
            "vs truth": "-" if error is None else f"{100 * error:+.2f}%",
            "late spans": "-" if late is None else ("0" if late["passed"] else late["detail"].split(" ")[0]),
        }
    return rows


def print_side_by_side(quiet: tuple, loaded: tuple, busy: int) -> None:
    (q_summary, q_seconds, q_dir), (l_summary, l_seconds, l_dir) = quiet, loaded
    label = "SIMULATED " if q_summary["simulated"] else ""
    print(f"{label}wattledger bench --quick on {os.cpu_count()} cores: quiet vs beside {busy} busy processes")
    print(f"  quiet : {q_seconds:6.1f} s wall, {q_dir}")
    print(f"  loaded: {l_seconds:6.1f} s wall, {l_dir}")
    q_rows, l_rows = regime_rows(q_summary), regime_rows(l_summary)
    print(f"{'regime':9s} {'figure':14s} {'quiet':>12s} {'loaded':>12s}")
    for name in q_rows:
        for figure, quiet_text in q_rows[name].items():
            loaded_text = l_rows.get(name, {}).get(figure, "-")
            print(f"{name:9s} {figure:14s} {quiet_text:>12s} {loaded_text:>12s}")
    for tag, summary in (("quiet", q_summary), ("loaded", l_summary)):
        failed = [(name, c) for name, regime in summary["regimes"].items() for c in regime.get("validity", [])
                  if not c["passed"]] + [("run", c) for c in summary.get("validity", [])
                                         if not c["passed"] and c["check"] != "backend"]
        print(f"failed checks ({tag}): {len(failed)}")
        for name, check in failed:
            print(f"  {name}: {check['check']}: {check['detail']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="parent of the two runs' directories")
    parser.add_argument("--busy-per-core", type=int, default=3, help="busy processes per core (default 3)")
    args = parser.parse_args()
    output = args.output or Path(tempfile.mkdtemp(prefix="wattledger-under-load-"))
    busy = args.busy_per_core * (os.cpu_count() or 1)
    quiet = run_quick_bench(output / "quiet")
    loaded = with_busy_processes(busy, lambda: run_quick_bench(output / "loaded"))
    print_side_by_side(quiet, loaded, busy)


if __name__ == "__main__":
    main()
