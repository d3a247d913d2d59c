"""The accounting API: what workloads tell the agent about themselves.

A workload starts and stops on a set of GPUs; while it runs, the energy and time of those GPUs accrue to
it (idle gaps included: the GPU was held for it). It reports token counts by kind, and spans of activity
(compute, transfer, tool call, checkpoint, idle) with monotonic timestamps. Spans drive the mock GPU and
are kept for reports.

This module holds the state and validates every value; ``agent.http_api`` maps HTTP requests onto it.
Every check runs before anything changes, so a rejected call leaves every counter as it was.

Limits (each refused with a one-line error, never by slowing the agent down):

- workloads known at once: ``max_workloads`` (default 64), running and recently stopped together; a
  stopped workload (or one that only ever reported tokens or spans) is forgotten, series included,
  ``stopped_retention_s`` (default 600 s) after its last report, or at once through ``forget``. Past the
  cap a new workload is refused with 409. So at most ``max_workloads`` workloads ever run at once;
- finished spans kept for reports: the newest ``span_history_bytes`` (default 1 MiB) of them, the
  oldest dropped first;
- spans per call: ``MAX_SPANS_PER_CALL``; span gates (the mock's pending-span index) may refuse a batch
  with 429 when they are full.

In-process reporters show each step to the span gates (the mock) as it ends with ``announce_spans``, and
record the merged span later with ``add_spans(..., announced=True)``: the mock sees activity by the spans'
own timestamps within a step of it happening (see ``agent/span_activity.py``).

A workload started with a ``pid`` ends when that process exits: ``check_processes`` (the sampler calls
``maintain`` about once a second) compares each registered process's start time with the one read at
start, so a pid reused by another process ends the workload too.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from wattledger.probes.activity import Activity
from wattledger.probes.procfs import ProcfsParseError, parse_pid_stat

TOKEN_KINDS: tuple[str, ...] = ("prompt", "generated", "trained")
SPAN_KINDS: tuple[str, ...] = ("compute", "transfer", "tool_call", "checkpoint", "idle")
DEFAULT_NAME_PATTERN = r"[a-z][a-z0-9_-]{0,63}"
DEFAULT_MAX_WORKLOADS = 64
# Long enough for Prometheus (15-60 s scrapes) to read a stopped workload's final counters several times.
DEFAULT_STOPPED_RETENTION_SECONDS = 600.0
# About 60,000 spans as Python holds them (~280 bytes each): hours of history for a reporting workload.
# Nothing in the daemon reads the history (the recorder takes spans as they arrive): it is for in-process
# readers. The 10-minute soak (tests/benchmarks/soak.py) saw 16 MiB of it as +24 MB of RSS, hence 1 MiB.
DEFAULT_SPAN_HISTORY_BYTES = 1024 * 1024
# One request may add at most this many tokens: larger numbers are a client bug, not a real batch.
MAX_TOKENS_PER_CALL = 10**9
MAX_SPANS_PER_CALL = 1000
_MAX_NS = 2**63 - 1


class AccountingError(ValueError):
    """A rejected call. ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of one workload's activity on some GPUs, in monotonic nanoseconds."""

    workload: str
    kind: str
    start_ns: int
    end_ns: int
    gpus: tuple[int, ...]
    activity: Activity | None = None  # what the GPU did, if the workload knows (drives the mock)

    def to_json(self) -> dict:
        out = {
            "workload": self.workload,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "gpus": list(self.gpus),
        }
        if self.activity is not None:
            out["activity"] = {
                "gpu": self.activity.gpu,
                "sm": self.activity.sm,
                "tensor": self.activity.tensor,
                "dram": self.activity.dram,
            }
        return out


ProcessStartTicks = Callable[[int], "int | float | None"]  # a start time, None when not alive


def read_process_start_ticks(pid: int, procfs_root: str = "/proc") -> int | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat, clock ticks since boot), or None when no
    such process is alive: absent, unreadable, or a zombie (exited, not yet reaped by its parent)."""
    try:
        with open(os.path.join(procfs_root, str(pid), "stat"), encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:  # ENOENT, ESRCH while it is reaped, EACCES under hidepid
        return None
    state = text[text.rfind(")") + 1:].split()[:1]
    if state in (["Z"], ["X"], ["x"]):
        return None
    try:
        return parse_pid_stat(text).start_ticks
    except ProcfsParseError:
        return None


def _psutil_start_time(pid: int) -> float | None:
    """The process's creation time from psutil (machines without a Linux /proc), or None if not alive."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.Error, OSError):
        return None


def procfs_start_ticks(procfs_root: str = "/proc") -> ProcessStartTicks:
    """``read_process_start_ticks`` bound to one procfs root (the agent's ``--path.procfs``); psutil's
    creation time where there is no Linux procfs there (as the host probe falls back to psutil)."""
    if not os.path.exists(os.path.join(procfs_root, "stat")):
        return _psutil_start_time
    return lambda pid: read_process_start_ticks(pid, procfs_root)


def span_footprint_bytes(span: Span) -> int:
    """What one held span costs in memory, as CPython holds it (the workload name is interned)."""
    size = sys.getsizeof(span) + sys.getsizeof(span.gpus) + sys.getsizeof(span.start_ns) + sys.getsizeof(span.end_ns)
    if span.activity is not None:
        size += sys.getsizeof(span.activity)
    return size


def time_shares(stretches: Sequence[tuple[str, int, int]]) -> tuple[dict[str, float], int]:
    """``({workload: ns weight}, covered ns)`` for stretches ``(workload, start_ns, end_ns)`` of one
    interval: every instant is shared equally among the workloads holding the GPU then (a workload whose
    stretches overlap counts once). Time that nobody held is left out of ``covered``.

    One sweep over the sorted edges with prefix sums: O(n log n) in the number of stretches, so a
    thousand workloads on one GPU cost about a millisecond, where a scan of every stretch at every edge
    took seconds per tick.
    """
    if len(stretches) == 1:
        name, lo, hi = stretches[0]
        return {name: float(hi - lo)}, hi - lo
    merged: list[tuple[str, int, int]] = []  # each workload's stretches as a union of disjoint ones
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, lo, hi in stretches:
        if hi > lo:
            by_name.setdefault(name, []).append((lo, hi))
    for name, pieces in by_name.items():
        pieces.sort()
        lo, hi = pieces[0]
        for next_lo, next_hi in pieces[1:]:
            if next_lo <= hi:
                hi = max(hi, next_hi)
            else:
                merged.append((name, lo, hi))
                lo, hi = next_lo, next_hi
        merged.append((name, lo, hi))
    if not merged:
        return {}, 0
    edges = sorted({t for _, lo, hi in merged for t in (lo, hi)})
    position = {t: i for i, t in enumerate(edges)}
    change = [0] * len(edges)  # holders: +1 where a stretch begins, -1 where it ends
    for _, lo, hi in merged:
        change[position[lo]] += 1
        change[position[hi]] -= 1
    per_holder = [0.0] * len(edges)  # per_holder[i]: ns one holder earns from edges[0] to edges[i]
    holders = covered = 0
    for i in range(len(edges) - 1):
        holders += change[i]
        width = edges[i + 1] - edges[i]
        if holders:
            covered += width
        per_holder[i + 1] = per_holder[i] + (width / holders if holders else 0.0)
    weights: dict[str, float] = {}
    for name, lo, hi in merged:
        weights[name] = weights.get(name, 0.0) + per_holder[position[hi]] - per_holder[position[lo]]
    return weights, covered


# One GPU's run stretches as ``Accounting.run_stretches`` hands them out: closed ``(workload, start_ns,
# end_ns)`` stretches, then running ``(workload, since_ns)`` ones, in the order ``running_on`` reports them.
GpuRunStretches = tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int], ...]]
NO_RUN_STRETCHES: GpuRunStretches = ((), ())


def clip_run_stretches(stretches: GpuRunStretches, start_ns: int, end_ns: int) -> list[tuple[str, int, int]]:
    """One GPU's stretches (``GpuRunStretches``) clipped to [start_ns, end_ns): ``(workload, lo, hi)`` for
    every overlap, closed stretches first, as ``Accounting.running_on`` returns them."""
    closed, running = stretches
    out = []
    for name, begin, finish in closed:
        lo, hi = max(begin, start_ns), min(finish, end_ns)
        if lo < hi:
            out.append((name, lo, hi))
    for name, begin in running:
        lo = begin if begin > start_ns else start_ns
        if lo < end_ns:
            out.append((name, lo, end_ns))
    return out


@dataclass(slots=True)
class _Workload:
    name: str
    last_active_ns: int  # the last report: a stopped workload is forgotten a retention time after it
    gpus: tuple[int, ...] = ()
    running_since_ns: int | None = None
    pid: int | None = None
    pid_start_ticks: int | float | None = None  # the process's start time, read at start: guards against pid reuse
    pid_seen_alive_ns: int | None = None  # the last liveness check that found the process
    tokens: dict[str, int] = field(default_factory=dict)
    memory_bytes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkloadView:
    """A read-only copy of one workload's state."""

    name: str
    running: bool
    gpus: tuple[int, ...]
    pid: int | None
    tokens: dict[str, int]
    memory_bytes: dict[int, int]


class Accounting:
    """Thread-safe store of workloads, token counts, spans and declared GPU memory.

    ``gpu_indices`` are the GPUs workloads may name; ``clock_ns`` stamps starts and stops that carry no
    timestamp of their own. ``process_start_ticks(pid)`` returns a process's start time or None when it
    is not alive (the agent passes ``procfs_start_ticks(procfs)``); None turns pid checks off, for
    callers whose pids live in a fake process tree.
    """

    def __init__(
        self,
        gpu_indices: Sequence[int],
        clock_ns: Callable[[], int] = time.monotonic_ns,
        max_workloads: int = DEFAULT_MAX_WORKLOADS,
        name_pattern: str = DEFAULT_NAME_PATTERN,
        span_history_bytes: int = DEFAULT_SPAN_HISTORY_BYTES,
        stopped_retention_s: float = DEFAULT_STOPPED_RETENTION_SECONDS,
        process_start_ticks: ProcessStartTicks | None = None,
    ):
        self._gpus = frozenset(gpu_indices)
        self._clock_ns = clock_ns
        self._max_workloads = max_workloads
        self._name_re = re.compile(name_pattern)
        self._lock = threading.Lock()
        self._workloads: dict[str, _Workload] = {}
        # Per GPU: who runs there now (name -> since), and closed [start, end) run stretches that the
        # ledger has not yet accounted for. running_on reads one GPU's entries, not every workload's.
        self._running_by_gpu: dict[int, dict[str, int]] = {gpu: {} for gpu in self._gpus}
        self._closed_by_gpu: dict[int, list[tuple[str, int, int]]] = {gpu: [] for gpu in self._gpus}
        # Bumped, last thing under the lock, by every change to the two dicts above: a reader that holds
        # a copy taken at this generation (``run_stretches``) may go on using it, without the lock, for as
        # long as the number is unchanged (the ledger reads it once per tick instead of locking per GPU).
        self.run_stretches_generation = 0
        self._spans: deque[Span] = deque()
        self._span_bytes = 0
        self._span_history_bytes = span_history_bytes
        self._retention_ns = round(stopped_retention_s * 1e9)
        self._process_start_ticks = process_start_ticks
        self._open_spans: dict[int, Span] = {}
        self._next_open_id = 0
        self._span_gates: list[Callable[[list[Span]], None]] = []
        self._span_listeners: list[Callable[[Span], None]] = []
        self._process_listeners: list[Callable[[str, int | None, int | None], None]] = []
        self._forget_listeners: list[Callable[[str], None]] = []

    # -- validation -----------------------------------------------------------------------------

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not self._name_re.fullmatch(name):
            raise AccountingError(
                f"workload name must match {self._name_re.pattern!r}, got {str(name)[:80]!r}"
            )
        return sys.intern(name)  # one copy of each name, however many spans carry it

    def _check_gpus(self, gpus: object) -> tuple[int, ...]:
        if not isinstance(gpus, (list, tuple)) or not gpus:
            raise AccountingError("gpus must be a non-empty list of GPU indices")
        out = []
        for gpu in gpus:
            if isinstance(gpu, bool) or not isinstance(gpu, int):
                raise AccountingError(f"gpu index must be an integer, got {gpu!r}")
            if gpu not in self._gpus:
                known = ", ".join(map(str, sorted(self._gpus))) or "none"
                raise AccountingError(f"gpu {gpu} does not exist on this node (gpus: {known})")
            out.append(gpu)
        if len(set(out)) != len(out):
            raise AccountingError("gpus must not repeat")
        return tuple(sorted(out))

    @staticmethod
    def _check_ns(value: object, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_NS:
            raise AccountingError(f"{what} must be an integer number of nanoseconds >= 0")
        return value

    @staticmethod
    def _check_ratio(value: object, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AccountingError(f"{what} must be a number from 0 to 1")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise AccountingError(f"{what} must be a number from 0 to 1, got {value!r}")
        return float(value)

    def _too_many(self) -> AccountingError:
        return AccountingError(
            f"too many workloads: at most {self._max_workloads} running or stopped in the last "
            f"{self._retention_ns / 1e9:g} s (configurable); forget stopped ones with POST /v1/workloads/forget",
            status=409,
        )

    def _make_room_locked(self, new_names: int, now_ns: int, forgotten: list[str]) -> None:
        """Raise 409 unless ``new_names`` more workloads fit, after forgetting expired stopped ones."""
        if len(self._workloads) + new_names <= self._max_workloads:
            return
        forgotten += self._expire_locked(now_ns)
        if len(self._workloads) + new_names > self._max_workloads:
            raise self._too_many()

    def _workload_for_write(self, name: str, now_ns: int, forgotten: list[str]) -> _Workload:
        """The workload named, created if there is room; marked active now. Call with the lock held."""
        workload = self._workloads.get(name)
        if workload is None:
            self._make_room_locked(1, now_ns, forgotten)
            workload = _Workload(name, now_ns)
            self._workloads[name] = workload
        workload.last_active_ns = max(workload.last_active_ns, now_ns)
        return workload

    def _check_pid(self, pid: object) -> int | float | None:
        """The process's start time (None without pid checks); 422 for a pid that is not alive."""
        if pid is None:
            return None
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
            raise AccountingError("pid must be a positive integer")
        if self._process_start_ticks is None:
            return None
        start_ticks = self._process_start_ticks(pid)
        if start_ticks is None:
            raise AccountingError(f"pid {pid} is not a running process on this host (as the agent sees "
                                  "/proc: a workload in another PID namespace must leave pid out)")
        return start_ticks

    # -- writes ---------------------------------------------------------------------------------

    def start(self, name: str, gpus: Sequence[int], pid: int | None = None, at_ns: int | None = None,
              ends_with_process: bool = True) -> None:
        """The workload runs on ``gpus`` from ``at_ns`` (default: now) until ``stop`` or its process exits.

        ``ends_with_process=False`` (in-process callers that wait on the process themselves, such as
        ``wattledger run``, and stop the workload at the exact exit time): ``pid`` only names the
        processes whose host figures are the workload's; it is not checked for being alive, and its exit
        does not stop the workload (a command that exits at once must still be profiled).
        """
        name = self._check_name(name)
        gpu_tuple = self._check_gpus(gpus)
        start_ticks = self._check_pid(pid) if ends_with_process else None
        at = self._clock_ns() if at_ns is None else self._check_ns(at_ns, "timestamp_ns")
        now = self._clock_ns()
        forgotten: list[str] = []
        try:
            with self._lock:
                workload = self._workloads.get(name)
                if workload is not None and workload.running_since_ns is not None:
                    raise AccountingError(f"workload {name!r} is already running; stop it first", status=409)
                workload = self._workload_for_write(name, now, forgotten)
                workload.gpus = gpu_tuple
                workload.running_since_ns = at
                for gpu in gpu_tuple:
                    self._running_by_gpu[gpu][name] = at
                self.run_stretches_generation += 1
                old_pid, workload.pid = workload.pid, pid
                workload.pid_start_ticks = start_ticks
                workload.pid_seen_alive_ns = now if pid is not None and start_ticks is not None else None
                listeners = list(self._process_listeners)
        finally:
            self._notify_forgotten(forgotten)
        for listener in listeners:
            listener(name, old_pid, pid)

    def _stop_locked(self, workload: _Workload, at: int) -> int | None:
        """Close the running workload's stretch at ``at``; returns its old pid. Call with the lock held."""
        for gpu in workload.gpus:
            self._running_by_gpu[gpu].pop(workload.name, None)
            self._closed_by_gpu[gpu].append((workload.name, workload.running_since_ns, at))
        self.run_stretches_generation += 1
        workload.running_since_ns = None
        old_pid, workload.pid = workload.pid, None
        workload.pid_start_ticks = workload.pid_seen_alive_ns = None
        workload.memory_bytes.clear()
        workload.last_active_ns = max(workload.last_active_ns, self._clock_ns())
        return old_pid

    def stop(self, name: str, at_ns: int | None = None) -> None:
        """The workload stops at ``at_ns`` (default: now). Its counters stay (until it is forgotten)."""
        name = self._check_name(name)
        at = self._clock_ns() if at_ns is None else self._check_ns(at_ns, "timestamp_ns")
        with self._lock:
            workload = self._workloads.get(name)
            if workload is None or workload.running_since_ns is None:
                raise AccountingError(f"workload {name!r} is not running", status=409)
            if at < workload.running_since_ns:
                raise AccountingError("stop timestamp_ns is before the workload's start")
            old_pid = self._stop_locked(workload, at)
            listeners = list(self._process_listeners)
        for listener in listeners:
            listener(name, old_pid, None)

    def forget(self, name: str) -> None:
        """Drop a stopped workload now: its tokens, and (through the forget listeners) its series."""
        name = self._check_name(name)
        with self._lock:
            workload = self._workloads.get(name)
            if workload is None:
                raise AccountingError(f"no workload {name!r}", status=404)
            if workload.running_since_ns is not None:
                raise AccountingError(f"workload {name!r} is running; stop it first", status=409)
            self._forget_locked(name)
        self._notify_forgotten([name])

    def _forget_locked(self, name: str) -> None:
        del self._workloads[name]
        # Its closed stretches go too, so the ledger cannot attribute energy to it (and recreate its
        # series) after the forget listeners have removed them.
        for gpu, closed in self._closed_by_gpu.items():
            if any(entry[0] == name for entry in closed):
                self._closed_by_gpu[gpu] = [entry for entry in closed if entry[0] != name]
                self.run_stretches_generation += 1

    def _expire_locked(self, now_ns: int) -> list[str]:
        expired = [
            w.name for w in self._workloads.values()
            if w.running_since_ns is None and now_ns - w.last_active_ns >= self._retention_ns
        ]
        for name in expired:
            self._forget_locked(name)
        return expired

    def _notify_forgotten(self, names: list[str]) -> None:
        if not names:
            return
        with self._lock:
            listeners = list(self._forget_listeners)
        for name in names:
            for listener in listeners:
                listener(name)

    def check_processes(self) -> list[str]:
        """Stop every running workload whose registered process has exited (or whose pid now belongs to
        a process that started later: pid reuse). Each stops when it was last seen alive. Returns the
        names stopped."""
        if self._process_start_ticks is None:
            return []
        with self._lock:
            watched = [(w.name, w.pid, w.pid_start_ticks, w.running_since_ns)
                       for w in self._workloads.values()
                       if w.running_since_ns is not None and w.pid is not None and w.pid_start_ticks is not None]
        now = self._clock_ns()
        # /proc reads happen outside the lock: writers never wait on them.
        verdicts = [(name, pid, since, self._process_start_ticks(pid) == start_ticks)
                    for name, pid, start_ticks, since in watched]
        stopped: list[tuple[str, int | None]] = []
        with self._lock:
            for name, pid, since, alive in verdicts:
                workload = self._workloads.get(name)
                if workload is None or workload.running_since_ns != since or workload.pid != pid:
                    continue  # stopped or restarted meanwhile: the new run is checked next time
                if alive:
                    workload.pid_seen_alive_ns = now
                    continue
                at = max(since, workload.pid_seen_alive_ns or since)
                stopped.append((name, self._stop_locked(workload, at)))
            listeners = list(self._process_listeners)
        for name, old_pid in stopped:
            for listener in listeners:
                listener(name, old_pid, None)
        return [name for name, _ in stopped]

    def maintain(self) -> None:
        """Housekeeping the sampler runs about once a second: end workloads whose process exited, and
        forget stopped workloads past the retention time."""
        self.check_processes()
        with self._lock:
            forgotten = self._expire_locked(self._clock_ns())
        self._notify_forgotten(forgotten)

    def add_tokens(self, name: str, kind: str, count: int) -> None:
        """Add ``count`` tokens of ``kind`` (prompt, generated or trained) to the workload."""
        name = self._check_name(name)
        if kind not in TOKEN_KINDS:
            raise AccountingError(f"kind must be one of {', '.join(TOKEN_KINDS)}, got {str(kind)[:40]!r}")
        if isinstance(count, bool) or not isinstance(count, int):
            raise AccountingError("count must be an integer")
        if not 0 <= count <= MAX_TOKENS_PER_CALL:
            raise AccountingError(f"count must be between 0 and {MAX_TOKENS_PER_CALL}")
        now = self._clock_ns()
        forgotten: list[str] = []
        try:
            with self._lock:
                workload = self._workload_for_write(name, now, forgotten)
                workload.tokens[kind] = workload.tokens.get(kind, 0) + count
        finally:
            self._notify_forgotten(forgotten)

    def make_span(
        self,
        workload: str,
        kind: str,
        start_ns: int,
        end_ns: int,
        gpus: Sequence[int],
        activity: dict | Activity | None = None,
    ) -> Span:
        """A validated span (not yet recorded)."""
        workload = self._check_name(workload)
        if kind not in SPAN_KINDS:
            raise AccountingError(f"span kind must be one of {', '.join(SPAN_KINDS)}, got {str(kind)[:40]!r}")
        kind = SPAN_KINDS[SPAN_KINDS.index(kind)]  # the shared constant, not the request's copy
        start = self._check_ns(start_ns, "start_ns")
        end = self._check_ns(end_ns, "end_ns")
        if end < start:
            raise AccountingError("end_ns must not be before start_ns")
        if isinstance(activity, dict):
            unknown = set(activity) - {"gpu", "sm", "tensor", "dram"}
            if unknown:
                raise AccountingError(f"unknown activity field(s): {', '.join(sorted(unknown))}")
            activity = Activity(**{k: self._check_ratio(v, f"activity.{k}") for k, v in activity.items()})
        elif activity is not None and not isinstance(activity, Activity):
            raise AccountingError("activity must be an object of ratios (gpu, sm, tensor, dram)")
        return Span(workload, kind, start, end, self._check_gpus(gpus), activity)

    def add_spans(self, spans: Iterable[Span], announced: bool = False) -> None:
        """Record finished spans, all or none: the workload cap and every span gate judge the whole batch
        (409 too many workloads, 429 a gate is full) before anything is recorded.

        ``announced``: the batch's activity already reached the span gates, piece by piece as it happened,
        through ``announce_spans`` (an in-process reporter merging back-to-back steps): it is recorded and
        passed to the listeners, not shown to the gates (the mock) a second time."""
        self._add_spans(list(spans), announced)

    def _add_spans(self, batch: list[Span], announced: bool, closing_handle: int | None = None,
                   record: bool = True) -> None:
        """``add_spans``; with ``closing_handle``, the open span it ends is removed under the same lock
        hold as the gates see the closed span, so the mock sees one of the two at any time (see ``end_span``).
        ``record=False``: only the gates see the batch."""
        if len(batch) > MAX_SPANS_PER_CALL:
            raise AccountingError(f"at most {MAX_SPANS_PER_CALL} spans per call")
        now = self._clock_ns()
        forgotten: list[str] = []
        try:
            with self._lock:
                if closing_handle is not None and closing_handle not in self._open_spans:
                    raise AccountingError(f"no open span with handle {closing_handle}", status=404)  # closed meanwhile
                new_names = {s.workload for s in batch} - set(self._workloads)
                self._make_room_locked(len(new_names), now, forgotten)
                if not announced:
                    for gate in self._span_gates:
                        gate(batch)  # the last check: a gate that takes the batch may not fail after it
                if closing_handle is not None:
                    self._open_spans.pop(closing_handle, None)
                if not record:
                    return
                for span in batch:
                    self._workload_for_write(span.workload, now, forgotten)
                    self._remember_span_locked(span)
                listeners = list(self._span_listeners)
        finally:
            self._notify_forgotten(forgotten)
        for span in batch:
            for listener in listeners:
                listener(span)

    def announce_spans(self, spans: Iterable[Span]) -> None:
        """Show finished pieces of activity to the span gates (the mock GPU) now, without recording them.

        An in-process reporter calls this with each step as it ends, then records the merged span with
        ``add_spans(..., announced=True)``: the mock learns of activity within a step of it happening,
        whatever the reporter holds back for merging. A full gate refuses the batch with 429, as in
        ``add_spans``."""
        batch = list(spans)
        if len(batch) > MAX_SPANS_PER_CALL:
            raise AccountingError(f"at most {MAX_SPANS_PER_CALL} spans per call")
        with self._lock:
            for gate in self._span_gates:
                gate(batch)

    def _remember_span_locked(self, span: Span) -> None:
        self._spans.append(span)
        self._span_bytes += span_footprint_bytes(span)
        while self._span_bytes > self._span_history_bytes and self._spans:
            self._span_bytes -= span_footprint_bytes(self._spans.popleft())

    def begin_span(self, workload: str, kind: str, gpus: Sequence[int], activity: Activity | None = None,
                   start_ns: int | None = None) -> int:
        """Open a span (in-process only), now or at ``start_ns`` (monotonic ns, not after now); returns a
        handle for ``end_span``.

        An open span counts as active up to the present, so the mock GPU sees long compute steps while
        they run rather than after they end: a step announced when it starts is never late, however long
        it takes.
        """
        now = self._clock_ns()
        start = now if start_ns is None else min(self._check_ns(start_ns, "start_ns"), now)
        span = self.make_span(workload, kind, start, start, gpus, activity)
        forgotten: list[str] = []
        try:
            with self._lock:
                self._workload_for_write(span.workload, now, forgotten)
                handle = self._next_open_id
                self._next_open_id += 1
                self._open_spans[handle] = span
        finally:
            self._notify_forgotten(forgotten)
        return handle

    def end_span(self, handle: int, end_ns: int | None = None, record: bool = True) -> Span:
        """Close an open span at the present (or at ``end_ns``, not before its start) and record it.

        ``record=False``: the closed span only reaches the gates (the mock), as ``announce_spans``; the
        caller records it later, merged, with ``add_spans(..., announced=True)`` (an in-process reporter).

        The open span leaves and the closed one reaches the gates in one lock hold: the mock (which reads
        open spans, then its index) sees one or the other, so what it simulated while the span was open
        is never counted late, and nothing after falls between the two."""
        with self._lock:
            span = self._open_spans.get(handle)
        if span is None:
            raise AccountingError(f"no open span with handle {handle}", status=404)
        end = self._clock_ns() if end_ns is None else self._check_ns(end_ns, "end_ns")
        closed = Span(span.workload, span.kind, span.start_ns, max(span.start_ns, end), span.gpus, span.activity)
        self._add_spans([closed], announced=False, closing_handle=handle, record=record)
        return closed

    def set_memory(self, name: str, gpu: int, memory_bytes: int) -> None:
        """Declare how much GPU memory the running workload holds on ``gpu`` (drives the mock)."""
        name = self._check_name(name)
        (gpu,) = self._check_gpus([gpu])
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or not 0 <= memory_bytes < 2**50:
            raise AccountingError("bytes must be an integer from 0 to 2**50")
        with self._lock:
            workload = self._workloads.get(name)
            if workload is None or workload.running_since_ns is None:
                raise AccountingError(f"workload {name!r} is not running", status=409)
            if gpu not in workload.gpus:
                raise AccountingError(f"workload {name!r} does not run on gpu {gpu}")
            workload.memory_bytes[gpu] = memory_bytes
            workload.last_active_ns = max(workload.last_active_ns, self._clock_ns())

    def add_span_gate(self, gate: Callable[[list[Span]], None]) -> None:
        """Call ``gate(batch)`` with the lock held, after every other check of a span batch: it may refuse
        the batch by raising AccountingError (nothing is recorded) or take it, and then must not fail.
        It must not call back into this object."""
        with self._lock:
            self._span_gates.append(gate)

    def add_span_listener(self, listener: Callable[[Span], None]) -> None:
        """Call ``listener(span)`` for every finished span, outside the lock."""
        with self._lock:
            self._span_listeners.append(listener)

    def add_process_listener(self, listener: Callable[[str, int | None, int | None], None]) -> None:
        """Call ``listener(workload, old_pid, new_pid)`` when a workload's process changes."""
        with self._lock:
            self._process_listeners.append(listener)

    def add_forget_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(workload)``, outside the lock, when a workload is forgotten (its series go)."""
        with self._lock:
            self._forget_listeners.append(listener)

    def set_gpus(self, gpu_indices: Sequence[int]) -> None:
        """The GPUs workloads may name, when the GPU backend learns them after start (NVML retried)."""
        with self._lock:
            self._gpus = frozenset(gpu_indices)
            for gpu in self._gpus:
                self._running_by_gpu.setdefault(gpu, {})
                self._closed_by_gpu.setdefault(gpu, [])
            self.run_stretches_generation += 1

    # -- reads ----------------------------------------------------------------------------------

    def workloads(self) -> list[WorkloadView]:
        with self._lock:
            return [
                WorkloadView(w.name, w.running_since_ns is not None, w.gpus, w.pid, dict(w.tokens),
                             dict(w.memory_bytes))
                for w in self._workloads.values()
            ]

    def tokens(self) -> dict[tuple[str, str], int]:
        """Token counts by (workload, kind)."""
        with self._lock:
            return {(w.name, k): n for w in self._workloads.values() for k, n in w.tokens.items()}

    def pids(self) -> dict[str, int]:
        """The registered process of each running workload."""
        with self._lock:
            return {w.name: w.pid for w in self._workloads.values() if w.pid is not None}

    def declared_memory_bytes(self, gpu: int) -> int:
        with self._lock:
            return sum(w.memory_bytes.get(gpu, 0) for w in self._workloads.values())

    def recent_spans(self) -> list[Span]:
        """The finished spans still held (the newest ``span_history_bytes`` of them)."""
        with self._lock:
            return list(self._spans)

    def span_history_bytes(self) -> int:
        """The estimated memory the held spans take (at most the configured ``span_history_bytes``)."""
        with self._lock:
            return self._span_bytes

    def open_spans(self) -> list[Span]:
        """Spans begun in-process and not yet ended, with ``end_ns`` = their start."""
        with self._lock:
            return list(self._open_spans.values())

    def running_on(self, gpu: int, start_ns: int, end_ns: int) -> list[tuple[str, int, int]]:
        """Stretches of [start_ns, end_ns) during which each workload ran on ``gpu``.

        Returns ``(workload, overlap_start_ns, overlap_end_ns)`` for every overlap, so the ledger can
        split a sample interval's energy among the workloads that held the GPU. The cost is that of this
        GPU's workloads and not-yet-forgotten stretches, never of every workload's history.
        """
        with self._lock:
            stretches = (self._closed_by_gpu.get(gpu, ()), tuple(self._running_by_gpu.get(gpu, {}).items()))
            return clip_run_stretches(stretches, start_ns, end_ns)

    def run_stretches(self) -> tuple[int, dict[int, GpuRunStretches]]:
        """``(generation, {gpu: its stretches})``: a copy of every GPU's run stretches, and the
        ``run_stretches_generation`` it was taken at. While that number stays the same the copy is
        current, and ``clip_run_stretches(copy[gpu], start, end) == running_on(gpu, start, end)``."""
        with self._lock:
            stretches = {gpu: (tuple(self._closed_by_gpu.get(gpu, ())), tuple(running.items()))
                         for gpu, running in self._running_by_gpu.items()}
            return self.run_stretches_generation, stretches

    def forget_intervals_before(self, ns: int) -> None:
        """Drop closed run stretches that ended before ``ns`` (the ledger has accounted for them)."""
        with self._lock:
            for gpu, closed in self._closed_by_gpu.items():
                kept = [entry for entry in closed if entry[2] >= ns]
                if len(kept) != len(closed):
                    self._closed_by_gpu[gpu] = kept
                    self.run_stretches_generation += 1
