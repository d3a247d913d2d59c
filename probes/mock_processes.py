"""Simulated compute processes for the mock GPU: who runs on each device, with what share of it, and when.

For issue 13 (who used the GPU), so that per-process and per-owner attribution is tested on CPU. A
``ScriptedProcess`` is one process on one GPU: its pid, the GPU memory it holds, the owner labels the
agent's resolver should find for it (``{"namespace": "llm", "pod": "vllm-0", "container": "vllm"}`` or
``{"group": "trainer.service"}``), when it runs, and its SM share: the fraction of the GPU's time its
kernels run (what ``nvidia-smi pmon`` reports as "sm"), constant or a step timeline. ``ScriptedProcesses``
is the list the mock takes (``MockGpuBackend(processes=...)``); times are seconds of simulated time after
the backend starts, as for the mock's faults.

What the mock makes of them (probes/mock.py):

- A GPU's activity is that of the processes alive on it: utilization and SM activity are the sum of their
  shares, capped at 1, so power and energy follow them through the mock's usual physics. Time slicing is
  how a GPU shared by processes without MPS runs them (one context at a time), so while they run the
  tensor pipes and HBM are busy as much as each running process keeps them: GPU tensor activity is the sum
  over processes of share x ``tensor_ratio`` (and DRAM the same with ``dram_ratio``). Processes asking
  for more than the whole GPU (shares summing over 1) get it in proportion to their shares, each share
  scaled by 1 / sum, as a time-slicing scheduler with equal slices per unit of demand would give it.
  With an activity source as well (a script, the agent's workload spans) the two combine field by field
  with ``max``, the rule ``probes/activity.py`` uses for anything that overlaps on one device.
- Each sample's ``processes`` lists the processes alive on that GPU at the sample's time, refreshed
  every ``process_interval_s`` (1 s, NVML's cadence in probes/nvml.py) and carried between refreshes, with
  ``sm_utilization_ratio`` its exact mean effective share over the interval since the previous refresh
  (the first covers the interval before it, clipped at the backend's start), and
  ``memory_controller_utilization_ratio`` the same for share x ``dram_ratio``: as
  probes/nvml_processes.py turns NVML's per-process samples into shares. A process that ended within the
  interval is not on the list, as on NVML, whose list is what holds memory now.
- The GPU's memory used adds the memory of the processes alive now.
- Registered workloads are processes too, when the activity source knows them (``workload_processes``,
  ``WorkloadProcessSource`` in probes/activity.py: the agent's span source lists each running workload
  with a pid whose spans drove the GPU): each refresh adds them with ``sm_utilization_ratio`` the mean
  ``sm`` of their spans over the refresh interval and ``memory_controller_utilization_ratio`` the mean
  ``dram``, and the memory their workload declared, as NVML would list the workload's process. They add
  nothing to the GPU's activity or memory used (the source already drives both), so energy is as
  without them. A workload whose spans ended before the interval is not listed. A pid both scripted and
  registered on one GPU is listed once, as the scripted process (its share and memory): the script is
  the test's explicit statement of that process. The lists are simulated even with no process scripted.
  The workloads' shares come from their own spans, while the GPU's activity combines workloads and
  scripted processes with ``max``: shares summing above the busy ratio are data the attribution
  normalises (docs/attribution.md, rule 3), as they are on NVML.

Nothing here is measured: the mock is a simulator and every figure it gives is labelled simulated.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from wattledger.probes.activity import IDLE, Activity, ActivitySegment, WorkloadProcess, flatten
from wattledger.probes.base import GpuProcess

NS_PER_S = 1_000_000_000
_FOREVER_NS = 2**62  # the end of a piece that lasts as long as the run

# ``WorkloadProcessSource.workload_processes``: (gpu, start_ns, end_ns) -> the workloads' processes.
WorkloadProcessLister = Callable[[int, int, int], list[WorkloadProcess]]

# The keys ``ScriptedProcesses.from_spec`` takes, required first.
SPEC_REQUIRED_KEYS = ("gpu", "pid", "sm_share", "memory_bytes", "labels")
SPEC_OPTIONAL_KEYS = ("start_s", "end_s", "tensor_ratio", "dram_ratio")


def _shown(value: object) -> str:
    """A value as an error message shows it: repr (which escapes newlines), cut to keep the message short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ratio(value: object, name: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a ratio from 0 to 1, not {_shown(value)}")
    return float(value)


def _share_steps(sm_share: object) -> tuple[tuple[float, float], ...]:
    """``sm_share`` as ``((at_s, share), ...)`` with at_s strictly ascending: a number is one step at 0 s."""
    if _is_number(sm_share):
        return ((0.0, _check_ratio(sm_share, "sm_share")),)
    if isinstance(sm_share, (str, bytes)) or not isinstance(sm_share, Sequence) or not sm_share:
        raise ValueError(
            f"sm_share must be a ratio from 0 to 1 or a list of [at_s, share] steps, not {_shown(sm_share)}")
    steps = []
    for step in sm_share:
        if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) != 2:
            raise ValueError(f"sm_share steps must be [at_s, share] pairs, not {_shown(step)}")
        at_s, share = step
        if not _is_number(at_s) or at_s < 0:
            raise ValueError(f"sm_share step time must be a finite number of seconds >= 0, not {_shown(at_s)}")
        if steps and at_s <= steps[-1][0]:
            raise ValueError(f"sm_share step times must ascend: {at_s:g} s comes after {steps[-1][0]:g} s")
        steps.append((float(at_s), _check_ratio(share, "sm_share step share")))
    return tuple(steps)


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


@dataclass(frozen=True)
class ScriptedProcess:
    """One simulated compute process on one GPU.

    ``sm_share``: the fraction (0..1) of the GPU's time its kernels run while it is alive: a number, or a
    step timeline ``[(at_s, share), ...]`` (seconds after the backend starts, ascending; the share is 0
    before the first step). ``memory_bytes``: the GPU memory it holds while alive. ``labels``: what the
    owner resolver finds for its pid (a plain dict; empty: an owner no resolver can name). It is alive on
    [start_s, end_s) (end_s None: to the end of the run). ``tensor_ratio`` / ``dram_ratio``: how busy its
    kernels keep the tensor pipes and HBM bandwidth while they run (0..1; they shape its power, see the
    module docstring). Bad values raise ValueError with a one-line reason.
    """

    gpu: int
    pid: int
    sm_share: float | Sequence[tuple[float, float]]
    memory_bytes: int
    labels: Mapping[str, str]
    start_s: float = 0.0
    end_s: float | None = None
    tensor_ratio: float = 0.0
    dram_ratio: float = 0.0
    share_steps: tuple[tuple[float, float], ...] = field(init=False, repr=False)

    def __post_init__(self):
        if not _is_int(self.gpu) or self.gpu < 0:
            raise ValueError(f"gpu must be a GPU index (an int >= 0), not {_shown(self.gpu)}")
        if not _is_int(self.pid) or self.pid <= 0:
            raise ValueError(f"pid must be an int > 0, not {_shown(self.pid)}")
        if not _is_int(self.memory_bytes) or self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be an int >= 0, not {_shown(self.memory_bytes)}")
        if not isinstance(self.labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise ValueError(f"labels must map label names to strings, not {_shown(self.labels)}")
        if not _is_number(self.start_s) or self.start_s < 0:
            raise ValueError(f"start_s must be a finite number of seconds >= 0, not {_shown(self.start_s)}")
        if self.end_s is not None and (not _is_number(self.end_s) or _ns(self.end_s) <= _ns(self.start_s)):
            raise ValueError(f"end_s must be a finite number of seconds after start_s, not {_shown(self.end_s)}")
        _check_ratio(self.tensor_ratio, "tensor_ratio")
        _check_ratio(self.dram_ratio, "dram_ratio")
        object.__setattr__(self, "labels", dict(self.labels))  # a copy: the caller's dict may change
        object.__setattr__(self, "share_steps", _share_steps(self.sm_share))

    @property
    def start_ns(self) -> int:
        """Start, in ns after the backend starts."""
        return _ns(self.start_s)

    @property
    def end_ns(self) -> int:
        """End (exclusive), in ns after the backend starts; a far future for a process that never ends."""
        return _FOREVER_NS if self.end_s is None else _ns(self.end_s)

    def alive_at(self, offset_ns: int) -> bool:
        return self.start_ns <= offset_ns < self.end_ns

    def share_at(self, offset_ns: int) -> float:
        """The scripted (not yet scaled) SM share at ``offset_ns`` after the backend starts."""
        share = 0.0
        for at_s, step_share in self.share_steps:
            if _ns(at_s) > offset_ns:
                break
            share = step_share
        return share


@dataclass(frozen=True, slots=True)
class _Member:
    """A process alive during a piece, with its effective (scaled) shares of the GPU's time."""

    pid: int
    sm_ratio: float
    memory_controller_ratio: float
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class _Piece:
    """A stretch of one GPU's script where nothing changes: from ``start_ns`` (after the backend starts) to
    the next piece's start."""

    start_ns: int
    activity: Activity
    members: tuple[_Member, ...]


class _GpuSchedule:
    """One GPU's processes as piecewise-constant pieces, found by bisection."""

    def __init__(self, processes: Sequence[ScriptedProcess], interned: dict[Activity, Activity]):
        edges = {0}
        for process in processes:
            edges.update((process.start_ns, process.end_ns))
            edges.update(_ns(at_s) for at_s, _ in process.share_steps)
        self.pieces: list[_Piece] = []
        for edge in sorted(e for e in edges if e < _FOREVER_NS):
            piece = _piece(edge, [p for p in processes if p.alive_at(edge)], interned)
            previous = self.pieces[-1] if self.pieces else None
            if previous is None or (previous.activity, previous.members) != (piece.activity, piece.members):
                self.pieces.append(piece)
        self.starts = [piece.start_ns for piece in self.pieces]

    def index_at(self, offset_ns: int) -> int:
        return max(bisect.bisect_right(self.starts, offset_ns) - 1, 0)

    def end_of(self, index: int) -> int:
        return self.starts[index + 1] if index + 1 < len(self.starts) else _FOREVER_NS

    def overlapping(self, start_ns: int, end_ns: int) -> Iterable[tuple[int, int, _Piece]]:
        """``(from, to, piece)`` for each piece's part inside [start_ns, end_ns) (offsets)."""
        index = self.index_at(start_ns)
        while index < len(self.pieces) and self.starts[index] < end_ns:
            lo, hi = max(self.starts[index], start_ns), min(self.end_of(index), end_ns)
            if lo < hi:
                yield lo, hi, self.pieces[index]
            index += 1


def _piece(start_ns: int, alive: list[ScriptedProcess], interned: dict[Activity, Activity]) -> _Piece:
    """The GPU's activity and the members' effective shares while ``alive`` run with their current shares."""
    shares = [p.share_at(start_ns) for p in alive]
    total = sum(shares)
    scale = 1.0 / total if total > 1.0 else 1.0  # oversubscribed: shares in proportion (module docstring)
    members = tuple(
        _Member(p.pid, share * scale, share * scale * p.dram_ratio, p.memory_bytes) for p, share in zip(alive, shares)
    )
    busy = min(total, 1.0)
    activity = Activity(
        gpu=busy,
        sm=busy,
        tensor=min(sum(share * scale * p.tensor_ratio for p, share in zip(alive, shares)), 1.0),
        dram=min(sum(m.memory_controller_ratio for m in members), 1.0),
    )
    # One object per distinct activity: the mock's physics extends a stretch while the activity stays the
    # same object (or an equal one), and evaluates its power model once per object.
    activity = interned.setdefault(activity, activity)  # IDLE itself for an idle stretch: it is in there
    return _Piece(start_ns, activity, members)


class ScriptedProcesses:
    """The mock's scripted processes (see the module docstring). Raises ValueError (one line) for a pid
    scripted twice on one GPU at overlapping times, or one pid with two different label sets."""

    def __init__(self, processes: Iterable[ScriptedProcess] = ()):
        self._processes = tuple(processes)
        for number, process in enumerate(self._processes):
            if not isinstance(process, ScriptedProcess):
                raise ValueError(f"processes[{number}] is a {type(process).__name__}, not a ScriptedProcess")
        self._labels: dict[int, dict[str, str]] = {}
        for number, process in enumerate(self._processes):
            _check_against_earlier(number, process, self._processes[:number], self._labels)
            self._labels.setdefault(process.pid, process.labels)
        interned: dict[Activity, Activity] = {IDLE: IDLE}
        self._schedules = {
            gpu: _GpuSchedule([p for p in self._processes if p.gpu == gpu], interned) for gpu in self.gpus()
        }

    @classmethod
    def from_spec(cls, spec: object) -> "ScriptedProcesses":
        """Build from plain data (a JSON or TOML list of tables), e.g. ``[{"gpu": 0, "pid": 4242,
        "sm_share": 0.6, "memory_bytes": 20 * 2**30, "labels": {"namespace": "llm", "pod": "vllm-0"}}]``;
        ``sm_share`` may be ``[[at_s, share], ...]``. Keys: SPEC_REQUIRED_KEYS, then SPEC_OPTIONAL_KEYS.
        Bad input: ValueError with one line naming the entry."""
        if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Sequence):
            raise ValueError(f"scripted processes must be a list of tables, not {_shown(spec)}")
        processes = []
        for number, entry in enumerate(spec):
            if not isinstance(entry, Mapping):
                raise ValueError(
                    f"processes[{number}] must be a table of {', '.join(SPEC_REQUIRED_KEYS)}, not {_shown(entry)}")
            unknown = [key for key in entry if key not in SPEC_REQUIRED_KEYS + SPEC_OPTIONAL_KEYS]
            missing = [key for key in SPEC_REQUIRED_KEYS if key not in entry]
            if unknown:
                raise ValueError(f"processes[{number}]: unknown key {_shown(unknown[0])}; keys are "
                                 f"{', '.join(SPEC_REQUIRED_KEYS + SPEC_OPTIONAL_KEYS)}")
            if missing:
                raise ValueError(f"processes[{number}]: missing {', '.join(missing)}")
            try:
                processes.append(ScriptedProcess(**entry))
            except ValueError as err:
                raise ValueError(f"processes[{number}]: {err}") from None
        return cls(processes)

    def __iter__(self):
        return iter(self._processes)

    def __len__(self) -> int:
        return len(self._processes)

    def gpus(self) -> set[int]:
        """The GPU indices that have a scripted process."""
        return {p.gpu for p in self._processes}

    def owner_labels(self) -> dict[int, dict[str, str]]:
        """pid -> its labels (a copy)."""
        return {pid: dict(labels) for pid, labels in self._labels.items()}

    def schedule(self, gpu: int) -> _GpuSchedule | None:
        return self._schedules.get(gpu)

    def mean_sm_share(self, gpu: int, pid: int, start_s: float, end_s: float) -> float:
        """The exact time-weighted mean of a pid's effective SM share on a GPU over [start_s, end_s) (seconds
        after the backend starts), oversubscription scaling included: the truth attribution tests compare
        their figures against."""
        start_ns, end_ns = _ns(start_s), _ns(end_s)
        if end_ns <= start_ns:
            raise ValueError("end_s must come after start_s")
        schedule = self._schedules.get(gpu)
        if schedule is None:
            return 0.0
        share_ns = sum(
            (hi - lo) * member.sm_ratio
            for lo, hi, piece in schedule.overlapping(start_ns, end_ns)
            for member in piece.members if member.pid == pid
        )
        return share_ns / (end_ns - start_ns)


def _check_against_earlier(
    number: int, process: ScriptedProcess, earlier: Sequence[ScriptedProcess], labels: Mapping[int, Mapping[str, str]]
) -> None:
    """One pid is one process: one label set, and on one GPU at most one lifetime at a time."""
    if process.pid in labels and labels[process.pid] != process.labels:
        raise ValueError(f"processes[{number}]: pid {process.pid} is scripted with two different label sets")
    for other in earlier:
        if other.pid == process.pid and other.gpu == process.gpu and (
            other.start_ns < process.end_ns and process.start_ns < other.end_ns
        ):
            raise ValueError(f"processes[{number}]: pid {process.pid} is already on GPU {process.gpu} at that time")


class ProcessSimulation:
    """``ScriptedProcesses`` running in one mock backend: its start on the mock's clock, and each GPU's
    process list with the time it was last refreshed (NVML's cadence, see the module docstring)."""

    def __init__(self, script: ScriptedProcesses, origin_ns: int, gpu_count: int, interval_s: float):
        outside = sorted(gpu for gpu in script.gpus() if gpu >= gpu_count)
        if outside:
            raise ValueError(f"a scripted process is on GPU {outside[0]}, but the mock has {gpu_count} GPU(s)")
        if not _is_number(interval_s) or interval_s <= 0:
            raise ValueError(f"process_interval_s must be a number of seconds > 0, not {_shown(interval_s)}")
        self.script = script
        self._origin_ns = origin_ns
        self._interval_ns = max(_ns(interval_s), 1)
        self._lists: dict[int, tuple[GpuProcess, ...]] = {}
        self._listed_at_ns: dict[int, int] = {}

    def with_segments(
        self, gpu: int, start_ns: int, end_ns: int, segments: list[ActivitySegment]
    ) -> list[ActivitySegment]:
        """The activity source's ``segments`` for [start_ns, end_ns) combined with the processes'."""
        schedule = self.script.schedule(gpu)
        if schedule is None:
            return segments
        origin = self._origin_ns
        own = [
            (origin + lo, origin + hi, piece.activity)
            for lo, hi, piece in schedule.overlapping(start_ns - origin, end_ns - origin)
            if piece.activity is not IDLE
        ]
        if not segments:  # the pieces are already in order and apart
            return [ActivitySegment(*interval) for interval in own]
        if not own:
            return segments
        return flatten([(s.start_ns, s.end_ns, s.activity) for s in segments] + own, start_ns, end_ns)

    def memory_bytes(self, gpu: int, now_ns: int) -> int:
        """GPU memory held by the processes alive now."""
        schedule = self.script.schedule(gpu)
        if schedule is None:
            return 0
        piece = schedule.pieces[schedule.index_at(now_ns - self._origin_ns)]
        return sum(member.memory_bytes for member in piece.members)

    def process_list(self, gpu: int, now_ns: int,
                     workloads: WorkloadProcessLister | None = None) -> tuple[GpuProcess, ...]:
        """The GPU's process list at ``now_ns``: refreshed once ``process_interval_s`` has passed since the
        last refresh (or on the first call, or after ``forget``), else the last one again. The first refresh
        covers the interval before it, clipped at the backend's start, as NVML's first read does.
        ``workloads``: the activity source's ``workload_processes``, whose processes each refresh adds
        after the scripted ones (a pid in both: the scripted one, see the module docstring)."""
        listed_at = self._listed_at_ns.get(gpu)
        if listed_at is not None and now_ns - listed_at < self._interval_ns:
            return self._lists[gpu]
        window_start = max(now_ns - (self._interval_ns if listed_at is None else now_ns - listed_at), self._origin_ns)
        listed = self._refreshed(gpu, window_start, now_ns)
        if workloads is not None and now_ns > window_start:
            listed = _with_workloads(listed, workloads(gpu, window_start, now_ns))
        self._lists[gpu] = listed
        if now_ns > window_start:
            self._listed_at_ns[gpu] = now_ns
        # else: sampled at the backend's very start, no time to take shares over: the list goes out with
        # its shares unmeasured (None) and the next sample refreshes it, rather than a second later
        return listed

    def _refreshed(self, gpu: int, start_ns: int, now_ns: int) -> tuple[GpuProcess, ...]:
        schedule = self.script.schedule(gpu)
        if schedule is None:
            return ()
        origin = self._origin_ns
        alive = schedule.pieces[schedule.index_at(now_ns - origin)].members
        if now_ns <= start_ns:  # no interval yet (see process_list): shares not measured
            return tuple(GpuProcess(m.pid, m.memory_bytes) for m in alive)
        sm_ns = dict.fromkeys((m.pid for m in alive), 0.0)
        memory_controller_ns = dict(sm_ns)
        for lo, hi, piece in schedule.overlapping(start_ns - origin, now_ns - origin):
            for member in piece.members:
                if member.pid in sm_ns:
                    sm_ns[member.pid] += (hi - lo) * member.sm_ratio
                    memory_controller_ns[member.pid] += (hi - lo) * member.memory_controller_ratio
        span_ns = now_ns - start_ns
        return tuple(
            GpuProcess(
                pid=m.pid,
                memory_used_bytes=m.memory_bytes,
                sm_utilization_ratio=min(sm_ns[m.pid] / span_ns, 1.0),
                memory_controller_utilization_ratio=min(memory_controller_ns[m.pid] / span_ns, 1.0),
            )
            for m in alive
        )

    def forget(self, gpu: int) -> None:
        """The device was lost: its list is gone, and the first after it is back covers a fresh interval."""
        self._lists.pop(gpu, None)
        self._listed_at_ns.pop(gpu, None)


def _with_workloads(scripted: tuple[GpuProcess, ...], workloads: Sequence[WorkloadProcess]) -> tuple[GpuProcess, ...]:
    """The scripted list, then each workload process whose pid is not scripted on this GPU."""
    taken = {process.pid for process in scripted}
    return scripted + tuple(
        GpuProcess(
            pid=w.pid,
            memory_used_bytes=w.memory_bytes,
            sm_utilization_ratio=min(w.sm_ratio, 1.0),
            memory_controller_utilization_ratio=min(w.dram_ratio, 1.0),
        )
        for w in workloads if w.pid not in taken
    )
