"""A run directory: what ``wattledger bench`` and ``wattledger run`` record, and how it is read back.

Raw files, written while the run goes on so that an interrupted run (even one killed outright) leaves
something to analyse; ``wattledger report RUN_DIR`` rebuilds everything else from them:

Writers are ``exporters.jsonl.JsonlWriter`` / ``JsonlRecorder``.

- ``samples.jsonl``: the agent's recorder format (header, GPU and host samples), plus per-tick ``tokens``
  records (every workload's cumulative token counts, stamped on the host's monotonic clock) and, on the
  mock backend, ``truth`` records (the simulator's exact cumulative energy per GPU). Flushed every 2 s.
- ``spans.jsonl``: every span the workloads reported. Flushed every 2 s.
- ``events.jsonl``: run and phase boundaries with the workloads' own summaries. Flushed at each event.
  ``phase_start`` carries ``planned_seconds`` (the phase's planned length: the idle wait, or the
  workload's duration, which it counts from its own start); ``phase_end`` carries ``interrupted`` (the
  run was stopped during the phase, so the workload returned early) and, then, ``stop_reason`` ("SIGTERM",
  "SIGINT") and ``stop_requested_ns`` (when the stop was asked for). ``run_start`` carries ``rapl``, the
  host probe's RAPL entries (name, supported, reason).

Derived files: ``samples.parquet`` and ``host.parquet`` (the samples as tables), ``summary.json``,
``report.html`` and ``figures/*.png``.

All timestamps are ``time.monotonic_ns()`` of the host. Mock samples carry the simulated time, which runs a
fixed delay behind but on the same clock, so windows cut on one timeline line up on the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wattledger.probes import records


NS_PER_S = 1_000_000_000


@dataclass
class RunData:
    """A run directory read back into tables. ``t`` columns are seconds since the run started."""

    run_dir: Path
    header: dict
    events: list[dict]
    gpu: pd.DataFrame  # one row per GPU sample
    host: pd.DataFrame  # one row per host sample
    tokens: pd.DataFrame  # per tick: cumulative tokens, one column per "workload/kind"
    truth: pd.DataFrame  # mock only: per tick, cumulative true energy, one column per GPU index
    spans: pd.DataFrame  # workload, kind, start_ns, end_ns, t_start, t_end
    origin_ns: int

    def event(self, type_: str, **match) -> dict | None:
        for event in self.events:
            if event.get("type") == type_ and all(event.get(k) == v for k, v in match.items()):
                return event
        return None

    @property
    def simulated(self) -> bool:
        return bool(self.header.get("simulated"))


def _is_ns(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_event(record: dict) -> str | None:
    """What is wrong with an events.jsonl record, or None."""
    if not isinstance(record.get("type"), str) or not _is_ns(record.get("monotonic_ns")):
        return "an event needs a type and monotonic_ns (nanoseconds)"
    if record["type"] in ("phase_start", "phase_end") and not isinstance(record.get("phase"), str):
        return f"a {record['type']} event needs a phase name"
    if record["type"] == "run_start":
        settings = record.get("settings", {})
        if not isinstance(settings, dict):
            return "run_start settings must be an object"
        workloads = settings.get("workloads")
        if workloads is not None and not (isinstance(workloads, list) and all(isinstance(w, str) for w in workloads)):
            return "run_start settings.workloads must be a list of names"
    if record["type"] == "phase_end" and not isinstance(record.get("workload_summary") or {}, dict):
        return "phase_end workload_summary must be an object"
    if record["type"] == "phase_start" and record.get("planned_seconds") is not None and not (
            _is_number(record["planned_seconds"]) and record["planned_seconds"] >= 0):
        return "phase_start planned_seconds must be a number of seconds >= 0"
    if record["type"] == "phase_end" and not isinstance(record.get("interrupted", False), bool):
        return "phase_end interrupted must be true or false"
    if record["type"] == "phase_end" and record.get("stop_requested_ns") is not None and not _is_ns(
            record["stop_requested_ns"]):
        return "phase_end stop_requested_ns must be nanoseconds"
    return None


def _check_sample(record: dict) -> str | None:
    """What is wrong with a samples.jsonl record, or None. GPU samples get the replay backend's checks."""
    kind = record.get("type")
    try:
        if kind == "header":
            records.header_from_record(record)
        elif kind == "gpu":
            records.gpu_sample_from_record(record)
    except records.RecordError as err:
        return str(err)
    if not isinstance(kind, str):
        return "a record needs a type"
    if kind in ("host", "tokens", "truth") and not _is_ns(record.get("monotonic_ns")):
        return f"a {kind} record needs monotonic_ns (nanoseconds)"
    if kind == "tokens" and not (isinstance(record.get("counts", {}), dict)
                                 and all(_is_number(v) for v in record.get("counts", {}).values())):
        return "tokens counts must map names to numbers"
    if kind == "truth" and not (isinstance(record.get("energy_joules", []), list)
                                and all(_is_number(v) for v in record.get("energy_joules", []))):
        return "truth energy_joules must be a list of numbers"
    if kind == "host" and not isinstance(record.get("rapl_energy_joules") or {}, dict):
        return "host rapl_energy_joules must map zones to joules"
    if kind == "host" and not (isinstance(record.get("processes") or [], list)
                               and all(isinstance(p, dict) for p in record.get("processes") or [])):
        return "host processes must be a list of objects"
    return None


def _check_span(record: dict) -> str | None:
    """What is wrong with a spans.jsonl record, or None."""
    if not (isinstance(record.get("workload"), str) and isinstance(record.get("kind"), str)):
        return "a span needs a workload and a kind"
    if not (_is_ns(record.get("start_ns")) and _is_ns(record.get("end_ns"))):
        return "a span needs start_ns and end_ns (nanoseconds)"
    return None


def _read_jsonl(path: Path, check: Callable[[dict], str | None]) -> list[dict]:
    """Every complete record of a JSON-lines file, each checked; a line cut short by a kill at the very end is
    skipped. ValueError (one line, with the file and line number) for anything else that is not a record."""
    if not path.exists():
        return []
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    out = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            record = records.load_json_line(raw.decode("utf-8"), number)
        except (UnicodeDecodeError, records.RecordError) as err:
            if number == len(raw_lines):
                break
            reason = f"line {number}: not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err)
            raise ValueError(f"{path}: {reason}") from None
        problem = "not a JSON object" if not isinstance(record, dict) else check(record)
        if problem is not None:
            raise ValueError(f"{path}: line {number}: {problem}")
        out.append(record)
    return out


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory's raw files. ValueError (one line) when it is not a run directory or a file in it
    is malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        why = "not a directory" if run_dir.exists() else "no such directory"
        raise ValueError(f"{run_dir} is not a wattledger run directory ({why})")
    missing = [name for name in ("events.jsonl", "samples.jsonl") if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f"{run_dir} is not a wattledger run directory (no {' and no '.join(missing)})")
    events = _read_jsonl(run_dir / "events.jsonl", _check_event)
    start = next((e for e in events if e.get("type") == "run_start"), None)
    if start is None:
        raise ValueError(f"{run_dir}/events.jsonl has no run_start event")
    origin = int(start["monotonic_ns"])
    raw = _read_jsonl(run_dir / "samples.jsonl", _check_sample)
    header = next((r for r in raw if r.get("type") == "header"), {})
    gpu_rows, host_rows, token_rows, truth_rows = [], [], [], []
    for record in raw:
        kind = record.get("type")
        if kind == "gpu":
            row = {k: v for k, v in record.items() if k not in ("type", "throttle_seconds", "processes", "mig_instances")}
            row["throttle_reasons"] = ",".join(record.get("throttle_reasons") or [])
            gpu_rows.append(row)
        elif kind == "host":
            row = {k: v for k, v in record.items() if k not in ("type", "processes", "cpu_busy_seconds_per_core",
                                                               "cpu_core_ids", "rapl_energy_joules")}
            for zone, joules in (record.get("rapl_energy_joules") or {}).items():
                row[f"rapl_{zone}_joules"] = joules
            processes = record.get("processes") or []
            row["process_pinned_bytes"] = sum(p.get("pinned_bytes") or 0 for p in processes)
            row["process_locked_bytes"] = sum(p.get("locked_bytes") or 0 for p in processes)
            row["process_rss_bytes"] = sum(p.get("rss_bytes") or 0 for p in processes)
            host_rows.append(row)
        elif kind == "tokens":
            row = {"monotonic_ns": record["monotonic_ns"]}
            row.update(record.get("counts", {}))
            token_rows.append(row)
        elif kind == "truth":
            row = {"monotonic_ns": record["monotonic_ns"]}
            row.update({str(i): e for i, e in enumerate(record.get("energy_joules", []))})
            truth_rows.append(row)

    def table(rows: list[dict]) -> pd.DataFrame:
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame = frame.sort_values("monotonic_ns", kind="stable").reset_index(drop=True)
            frame["t"] = (frame["monotonic_ns"] - origin) / NS_PER_S
        return frame

    spans = pd.DataFrame(_read_jsonl(run_dir / "spans.jsonl", _check_span))
    if not spans.empty:
        spans["t_start"] = (spans["start_ns"] - origin) / NS_PER_S
        spans["t_end"] = (spans["end_ns"] - origin) / NS_PER_S
    tokens = table(token_rows).fillna(0)
    return RunData(run_dir, header, events, table(gpu_rows), table(host_rows), tokens, table(truth_rows), spans,
                   origin)


def write_parquet(run: RunData) -> list[Path]:
    """The samples as Parquet tables beside the raw files."""
    written = []
    for name, frame in (("samples.parquet", run.gpu), ("host.parquet", run.host)):
        if not frame.empty:
            path = run.run_dir / name
            frame.to_parquet(path, index=False)
            written.append(path)
    return written
