"""Each compute process's share of a GPU's activity, from NVML's per-process utilization samples.

For issue 13 item 1 (who used the GPU): the NVML backend reads, on the process-list cadence (about 1 Hz),
``nvmlDeviceGetProcessesUtilizationInfo`` (NVML 12.550+, struct ``nvmlProcessesUtilizationInfo_v1_t``) or,
on drivers without it, ``nvmlDeviceGetProcessUtilization`` (Maxwell and newer), passing the newest sample
timestamp it has seen so that each read returns only new samples. ``ProcessActivity`` (one per GPU, and one
per MIG device where NVML answers on MIG handles) turns the samples of one read into each pid's SM and
memory-controller share over that read's interval; ``with_activity`` joins them onto the process list
(``GpuProcess``, memory per pid from ``nvmlDeviceGetComputeRunningProcesses``). This module makes no NVML
call and does not import pynvml: nvml.py calls and handles errors, as for GPM (nvml_gpm.py).

What the samples mean (NVML API reference, nvmlDeviceGetProcessUtilization): "One utilization sample
structure is returned per process running, that had some non-zero utilization during the last sample
period. It includes the CPU timestamp at which the samples were recorded" (microseconds, the host's
realtime clock), and "If no valid sample entries are found since the lastSeenTimeStamp, NVML_ERROR_NOT_FOUND
is returned". So a process without a sample did not run, and NOT_FOUND is "no process ran", not a failure.
Drivers answer in one of two ways, and the aggregation follows the answer rather than guessing the driver:

- One sample per process (what the reference describes, and what users report from real drivers, e.g.
  NVIDIA/go-nvml#51): the value is the driver's figure for its last sample period, or for the time since
  the timestamp passed (as nvtop's author found, Syllo/nvtop#91); either way the best estimate of the share
  over the interval there is, so it is taken as it is.
- Several samples for any process in one read (a buffer of per-period samples): every sample of that read
  is one driver sample period, "between 1 second and 1/6 second, depending on the product" (NVML API
  reference, nvmlDeviceGetUtilizationRates), and a period without a sample is one in which the process did
  not run.
  The share is then time-weighted over the interval, not the mean of the samples: the mean would give a
  process that ran in one period of five at 90 % a share of 90 %, where it had 18 % of the GPU's time, the
  figure that adds up with the GPU's utilization and that energy can be split by. For a pid over an
  interval of length T, with P the driver's period:

      share = sum over its samples i of (percent_i / 100) * P / T

  P is not published per GPU: it is the median spacing of consecutive samples of one pid in that read (a
  gap where the pid did not run is a multiple of P, and one or two of them do not move the median), never
  below 1/6 s, the shortest period NVML documents, so samples stamped close together cannot shrink it.

The interval of a read runs from the previous read that got an answer to this one (its length from the
monotonic clock, its place on NVML's realtime clock by subtracting that from now), so an interval with no
sample gives 0.0 and idle time is not carried into the next read. Samples are asked for after the newest one
seen, as NVML means lastSeenTimeStamp to be used, so a sample delivered just after a read counts in the next
interval; ratios are clamped to 0..1, and percentages over 100 (reported from some drivers, Syllo/nvtop#110)
are taken as "not available".

What the wiring needs: nothing more than ``GpuSample.processes``; each ``GpuProcess`` carries
``sm_utilization_ratio`` and ``memory_controller_utilization_ratio`` (None: not measured) over the last
process interval, to be multiplied by that interval (``process_interval_s``, the refresh cadence of the
list) or used as weights when splitting the GPU's energy among owners.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from .base import GpuProcess

# pynvml functions, newest first: the backend falls back to the next on FunctionNotFound, an argument
# version mismatch, or NotSupported from the newer one.
UTILIZATION_FUNCTIONS = ("nvmlDeviceGetProcessesUtilizationInfo", "nvmlDeviceGetProcessUtilization")
# The shortest sample period NVML documents (nvmlDeviceGetUtilizationRates: "between 1 second and 1/6
# second"), a floor for the per-GPU estimate, so two samples of one pid stamped close together cannot make
# every sample cover almost nothing.
SHORTEST_DRIVER_PERIOD_US = 1_000_000 // 6


@dataclass(frozen=True, slots=True)
class UtilizationSample:
    """One per-process sample as NVML gives it, from either function's struct (both have these fields)."""

    pid: int
    timestamp_us: int  # host realtime clock, microseconds since the epoch
    sm_percent: float | None  # 0..100; None where NVML says "not available" (all-ones) or over 100
    memory_percent: float | None


def _percent(value: Any) -> float | None:
    """NVML percent -> 0..100; None for "not available" and for values no percentage can have."""
    if value is None or not 0 <= int(value) <= 100:
        return None
    return float(value)


def samples_from_nvml(entries: Iterable[Any]) -> list[UtilizationSample]:
    """``c_nvmlProcessUtilizationSample_t`` or ``c_nvmlProcessUtilizationInfo_v1_t`` entries -> samples."""
    return [
        UtilizationSample(int(e.pid), int(e.timeStamp), _percent(e.smUtil), _percent(e.memUtil)) for e in entries
    ]


@dataclass(frozen=True, slots=True)
class ProcessShares:
    """One pid's shares of one interval: ratios 0..1 of the interval's time."""

    sm_ratio: float | None
    memory_controller_ratio: float | None


@dataclass
class ProcessActivity:
    """What one GPU's (or one MIG device's) per-process reads keep between intervals.

    Use: ``query_after_us(now_us, now_ns)`` is the ``lastSeenTimeStamp`` to pass; hand what came back to
    ``interval(samples, now_us, now_ns)`` (``[]`` for NOT_FOUND), which returns pid -> shares of the interval
    since the previous answered read. ``now_us`` is the realtime clock NVML stamps samples with, ``now_ns``
    the monotonic clock: the interval's length is taken from the monotonic one, so a step of the realtime
    clock (NTP) cannot make an interval negative or an hour long.
    """

    interval_us: int  # the nominal interval: the first read covers this much time before it
    previous_read_ns: int | None = None  # monotonic time of the last read that got an answer
    newest_sample_us: int | None = None

    def query_after_us(self, now_us: int, now_ns: int) -> int:
        """The timestamp after which samples are new: the newest seen, else the start of this interval.

        A newest sample stamped after ``now_us`` means the realtime clock stepped back: asking after it would
        hide every sample until the clock caught up, so the interval's start is asked for instead.
        """
        if self.newest_sample_us is not None and self.newest_sample_us <= now_us:
            return self.newest_sample_us
        return max(0, now_us - self._span_us(now_ns))

    def _span_us(self, now_ns: int) -> int:
        """Length of the interval ending now: since the last answered read (a failed one is skipped)."""
        if self.previous_read_ns is None:
            return self.interval_us
        return max(0, (now_ns - self.previous_read_ns) // 1000)

    def interval(
        self, samples: list[UtilizationSample], now_us: int, now_ns: int
    ) -> dict[int, ProcessShares] | None:
        """pid -> shares of the interval that ends now, from the samples newer than ``query_after_us``;
        None when the interval is empty (two reads at the same monotonic time)."""
        span_us = self._span_us(now_ns)
        after_us = self.query_after_us(now_us, now_ns)
        self.previous_read_ns = now_ns
        if span_us <= 0:
            return None
        fresh = [s for s in samples if s.timestamp_us > after_us]
        if fresh:
            self.newest_sample_us = max(s.timestamp_us for s in fresh)
        return shares_of_interval(fresh, span_us)


def driver_period_us(by_pid: dict[int, list[UtilizationSample]]) -> int | None:
    """The driver's sample period, from the spacing of consecutive samples of each pid (see the module
    docstring); None when no pid has two samples (the driver answers one per process)."""
    spacings = []
    for pid_samples in by_pid.values():
        stamps = sorted(s.timestamp_us for s in pid_samples)
        spacings.extend(later - earlier for earlier, later in zip(stamps, stamps[1:]) if later > earlier)
    if not spacings:
        return None
    return max(int(statistics.median(spacings)), SHORTEST_DRIVER_PERIOD_US)


def shares_of_interval(samples: list[UtilizationSample], span_us: int) -> dict[int, ProcessShares]:
    """pid -> shares of an interval ``span_us`` long, from its new samples (see the module docstring)."""
    by_pid: dict[int, list[UtilizationSample]] = {}
    for sample in samples:
        by_pid.setdefault(sample.pid, []).append(sample)
    period_us = driver_period_us(by_pid)
    if period_us is None:  # one sample per process: the driver's own figure for the interval
        return {pid: ProcessShares(_ratio(s.sm_percent), _ratio(s.memory_percent)) for pid, [s] in by_pid.items()}
    weight = period_us / span_us  # the fraction of the interval one sample period is
    return {
        pid: ProcessShares(
            _weighted([s.sm_percent for s in pid_samples], weight),
            _weighted([s.memory_percent for s in pid_samples], weight),
        )
        for pid, pid_samples in by_pid.items()
    }


def _ratio(percent: float | None) -> float | None:
    return None if percent is None else percent / 100.0


def _weighted(percents: list[float | None], weight: float) -> float | None:
    """sum(percent / 100 * P / T), clamped to 0..1; None when every value was "not available"."""
    known = [p for p in percents if p is not None]
    if not known:
        return None
    return min(max(sum(known) / 100.0 * weight, 0.0), 1.0)


def with_activity(
    processes: tuple[GpuProcess, ...], shares: dict[int, ProcessShares] | None
) -> tuple[GpuProcess, ...]:
    """The process list with each pid's shares; a pid without samples in a measured interval did not run (0.0).

    ``shares`` None: not measured (unsupported, failed, no interval yet): the ratios stay None. Samples of
    pids that are not on the list (a process that left between the two calls, a graphics process) are left
    out: the list is what holds memory on the GPU now.
    """
    if shares is None:
        return processes
    zero = ProcessShares(0.0, 0.0)
    return tuple(
        dataclasses.replace(
            p,
            sm_utilization_ratio=shares.get(p.pid, zero).sm_ratio,
            memory_controller_utilization_ratio=shares.get(p.pid, zero).memory_controller_ratio,
        )
        for p in processes
    )
