"""A run directory: what ``wattledger bench`` and ``wattledger run`` record, and how it is read back.

Raw files, written while the run goes on so that an interrupted run (even one killed outright) leaves
something to analyse; ``wattledger report RUN_DIR`` rebuilds everything else from them:

Writers are ``exporters.jsonl.JsonlWriter`` / ``JsonlRecorder``.

- ``samples.jsonl``: the agent's recorder format (header, GPU and host samples), plus per-tick ``tokens``
  records (every workload's cumulative token counts, stamped on the host's monotonic clock) and, on the
  mock backend, ``truth`` records (the simulator's exact cumulative energy per GPU). Flushed every 2 s.
- ``spans.jsonl``: every span the workloads reported. Flushed every 2 s.
- ``events.jsonl``: run and phase boundaries with the workloads' own summaries. Flushed at each event.

Derived files: ``samples.parquet`` and ``host.parquet`` (the samples as tables), ``summary.json``,
``report.html`` and ``figures/*.png``.

All timestamps are ``time.monotonic_ns()`` of the host. Mock samples carry the simulated time, which runs a
fixed delay behind but on the same clock, so windows cut on one timeline line up on the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


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


def _read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of a file; a line cut short by a kill at the very end is skipped."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
    return out


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory's raw files. ValueError (one line) when it is not a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").exists() or not (run_dir / "samples.jsonl").exists():
        raise ValueError(f"{run_dir} is not a wattledger run directory (no events.jsonl and samples.jsonl)")
    events = _read_jsonl(run_dir / "events.jsonl")
    start = next((e for e in events if e.get("type") == "run_start"), None)
    if start is None:
        raise ValueError(f"{run_dir}/events.jsonl has no run_start event")
    origin = int(start["monotonic_ns"])
    raw = _read_jsonl(run_dir / "samples.jsonl")
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
                                                               "rapl_energy_joules")}
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

    spans = pd.DataFrame(_read_jsonl(run_dir / "spans.jsonl"))
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
