"""Soak test of the agent: many minutes at 100 Hz with scrapers and reporters hammering it.

    python tests/benchmarks/soak.py                  # 10 minutes, 8 mock GPUs, 100 Hz, 20 scrapers
    python tests/benchmarks/soak.py --minutes 1      # a short smoke run

One agent process (mock backend, SIMULATED GPUs) sampling at 100 Hz; 20 threads scraping ``/metrics``
concurrently; one thread posting tokens and one posting spans over the accounting API; a monitor that
every few seconds reads the agent's RSS and the whole exposition. It prints RSS over time, sampler
overruns, scrape p50/p99, every error, and two checks: no counter series (``_total``, histogram buckets,
``_count`` and ``_sum``) ever decreased between two readings, and the tokens the agent counted equal the
tokens posted. It exits 1 when a check fails. Figures are of this machine: they are printed, never
asserted in the unit suite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from wattledger.agent.client import AgentClient, AgentClientError

TOKEN_WORKLOAD = "soak-tokens"
SPAN_WORKLOAD = "soak-spans"
RSS_SETTLE_SECONDS = 60.0  # RSS growth is measured from the first minute on (imports, caches, buffers)


def start_agent(gpus: int, interval: str) -> tuple[subprocess.Popen, str]:
    """The agent as a separate process, as it runs on a node; returns it and its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wattledger.agent.cli", "agent", "--backend", "mock", "--mock-gpus", str(gpus),
         "--interval", interval, "--address", "127.0.0.1", "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        match = re.search(r"metrics at (http://\S+)/metrics", line)
        if match:
            # Keep draining stdout so the agent never blocks on a full pipe.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, match.group(1)
    raise RuntimeError(f"the agent did not start: {process.stderr.read()[-500:]}")


def counter_values(text: str) -> dict[tuple, float]:
    """Every sample that must never decrease: counters' ``_total``, histograms' buckets, count and sum."""
    values: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class Soak:
    """The load and the bookkeeping; every thread stops by itself when ``deadline`` passes."""

    def __init__(self, base_url: str, process: subprocess.Popen, seconds: float, scrapers: int,
                 scrape_pause_s: float, monitor_every_s: float):
        self.base_url = base_url
        self.process = psutil.Process(process.pid)
        self.deadline = time.monotonic() + seconds
        self.started = time.monotonic()
        self.scrapers = scrapers
        self.scrape_pause_s = scrape_pause_s
        self.monitor_every_s = monitor_every_s
        self.client = AgentClient(base_url, timeout_s=10.0)
        self.lock = threading.Lock()
        self.scrape_latencies_s: list[float] = []
        self.errors: list[str] = []
        self.tokens_posted = 0
        self.spans_posted = 0
        self.rss_mb: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.decreases: list[str] = []
        self.last_counters: dict[tuple, float] = {}
        self.overruns = 0.0

    def error(self, where: str, err: object) -> None:
        with self.lock:
            self.errors.append(f"{time.monotonic() - self.started:7.1f} s {where}: {err}")

    def scraper(self) -> None:
        while time.monotonic() < self.deadline:
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as response:
                    response.read()
            except (urllib.error.URLError, OSError) as err:
                self.error("scrape", err)
            else:
                with self.lock:
                    self.scrape_latencies_s.append(time.perf_counter() - started)
            time.sleep(self.scrape_pause_s)

    def token_reporter(self) -> None:
        count = 0
        while time.monotonic() < self.deadline:
            count = count % 97 + 1  # varied batch sizes
            try:
                self.client.add_tokens(TOKEN_WORKLOAD, "generated", count)
            except AgentClientError as err:
                self.error("tokens", err)
            else:
                with self.lock:
                    self.tokens_posted += count
            time.sleep(0.01)

    def span_reporter(self) -> None:
        while time.monotonic() < self.deadline:
            end_ns = time.monotonic_ns()
            spans = [{"workload": SPAN_WORKLOAD, "kind": "compute", "gpus": [1],
                      "start_ns": end_ns - (i + 1) * 4_000_000, "end_ns": end_ns - i * 4_000_000 - 1_000_000,
                      "activity": {"gpu": 1.0, "sm": 0.7, "tensor": 0.5, "dram": 0.6}} for i in range(8)]
            try:
                self.client.add_spans(spans)
            except AgentClientError as err:
                self.error("spans", err)
            else:
                with self.lock:
                    self.spans_posted += len(spans)
            time.sleep(0.05)

    def monitor(self) -> None:
        while True:
            self.check_once()
            if time.monotonic() >= self.deadline:
                return
            time.sleep(min(self.monitor_every_s, max(0.0, self.deadline - time.monotonic())))

    def check_once(self) -> None:
        elapsed = time.monotonic() - self.started
        try:
            rss = self.process.memory_info().rss / 1e6
        except psutil.Error as err:
            self.error("rss", err)
            return
        try:
            with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as response:
                counters = counter_values(response.read().decode())
        except (urllib.error.URLError, OSError, ValueError) as err:
            self.error("monitor scrape", err)
            return
        with self.lock:
            self.rss_mb.append((elapsed, rss))
            for key, value in counters.items():
                previous = self.last_counters.get(key)
                if previous is not None and value < previous:
                    self.decreases.append(f"{elapsed:7.1f} s {key[0]}{dict(key[1])}: {previous} -> {value}")
            self.last_counters.update(counters)
            self.overruns = max((v for (name, _), v in counters.items()
                                 if name == "wattledger_sampler_overruns_total"), default=0.0)

    def tokens_counted(self) -> int:
        for workload in self.client.workloads():
            if workload.get("name") == TOKEN_WORKLOAD:
                return int(workload.get("tokens", {}).get("generated", 0))
        return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--gpus", type=int, default=8, help="mock GPUs (default 8)")
    parser.add_argument("--interval", default="10ms", help="sampling interval (default 10ms: 100 Hz)")
    parser.add_argument("--scrapers", type=int, default=20, help="concurrent scrapers (default 20)")
    parser.add_argument("--scrape-pause", type=float, default=1.0,
                        help="seconds each scraper waits between scrapes (default 1)")
    args = parser.parse_args()
    seconds = args.minutes * 60
    process, base_url = start_agent(args.gpus, args.interval)
    try:
        soak = Soak(base_url, process, seconds, args.scrapers, args.scrape_pause,
                    monitor_every_s=max(1.0, min(10.0, seconds / 30)))
        soak.client.start(TOKEN_WORKLOAD, gpus=[0], pid=os.getpid())
        soak.client.start(SPAN_WORKLOAD, gpus=[1])
        workers = [soak.token_reporter, soak.span_reporter, soak.monitor] + [soak.scraper] * args.scrapers
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
            for future in [pool.submit(worker) for worker in workers]:
                future.result()
        time.sleep(0.5)  # the last token post is counted before we read
        counted = soak.tokens_counted()
        soak.check_once()
    finally:
        process.terminate()
        process.wait(10)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"backend: mock (SIMULATED), {args.gpus} GPUs at {args.interval}; {args.scrapers} scrapers "
          f"{args.scrape_pause:g} s apart; {args.minutes:g} min")
    print("RSS over time (s: MB): " + ", ".join(f"{t:.0f}: {mb:.1f}" for t, mb in soak.rss_mb[:: max(1, len(soak.rss_mb) // 12)]))
    settled = [mb for t, mb in soak.rss_mb if t >= min(RSS_SETTLE_SECONDS, seconds / 2)]
    growth = (settled[-1] - settled[0]) if len(settled) >= 2 else float("nan")
    print(f"RSS growth after the first {min(RSS_SETTLE_SECONDS, seconds / 2):.0f} s: {growth:+.1f} MB (target < 5 MB)")
    latencies = soak.scrape_latencies_s
    print(f"scrapes: {len(latencies)}, p50 {1000 * statistics.median(latencies) if latencies else float('nan'):.1f} ms, "
          f"p99 {1000 * percentile(latencies, 0.99):.1f} ms")
    print(f"sampler overruns: {soak.overruns:.0f}")
    print(f"errors: {len(soak.errors)}")
    for line in soak.errors[:20]:
        print(f"  {line}")
    print(f"spans posted: {soak.spans_posted}")
    print(f"tokens posted {soak.tokens_posted}, counted {counted}")
    failures = []
    if soak.decreases:
        failures.append(f"{len(soak.decreases)} counter decrease(s)")
        for line in soak.decreases[:20]:
            print(f"  decreased: {line}")
    if counted != soak.tokens_posted:
        failures.append(f"tokens counted {counted} != posted {soak.tokens_posted}")
    if soak.errors:
        failures.append(f"{len(soak.errors)} error(s)")
    if not growth < 5.0:
        failures.append(f"RSS grew {growth:+.1f} MB after the first minute")
    print("checks: " + ("PASS (no counter decreased; tokens counted == posted; no errors; RSS growth < 5 MB)"
                        if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
