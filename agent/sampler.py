"""The sampler: one thread that owns every hardware call.

A fixed-deadline loop (``next += interval; sleep(next - now)``) reads the GPU and host backends and
writes into the ledger. Deadlines do not drift with the time the probes take; a tick that finishes
after the next deadline counts as an overrun and the schedule skips ahead rather than bursting to
catch up. Each probe's duration and success become self-metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from wattledger.agent.ledger import Ledger
from wattledger.probes.base import GpuBackend, GpuSample, HostBackend, HostSample

log = logging.getLogger(__name__)

MIN_INTERVAL_SECONDS = 0.010
DEFAULT_INTERVAL_SECONDS = 0.100
# The host's figures are mostly kernel counters (CPU time, RAPL energy) that lose nothing when read
# less often, and reading /proc/stat makes the kernel format every CPU's and interrupt's counts: so the
# host is read on its own, slower cadence by default. Memory gauges still see anything lasting 0.5 s.
DEFAULT_HOST_INTERVAL_SECONDS = 0.5


class Sampler:
    """Reads the backends on a fixed schedule and feeds the ledger (and any sample sinks)."""

    def __init__(
        self,
        ledger: Ledger,
        gpu: GpuBackend | None,
        host: HostBackend | None,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        host_interval_seconds: float | None = None,
        sinks: Sequence[Callable[[list[GpuSample], HostSample | None], None]] = (),
        wait: Callable[[float], bool] | None = None,
    ):
        if interval_seconds < MIN_INTERVAL_SECONDS:
            raise ValueError(f"the sampling interval must be at least {MIN_INTERVAL_SECONDS * 1000:g} ms")
        self.ledger = ledger
        self.gpu = gpu
        self.host = host
        self.interval_seconds = interval_seconds
        # None: the default cadence, but never faster than the GPU interval.
        self.host_interval_seconds = (
            max(interval_seconds, DEFAULT_HOST_INTERVAL_SECONDS) if host_interval_seconds is None
            else max(interval_seconds, host_interval_seconds)
        )
        self._next_host_read: float | None = None
        self._clock = clock
        self._sinks = list(sinks)
        self._stop = threading.Event()
        # wait(seconds) sleeps until then or until stop(); returns True once stopped. Tests pass one that
        # moves a fake clock instead.
        self._wait = wait if wait is not None else self._stop.wait
        self._thread: threading.Thread | None = None
        self._last_tick_end: float | None = None
        self.fatal_error: BaseException | None = None
        self.ticks = 0
        gpu_infos = gpu.devices() if gpu is not None else []
        ledger.set_devices(gpu.name if gpu else None, bool(gpu and gpu.simulated), gpu_infos)

    def add_sink(self, sink: Callable[[list[GpuSample], HostSample | None], None]) -> None:
        self._sinks.append(sink)

    def tick(self) -> None:
        """Read every backend once. Tests call this directly with an injected clock."""
        gpu_samples: list[GpuSample] = []
        host_sample: HostSample | None = None
        if self.gpu is not None:
            gpu_samples = self._timed("gpu", self.gpu.sample, self.ledger.record_gpus) or []
            xid_counts = getattr(self.gpu, "xid_counts", None)
            if xid_counts is not None:
                self.ledger.record_xids(xid_counts())
        now = self._clock()
        if self.host is not None and (self._next_host_read is None or now >= self._next_host_read):
            # Half an interval of slack keeps jitter from skipping a read.
            self._next_host_read = now + self.host_interval_seconds - self.interval_seconds / 2
            host_sample = self._timed("host", self.host.sample, self.ledger.record_host)
        for sink in self._sinks:
            sink(gpu_samples, host_sample)
        self.ticks += 1
        self._last_tick_end = self._clock()

    def _timed(self, probe: str, read, record):
        started = self._clock()
        try:
            result = read()
        except Exception as err:  # noqa: BLE001 - every probe failure must show up, not kill the loop
            if getattr(err, "fatal", False):
                raise
            self.ledger.record_probe(probe, False, self._clock() - started, f"{type(err).__name__}: {err}")
            log.warning("%s probe failed: %s", probe, err)
            return None
        self.ledger.record_probe(probe, True, self._clock() - started)
        record(result)
        return result

    def run(self) -> None:
        """The loop; returns when ``stop()`` is called or a fatal probe error occurs."""
        next_deadline = self._clock()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - only fatal errors reach here (see _timed)
                self.fatal_error = err
                log.error("sampler stopped: %s", err)
                return
            next_deadline += self.interval_seconds
            now = self._clock()
            if now > next_deadline:
                self.ledger.record_overrun()
                missed = int((now - next_deadline) / self.interval_seconds) + 1
                next_deadline += missed * self.interval_seconds
            if self._wait(max(0.0, next_deadline - now)):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="wattledger-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def is_alive(self, max_stall_intervals: float = 20.0) -> bool:
        """True while the loop runs and its last tick is recent (what /healthz reports)."""
        if self._thread is None or not self._thread.is_alive() or self._last_tick_end is None:
            return False
        stall_limit = max(2.0, max_stall_intervals * self.interval_seconds)
        return self._clock() - self._last_tick_end <= stall_limit
