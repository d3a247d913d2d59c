"""Tick and scrape cost at the agent's stated limits (issue 8, item 12). Prints figures; asserts nothing.

    .venv/bin/python tests/benchmarks/bench_limits.py [--quick]

Cases, each on a mock agent with 8 GPUs and no HTTP server (the sampler ticked by hand):

- pending spans at the limit (10,000 span-GPU entries), all inside the next tick on one GPU: the worst
  a writer can make one tick do;
- running workloads at the default cap (64) and at 1,000 (``max_workloads`` raised), all started in one
  sampling interval on every GPU: the attribution sweep's worst case;
- span history at its byte limit (1 MiB by default): how many spans that holds;
- the scrape (prometheus_client text rendering of the registry) at each workload count.
"""

from __future__ import annotations

import statistics
import sys
import time

from wattledger.agent.accounting import DEFAULT_SPAN_HISTORY_BYTES, MAX_SPANS_PER_CALL, Accounting
from wattledger.agent.config import AgentConfig
from wattledger.agent.daemon import Agent
from wattledger.agent.span_activity import DEFAULT_MAX_PENDING_SPANS
from prometheus_client import generate_latest

NS_PER_S = 1_000_000_000


def mock_agent(gpus: int = 8, max_workloads: int = 64) -> Agent:
    config = AgentConfig(backend="mock", mock_gpus=gpus, mock_delay_seconds=0.0, max_workloads=max_workloads)
    return Agent(config, serve_http=False)


def timed_ms(function, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples), max(samples)


def pending_spans_at_the_limit(repeat: int) -> None:
    agent = mock_agent()
    agent.sampler.tick()
    costs = []
    for _ in range(repeat):
        now = agent._clock_ns()
        # Every pending entry a writer may leave, packed into the next 50 ms of GPU 0.
        step = 50 * 10**6 // DEFAULT_MAX_PENDING_SPANS
        for batch in range(DEFAULT_MAX_PENDING_SPANS // MAX_SPANS_PER_CALL):
            spans = [agent.accounting.make_span("w", "compute", now + (batch * MAX_SPANS_PER_CALL + i) * step,
                                                now + (batch * MAX_SPANS_PER_CALL + i) * step + 2 * step, [0],
                                                {"gpu": 1.0, "sm": (i % 97) / 97})
                     for i in range(MAX_SPANS_PER_CALL)]
            agent.accounting.add_spans(spans)
        time.sleep(0.06)
        started = time.perf_counter()
        agent.sampler.tick()
        costs.append((time.perf_counter() - started) * 1e3)
    agent.stop()
    print(f"pending spans at the limit ({DEFAULT_MAX_PENDING_SPANS} in one tick on one GPU): "
          f"tick p50 {statistics.median(costs):.1f} ms, max {max(costs):.1f} ms")


def running_workloads(count: int, repeat: int) -> None:
    agent = mock_agent(max_workloads=count)
    agent.sampler.tick()
    now = agent._clock_ns()
    for n in range(count):  # all start within the last sampling interval, staggered
        agent.accounting.start(f"w{n}", list(range(8)), at_ns=now - 10**8 + n * (10**8 // count))
    ticks = []
    for _ in range(repeat):
        started = time.perf_counter()
        agent.sampler.tick()
        ticks.append((time.perf_counter() - started) * 1e3)
    scrape_p50, scrape_max = timed_ms(lambda: generate_latest(agent.registry), repeat)
    lines = generate_latest(agent.registry).count(b"\n")
    agent.stop()
    print(f"{count} running workloads on 8 GPUs: tick p50 {statistics.median(ticks):.1f} ms, max {max(ticks):.1f} ms;"
          f" scrape ({lines} lines) p50 {scrape_p50:.1f} ms, max {scrape_max:.1f} ms")


def span_history_at_the_limit() -> None:
    accounting = Accounting(range(8))
    batch = [accounting.make_span("train", "compute", i, i + 1000, [0, 1], {"gpu": 1.0}) for i in range(1000)]
    while True:
        before = len(accounting.recent_spans())
        accounting.add_spans(batch)
        if len(accounting.recent_spans()) == before:
            break
    print(f"span history at its limit ({DEFAULT_SPAN_HISTORY_BYTES >> 20} MiB): {before} spans held, "
          f"{accounting.span_history_bytes() / 2**20:.1f} MiB estimated")


def main() -> None:
    quick = "--quick" in sys.argv
    repeat = 3 if quick else 10
    pending_spans_at_the_limit(repeat)
    running_workloads(64, repeat)
    running_workloads(1000, 3 if quick else 5)
    span_history_at_the_limit()


if __name__ == "__main__":
    main()
