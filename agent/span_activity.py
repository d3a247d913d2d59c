"""Drives the mock GPU from the spans workloads report through the accounting API.

Each span kind has a default activity (what a GPU typically does during it); a span may carry its own.
On a CPU-only machine this makes the mock telemetry show each regime's shape: flat for training,
bursts for chat, compute broken by tool calls for agentic sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from wattledger.agent.accounting import Accounting, Span
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


class SpanActivitySource:
    """An ActivitySource fed by accounting spans (finished ones, and open in-process ones)."""

    def __init__(self, accounting: Accounting, defaults: Mapping[str, Activity] = DEFAULT_SPAN_ACTIVITY):
        self._accounting = accounting
        self._defaults = dict(defaults)
        self._lock = threading.Lock()
        self._by_gpu: dict[int, list[tuple[int, int, Activity]]] = {}
        self._simulated_up_to: dict[int, int] = {}
        accounting.add_span_listener(self._on_span)

    def _activity(self, span: Span) -> Activity:
        return span.activity if span.activity is not None else self._defaults.get(span.kind, IDLE)

    def _on_span(self, span: Span) -> None:
        activity = self._activity(span)
        if activity == IDLE or span.end_ns <= span.start_ns:
            return
        with self._lock:
            for gpu in span.gpus:
                if span.end_ns > self._simulated_up_to.get(gpu, 0):
                    self._by_gpu.setdefault(gpu, []).append((span.start_ns, span.end_ns, activity))

    def segments(self, gpu: int, start_ns: int, end_ns: int) -> list[ActivitySegment]:
        open_spans = [
            (s.start_ns, end_ns, self._activity(s)) for s in self._accounting.open_spans() if gpu in s.gpus
        ]
        with self._lock:
            # Spans that ended before this query are history the mock has already simulated.
            kept = [entry for entry in self._by_gpu.get(gpu, []) if entry[1] > start_ns]
            self._by_gpu[gpu] = kept
            self._simulated_up_to[gpu] = end_ns
            candidates = kept + open_spans
        return flatten(candidates, start_ns, end_ns)

    def allocated_bytes(self, gpu: int) -> int:
        return self._accounting.declared_memory_bytes(gpu)
