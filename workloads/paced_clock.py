"""The simulated device's clock: workloads on the mock GPU run on the time a real GPU would take, not the CPU's.

On the mock, a workload's step costs the simulated device time of its work (``workloads/device_time.py``),
whatever the host CPU took to compute it. :class:`PacedClock` keeps that schedule: it reads as the
**scheduled** time, which moves only when the workload spends device time (``spend``) or waits for
something (``wait_until``: the next arrival, the end of a tool call), and it paces the schedule to the
wall clock by sleeping whenever the schedule is ahead of it. Every decision the workload takes (which
requests join the batch, when a tool call ends, when the run is over) reads this clock, and every span is
stamped with it, so with the same seed the run is the same run on a quiet machine and on a loaded one.

When the CPU is slower than the simulated device the wall clock runs ahead of the schedule: the clock
does not sleep then, and the schedule catches up in the next wait that has room for it (a chat server's
idle gap). The gap is the **lag**: spans reach the agent that much after their stamped time. The mock
simulates a time once it is its ``--mock-delay`` old (1 s in the bench), so a lag below that changes no
figure; a larger one makes spans late (the mock counts them as such, ``agent/span_activity.py``) and the
figures wrong. ``max_lag_s`` and ``lagging_seconds`` are for the bench's validity check ("the CPU kept
up with the simulated device").

Times are monotonic nanoseconds; ``wall_ns`` and ``sleep_s`` are injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

NS_PER_S = 1_000_000_000


class PacedClock:
    """A schedule in monotonic ns that starts at the wall clock's now and is paced to it."""

    def __init__(self, wall_ns: Callable[[], int] = time.monotonic_ns,
                 sleep_s: Callable[[float], object] | None = None, stop: threading.Event | None = None):
        """``sleep_s``: how to wait (default: ``stop.wait`` when ``stop`` is given, so a stop request ends a
        wait at once, else ``time.sleep``)."""
        self._wall_ns = wall_ns
        self._stop = stop
        self._sleep_s = sleep_s or (stop.wait if stop is not None else time.sleep)
        self._scheduled_ns = wall_ns()
        self.max_lag_s = 0.0  # the most the wall clock was ahead of the schedule (s)
        self.lagging_seconds = 0.0  # scheduled seconds spent while the wall clock was ahead (s)
        self.spent_seconds = 0.0  # device seconds spent (s)

    def now_ns(self) -> int:
        """The scheduled time (ns): what the workload decides by and stamps its spans with."""
        return self._scheduled_ns

    __call__ = now_ns  # a PacedClock is a ``clock_ns`` callable

    def spend(self, seconds: float) -> tuple[int, int]:
        """The device works ``seconds`` from now: returns the span's (start_ns, end_ns) and paces to its end."""
        if not seconds >= 0:
            raise ValueError(f"device seconds must be >= 0, not {seconds!r}")
        start_ns = self._scheduled_ns
        end_ns = start_ns + round(seconds * NS_PER_S)
        self.spent_seconds += seconds
        self._advance_to(end_ns)
        return start_ns, end_ns

    def wait_until(self, scheduled_ns: int) -> None:
        """Nothing runs until ``scheduled_ns`` (an arrival, the end of a tool call): the schedule moves there."""
        if scheduled_ns > self._scheduled_ns:
            self._advance_to(scheduled_ns)

    def _advance_to(self, end_ns: int) -> None:
        start_ns = self._scheduled_ns
        self._scheduled_ns = end_ns
        lag_ns = self._wall_ns() - end_ns
        if lag_ns > 0:
            # The CPU is behind the simulated device: no sleep, and the schedule's time is counted as lagging.
            self.max_lag_s = max(self.max_lag_s, lag_ns / NS_PER_S)
            self.lagging_seconds += (end_ns - start_ns) / NS_PER_S
            return
        if self._stop is not None and self._stop.is_set():
            return
        self._sleep_s(-lag_ns / NS_PER_S)

    def report(self) -> dict:
        """For the workload's summary: how far the CPU fell behind the simulated device (seconds)."""
        return {"max_lag_seconds": self.max_lag_s, "lagging_seconds": self.lagging_seconds,
                "device_seconds": self.spent_seconds}
