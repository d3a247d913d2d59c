"""The mock GPU's input: what each simulated device is doing, and when.

``Activity`` (a device's load over a stretch of time), ``ActivitySegment`` and the ``ActivitySource``
protocol the mock reads them through; ``ScriptedTimeline`` is a source scripted in advance (tests,
benchmarks), the agent's span-driven source is ``agent/span_activity.py``.

Overlapping activities on one device combine field by field with ``max``: a GPU is busy when any
kernel runs, and its SM/tensor/DRAM load is that of the heaviest thing running.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from wattledger.probes.base import direct_slot_init

NS_PER_S = 1_000_000_000


@direct_slot_init
@dataclass(frozen=True, slots=True)
class Activity:
    """What a GPU is doing over a stretch of time: the input to the mock GPU's physics.

    Each ratio is a time fraction from 0 to 1. ``gpu`` is the fraction of time any kernel runs (what
    NVML's utilization.gpu reports), ``sm`` the fraction of SMs busy, ``tensor`` the tensor pipes,
    ``dram`` the HBM bandwidth used.
    """

    gpu: float = 0.0
    sm: float = 0.0
    tensor: float = 0.0
    dram: float = 0.0
    pcie_transmit_bytes_per_second: float = 0.0
    pcie_receive_bytes_per_second: float = 0.0


IDLE = Activity()


@direct_slot_init
@dataclass(frozen=True, slots=True)
class ActivitySegment:
    """``activity`` holds on [start_ns, end_ns)."""

    start_ns: int
    end_ns: int
    activity: Activity


class ActivitySource(Protocol):
    """Tells the mock GPU what each device was doing."""

    def segments(self, gpu: int, start_ns: int, end_ns: int) -> list[ActivitySegment]:
        """Non-overlapping segments covering [start_ns, end_ns) in order; gaps are idle."""
        ...

    def allocated_bytes(self, gpu: int) -> int:
        """GPU memory the workloads have declared on this device, in bytes."""
        ...


@dataclass(frozen=True, slots=True)
class WorkloadProcess:
    """A registered workload's process on one GPU over an interval, as the activity source simulated it.

    The ratios are time-weighted means over the whole interval (0..1) of the ``sm``, ``tensor`` and
    ``dram`` fields of the activities its spans drove on that GPU (its overlapping spans combine with
    ``max``, as everything on one device does); ``memory_bytes``: the GPU memory its workload declared
    on that GPU, in bytes.
    """

    pid: int
    sm_ratio: float
    tensor_ratio: float
    dram_ratio: float
    memory_bytes: int


class WorkloadProcessSource(Protocol):
    """An activity source that also knows which registered processes drove each GPU (optional: the mock
    lists them as compute processes when its source has this method, probes/mock_processes.py)."""

    def workload_processes(self, gpu: int, start_ns: int, end_ns: int) -> list[WorkloadProcess]:
        """The processes whose spans covered ``gpu`` somewhere in [start_ns, end_ns), which the mock has
        already simulated, in pid order. The source may forget what it simulated before ``start_ns``."""
        ...


def combine(activities: Sequence[Activity]) -> Activity:
    """Field-wise maximum of activities that overlap in time."""
    if len(activities) == 1:
        return activities[0]
    return Activity(
        gpu=max(a.gpu for a in activities),
        sm=max(a.sm for a in activities),
        tensor=max(a.tensor for a in activities),
        dram=max(a.dram for a in activities),
        pcie_transmit_bytes_per_second=max(a.pcie_transmit_bytes_per_second for a in activities),
        pcie_receive_bytes_per_second=max(a.pcie_receive_bytes_per_second for a in activities),
    )


def flatten(
    intervals: Iterable[tuple[int, int, Activity]], start_ns: int, end_ns: int
) -> list[ActivitySegment]:
    """Non-overlapping segments of [start_ns, end_ns) where something is active, in time order.

    ``intervals`` are ``(start_ns, end_ns, activity)`` and may overlap; gaps stay out of the result
    (they are idle).
    """
    clipped = [
        (max(s, start_ns), min(e, end_ns), a) for s, e, a in intervals if s < end_ns and e > start_ns
    ]
    clipped = [c for c in clipped if c[0] < c[1]]
    if not clipped:
        return []
    if len(clipped) == 1:
        s, e, a = clipped[0]
        return [ActivitySegment(s, e, a)]
    return _sweep(clipped)


_FIELDS = ("gpu", "sm", "tensor", "dram", "pcie_transmit_bytes_per_second", "pcie_receive_bytes_per_second")


def _sweep(clipped: list[tuple[int, int, Activity]]) -> list[ActivitySegment]:
    """``flatten``'s segments by one sweep over the sorted edges: O(n log n), where a scan of every
    interval at every edge cost O(n^2) (seconds for a few thousand spans in one sampler tick).

    Between two consecutive edges the active intervals are those begun at or before the left edge and
    ending after it; each field's maximum comes from a heap with lazy deletion by end time.
    """
    clipped.sort(key=lambda c: c[0])
    edges = sorted({t for s, e, _ in clipped for t in (s, e)})
    by_end: list[tuple[int, int]] = []  # (end, index): the active set, for its size and its lone member
    heaps: list[list[tuple[float, int]]] = [[] for _ in _FIELDS]  # per field: (-value, end)
    out: list[ActivitySegment] = []
    nxt = 0
    for lo, hi in zip(edges, edges[1:]):
        while nxt < len(clipped) and clipped[nxt][0] <= lo:
            s, e, a = clipped[nxt]
            heapq.heappush(by_end, (e, nxt))
            for heap, name in zip(heaps, _FIELDS):
                heapq.heappush(heap, (-getattr(a, name), e))
            nxt += 1
        while by_end and by_end[0][0] <= lo:
            heapq.heappop(by_end)
        if not by_end:
            continue
        if len(by_end) == 1:
            merged = clipped[by_end[0][1]][2]
        else:
            for heap in heaps:
                while heap[0][1] <= lo:
                    heapq.heappop(heap)
            merged = Activity(*(-heap[0][0] for heap in heaps))
        if out and out[-1].end_ns == lo and out[-1].activity == merged:
            out[-1] = ActivitySegment(out[-1].start_ns, hi, merged)
        else:
            out.append(ActivitySegment(lo, hi, merged))
    return out


class ScriptedTimeline:
    """A fixed script of activity per GPU, for tests and demos.

    Times are seconds from ``origin_ns`` (the mock's clock reading when the script starts).
    ``gpus=None`` means every GPU.
    """

    def __init__(self, origin_ns: int = 0):
        self.origin_ns = origin_ns
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Activity, frozenset[int] | None]] = []
        self._longest_ns = 0
        self._allocations: dict[int, int] = {}
        # (start_ns, end_ns, segments) of the last query whose activities all cover every GPU: the mock
        # asks for each GPU with the same window, and such a script answers them all alike.
        self._shared_window: tuple[int, int, list[ActivitySegment]] | None = None

    def add(self, start_s: float, end_s: float, activity: Activity, gpus: Sequence[int] | None = None) -> "ScriptedTimeline":
        start = self.origin_ns + round(start_s * NS_PER_S)
        end = self.origin_ns + round(end_s * NS_PER_S)
        if end <= start:
            raise ValueError("an activity must end after it starts")
        where = bisect.bisect_right(self._starts, start)
        self._starts.insert(where, start)
        self._entries.insert(where, (start, end, activity, None if gpus is None else frozenset(gpus)))
        self._longest_ns = max(self._longest_ns, end - start)
        self._shared_window = None
        return self

    def bursts(
        self,
        start_s: float,
        end_s: float,
        period_s: float,
        busy_s: float,
        activity: Activity,
        gpus: Sequence[int] | None = None,
    ) -> "ScriptedTimeline":
        """``activity`` for ``busy_s`` at the start of every ``period_s`` from start_s to end_s."""
        if not 0 < busy_s <= period_s:
            raise ValueError("busy_s must be in (0, period_s]")
        t = start_s
        while t < end_s - 1e-12:
            self.add(t, min(t + busy_s, end_s), activity, gpus)
            t += period_s
        return self

    def allocate(self, gpu: int, memory_bytes: int) -> "ScriptedTimeline":
        """Declare ``memory_bytes`` held on ``gpu`` (the mock's memory.used)."""
        self._allocations[gpu] = memory_bytes
        return self

    def segments(self, gpu: int, start_ns: int, end_ns: int) -> list[ActivitySegment]:
        shared = self._shared_window
        if shared is not None and shared[0] == start_ns and shared[1] == end_ns:
            return list(shared[2])
        lo = bisect.bisect_left(self._starts, start_ns - self._longest_ns)
        hi = bisect.bisect_left(self._starts, end_ns)
        entries = self._entries[lo:hi]
        out = flatten(((s, e, a) for s, e, a, gpus in entries if gpus is None or gpu in gpus), start_ns, end_ns)
        if all(gpus is None for _, _, _, gpus in entries):
            self._shared_window = (start_ns, end_ns, list(out))
        return out

    def allocated_bytes(self, gpu: int) -> int:
        return self._allocations.get(gpu, 0)

    def mean_busy_ratio(self, gpu: int, start_ns: int, end_ns: int, field: str = "gpu") -> float:
        """The exact time-weighted mean of one activity field: the truth tests compare against."""
        total = sum(
            (seg.end_ns - seg.start_ns) * getattr(seg.activity, field)
            for seg in self.segments(gpu, start_ns, end_ns)
        )
        return total / (end_ns - start_ns)
