"""The machinery of tests/gpu/check.py: steps, checks, the time budget, isolation, the record.

A step is a function ``run(ctx) -> None`` that records figures and checks on ``ctx``; the runner times it,
catches anything it raises (one failure never stops the rest), runs it in a child process when asked (a
CUDA error or an OOM then cannot poison the next step's context, and a hang is cut at the budget), and
writes the record after every step, so a run killed half-way still leaves one.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PACKAGE_FOLDERS = ("agent", "probes", "exporters", "workloads")
RECORD_JSON = "record.json"
RECORD_MARKDOWN = "record.md"
LOG_FILE = "log.txt"
MAX_OUTPUT_FILES = 8
# Leave this much of the budget for writing the record and for the child process to start and stop.
BUDGET_RESERVE_S = 5.0
# A step may run this many times its estimate (at least STEP_TIMEOUT_MIN_S) before it is cut: a hang in one
# step must not eat the budget of all the others.
STEP_TIMEOUT_FACTOR = 3.0
STEP_TIMEOUT_MIN_S = 60.0
LOG_TAIL_CHARS = 4000


def package_path() -> Path:
    """A folder holding ``wattledger/`` as symlinks to the checkout's code folders (pyproject's package-dir).

    ``wattledger`` is a namespace package (no __init__.py), so putting this folder on sys.path makes
    ``import wattledger.workloads.model`` work from a plain checkout, with nothing installed.
    """
    scratch = Path(tempfile.mkdtemp(prefix="wattledger-gpu-check-path-"))
    package = scratch / "wattledger"
    package.mkdir()
    for folder in PACKAGE_FOLDERS:
        (package / folder).symlink_to(REPO / folder)
    return scratch


def install_package_path() -> str:
    """Make ``wattledger`` importable here and in every child process; returns the folder."""
    existing = os.environ.get("GPU_CHECK_PACKAGE_PATH")
    if existing and Path(existing, "wattledger").is_dir():
        folder = existing  # a child process: the parent made it and removes it
    else:
        folder = str(package_path())
        atexit.register(shutil.rmtree, folder, True)
    os.environ["GPU_CHECK_PACKAGE_PATH"] = folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


def wattledger_command(*args: str) -> list[str]:
    """The ``wattledger`` CLI as a command line that works without the console script installed."""
    return [sys.executable, "-m", "wattledger.agent.cli", *args]


@dataclass
class Check:
    """One figure judged against its expectation."""

    name: str
    value: object
    expected: str
    passed: bool


@dataclass
class Context:
    """What a step sees: where to write, whether this is a dry run, and where its figures go."""

    out_dir: Path
    scratch: Path  # big or many files go here, never into out_dir
    dry_run: bool
    deadline: float  # time.monotonic() by which the whole run must end
    figures: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def figure(self, name: str, value) -> None:
        self.figures[name] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, name: str, value, expected: str, passed: bool) -> bool:
        self.checks.append(Check(name, value, expected, bool(passed)))
        return bool(passed)

    def check_range(self, name: str, value: float | None, low: float | None, high: float | None,
                    unit: str = "") -> bool:
        """``low <= value <= high`` (either bound may be None); a missing value fails."""
        bounds = " and ".join(part for part in (f">= {low:g}{unit}" if low is not None else "",
                                                f"<= {high:g}{unit}" if high is not None else "") if part)
        ok = (value is not None and (low is None or value >= low) and (high is None or value <= high))
        return self.check(name, value, bounds, ok)


class Skip(Exception):
    """Raised by a step that cannot run here; ``counts_as_pass`` for "no GPU" in a dry run."""

    def __init__(self, reason: str, counts_as_pass: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.counts_as_pass = counts_as_pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], None]
    estimate_s: float  # on an H200, for the budget: a step whose estimate does not fit is skipped
    title: str  # one line for the Markdown record
    isolate: bool = True  # run in a child process when the run isolates steps


def step_result(name: str, status: str, seconds: float, ctx: Context | None, reason: str | None = None,
                counts_as_pass: bool = False, error: str | None = None) -> dict:
    return {
        "name": name, "status": status, "passed": status == "pass" or counts_as_pass, "seconds": round(seconds, 3),
        "reason": reason, "error": error,
        "figures": ctx.figures if ctx else {}, "notes": ctx.notes if ctx else [],
        "checks": [vars(c) for c in ctx.checks] if ctx else [],
    }


def run_in_process(step: Step, ctx: Context) -> dict:
    started = time.monotonic()
    try:
        step.run(ctx)
    except Skip as skip:
        return step_result(step.name, "skipped", time.monotonic() - started, ctx, skip.reason, skip.counts_as_pass)
    except BaseException as err:  # noqa: BLE001 - one step's failure, whatever it is, must not stop the rest
        if isinstance(err, KeyboardInterrupt):
            raise
        tail = traceback.format_exc()[-LOG_TAIL_CHARS:]
        return step_result(step.name, "error", time.monotonic() - started, ctx, f"{type(err).__name__}: {err}",
                           error=tail)
    status = "pass" if all(c.passed for c in ctx.checks) else "fail"
    return step_result(step.name, status, time.monotonic() - started, ctx)


def run_isolated(step: Step, ctx: Context, script: Path, timeout_s: float) -> dict:
    """Run one step in a child process (``check.py --child NAME``), cut at ``timeout_s``."""
    started = time.monotonic()
    result_file = ctx.scratch / f"step-{step.name}.json"
    command = [sys.executable, str(script), "--child", step.name, "--child-result", str(result_file),
               "--scratch", str(ctx.scratch), "--child-budget-s", str(max(1.0, timeout_s)), str(ctx.out_dir)]
    if ctx.dry_run:
        command.append("--dry-run")
    log = (ctx.scratch / f"step-{step.name}.log").open("w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own group: its torchrun, nvidia-smi, agents too
        child.wait()
        return step_result(step.name, "error", time.monotonic() - started, ctx,
                           f"timed out after {timeout_s:.0f} s (budget)", error=_log_tail(ctx, step))
    finally:
        log.close()
    if result_file.exists():
        result = json.loads(result_file.read_text())
        result["seconds"] = round(time.monotonic() - started, 3)
        return result
    return step_result(step.name, "error", time.monotonic() - started, ctx,
                       f"the child exited {child.returncode} without a result", error=_log_tail(ctx, step))


def _log_tail(ctx: Context, step: Step) -> str:
    path = ctx.scratch / f"step-{step.name}.log"
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if path.exists() else ""


def run_steps(steps: list[Step], out_dir: Path, scratch: Path, dry_run: bool, budget_s: float, isolate: bool,
              script: Path, header: dict) -> dict:
    """Every step in order, each timed and guarded; the record is rewritten after each one."""
    started = time.monotonic()
    deadline = started + budget_s
    record = {**header, "budget_s": budget_s, "dry_run": dry_run, "isolated": isolate, "steps": []}
    for step in steps:
        ctx = Context(out_dir, scratch, dry_run, deadline)
        left = deadline - time.monotonic() - BUDGET_RESERVE_S
        scaled_estimate = step.estimate_s if not dry_run else 0.0
        print(f"[{time.monotonic() - started:6.1f} s] {step.name}: ", end="", flush=True)
        if left < scaled_estimate or left <= 0:
            result = step_result(step.name, "skipped", 0.0, ctx,
                                 f"budget: {max(left, 0):.0f} s left, the step needs about {step.estimate_s:.0f} s")
        elif isolate and step.isolate:
            result = run_isolated(step, ctx, script, min(left, max(STEP_TIMEOUT_MIN_S,
                                                                   STEP_TIMEOUT_FACTOR * step.estimate_s)))
        else:
            result = run_in_process(step, ctx)
        print(f"{result['status']} ({result['seconds']:.1f} s){' - ' + result['reason'] if result['reason'] else ''}",
              flush=True)
        record["steps"].append(result)
        record["seconds"] = round(time.monotonic() - started, 3)
        record["passed"] = all(s["passed"] for s in record["steps"])
        write_record(record, out_dir)
    return record


def run_child(step: Step, out_dir: Path, scratch: Path, dry_run: bool, budget_s: float, result_file: Path) -> int:
    ctx = Context(out_dir, scratch, dry_run, time.monotonic() + budget_s)
    result = run_in_process(step, ctx)
    result_file.write_text(json.dumps(result, default=str))
    return 0


def header_fields(argv: list[str]) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"format": "wattledger-gpu-check", "version": 1, "started_utc": now.isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "command": " ".join(argv),
            "commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def write_record(record: dict, out_dir: Path) -> None:
    (out_dir / RECORD_JSON).write_text(json.dumps(record, indent=1, default=str))
    (out_dir / RECORD_MARKDOWN).write_text(markdown_record(record))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def markdown_record(record: dict) -> str:
    verdict = "PASS" if record.get("passed") else "FAIL"
    lines = [f"# GPU check, {record['started_utc']}: {verdict}", "",
             f"Command: `{record['command']}`; commit {record.get('commit')}; host {record['host']}; "
             f"{record.get('seconds', 0):.0f} s of a {record['budget_s']:.0f} s budget"
             f"{' (dry run: mock GPU, tiny preset, CPU)' if record['dry_run'] else ''}.", "",
             "| step | status | seconds | why |", "|---|---|---:|---|"]
    for s in record["steps"]:
        lines.append(f"| {s['name']} | {s['status']}{'' if s['passed'] else ' ✗'} | {s['seconds']:.1f} | "
                     f"{(s['reason'] or '').replace('|', '/')} |")
    for s in record["steps"]:
        lines += ["", f"## {s['name']}: {s['status']}", ""]
        if s["checks"]:
            lines += ["| check | value | expected | pass |", "|---|---|---|---|"]
            lines += [f"| {c['name']} | {_fmt(c['value'])} | {c['expected']} | {'yes' if c['passed'] else 'NO'} |"
                      for c in s["checks"]]
        if s["figures"]:
            lines += ["", "Figures: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in s["figures"].items())]
        lines += [f"- {n}" for n in s["notes"]]
        if s.get("error"):
            lines += ["", "```", s["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"
