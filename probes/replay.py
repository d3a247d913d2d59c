"""The replay backend: plays a recorded sample file (see ``records``) at real or accelerated speed.

A trace recorded on a GPU node with ``wattledger agent --record FILE`` can then drive tests and demos
on any machine. Sample times are moved onto this machine's clock: a sample recorded ``t`` seconds into
the trace is served ``t / speed`` seconds after the replay starts, stamped with that time. Counters are
served as recorded, so at ``speed`` > 1 the energy rates come out ``speed`` times higher: this is a
replay of the trace, not a rescaling of it. With ``loop`` the trace starts again at its end (the
counters then go back, which the ledger treats like a driver reset); without it, the devices read as
down (``up=False``) once the trace has ended.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from wattledger.probes import records
from wattledger.probes.base import FieldStatus, FixedGpuBackend, GpuInfo, GpuSample, ProbeUnavailable

NS_PER_S = 1_000_000_000


class ReplayGpuBackend(FixedGpuBackend):
    """Serves the newest recorded sample of each GPU whose (scaled) time has come."""

    name = "replay"

    def __init__(
        self,
        path: str | Path,
        speed: float = 1.0,
        loop: bool = False,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ):
        if not speed > 0:
            raise ValueError("replay speed must be positive")
        self.path = Path(path)
        self._speed = speed
        self._loop = loop
        self._clock_ns = clock_ns
        self._infos, self.simulated, self._timelines = _load(self.path)
        self._fields_seen = {
            index: {f for s in samples for f in _present_fields(s)} for index, (_, samples) in self._timelines.items()
        }
        first = min((times[0] for times, _ in self._timelines.values() if times), default=0)
        last = max((times[-1] for times, _ in self._timelines.values() if times), default=0)
        self._trace_start_ns = first
        self._trace_length_ns = max(1, last - first)
        self._started_ns = clock_ns()

    def devices(self) -> list[GpuInfo]:
        return list(self._infos)

    @property
    def finished(self) -> bool:
        """True once a non-looping replay has served its last sample."""
        return not self._loop and self._trace_offset_ns()[1] > self._trace_length_ns

    def _trace_offset_ns(self) -> tuple[int, int]:
        elapsed = self._clock_ns() - self._started_ns
        offset = int(elapsed * self._speed)
        if self._loop:
            return offset // (self._trace_length_ns + 1), offset % (self._trace_length_ns + 1)
        return 0, offset

    def sample(self) -> list[GpuSample]:
        now = self._clock_ns()
        _, offset = self._trace_offset_ns()
        at = self._trace_start_ns + offset
        out = []
        if self.finished:
            # The recording has ended: report the devices as gone rather than repeat the last sample
            # (its utilization would keep adding busy seconds that nobody recorded).
            return [GpuSample(index=i.index, uuid=i.uuid, monotonic_ns=now, up=False) for i in self._infos]
        for info in self._infos:
            times, samples = self._timelines.get(info.index, ([], []))
            position = bisect.bisect_right(times, at) - 1
            if position < 0:
                # Nothing recorded this early: the device is reported as not yet answering.
                out.append(GpuSample(index=info.index, uuid=info.uuid, monotonic_ns=now, up=False))
                continue
            out.append(dataclasses.replace(samples[position], monotonic_ns=now))
        return out

    def field_status(self, index: int) -> list[FieldStatus]:
        seen = self._fields_seen.get(index, set())
        return [
            FieldStatus(name, name in seen, None if name in seen else "absent from the recording")
            for name in _SAMPLE_VALUE_FIELDS
        ]

    def close(self) -> None:
        pass


_SAMPLE_VALUE_FIELDS = tuple(
    f.name for f in dataclasses.fields(GpuSample) if f.name not in ("index", "uuid", "monotonic_ns", "up")
)


def _present_fields(sample: GpuSample) -> set[str]:
    return {name for name in _SAMPLE_VALUE_FIELDS if getattr(sample, name) is not None}


class ReplayFileError(ProbeUnavailable):
    """The replay file cannot be played (missing, not a sample file, a bad value): bad input, one line
    naming the file and the line at fault. The command line exits 2 on it."""


Timelines = dict[int, tuple[list[int], list[GpuSample]]]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """The file's non-blank lines with their numbers (from 1), decoded as UTF-8 one by one.

    The recorder writes ASCII JSON, so bytes that are not UTF-8 mean a file of another kind; only the last
    line is excused, as it may be cut short by a crash while recording."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReplayFileError(f"cannot read replay file {path}: {err.strerror or err}") from None
    raw_lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if number == len(raw_lines) and out:
                break
            raise ReplayFileError(f"cannot replay {path}: line {number}: not UTF-8 text (is this a "
                                  "wattledger --record file?)") from None
        if line.strip():
            out.append((number, line))
    return out


def _parse_header(line: str) -> tuple[list[GpuInfo], bool]:
    """Line 1: the format, its version and the GPUs; RecordError naming what is wrong."""
    try:
        return records.header_from_record(records.parse_line(line, 1))
    except records.RecordError as err:
        message = str(err)
        raise records.RecordError(message if message.startswith("line ") else f"line 1: {message}") from None


def _parse_samples(lines: list[tuple[int, str]], infos: list[GpuInfo]) -> Timelines:
    """Every GPU sample after the header, checked for type, range and order, by GPU index."""
    timelines: Timelines = {info.index: ([], []) for info in infos}
    last_number = lines[-1][0]
    for number, line in lines:
        try:
            record = records.parse_line(line, number)
        except records.RecordError:
            if number == last_number:
                break  # a last line cut short by a crash while recording: play what came before
            raise
        if record["type"] != "gpu":
            continue
        try:
            sample = records.gpu_sample_from_record(record)
        except records.RecordError as err:
            raise records.RecordError(f"line {number}: {err}") from None
        if sample.index not in timelines:
            raise records.RecordError(f"line {number}: GPU {sample.index} is not among the header's GPUs")
        times, samples = timelines[sample.index]
        if times and sample.monotonic_ns < times[-1]:
            raise records.RecordError(f"line {number}: samples go back in time")
        times.append(sample.monotonic_ns)
        samples.append(sample)
    return timelines


def _load(path: Path) -> tuple[list[GpuInfo], bool, Timelines]:
    """Read a sample file; ReplayFileError with the line at fault if it cannot be played."""
    lines = _read_lines(path)
    if not lines:
        raise ReplayFileError(f"replay file {path} is empty")
    try:
        infos, simulated = _parse_header(lines[0][1])
        timelines = _parse_samples(lines[1:], infos) if len(lines) > 1 else {}
    except records.RecordError as err:
        raise ReplayFileError(f"cannot replay {path}: {err}") from None
    if not any(times for times, _ in timelines.values()):
        raise ReplayFileError(f"replay file {path} holds no GPU samples")
    return infos, simulated, timelines
