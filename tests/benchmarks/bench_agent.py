"""Agent overhead benchmark: sampler CPU cost, /metrics latency, agent RSS. Prints figures; asserts nothing.

    python tests/benchmarks/bench_agent.py            # everything (about 2 minutes)
    python tests/benchmarks/bench_agent.py --seconds 10 sampler

Targets from the telemetry-core issue: sampler at most 0.5% of one core at 10 Hz and 3% at 100 Hz with
8 mock GPUs plus the host probe; scrape p99 under 10 ms sequential; agent RSS under 60 MB. The mock
GPUs run a bursty scripted load so the physics and the ledger do real work every tick. Figures are of
this machine and the mock backend (simulated GPUs). The sampler figure is split in two: the agent's own
work (sampler loop, ledger, host probe), and the mock's physics, whose place NVML's calls take on a GPU
node. Scrapes with the headers Prometheus really sends, beside node_exporter, at 8 and 64 GPUs and under
20 concurrent scrapers: ``bench_scrape.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil

from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.base import FixedGpuBackend
from wattledger.probes.host import open_host_backend
from wattledger.probes.mock import MockGpuBackend

GPUS = 8


def bursty_timeline(origin_ns: int, seconds: float) -> ScriptedTimeline:
    return ScriptedTimeline(origin_ns).bursts(0, seconds + 5, 0.7, 0.2, Activity(gpu=1, sm=0.8, tensor=0.6, dram=0.5))


class TimedBackend(FixedGpuBackend):
    """Wraps the mock and counts the CPU time its physics takes: on a GPU node, NVML calls take its place."""

    def __init__(self, backend):
        self._backend = backend
        self.name, self.simulated = backend.name, backend.simulated
        self.cpu_ns = 0

    def devices(self):
        return self._backend.devices()

    def sample(self):
        started = time.thread_time_ns()
        try:
            return self._backend.sample()
        finally:
            self.cpu_ns += time.thread_time_ns() - started

    def field_status(self, index):
        return self._backend.field_status(index)

    def close(self):
        self._backend.close()


def sampler_cpu(hz: float, seconds: float) -> dict:
    """Share of one core the sampler thread uses (thread CPU time over wall time)."""
    mock = MockGpuBackend(GPUS, clock_ns=time.monotonic_ns)
    mock.set_activity_source(bursty_timeline(time.monotonic_ns(), seconds))
    backend = TimedBackend(mock)
    host = open_host_backend()
    ledger = Ledger(None)
    sampler = Sampler(ledger, backend, host, 1.0 / hz)
    cpu_ns = {}

    def run_and_measure():
        start = time.thread_time_ns()
        sampler.run()
        cpu_ns["sampler"] = time.thread_time_ns() - start

    import threading

    thread = threading.Thread(target=run_and_measure)
    wall_start = time.monotonic()
    thread.start()
    time.sleep(seconds)
    sampler.stop()
    thread.join()
    wall = time.monotonic() - wall_start
    return {
        "hz": hz,
        "seconds": round(wall, 1),
        "ticks": sampler.ticks,
        "cpu_percent_of_one_core": round(100 * cpu_ns["sampler"] / 1e9 / wall, 3),
        "cpu_us_per_tick": round(cpu_ns["sampler"] / 1e3 / max(1, sampler.ticks), 1),
        # Without the simulator's physics: ledger, host probe, sampler loop (what the agent adds to NVML).
        "agent_percent_of_one_core": round(100 * (cpu_ns["sampler"] - backend.cpu_ns) / 1e9 / wall, 3),
        "mock_physics_percent_of_one_core": round(100 * backend.cpu_ns / 1e9 / wall, 3),
        "overruns": ledger.snapshot().overruns,
    }


def start_agent_process(gpus: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "wattledger.agent.cli", "agent", "--backend", "mock", "--mock-gpus", str(gpus),
         "--address", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        match = re.search(r"metrics at (http://\S+/metrics)", line)
        if match:
            return process, match.group(1)
    raise RuntimeError("agent did not start")


def scrape(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scrape_latency(url: str, scrapes: int, scrapers: int, pause_s: float = 0.0) -> dict:
    """Latency of ``scrapes`` scrapes by ``scrapers`` threads, each pausing ``pause_s`` after a scrape.

    A pause longer than the agent's sampling interval makes every scrape render anew (the agent shares a
    rendering only between scrapes within one interval), which is what a lone Prometheus sees.
    """

    def one(_):
        latency = scrape(url)
        time.sleep(pause_s)
        return latency

    with concurrent.futures.ThreadPoolExecutor(scrapers) as pool:
        latencies = list(pool.map(one, range(scrapes)))
    return {
        "scrapers": scrapers,
        "pause_ms": round(pause_s * 1000),
        "scrapes": scrapes,
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
    }


def agent_rss(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="*", choices=["sampler", "scrape", []], default=[],
                        help="sampler and/or scrape (default both)")
    parser.add_argument("--seconds", type=float, default=30.0, help="sampler run per rate (default 30)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.what = args.what or ["sampler", "scrape"]
    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "backend": f"mock (SIMULATED), {GPUS} GPUs"}
    if "sampler" in args.what:
        figures["sampler"] = [sampler_cpu(hz, args.seconds) for hz in (10, 100)]
    if "scrape" in args.what:
        process, url = start_agent_process(GPUS)
        try:
            time.sleep(2)
            scrape(url)
            figures["exposition_bytes"] = len(urllib.request.urlopen(url).read())
            figures["scrape"] = [scrape_latency(url, 300, 1, pause_s=0.15), scrape_latency(url, 2000, 20)]
            time.sleep(5)
            figures["agent_rss_mb"] = round(agent_rss(process), 1)
        finally:
            process.terminate()
            process.wait(10)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"machine: {figures['machine']}; backend: {figures['backend']}")
    for row in figures.get("sampler", []):
        print(f"sampler at {row['hz']:g} Hz: {row['cpu_percent_of_one_core']}% of one core in all "
              f"({row['cpu_us_per_tick']} us CPU per tick, {row['ticks']} ticks, {row['overruns']} overruns): "
              f"agent {row['agent_percent_of_one_core']}%, mock physics {row['mock_physics_percent_of_one_core']}%")
    for row in figures.get("scrape", []):
        how = f"{row['scrapers']} scraper(s)" + (f", {row['pause_ms']} ms apart (each renders anew)"
                                                 if row["pause_ms"] else ", back to back")
        print(f"/metrics, {how}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms "
              f"over {row['scrapes']} scrapes ({figures['exposition_bytes']} bytes)")
    if "agent_rss_mb" in figures:
        print(f"agent RSS: {figures['agent_rss_mb']} MB")


if __name__ == "__main__":
    main()
