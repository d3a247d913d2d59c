"""Drives the mock GPU from the spans workloads report through the accounting API.

Each span kind has a default activity (what a GPU typically does during it); a span may carry its own.
On a CPU-only machine this makes the mock telemetry show each regime's shape: flat for training,
bursts for chat, compute broken by tool calls for agentic sessions.

The rule (the same for the energy counter, utilization and the simulator's ground truth, since all three
come from the one simulated timeline): the mock's activity at time t is that of the spans covering t **by
their own timestamps**, whatever order or batching they arrive in, provided they arrive before the mock
has simulated t. The mock simulates t once t is its lag old (``MockGpuBackend(delay_s=...)``, the agent's
``--mock-delay``: 1 s by default, 1 s in ``bench``), so a span counts in full when it reaches the agent
within the lag of its start. Host load then changes nothing: a span that arrives 10 ms or 900 ms after it
happened drives the same simulated seconds.

A span that arrives later than that covers time the mock has already simulated (and exported: counters
cannot be rewritten). Its part before the mock's present is **late**: not simulated, and counted
(``late()``: span-GPU entries and seconds of activity), logged, and checked in the bench's run files, so a
lag too short for a reporter is visible rather than a silent loss of activity.

In-process reporters announce each step the moment it ends (``Accounting.announce_spans``) and record the
merged span later without simulating it again; open spans (``Accounting.begin_span``) count as active up to
the mock's present while they run, and the part of them the mock has simulated is not late when they close.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from wattledger.agent.accounting import Accounting, AccountingError, Span
from wattledger.probes.activity import IDLE, Activity, ActivitySegment, WorkloadProcess, flatten

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000

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

# Late spans are logged at most this often (with the totals so far), so a reporter that is always late
# does not flood the log.
LATE_LOG_INTERVAL_SECONDS = 60.0

# How long each GPU's simulated spans are kept for ``workload_processes`` when nobody asks for them (a GPU
# that is lost, a mock that never lists processes): the mock asks about every ``process_interval_s``
# (1 s) and each question lets the source forget what came before it, so this only bounds the memory.
# ASSUMPTION: no process-list refresh window is longer than a minute.
WORKLOAD_HISTORY_NS = 60 * NS_PER_S


@dataclass(frozen=True, slots=True)
class LateSpans:
    """Activity that reached the mock after it had simulated that time (so it was not simulated).

    ``spans``: span-GPU entries with a late part; ``seconds``: the length of those late parts, summed.
    Both count up from the source's start."""

    spans: int = 0
    seconds: float = 0.0


def _open_key(span: Span, gpu: int) -> tuple:
    """What identifies an open span and the closed span that ends it (they differ only in ``end_ns``)."""
    return span.workload, span.kind, span.start_ns, span.gpus, span.activity, gpu


class SpanActivitySource:
    """An ActivitySource fed by accounting spans (finished ones, and open in-process ones).

    Spans are indexed when they arrive, on the writer's thread: per GPU, a list sorted by start time of
    spans the mock has not reached yet, and a short list of those it is simulating. A query takes the
    pending spans that begin before its end (a bisect), drops those that ended, and flattens what is
    left, so its cost follows the spans overlapping the query, never the number of posts.
    """

    def __init__(self, accounting: Accounting, defaults: Mapping[str, Activity] = DEFAULT_SPAN_ACTIVITY,
                 max_pending_spans: int = DEFAULT_MAX_PENDING_SPANS,
                 monotonic_s: Callable[[], float] = time.monotonic):
        self._accounting = accounting
        self._defaults = dict(defaults)
        self._max_pending = max_pending_spans
        self._lock = threading.Lock()
        # gpu -> [(start_ns, arrival number, end_ns, activity, workload)] sorted; the arrival number keeps
        # the order total without comparing activities.
        self._pending: dict[int, list[tuple[int, int, int, Activity, str]]] = {}
        self._active: dict[int, list[tuple[int, int, Activity, str]]] = {}
        # gpu -> (query start_ns, query end_ns, its spans as (start_ns, end_ns, activity, workload)) for
        # each query that had any, oldest first: what workload_processes integrates per workload.
        self._simulated: dict[int, deque[tuple[int, int, list[tuple[int, int, Activity, str]]]]] = {}
        self._held = 0
        self._arrivals = 0
        self._simulated_up_to: dict[int, int] = {}
        # How far each open span (per GPU) has been simulated: when it closes, that part is not late.
        self._open_simulated_to: dict[tuple, int] = {}
        self._late_spans = 0
        self._late_ns = 0
        self._monotonic_s = monotonic_s
        self._late_logged_at: float | None = None
        self._open_window: tuple[int, int] | None = None
        self._open_cache: list[Span] = []
        accounting.add_span_gate(self._admit)

    def _activity(self, span: Span) -> Activity:
        return span.activity if span.activity is not None else self._defaults.get(span.kind, IDLE)

    def _admit(self, batch: list[Span]) -> None:
        """A span gate: index the batch, or refuse it whole with 429 when the index is full.

        The part of a span before the mock's present is late (counted, not simulated), unless it was
        simulated while the span was open."""
        entries = [(gpu, span.start_ns, span.end_ns, activity, _open_key(span, gpu))
                   for span in batch if span.end_ns > span.start_ns
                   for activity in (self._activity(span),) if activity != IDLE
                   for gpu in span.gpus]
        with self._lock:
            # Spans that ended before the mock's present are history it has already simulated.
            kept = [e for e in entries if e[2] > self._simulated_up_to.get(e[0], 0)]
            if self._held + len(kept) > self._max_pending:
                raise AccountingError(
                    f"too many pending spans: the mock holds at most {self._max_pending} span-GPU entries not yet "
                    f"simulated ({self._held} now); retry in a second", status=429)
            late = [self._late_ns_locked(gpu, start, end, key) for gpu, start, end, _, key in entries]
            for gpu, start, end, activity, key in kept:
                bisect.insort(self._pending.setdefault(gpu, []), (start, self._arrivals, end, activity, key[0]))
                self._arrivals += 1
            self._held += len(kept)
            late = [ns for ns in late if ns > 0]
            self._late_spans += len(late)
            self._late_ns += sum(late)
            totals = LateSpans(self._late_spans, self._late_ns / NS_PER_S) if late else None
        if totals is not None:
            self._log_late(len(late), sum(late) / NS_PER_S, totals)

    def _late_ns_locked(self, gpu: int, start_ns: int, end_ns: int, key: tuple) -> int:
        """How much of [start_ns, end_ns) on ``gpu`` the mock had already simulated without it."""
        simulated_to = self._simulated_up_to.get(gpu, 0)
        covered_to = self._open_simulated_to.pop(key, start_ns)  # simulated while it was open
        return max(0, min(end_ns, simulated_to) - max(start_ns, covered_to))

    def _log_late(self, spans: int, seconds: float, totals: LateSpans) -> None:
        now = self._monotonic_s()
        if self._late_logged_at is not None and now - self._late_logged_at < LATE_LOG_INTERVAL_SECONDS:
            return
        self._late_logged_at = now
        log.warning("%d span(s) reached the mock GPU after it had simulated their time: %.3f s of activity "
                    "not simulated (%d late, %.3f s, so far); report spans sooner or raise --mock-delay",
                    spans, seconds, totals.spans, totals.seconds)

    def pending_spans(self) -> int:
        """Span-GPU entries held and not yet simulated to their end."""
        with self._lock:
            return self._held

    def late(self) -> LateSpans:
        """Activity that arrived after the mock had simulated its time (see the module docstring)."""
        with self._lock:
            return LateSpans(self._late_spans, self._late_ns / NS_PER_S)

    def _open_spans_for(self, start_ns: int, end_ns: int) -> list[Span]:
        """The accounting's open spans, read once per query window: the mock asks for every GPU with the
        same window in one sample, and one consistent read serves them all (it was once per GPU)."""
        window = (start_ns, end_ns)
        if self._open_window != window:
            self._open_window = window
            self._open_cache = self._accounting.open_spans()
        return self._open_cache

    def segments(self, gpu: int, start_ns: int, end_ns: int) -> list[ActivitySegment]:
        open_spans = [s for s in self._open_spans_for(start_ns, end_ns) if gpu in s.gpus]
        with self._lock:
            pending = self._pending.get(gpu, [])
            reached = bisect.bisect_left(pending, (end_ns,))  # those that begin before this query ends
            active = self._active.get(gpu, []) + [(s, e, a, w) for s, _, e, a, w in pending[:reached]]
            del pending[:reached]
            candidates = [entry for entry in active if entry[1] > start_ns]
            # What ends within this query is simulated once it returns: only longer spans stay.
            kept = [entry for entry in candidates if entry[1] > end_ns]
            self._held -= len(active) - len(kept)
            self._active[gpu] = kept
            self._simulated_up_to[gpu] = end_ns
            self._note_open_spans_locked(gpu, open_spans, end_ns)
            candidates += [(s.start_ns, end_ns, self._activity(s), s.workload) for s in open_spans]
            if candidates:
                self._remember_simulated_locked(gpu, start_ns, end_ns, candidates)
        return flatten([(s, e, a) for s, e, a, _ in candidates], start_ns, end_ns)

    def _remember_simulated_locked(self, gpu: int, start_ns: int, end_ns: int,
                                   candidates: list[tuple[int, int, Activity, str]]) -> None:
        """Keep one query's spans for ``workload_processes`` (at most ``WORKLOAD_HISTORY_NS`` of them)."""
        history = self._simulated.setdefault(gpu, deque())
        history.append((start_ns, end_ns, candidates))
        while history[0][1] <= end_ns - WORKLOAD_HISTORY_NS:
            history.popleft()

    def _note_open_spans_locked(self, gpu: int, open_spans: list[Span], end_ns: int) -> None:
        """Remember how far this GPU's open spans are simulated; forget spans no longer open (their closed
        span has arrived, or arrives just after this query and then counts only its unsimulated part)."""
        keys = {_open_key(s, gpu) for s in open_spans if self._activity(s) != IDLE and end_ns > s.start_ns}
        for key in [k for k in self._open_simulated_to if k[-1] == gpu and k not in keys]:
            del self._open_simulated_to[key]
        for key in keys:
            self._open_simulated_to[key] = end_ns

    def allocated_bytes(self, gpu: int) -> int:
        return self._accounting.declared_memory_bytes(gpu)

    def workload_processes(self, gpu: int, start_ns: int, end_ns: int) -> list[WorkloadProcess]:
        """The registered processes that drove ``gpu`` in [start_ns, end_ns) (probes/activity.py's
        ``WorkloadProcessSource``): each running workload with a pid whose simulated spans (not idle ones)
        overlap the interval, with the time-weighted means of its spans' activities over the whole
        interval and the memory it declared on ``gpu``. A workload without a pid is no process; workloads
        that name one pid are one process (their spans combine with ``max``, their memory adds up). Only
        what the mock simulated counts (late spans do not), and what ended before ``start_ns`` is forgotten.
        """
        if end_ns <= start_ns:
            return []
        owners = self._pid_owners(gpu)  # before our lock: the accounting's lock comes first (see _admit)
        with self._lock:
            intervals = self._intervals_by_pid_locked(gpu, start_ns, end_ns, owners)
        return [_mean_process(pid, flatten(pieces, start_ns, end_ns), start_ns, end_ns, owners[pid][1])
                for pid, pieces in sorted(intervals.items())]

    def _pid_owners(self, gpu: int) -> dict[int, tuple[frozenset[str], int]]:
        """pid -> (the running workloads registered with it, the memory they declared on ``gpu``)."""
        owners: dict[int, tuple[frozenset[str], int]] = {}
        for view in self._accounting.workloads():
            if view.pid is not None and view.running:
                names, memory = owners.get(view.pid, (frozenset(), 0))
                owners[view.pid] = (names | {view.name}, memory + view.memory_bytes.get(gpu, 0))
        return owners

    def _intervals_by_pid_locked(self, gpu: int, start_ns: int, end_ns: int,
                                 owners: Mapping[int, tuple[frozenset[str], int]]) -> dict[int, list]:
        """pid -> its spans' ``(start_ns, end_ns, activity)`` within [start_ns, end_ns), each clipped to the
        query that simulated it (queries do not overlap, so neither do one span's pieces)."""
        history = self._simulated.get(gpu)
        if not history:
            return {}
        while history and history[0][1] <= start_ns:
            history.popleft()  # asked from start_ns on: nothing before it is asked for again
        pid_of = {name: pid for pid, (names, _) in owners.items() for name in names}
        out: dict[int, list] = {}
        for query_start, query_end, entries in history:
            if query_start >= end_ns:
                break
            lo_bound, hi_bound = max(query_start, start_ns), min(query_end, end_ns)
            for span_start, span_end, activity, workload in entries:
                pid = pid_of.get(workload)
                lo, hi = max(span_start, lo_bound), min(span_end, hi_bound)
                if pid is None or lo >= hi or activity == IDLE:
                    continue
                pieces = out.setdefault(pid, [])
                last = pieces[-1] if pieces else None
                if last is not None and last[1] == lo and last[2] is activity:
                    pieces[-1] = (last[0], hi, activity)  # one long span, queried piece by piece: one piece
                else:
                    pieces.append((lo, hi, activity))
        return out


def _mean_process(pid: int, segments: list[ActivitySegment], start_ns: int, end_ns: int,
                  memory_bytes: int) -> WorkloadProcess:
    """One process's time-weighted mean activity over [start_ns, end_ns) from its (flattened) segments."""
    span_ns = end_ns - start_ns
    sm = tensor = dram = 0.0
    for seg in segments:
        length = seg.end_ns - seg.start_ns
        sm += length * seg.activity.sm
        tensor += length * seg.activity.tensor
        dram += length * seg.activity.dram
    return WorkloadProcess(pid, sm / span_ns, tensor / span_ns, dram / span_ns, memory_bytes)
