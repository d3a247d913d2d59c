"""The accounting API: what workloads tell the agent about themselves.

A workload starts and stops on a set of GPUs; while it runs, the energy and time of those GPUs accrue to
it (idle gaps included: the GPU was held for it). It reports token counts by kind, and spans of activity
(compute, transfer, tool call, checkpoint, idle) with monotonic timestamps. Spans drive the mock GPU and
are kept for reports.

This module holds the state and validates every value; ``agent.http_api`` maps HTTP requests onto it.
Every check runs before anything changes, so a rejected call leaves every counter as it was.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from wattledger.probes.base import Activity

TOKEN_KINDS: tuple[str, ...] = ("prompt", "generated", "trained")
SPAN_KINDS: tuple[str, ...] = ("compute", "transfer", "tool_call", "checkpoint", "idle")
DEFAULT_NAME_PATTERN = r"[a-z][a-z0-9_-]{0,63}"
DEFAULT_MAX_WORKLOADS = 64
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


@dataclass(slots=True)
class _Workload:
    name: str
    gpus: tuple[int, ...] = ()
    running_since_ns: int | None = None
    # Closed [start, end) stretches when the workload ran; the ledger attributes energy with them.
    intervals: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    pid: int | None = None
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
    timestamp of their own.
    """

    def __init__(
        self,
        gpu_indices: Sequence[int],
        clock_ns: Callable[[], int] = time.monotonic_ns,
        max_workloads: int = DEFAULT_MAX_WORKLOADS,
        name_pattern: str = DEFAULT_NAME_PATTERN,
        span_history: int = 100_000,
    ):
        self._gpus = frozenset(gpu_indices)
        self._clock_ns = clock_ns
        self._max_workloads = max_workloads
        self._name_re = re.compile(name_pattern)
        self._lock = threading.Lock()
        self._workloads: dict[str, _Workload] = {}
        self._spans: deque[Span] = deque(maxlen=span_history)
        self._open_spans: dict[int, Span] = {}
        self._next_open_id = 0
        self._span_listeners: list[Callable[[Span], None]] = []
        self._process_listeners: list[Callable[[str, int | None, int | None], None]] = []

    # -- validation -----------------------------------------------------------------------------

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not self._name_re.fullmatch(name):
            raise AccountingError(
                f"workload name must match {self._name_re.pattern!r}, got {str(name)[:80]!r}"
            )
        return name

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

    def _workload_for_write(self, name: str) -> _Workload:
        """The workload named, created if there is room. Call with the lock held."""
        workload = self._workloads.get(name)
        if workload is None:
            if len(self._workloads) >= self._max_workloads:
                raise AccountingError(
                    f"too many workloads: at most {self._max_workloads} (configurable)", status=409
                )
            workload = _Workload(name)
            self._workloads[name] = workload
        return workload

    # -- writes ---------------------------------------------------------------------------------

    def start(self, name: str, gpus: Sequence[int], pid: int | None = None, at_ns: int | None = None) -> None:
        """The workload runs on ``gpus`` from ``at_ns`` (default: now) until ``stop``."""
        name = self._check_name(name)
        gpu_tuple = self._check_gpus(gpus)
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31):
            raise AccountingError("pid must be a positive integer")
        at = self._clock_ns() if at_ns is None else self._check_ns(at_ns, "timestamp_ns")
        with self._lock:
            workload = self._workloads.get(name)
            if workload is not None and workload.running_since_ns is not None:
                raise AccountingError(f"workload {name!r} is already running; stop it first", status=409)
            workload = self._workload_for_write(name)
            workload.gpus = gpu_tuple
            workload.running_since_ns = at
            old_pid, workload.pid = workload.pid, pid
            listeners = list(self._process_listeners)
        for listener in listeners:
            listener(name, old_pid, pid)

    def stop(self, name: str, at_ns: int | None = None) -> None:
        """The workload stops at ``at_ns`` (default: now). Its counters stay."""
        name = self._check_name(name)
        at = self._clock_ns() if at_ns is None else self._check_ns(at_ns, "timestamp_ns")
        with self._lock:
            workload = self._workloads.get(name)
            if workload is None or workload.running_since_ns is None:
                raise AccountingError(f"workload {name!r} is not running", status=409)
            if at < workload.running_since_ns:
                raise AccountingError("stop timestamp_ns is before the workload's start")
            workload.intervals.append((workload.running_since_ns, at, workload.gpus))
            workload.running_since_ns = None
            old_pid, workload.pid = workload.pid, None
            workload.memory_bytes.clear()
            listeners = list(self._process_listeners)
        for listener in listeners:
            listener(name, old_pid, None)

    def add_tokens(self, name: str, kind: str, count: int) -> None:
        """Add ``count`` tokens of ``kind`` (prompt, generated or trained) to the workload."""
        name = self._check_name(name)
        if kind not in TOKEN_KINDS:
            raise AccountingError(f"kind must be one of {', '.join(TOKEN_KINDS)}, got {str(kind)[:40]!r}")
        if isinstance(count, bool) or not isinstance(count, int):
            raise AccountingError("count must be an integer")
        if not 0 <= count <= MAX_TOKENS_PER_CALL:
            raise AccountingError(f"count must be between 0 and {MAX_TOKENS_PER_CALL}")
        with self._lock:
            workload = self._workload_for_write(name)
            workload.tokens[kind] = workload.tokens.get(kind, 0) + count

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

    def add_spans(self, spans: Iterable[Span]) -> None:
        """Record finished spans (all or none: the workload limit is checked for the whole batch)."""
        batch = list(spans)
        if len(batch) > MAX_SPANS_PER_CALL:
            raise AccountingError(f"at most {MAX_SPANS_PER_CALL} spans per call")
        with self._lock:
            new_names = {s.workload for s in batch} - set(self._workloads)
            if len(self._workloads) + len(new_names) > self._max_workloads:
                raise AccountingError(
                    f"too many workloads: at most {self._max_workloads} (configurable)", status=409
                )
            for span in batch:
                self._workload_for_write(span.workload)
                self._spans.append(span)
            listeners = list(self._span_listeners)
        for span in batch:
            for listener in listeners:
                listener(span)

    def begin_span(self, workload: str, kind: str, gpus: Sequence[int], activity: Activity | None = None) -> int:
        """Open a span now (in-process only); returns a handle for ``end_span``.

        An open span counts as active up to the present, so the mock GPU sees long compute steps while
        they run rather than after they end.
        """
        now = self._clock_ns()
        span = self.make_span(workload, kind, now, now, gpus, activity)
        with self._lock:
            self._workload_for_write(span.workload)
            handle = self._next_open_id
            self._next_open_id += 1
            self._open_spans[handle] = span
        return handle

    def end_span(self, handle: int) -> Span:
        """Close an open span at the present and record it."""
        with self._lock:
            span = self._open_spans.pop(handle, None)
        if span is None:
            raise AccountingError(f"no open span with handle {handle}", status=404)
        closed = Span(span.workload, span.kind, span.start_ns, max(span.start_ns, self._clock_ns()),
                      span.gpus, span.activity)
        self.add_spans([closed])
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

    def add_span_listener(self, listener: Callable[[Span], None]) -> None:
        """Call ``listener(span)`` for every finished span, outside the lock."""
        with self._lock:
            self._span_listeners.append(listener)

    def add_process_listener(self, listener: Callable[[str, int | None, int | None], None]) -> None:
        """Call ``listener(workload, old_pid, new_pid)`` when a workload's process changes."""
        with self._lock:
            self._process_listeners.append(listener)

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
        """The finished spans still held (the newest ``span_history``)."""
        with self._lock:
            return list(self._spans)

    def open_spans(self) -> list[Span]:
        """Spans begun in-process and not yet ended, with ``end_ns`` = their start."""
        with self._lock:
            return list(self._open_spans.values())

    def running_on(self, gpu: int, start_ns: int, end_ns: int) -> list[tuple[str, int, int]]:
        """Stretches of [start_ns, end_ns) during which each workload ran on ``gpu``.

        Returns ``(workload, overlap_start_ns, overlap_end_ns)`` for every overlap, so the ledger can
        split a sample interval's energy among the workloads that held the GPU.
        """
        out = []
        with self._lock:
            for w in self._workloads.values():
                stretches = list(w.intervals)
                if w.running_since_ns is not None:
                    stretches.append((w.running_since_ns, _MAX_NS, w.gpus))
                for begin, finish, gpus in stretches:
                    if gpu in gpus:
                        lo, hi = max(begin, start_ns), min(finish, end_ns)
                        if lo < hi:
                            out.append((w.name, lo, hi))
        return out

    def forget_intervals_before(self, ns: int) -> None:
        """Drop closed run stretches that ended before ``ns`` (the ledger has accounted for them)."""
        with self._lock:
            for w in self._workloads.values():
                w.intervals = [iv for iv in w.intervals if iv[1] >= ns]
