"""Drives the mock GPU from the spans workloads report through the accounting API.

Each span kind has a default activity (what a GPU typically does during it); a span may carry its own.
On a CPU-only machine this makes the mock telemetry show each regime's shape: flat for training,
bursts for chat, compute broken by tool calls for agentic sessions.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping

from wattledger.agent.accounting import Accounting, AccountingError, Span
from wattledger.probes.activity import flatten
from wattledger.probes.base import IDLE, Activity, ActivitySegment

# ASSUMPTION: typical activity per span kind when the workload does not say; compute is a dense
# matrix-heavy step, transfers and checkpoints keep the copy engines and PCIe busy but no SM.
DEFAULT_SPAN_ACTIVITY: dict[str, Activity] = {
    "compute": Activity(gpu=1.0, sm=0.8, tensor=0.5, dram=0.5),
    "transfer": Activity(dram=0.2, pcie_transmit_bytes_per_second=10e9, pcie_receive_bytes_per_second=10e9),
    "checkpoint": Activity(gpu=0.05, sm=0.02, dram=0.1, pcie_transmit_bytes_per_second=10e9),
    "tool_call": IDLE,
    "idle": IDLE,
}


# The most span x GPU entries the mock holds before it has simulated them (spans arrive up to the mock's
# delay early, or up to 60 s for timestamps slightly ahead of the clock). Past it a batch is refused with
# 429 (retry later): the sampler's work per tick grows with the spans overlapping that tick, and this
# bounds them whatever writers do.
DEFAULT_MAX_PENDING_SPANS = 10_000


class SpanActivitySource:
    """An ActivitySource fed by accounting spans (finished ones, and open in-process ones).

    Spans are indexed when they arrive, on the writer's thread: per GPU, a list sorted by start time of
    spans the mock has not reached yet, and a short list of those it is simulating. A query takes the
    pending spans that begin before its end (a bisect), drops those that ended, and flattens what is
    left, so its cost follows the spans overlapping the query, never the number of posts.
    """

    def __init__(self, accounting: Accounting, defaults: Mapping[str, Activity] = DEFAULT_SPAN_ACTIVITY,
                 max_pending_spans: int = DEFAULT_MAX_PENDING_SPANS):
        self._accounting = accounting
        self._defaults = dict(defaults)
        self._max_pending = max_pending_spans
        self._lock = threading.Lock()
        # gpu -> [(start_ns, arrival number, end_ns, activity)] sorted; the arrival number keeps the
        # order total without comparing activities.
        self._pending: dict[int, list[tuple[int, int, int, Activity]]] = {}
        self._active: dict[int, list[tuple[int, int, Activity]]] = {}
        self._held = 0
        self._arrivals = 0
        self._simulated_up_to: dict[int, int] = {}
        accounting.add_span_gate(self._admit)

    def _activity(self, span: Span) -> Activity:
        return span.activity if span.activity is not None else self._defaults.get(span.kind, IDLE)

    def _admit(self, batch: list[Span]) -> None:
        """A span gate: index the batch, or refuse it whole with 429 when the index is full."""
        entries = [(gpu, span.start_ns, span.end_ns, activity)
                   for span in batch if span.end_ns > span.start_ns
                   for activity in (self._activity(span),) if activity != IDLE
                   for gpu in span.gpus]
        with self._lock:
            # Spans that ended before the mock's present are history it has already simulated.
            entries = [e for e in entries if e[2] > self._simulated_up_to.get(e[0], 0)]
            if self._held + len(entries) > self._max_pending:
                raise AccountingError(
                    f"too many pending spans: the mock holds at most {self._max_pending} span-GPU entries not yet "
                    f"simulated ({self._held} now); retry in a second", status=429)
            for gpu, start, end, activity in entries:
                bisect.insort(self._pending.setdefault(gpu, []), (start, self._arrivals, end, activity))
                self._arrivals += 1
            self._held += len(entries)

    def pending_spans(self) -> int:
        """Span-GPU entries held and not yet simulated to their end."""
        with self._lock:
            return self._held

    def segments(self, gpu: int, start_ns: int, end_ns: int) -> list[ActivitySegment]:
        open_spans = [
            (s.start_ns, end_ns, self._activity(s)) for s in self._accounting.open_spans() if gpu in s.gpus
        ]
        with self._lock:
            pending = self._pending.get(gpu, [])
            reached = bisect.bisect_left(pending, (end_ns,))  # those that begin before this query ends
            active = self._active.get(gpu, []) + [(s, e, a) for s, _, e, a in pending[:reached]]
            del pending[:reached]
            candidates = [entry for entry in active if entry[1] > start_ns]
            # What ends within this query is simulated once it returns: only longer spans stay.
            kept = [entry for entry in candidates if entry[1] > end_ns]
            self._held -= len(active) - len(kept)
            self._active[gpu] = kept
            self._simulated_up_to[gpu] = end_ns
            candidates += open_spans
        return flatten(candidates, start_ns, end_ns)

    def allocated_bytes(self, gpu: int) -> int:
        return self._accounting.declared_memory_bytes(gpu)
