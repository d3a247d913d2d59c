"""One command that checks wattledger on a real NVIDIA GPU, from a plain checkout, in under 8 minutes.

    python3 tests/gpu/check.py /tmp/gpu-check              # on the GPU machine (nothing to install)
    python3 tests/gpu/check.py --dry-run /tmp/gpu-dry      # mock GPU, tiny preset, CPU: what the suite runs
    python3 tests/gpu/check.py --table                     # the roofline figures each step is judged against

Each step is timed and guarded (one failure never stops the rest) and runs in its own process on a GPU (a
CUDA error or an OOM cannot poison the next one); a step whose estimate no longer fits the budget
(--budget-s, default 450) is skipped, and the record is rewritten after every step. OUTDIR receives at most
8 files, each a few MiB at most: record.json and record.md (every figure, pass/fail against its
expectation), log.txt, recording.jsonl (a 100 ms recording slice for the replay tests), nvidia-smi.csv
and bench_summary.json. What each step checks and the figures to expect: docs/gpu-check.md.

Exit status: 0 when every step passed, 1 when one did not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpucheck_runner as runner  # noqa: E402 - after the path set-up above

runner.install_package_path()  # `wattledger` importable from the checkout, here and in every child

import gpucheck_model as model_steps  # noqa: E402
import gpucheck_nvml as nvml_steps  # noqa: E402

STEPS = [
    runner.Step("environment", model_steps.environment, 10, "GPU, driver, torch, CUDA, nvidia-ml-py"),
    runner.Step("devices", nvml_steps.devices_vs_nvidia_smi, 10,
                "`wattledger devices --json` against `nvidia-smi --query-gpu`"),
    runner.Step("nvml_costs", nvml_steps.nvml_costs, 20, "return code and cost of each NVML call, energy counter period"),
    runner.Step("attention", model_steps.attention_backends, 45,
                "SDPA backend each attention shape gets; decode ms/step by forward_cached and StaticDecoder"),
    runner.Step("agentic_spill", model_steps.agentic_spill, 30, "KV spilled to the host decodes bitwise the same"),
    runner.Step("torchrun", model_steps.torchrun, 60, "one-process torchrun: NCCL all-reduce, async checkpoint, resume"),
    runner.Step("bench_energy", nvml_steps.bench_energy, 120,
                "`wattledger bench --preset 1b` beside a 100 ms recording and nvidia-smi: counter vs integrated power"),
    runner.Step("model_bench", model_steps.model_bench, 120,
                "copy bandwidth, prefill, decode at batch 1 and 128 for 1b and 8b against the roofline"),
    runner.Step("compiled_decode", model_steps.compiled_decode, 60, "StaticDecoder under torch.compile vs eager"),
]
STEPS_BY_NAME = {step.name: step for step in STEPS}
DEFAULT_BUDGET_S = 450.0


class UsageParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage dump
        print(f"check.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _step_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS_BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0] if unknown else text!r}; "
                                         f"choose from {','.join(STEPS_BY_NAME)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = UsageParser(prog="tests/gpu/check.py", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, help="where the record goes (created; at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="mock GPU, tiny preset, CPU, no nvidia-smi")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting steps after this")
    parser.add_argument("--steps", type=_step_names, default=None, help="a comma-separated subset, e.g. "
                        "environment,model_bench (default: all, in order)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each step in its own process (auto: yes on a GPU, no in a dry run)")
    parser.add_argument("--table", action="store_true", help="print the roofline table and exit")
    # Internal: one step in a child process, and the NCCL probe run under torchrun.
    parser.add_argument("--child", choices=list(STEPS_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.table or args.nccl_child) and args.outdir is None:
        parser.error("give the output folder, e.g. python3 tests/gpu/check.py /tmp/gpu-check")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        parser.error(f"{args.outdir} exists and is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.table:
        from wattledger.workloads.roofline import main as roofline_main

        status = roofline_main(["--table"])
        print("\nWhat the model benchmark step accepts (tests/gpu/gpucheck_model.py):\n")
        print(model_steps.expectations_table())
        return status
    if args.nccl_child:
        return model_steps.nccl_all_reduce_child()
    if args.child:
        return runner.run_child(STEPS_BY_NAME[args.child], args.outdir, args.scratch, args.dry_run,
                                args.child_budget_s, args.child_result)
    return run_all(args, argv)


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    args.outdir.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in args.outdir.iterdir()]
    if stale:
        print(f"check.py: note: {args.outdir} already holds {len(stale)} files; same-named ones are replaced")
    scratch = Path(tempfile.mkdtemp(prefix="wattledger-gpu-check-"))
    isolate = {"yes": True, "no": False}.get(args.isolate, not args.dry_run)
    steps = [STEPS_BY_NAME[name] for name in args.steps] if args.steps else STEPS
    header = runner.header_fields(["python3", "tests/gpu/check.py", *argv])
    started = time.monotonic()
    try:
        record = runner.run_steps(steps, args.outdir, scratch, args.dry_run, args.budget_s, isolate, HERE / "check.py",
                                  header)
    finally:
        write_log(scratch, args.outdir / runner.LOG_FILE)
        shutil.rmtree(scratch, ignore_errors=True)
    files = sorted(p.name for p in args.outdir.iterdir())
    verdict = "PASS" if record["passed"] else "FAIL"
    print(f"{verdict} in {time.monotonic() - started:.0f} s: {args.outdir}/{runner.RECORD_MARKDOWN} "
          f"({len(files)} files: {', '.join(files)})")
    return 0 if record["passed"] else 1


def write_log(scratch: Path, target: Path) -> None:
    """The tail of every child's and tool's log, in one file (the folder keeps at most 8 files)."""
    parts = []
    for path in sorted(scratch.glob("*.log")):
        text = path.read_text(errors="replace")
        parts.append(f"===== {path.name} ({len(text)} chars, last 200,000 kept) =====\n{text[-200_000:]}")
    target.write_text("\n".join(parts) if parts else "(no step logs: steps ran in this process)\n")


if __name__ == "__main__":
    sys.exit(main())
