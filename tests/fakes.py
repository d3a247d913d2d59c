"""Test helpers: injectable clocks, a stop event that waits in fake time, and a driver that ticks a sampler
through simulated time."""

from __future__ import annotations

import contextlib
import json
import threading

NS_PER_S = 1_000_000_000


class FakeClock:
    """A monotonic clock that moves only when told. ``ns()`` and ``seconds()`` read the same time."""

    def __init__(self, start_ns: int = 1_000 * NS_PER_S):
        self.now_ns = start_ns

    def ns(self) -> int:
        return self.now_ns

    def __call__(self) -> int:
        """The clock itself is a ``clock_ns`` callable too."""
        return self.now_ns

    def seconds(self) -> float:
        return self.now_ns / NS_PER_S

    def advance(self, seconds: float) -> None:
        self.now_ns += round(seconds * NS_PER_S)


def run_ticks(sampler, clock: FakeClock, seconds: float, interval_s: float = 0.1, on_tick=None) -> None:
    """Advance the clock in ``interval_s`` steps for ``seconds``, ticking the sampler at each step."""
    steps = round(seconds / interval_s)
    for _ in range(steps):
        clock.advance(interval_s)
        sampler.tick()
        if on_tick is not None:
            on_tick()


class TickingClock(FakeClock):
    """A clock that moves ``tick_s`` each time it is read, so a loop's timeline counts its own readings.

    Passed as a workload's ``clock_ns``, it makes "which step a request arrives at" and "how long the run
    lasts" a function of the loop's steps, not of how fast the host runs them."""

    def __init__(self, tick_s: float = 0.001, start_ns: int = 1_000 * NS_PER_S):
        super().__init__(start_ns)
        self.tick_ns = round(tick_s * NS_PER_S)
        self.readings = 0

    def ns(self) -> int:
        now = self.now_ns
        self.now_ns += self.tick_ns
        self.readings += 1
        return now


class ClockedStop(threading.Event):
    """A stop event whose ``wait(timeout)`` moves a fake clock by ``timeout`` instead of sleeping (unless set).

    Idle waits in a workload loop then pass in fake time, instantly."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        if not self.is_set() and timeout:
            self.clock.advance(timeout)
        return self.is_set()


@contextlib.contextmanager
def scripted_mock_agent(tmp_path, processes: list[dict], gpus: int = 1, faults: tuple[str, ...] = ()):
    """An Agent on the mock with attribution on, its processes scripted from ``processes`` (the
    ``--mock-processes`` JSON, written under ``tmp_path``), no lag, no host probe, no HTTP, on a FakeClock:
    yields (agent, clock) and stops the agent after."""
    from wattledger.agent.config import build_config
    from wattledger.agent.daemon import Agent

    path = tmp_path / "processes.json"
    path.write_text(json.dumps(processes))
    clock = FakeClock()
    config = build_config({"backend": "mock", "mock_gpus": gpus, "mock_delay": "0", "attribution": True,
                           "mock_processes": str(path), "mock_faults": list(faults)}, {})
    agent = Agent(config, host=None, clock_ns=clock.ns, serve_http=False)
    try:
        yield agent, clock
    finally:
        agent.stop()
