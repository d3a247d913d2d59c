"""The simulator's truth for a set of spans: how busy they say the GPU was, whenever they reached the mock.

Tests of the mock's utilization compare against this instead of against thresholds a busy host can move:
it applies the mock's own rule (each span's activity, else its kind's default; overlapping spans combine
field by field with max) to the spans a workload reported, so it depends on their timestamps only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from wattledger.agent.span_activity import DEFAULT_SPAN_ACTIVITY
from wattledger.probes.activity import IDLE, Activity, flatten


def busy_fraction(spans: Iterable[tuple[str, int, int, Activity | None]], start_ns: int, end_ns: int) -> float:
    """Time-weighted ``gpu`` activity over [start_ns, end_ns) of ``(kind, start ns, end ns, activity)`` spans."""
    intervals = [(start, end, activity if activity is not None else DEFAULT_SPAN_ACTIVITY.get(kind, IDLE))
                 for kind, start, end, activity in spans]
    segments = flatten([i for i in intervals if i[2] != IDLE], start_ns, end_ns)
    return sum((s.end_ns - s.start_ns) * s.activity.gpu for s in segments) / (end_ns - start_ns)


def reported(spans) -> list[tuple[str, int, int, Activity | None]]:
    """A Reporter's kept spans (``ReportedSpan``) as ``busy_fraction`` takes them."""
    return [(s.kind, s.start_ns, s.end_ns, s.activity) for s in spans]


def run_dir_busy_fractions(run_dir: Path, summary: dict) -> dict[str, float]:
    """Per regime of a bench run: the busy fraction its spans.jsonl holds over its steady-state window."""
    origin_ns = next(json.loads(line)["monotonic_ns"] for line in (run_dir / "events.jsonl").read_text().splitlines()
                     if '"run_start"' in line)
    by_workload: dict[str, list] = {}
    for line in (run_dir / "spans.jsonl").read_text().splitlines():
        record = json.loads(line)
        activity = record.get("activity")
        by_workload.setdefault(record["workload"], []).append(
            (record["kind"], record["start_ns"], record["end_ns"], Activity(**activity) if activity else None))
    out = {}
    for name, regime in summary["regimes"].items():
        window = regime["window"]
        start = origin_ns + round(window["start_seconds"] * 1e9)
        end = origin_ns + round(window["end_seconds"] * 1e9)
        out[name] = busy_fraction(by_workload.get(name, []), start, end)
    return out
