"""The sampler loop: fixed deadlines, overruns, probe self-metrics, fatal errors."""

from __future__ import annotations

import pytest

from fakes import FakeClock
from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.probes.base import FatalProbeError, FixedGpuBackend, GpuInfo, GpuSample, ProbeOutcome


class ScriptedBackend(FixedGpuBackend):
    """A GPU backend whose reads take scripted (fake) time and may fail."""

    name, simulated = "stub", False

    def __init__(self, clock: FakeClock, read_seconds, failures=()):
        self.clock, self.read_seconds, self.failures = clock, list(read_seconds), set(failures)
        self.read_times: list[float] = []

    def devices(self):
        return [GpuInfo(0, "GPU-a", "Stub", "1", None, None)]

    def sample(self):
        number = len(self.read_times)
        self.read_times.append(self.clock.seconds())
        self.clock.advance(self.read_seconds[number] if number < len(self.read_seconds) else 0.001)
        if number in self.failures:
            raise RuntimeError("stub read failed")
        return [GpuSample(0, "GPU-a", self.clock.ns(), utilization_gpu_ratio=0.5)]

    def field_status(self, index):
        return []

    def close(self):
        pass


def make_sampler(backend, clock, stop_after_ticks):
    ledger = Ledger(None, clock_ns=clock.ns)
    state = {"ticks": 0}

    def wait(seconds):
        clock.advance(seconds)
        state["ticks"] += 1
        return state["ticks"] >= stop_after_ticks

    return Sampler(ledger, backend, None, 0.1, clock=clock.seconds, wait=wait), ledger


def test_deadlines_do_not_drift_with_read_time():
    clock = FakeClock(start_ns=0)
    backend = ScriptedBackend(clock, [0.03] * 10)
    sampler, ledger = make_sampler(backend, clock, stop_after_ticks=10)
    sampler.run()
    assert backend.read_times == pytest.approx([0.1 * i for i in range(10)])
    assert ledger.snapshot().overruns == 0


def test_a_slow_tick_is_an_overrun_and_the_schedule_skips_ahead():
    clock = FakeClock(start_ns=0)
    backend = ScriptedBackend(clock, [0.01, 0.25, 0.01, 0.01])
    sampler, ledger = make_sampler(backend, clock, stop_after_ticks=4)
    sampler.run()
    # Tick 1 ran 0.1-0.35 s: deadlines 0.2 and 0.3 were missed, the next read is at 0.4 (no burst).
    assert backend.read_times == pytest.approx([0.0, 0.1, 0.4, 0.5])
    assert ledger.snapshot().overruns == 1


def test_probe_failures_show_in_self_metrics_and_do_not_stop_the_loop():
    clock = FakeClock(start_ns=0)
    backend = ScriptedBackend(clock, [0.002] * 5, failures={1})
    sampler, ledger = make_sampler(backend, clock, stop_after_ticks=5)
    sampler.run()
    stats = ledger.snapshot().probes["gpu"]
    assert stats.success and stats.failures_total == 1 and "stub read failed" in stats.last_error
    assert stats.duration_seconds == pytest.approx(0.002)
    assert sampler.fatal_error is None and sampler.ticks == 5


def test_a_fatal_probe_error_stops_the_loop_for_a_restart():
    from wattledger.probes.nvml import NvmlFatalError

    clock = FakeClock(start_ns=0)
    backend = ScriptedBackend(clock, [0.001] * 5)
    original = backend.sample

    def failing():
        if len(backend.read_times) == 2:
            raise NvmlFatalError("NVML library and driver versions differ")
        return original()

    backend.sample = failing
    sampler, _ = make_sampler(backend, clock, stop_after_ticks=10)
    sampler.run()
    assert isinstance(sampler.fatal_error, NvmlFatalError) and sampler.ticks == 2


def test_any_fatal_probe_error_stops_the_loop_and_an_attribute_named_fatal_does_not():
    # The protocol's type decides, not an attribute: a backend's own FatalProbeError stops the loop, and
    # an ordinary error that happens to carry `fatal = True` is counted like any failed read.
    class Marked(RuntimeError):
        fatal = True

    for error, stops in ((FatalProbeError("driver replaced"), True), (Marked("only a read"), False)):
        clock = FakeClock(start_ns=0)
        backend = ScriptedBackend(clock, [0.001] * 5)
        original = backend.sample

        def failing(error=error, original=original, backend=backend):
            if len(backend.read_times) == 2:
                backend.read_times.append(clock.seconds())
                raise error
            return original()

        backend.sample = failing
        sampler, ledger = make_sampler(backend, clock, stop_after_ticks=5)
        sampler.run()
        assert (sampler.fatal_error is error) is stops
        assert (ledger.snapshot().probes["gpu"].failures_total == 1) is not stops


class SubProbes(ScriptedBackend):
    """A scripted backend that reports sub-probes, and counts how often it is asked for its extras."""

    def __init__(self, clock, outcomes):
        super().__init__(clock, [0.001] * 10)
        self.outcomes = outcomes
        self.xid_calls = 0

    def probe_status(self):
        return self.outcomes

    def xid_counts(self):
        self.xid_calls += 1
        return {(0, 79): 1}


def test_sub_probe_outcomes_are_recorded_under_their_own_names():
    clock = FakeClock(start_ns=0)
    backend = SubProbes(clock, [ProbeOutcome("gpu.fields", True, 0.004),
                                ProbeOutcome("gpu.gpm", False, 0.0, "GPU 0: GPM not supported")])
    sampler, ledger = make_sampler(backend, clock, stop_after_ticks=3)
    sampler.run()
    probes = ledger.snapshot().probes
    assert probes["gpu.fields"].success and probes["gpu.fields"].duration_seconds == 0.004
    assert not probes["gpu.gpm"].success and probes["gpu.gpm"].last_error == "GPU 0: GPM not supported"
    assert probes["gpu.gpm"].failures_total == 3  # one failed read a tick, as the "gpu" probe counts them
    assert ledger.snapshot().xid_counts == {(0, 79): 1} and backend.xid_calls == 3


def test_sub_probes_are_not_recorded_after_a_failed_read():
    clock = FakeClock(start_ns=0)
    backend = SubProbes(clock, [ProbeOutcome("gpu.fields", True, 0.0)])
    backend.failures = {0, 1, 2}
    sampler, ledger = make_sampler(backend, clock, stop_after_ticks=3)
    sampler.run()
    assert "gpu.fields" not in ledger.snapshot().probes and not ledger.snapshot().probes["gpu"].success


def test_intervals_below_10ms_are_refused():
    with pytest.raises(ValueError, match="10 ms"):
        Sampler(Ledger(None), None, None, 0.005)


def test_a_failing_sub_probe_is_logged_once_per_reason(caplog):
    import logging

    clock = FakeClock(start_ns=0)
    failing = ProbeOutcome("gpu.gpm", False, 0.0, "GPU 0: GPM not supported")
    backend = SubProbes(clock, [failing])
    sampler, _ = make_sampler(backend, clock, stop_after_ticks=1)
    with caplog.at_level(logging.INFO, logger="wattledger.agent.sampler"):
        for outcomes in ([failing], [failing], [ProbeOutcome("gpu.gpm", True, 0.0)], [failing]):
            backend.outcomes = outcomes
            clock.advance(0.1)
            sampler.tick()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("gpu.gpm probe failed" in m for m in messages) == 2  # first, and again after it worked
    assert sum("gpu.gpm probe works again" in m for m in messages) == 1


def test_the_stop_signal_times_out_false_and_once_set_answers_true_for_every_waiter():
    import threading

    from wattledger.agent.sampler import StopSignal

    signal = StopSignal()
    assert signal.wait(0.0) is False and not signal.is_set()
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(signal.wait(600.0)))
    waiter.start()
    signal.set()
    signal.set()  # a second stop() changes nothing (no double release)
    waiter.join(60)
    assert woke == [True] and signal.is_set()
    assert signal.wait(600.0) is True and signal.wait(0.0) is True  # stays set: later waits return at once
