"""The sampler: one thread that owns every hardware call.

A fixed-deadline loop (``next += interval; sleep(next - now)``) reads the GPU and host backends and
writes into the ledger. Deadlines do not drift with the time the probes take; a tick that finishes
after the next deadline counts as an overrun and the schedule skips ahead rather than bursting to
catch up. Each probe's duration and success become self-metrics.

Sinks (the ``--record`` file, the benchmark's recorder) run on this thread after each tick. A sink that
raises is switched off with one log line and counted (``sink_status``); sampling and /metrics go on. A
housekeeping callable (the accounting's ``maintain``: workloads whose process exited, stopped workloads
past their retention) runs about once a second on the same schedule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wattledger.agent.ledger import Ledger
from wattledger.probes.base import FatalProbeError, GpuBackend, GpuSample, HostBackend, HostSample, ProbeOutcome

log = logging.getLogger(__name__)

MIN_INTERVAL_SECONDS = 0.010
DEFAULT_INTERVAL_SECONDS = 0.100
# The host's figures are mostly kernel counters (CPU time, RAPL energy) that lose nothing when read
# less often, and reading /proc/stat makes the kernel format every CPU's and interrupt's counts: so the
# host is read on its own, slower cadence by default. Memory gauges still see anything lasting 0.5 s.
DEFAULT_HOST_INTERVAL_SECONDS = 0.5
# How often housekeeping runs (workload processes checked for exit): a dead workload holds its GPU's
# energy share for at most about this long.
HOUSEKEEPING_INTERVAL_SECONDS = 1.0

SampleSink = Callable[[list[GpuSample], "HostSample | None"], None]


class StopSignal:
    """A stop flag whose timed wait is one bare lock acquire.

    ``threading.Event.wait(timeout)`` goes through a Condition (a new lock, a waiter list, two acquires)
    on every call. The sampler waits once per tick; on the 2-core development VM a wait here costs the
    thread about 10-20 us less CPU than ``Event.wait`` (110-121 against 115-135 us; most of either is the
    platform's price of sleeping and waking a thread: ``tests/benchmarks/bench_real_loop.py --wait-cost``).
    """

    def __init__(self) -> None:
        self._released = threading.Lock()
        self._released.acquire()  # held until set(): a waiter blocks on it
        self._guard = threading.Lock()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._guard:
            if not self._set:
                self._set = True
                self._released.release()

    def wait(self, timeout_seconds: float) -> bool:
        """Sleep until ``timeout_seconds`` pass or ``set()`` is called; True once set."""
        if self._set:
            return True
        if self._released.acquire(True, max(0.0, timeout_seconds)):
            self._released.release()  # leave it free: every later wait returns at once
            return True
        return False


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """One sink as the self-metrics show it."""

    name: str
    active: bool
    failures: int
    last_error: str | None


class SinkGuard:
    """Runs one sink's calls; the first exception switches the sink off (one log line), for good.

    One guard may wrap several call sites of the same sink (the recorder takes samples from the
    sampler and spans from the accounting), so a failure at either stops both.
    """

    def __init__(self, name: str, on_failure: Callable[[], None] | None = None):
        self.name = name
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self.active = True
        self.failures = 0
        self.last_error: str | None = None

    def wrap(self, function: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: object) -> None:
            if not self.active:
                return
            try:
                function(*args)
            except Exception as err:  # noqa: BLE001 - a sink must never stop the sampler or an API call
                self._fail(err)
        return guarded

    def _fail(self, err: Exception) -> None:
        with self._lock:
            self.failures += 1
            first = self.active
            self.active = False
            self.last_error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        if not first:
            return
        log.error("sink %s failed and is switched off (%s); sampling and /metrics go on", self.name,
                  self.last_error)
        if self._on_failure is not None:
            try:
                self._on_failure()
            except Exception as cleanup_err:  # noqa: BLE001 - e.g. closing a file on a full disk
                log.debug("sink %s cleanup failed: %s", self.name, cleanup_err)

    def status(self) -> SinkStatus:
        with self._lock:
            return SinkStatus(self.name, self.active, self.failures, self.last_error)


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
        sinks: Sequence[SampleSink] = (),
        wait: Callable[[float], bool] | None = None,
        housekeeping: Callable[[], None] | None = None,
        housekeeping_interval_seconds: float = HOUSEKEEPING_INTERVAL_SECONDS,
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
        self._sinks: list[tuple[SinkGuard, SampleSink]] = []
        for sink in sinks:
            self.add_sink(sink)
        self._housekeeping = housekeeping
        self._housekeeping_interval = housekeeping_interval_seconds
        self._next_housekeeping: float | None = None
        self._housekeeping_error: str | None = None
        self._stop = StopSignal()
        # wait(seconds) sleeps until then or until stop(); returns True once stopped. Tests pass one that
        # moves a fake clock instead.
        self._wait = wait if wait is not None else self._stop.wait
        self._thread: threading.Thread | None = None
        self._last_tick_end: float | None = None
        self.fatal_error: BaseException | None = None
        self.ticks = 0
        self._probe_errors: dict[str, str] = {}  # probe -> its last failure, logged once (see _timed)
        # A backend whose devices appear later (NVML retried with backoff) bumps ``devices_generation``:
        # the ledger and the device listeners then learn the new list before its samples are recorded.
        self._device_listeners: list[Callable[[list], None]] = []
        self._devices_generation = gpu.devices_generation if gpu is not None else None
        # The GPU backend's bound methods, resolved once per backend object rather than every tick (see
        # _bind_gpu), and the counts last handed to the ledger (it is told only when they change).
        self._bound_gpu: object = None
        self._xid_counts: Callable[[], dict] = dict
        self._error_counts: Callable[[], dict] = dict
        self._gpu_probe_status: Callable[[], list[ProbeOutcome]] = list
        self._last_xid_counts: dict = {}
        self._last_error_counts: dict = {}
        self._host_probe_status: Callable[[], list[ProbeOutcome]] = host.probe_status if host is not None else list
        gpu_infos = gpu.devices() if gpu is not None else []
        ledger.set_devices(gpu.name if gpu else None, bool(gpu and gpu.simulated), gpu_infos)

    def add_device_listener(self, listener: Callable[[list], None]) -> None:
        """Call ``listener(gpu_infos)`` when the GPU backend's device list changes after start."""
        self._device_listeners.append(listener)

    def _bind_gpu(self) -> None:
        """Resolve the GPU backend's per-tick methods (``tick`` calls this again if ``self.gpu`` is replaced)."""
        gpu = self._bound_gpu = self.gpu
        self._xid_counts = gpu.xid_counts
        self._error_counts = gpu.error_counts
        self._gpu_probe_status = gpu.probe_status

    def _record_gpus(self, samples: list[GpuSample]) -> None:
        # (The attribute itself is read every tick: its value moves when the backend finds its devices.)
        generation = self.gpu.devices_generation
        if generation != self._devices_generation:
            self._devices_generation = generation
            infos = self.gpu.devices()
            self.ledger.set_devices(self.gpu.name, bool(self.gpu.simulated), infos)
            for listener in self._device_listeners:
                listener(infos)
        self.ledger.record_gpus(samples)

    def add_sink(self, sink: SampleSink, name: str | None = None, guard: SinkGuard | None = None) -> SinkGuard:
        """Call ``sink(gpu_samples, host_sample)`` after every tick, under a guard (``guard``, to share
        one with the sink's other call sites, or a new one named ``name``)."""
        if guard is None:
            guard = SinkGuard(name or getattr(sink, "__name__", "sink"))
        self._sinks.append((guard, guard.wrap(sink)))
        return guard

    def sink_status(self) -> list[SinkStatus]:
        """Each sink's state, for the self-metrics."""
        seen: dict[int, SinkStatus] = {}
        for guard, _ in self._sinks:
            seen.setdefault(id(guard), guard.status())
        return list(seen.values())

    def tick(self) -> None:
        """Read every backend once. Tests call this directly with an injected clock."""
        gpu_samples: list[GpuSample] = []
        host_sample: HostSample | None = None
        if self.gpu is not None:
            if self.gpu is not self._bound_gpu:
                self._bind_gpu()
            gpu_samples = self._timed("gpu", self.gpu.sample, self._record_gpus, self._gpu_probe_status) or []
            self._record_gpu_counts()
        now = self._clock()
        if self.host is not None and (self._next_host_read is None or now >= self._next_host_read):
            # Half an interval of slack keeps jitter from skipping a read.
            self._next_host_read = now + self.host_interval_seconds - self.interval_seconds / 2
            host_sample = self._timed("host", self.host.sample, self.ledger.record_host, self._host_probe_status)
        for _, sink in self._sinks:
            sink(gpu_samples, host_sample)
        if self._housekeeping is not None:
            self._run_housekeeping()
        self.ticks += 1
        self._last_tick_end = self._clock()

    def _record_gpu_counts(self) -> None:
        """The backend's cumulative XID and read-error counts, to the ledger when they changed (they
        seldom do: an unchanged dict is not copied under the ledger's lock every tick)."""
        xids = self._xid_counts()
        if xids != self._last_xid_counts:
            self._last_xid_counts = xids
            self.ledger.record_xids(xids)
        errors = self._error_counts()
        if errors != self._last_error_counts:
            self._last_error_counts = errors
            self.ledger.record_backend_errors(errors)

    def _run_housekeeping(self) -> None:
        if self._housekeeping is None:
            return
        now = self._clock()
        if self._next_housekeeping is not None and now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self._housekeeping_interval
        try:
            self._housekeeping()
        except Exception as err:  # noqa: BLE001 - housekeeping must not stop sampling
            message = f"{type(err).__name__}: {err}"
            if message != self._housekeeping_error:  # once per distinct failure, not once a second
                log.warning("housekeeping failed: %s", message)
            self._housekeeping_error = message
        else:
            self._housekeeping_error = None

    def _timed(self, probe: str, read, record, sub_probes: Callable[[], list[ProbeOutcome]]):
        """``record(read())``, with the read's outcome as probe ``probe`` and, after a read that worked,
        each of the backend's sub-probes' (``sub_probes()``) under its own name."""
        started = self._clock()
        try:
            result = read()
        except FatalProbeError:
            raise
        except Exception as err:  # noqa: BLE001 - every probe failure must show up, not kill the loop
            self._note_outcome(probe, False, self._clock() - started, f"{type(err).__name__}: {err}",
                               logging.WARNING)
            return None
        self._note_outcome(probe, True, self._clock() - started)
        for outcome in sub_probes():
            # A part that cannot work on this machine (no RAPL) is no alarm: INFO, not WARNING.
            self._note_outcome(outcome.name, outcome.success, outcome.duration_seconds, outcome.error,
                               logging.INFO)
        record(result)
        return result

    def _note_outcome(self, name: str, success: bool, duration_seconds: float, error: str | None = None,
                      failure_level: int = logging.WARNING) -> None:
        """One read of probe ``name`` into the self-metrics; a failure is logged once per distinct reason
        (not every tick), and the first success after one says so."""
        self.ledger.record_probe(name, success, duration_seconds, error)
        if success:
            if self._probe_errors.pop(name, None) is not None:
                log.info("%s probe works again", name)
        elif self._probe_errors.get(name) != (error or ""):
            log.log(failure_level, "%s probe failed: %s (logged once; wattledger_probe_success shows it)",
                    name, error)
            self._probe_errors[name] = error or ""

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
