"""Test helpers: an injectable clock and a driver that ticks a sampler through simulated time."""

from __future__ import annotations

NS_PER_S = 1_000_000_000


class FakeClock:
    """A monotonic clock that moves only when told. ``ns()`` and ``seconds()`` read the same time."""

    def __init__(self, start_ns: int = 1_000 * NS_PER_S):
        self.now_ns = start_ns

    def ns(self) -> int:
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
