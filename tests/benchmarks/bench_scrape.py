"""Scrape benchmark: the agent beside node_exporter, with the headers Prometheus sends. Prints figures; asserts nothing.

    python tests/benchmarks/bench_scrape.py                     # everything (about 6 minutes)
    python tests/benchmarks/bench_scrape.py --scrapes 50 --sampler-seconds 5    # a shorter run
    python tests/benchmarks/bench_scrape.py --only gzip,headers

Parts (``--only``, comma-separated):

- ``headers``: runs the real ``prometheus`` binary (when on PATH) against a recording server and prints
  the headers of its scrape request beside the ones this benchmark sends (PROMETHEUS_HEADERS).
- ``render``: in-process, the exposition of 8 and 64 mock GPUs written by the direct renderer and by
  prometheus_client's encoders (the reference), text and OpenMetrics; and gzip at levels 1, 3, 6, 9.
- ``scrape``: the agent (``--mock-gpus 8``, then 64) and node_exporter (``prometheus-node-exporter`` or
  ``node_exporter`` on PATH, started on a loopback port and stopped at the end) scraped in turns, one
  new connection per scrape, each ``--pause`` apart (longer than the agent's 100 ms sampling interval,
  so every scrape renders anew, as a lone Prometheus sees it). Twice: with PROMETHEUS_HEADERS, and as
  plain text without gzip. Latency is to the last byte; bytes are on the wire; lines are of the
  decompressed body; "per line" is the agent's latency (and CPU time) per line over node_exporter's.
  CPU time per scrape is each process's own (less what it spends unscraped), which other processes on
  a busy machine do not stretch as they stretch latencies.
- ``concurrent``: 20 scrapers back to back on the 64-GPU agent (and node_exporter), errors counted.
- ``sampler``: sampler CPU at 10 Hz and 100 Hz with 8 mock GPUs, the agent's own share and the mock's
  physics apart (the mock's place is NVML's on a GPU node).

Figures are of this machine and of simulated GPUs (the mock backend).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import http.client
import http.server
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from bench_agent import percentile, sampler_cpu, start_agent_process
from wattledger.agent.ledger import Ledger
from wattledger.agent.sampler import Sampler
from wattledger.exporters import render
from wattledger.exporters.prometheus import make_registry
from wattledger.probes.activity import Activity, ScriptedTimeline
from wattledger.probes.mock import MockGpuBackend

# What Prometheus 2.x sends with every scrape (captured from Debian 12's 2.42.0+ds with ``--only
# headers``; the Accept header is the same up to 2.54 without native histograms). The timeout header
# is the job's scrape_timeout (the default 10 s here).
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0+ds",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
PLAIN_HEADERS = {"Accept": "text/plain;version=0.0.4"}
NODE_EXPORTERS = ("prometheus-node-exporter", "node_exporter")
PARTS = ("headers", "render", "scrape", "concurrent", "sampler")


# -- one scrape ------------------------------------------------------------------------------------

def scrape(host: str, port: int, path: str, headers: dict) -> tuple[float, int, bytes]:
    """``(seconds to the last byte, bytes on the wire, decompressed body)`` of one GET on a new connection."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        wire = len(body)
        if response.getheader("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return elapsed, wire, body
    finally:
        connection.close()


class Target:
    def __init__(self, name: str, url: str, pid: int):
        self.name, self.pid = name, pid
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        self.host, _, port = hostport.rpartition(":")
        self.port, self.path = int(port), "/" + path

    def scrape(self, headers: dict) -> tuple[float, int, bytes]:
        return scrape(self.host, self.port, self.path, headers)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the target's process so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system


def summarise(latencies: list[float]) -> dict:
    return {"p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2)}


def idle_cpu_rates(targets: list[Target], seconds: float) -> dict[str, float]:
    """CPU seconds per second each target's process spends unscraped (the agent's sampler, mostly)."""
    before, started = {t.name: t.cpu_seconds() for t in targets}, time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return {t.name: (t.cpu_seconds() - before[t.name]) / wall for t in targets}


def scrape_in_turns(targets: list[Target], headers: dict, scrapes: int, pause_s: float) -> dict:
    """Each target scraped ``scrapes`` times, in turns (so machine noise falls on all alike).

    Besides latency, each target's own CPU time per scrape: its process's CPU time over the run, less
    what it spends unscraped over as long. Other processes on the machine stretch latencies, not this."""
    latencies: dict[str, list[float]] = {t.name: [] for t in targets}
    sizes: dict[str, tuple[int, int, int]] = {}
    idle_window_s = max(2.0, min(10.0, scrapes * len(targets) * pause_s / 4))
    idle = idle_cpu_rates(targets, idle_window_s)
    for target in targets:  # one unmeasured scrape each: connections, first render
        target.scrape(headers)
        time.sleep(pause_s)
    cpu_before, started = {t.name: t.cpu_seconds() for t in targets}, time.monotonic()
    for _ in range(scrapes):
        for target in targets:
            elapsed, wire, body = target.scrape(headers)
            latencies[target.name].append(elapsed)
            sizes[target.name] = (wire, len(body), body.count(b"\n"))
            time.sleep(pause_s)
    wall = time.monotonic() - started
    cpu_after = {t.name: t.cpu_seconds() for t in targets}
    # The unscraped rate before and after, averaged: the sampler's cost drifts with the mock's load.
    idle_after = idle_cpu_rates(targets, idle_window_s)
    idle = {name: (rate + idle_after[name]) / 2 for name, rate in idle.items()}
    cpu_ms = {t.name: 1000 * (cpu_after[t.name] - cpu_before[t.name] - idle[t.name] * wall) / scrapes for t in targets}
    return {name: {**summarise(values), "cpu_ms_per_scrape": round(cpu_ms[name], 2), "scrapes": len(values),
                   "wire_bytes": sizes[name][0], "body_bytes": sizes[name][1], "lines": sizes[name][2]}
            for name, values in latencies.items()}


def concurrent_scrapes(target: Target, headers: dict, scrapers: int, per_scraper: int) -> dict:
    """``scrapers`` threads, each scraping ``per_scraper`` times back to back; failures counted."""
    latencies, errors = [], []

    def one_scraper(_):
        for _ in range(per_scraper):
            try:
                elapsed, _, body = target.scrape(headers)
                latencies.append(elapsed)
            except Exception as exc:  # counted and shown, not raised: this is what is measured
                errors.append(f"{type(exc).__name__}: {exc}")

    with concurrent.futures.ThreadPoolExecutor(scrapers) as pool:
        list(pool.map(one_scraper, range(scrapers)))
    return {"scrapers": scrapers, "scrapes": len(latencies) + len(errors), "errors": len(errors),
            "first_error": errors[0] if errors else None, **(summarise(latencies) if latencies else {})}


# -- processes -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node_exporter() -> tuple[subprocess.Popen | None, str | None, str]:
    """node_exporter on a free loopback port, or (None, None, why not)."""
    binary = next((shutil.which(name) for name in NODE_EXPORTERS if shutil.which(name)), None)
    if binary is None:
        return None, None, "node_exporter not on PATH (Debian: apt-get install prometheus-node-exporter)"
    port = free_port()
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            scrape("127.0.0.1", port, "/metrics", PLAIN_HEADERS)
            first = (version.stdout + version.stderr).splitlines()
            return process, f"http://127.0.0.1:{port}/metrics", first[0] if first else binary
        except OSError:
            time.sleep(0.1)
    stop(process)
    return None, None, "node_exporter did not answer within 10 s"


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def prometheus_request_headers(timeout_s: float = 20.0) -> dict | str:
    """The headers of the real Prometheus binary's first scrape of a recording server (or why none)."""
    binary = shutil.which("prometheus")
    if binary is None:
        return "prometheus not on PATH"
    seen: dict = {}

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.setdefault("headers", dict(self.headers.items()))
            body = b"# TYPE up_probe gauge\nup_probe 1\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s}\nscrape_configs:\n"
                          f"  - job_name: record\n    static_configs: [{{targets: ['127.0.0.1:{server.server_port}']}}]\n")
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                                    f"--web.listen-address=127.0.0.1:{free_port()}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout_s
            while "headers" not in seen and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
        finally:
            stop(process)
            server.shutdown()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    first = (version.stdout + version.stderr).splitlines()
    if "headers" not in seen:
        return f"{first[0] if first else binary}: no scrape within {timeout_s:g} s"
    return {"prometheus": first[0] if first else binary, **seen["headers"]}


# -- in-process rendering --------------------------------------------------------------------------

def mock_families(gpus: int) -> list:
    """The agent's families over ``gpus`` mock GPUs after 10 simulated seconds of a bursty load."""
    now = [10**12]
    clock_ns = lambda: now[0]  # noqa: E731 - a simulated clock
    timeline = ScriptedTimeline(now[0]).bursts(0, 30, 0.7, 0.2, Activity(gpu=1, sm=0.8, tensor=0.6, dram=0.5))
    ledger = Ledger(None, clock_ns=clock_ns)
    sampler = Sampler(ledger, MockGpuBackend(gpus, activity=timeline, clock_ns=clock_ns), None, 0.1,
                      clock=lambda: now[0] / 1e9)
    for _ in range(100):
        now[0] += 100_000_000
        sampler.tick()
    return list(make_registry(ledger, "bench").collect())


def best_ms(function, repeats: int) -> tuple[float, object]:
    """Median milliseconds of ``function()`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3), result


class _Collected:
    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def render_figures(repeats: int) -> list[dict]:
    rows = []
    for gpus in (8, 64):
        families = mock_families(gpus)
        collector = _Collected(families)
        direct_text_ms, text = best_ms(lambda: render.render_text(families), repeats)
        direct_om_ms, om = best_ms(lambda: render.render_openmetrics(families), repeats)
        reference_text_ms, reference_text = best_ms(lambda: generate_latest(collector), repeats)
        reference_om_ms, reference_om = best_ms(lambda: openmetrics.generate_latest(collector), repeats)
        levels = []
        for level in (1, 3, 6, 9):
            ms, packed = best_ms(lambda: gzip.compress(om, compresslevel=level), repeats)
            levels.append({"level": level, "ms": ms, "bytes": len(packed), "ratio": round(len(om) / len(packed), 1)})
        rows.append({"gpus": gpus, "lines": text.count(b"\n"), "text_bytes": len(text), "openmetrics_bytes": len(om),
                     "identical_to_prometheus_client": text == reference_text and om == reference_om,
                     "direct_text_ms": direct_text_ms, "prometheus_client_text_ms": reference_text_ms,
                     "direct_openmetrics_ms": direct_om_ms, "prometheus_client_openmetrics_ms": reference_om_ms,
                     "gzip": levels})
    return rows


# -- the run ---------------------------------------------------------------------------------------

def run(args) -> dict:
    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "backend": "mock (SIMULATED GPUs)", "prometheus_headers": PROMETHEUS_HEADERS,
                     "gzip_level": render.GZIP_LEVEL}
    parts = args.only
    if "headers" in parts:
        figures["captured_prometheus_headers"] = prometheus_request_headers()
    if "render" in parts:
        figures["render"] = render_figures(args.repeats)
    if {"scrape", "concurrent"} & set(parts):
        node_exporter, node_url, about = start_node_exporter()
        figures["node_exporter"] = about
        try:
            for gpus in (8, 64):
                agent, url = start_agent_process(gpus)
                try:
                    time.sleep(2)  # a few ticks in the ledger
                    targets = [Target(f"wattledger, {gpus} GPUs", url, agent.pid)]
                    if node_url:
                        targets.append(Target("node_exporter", node_url, node_exporter.pid))
                    if "scrape" in parts:
                        for how, headers in (("prometheus", PROMETHEUS_HEADERS), ("plain", PLAIN_HEADERS)):
                            figures.setdefault("scrape", []).append(
                                {"gpus": gpus, "headers": how,
                                 "targets": scrape_in_turns(targets, headers, args.scrapes, args.pause)})
                    if "concurrent" in parts and gpus == 64:
                        figures["concurrent"] = [
                            {"target": t.name, **concurrent_scrapes(t, PROMETHEUS_HEADERS, 20, args.per_scraper)}
                            for t in targets]
                finally:
                    stop(agent)
        finally:
            stop(node_exporter)
    if "sampler" in parts:
        figures["sampler"] = [sampler_cpu(hz, args.sampler_seconds) for hz in (10, 100)]
    return figures


def print_figures(figures: dict) -> None:
    print(f"machine: {figures['machine']}; backend: {figures['backend']}")
    print("Prometheus' headers sent: " + "; ".join(f"{k}: {v}" for k, v in figures["prometheus_headers"].items()))
    captured = figures.get("captured_prometheus_headers")
    if isinstance(captured, dict):
        # The timeout header is the recording job's scrape_timeout (1 s there), so it is not compared.
        same = all(captured.get(k) == PROMETHEUS_HEADERS[k] for k in ("Accept", "Accept-Encoding", "User-Agent"))
        print(f"captured from {captured['prometheus']}: " + "; ".join(
            f"{k}: {captured.get(k)}" for k in PROMETHEUS_HEADERS)
            + f" ({'Accept, Accept-Encoding and User-Agent as sent here' if same else 'DIFFERENT from what is sent here'})")
    elif captured:
        print(f"captured Prometheus headers: none ({captured})")
    for row in figures.get("render", []):
        print(f"render, {row['gpus']} GPUs ({row['lines']} lines, {row['text_bytes']} B text, "
              f"{row['openmetrics_bytes']} B OpenMetrics; byte-identical to prometheus_client: "
              f"{row['identical_to_prometheus_client']}): text {row['direct_text_ms']} ms direct vs "
              f"{row['prometheus_client_text_ms']} ms prometheus_client; OpenMetrics {row['direct_openmetrics_ms']} ms "
              f"vs {row['prometheus_client_openmetrics_ms']} ms")
        print("  gzip of the OpenMetrics body: " + ", ".join(
            f"level {g['level']}: {g['ms']} ms, {g['bytes']} B ({g['ratio']}x)" for g in row["gzip"])
            + f" (the agent uses level {figures['gzip_level']})")
    if "node_exporter" in figures:
        print(f"node_exporter: {figures['node_exporter']}")
    for row in figures.get("scrape", []):
        targets = row["targets"]
        peer = targets.get("node_exporter")
        for name, t in targets.items():
            line = (f"{row['headers']:>10} headers, {name}: p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms, "
                    f"CPU {t['cpu_ms_per_scrape']} ms a scrape, {t['wire_bytes']} B on the wire, {t['body_bytes']} B, "
                    f"{t['lines']} lines, {t['scrapes']} scrapes")
            if peer and name != "node_exporter":
                def per_line(key):
                    ours, theirs = t[key] / t["lines"], peer[key] / peer["lines"]
                    return f"{ours / theirs:.2f}" if theirs > 0 else "n/a"
                line += (f"; per line vs node_exporter: p50 {per_line('p50_ms')}, p99 {per_line('p99_ms')}, "
                         f"CPU {per_line('cpu_ms_per_scrape')}")
            print(line)
    for row in figures.get("concurrent", []):
        print(f"20 concurrent scrapers, Prometheus' headers, {row['target']}: {row['scrapes']} scrapes, "
              f"{row['errors']} errors" + (f" (first: {row['first_error']})" if row["errors"] else "")
              + (f", p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms" if "p50_ms" in row else ""))
    for row in figures.get("sampler", []):
        print(f"sampler at {row['hz']:g} Hz, 8 mock GPUs: {row['cpu_percent_of_one_core']}% of one core in all "
              f"({row['cpu_us_per_tick']} us CPU per tick, {row['ticks']} ticks, {row['overruns']} overruns): "
              f"agent {row['agent_percent_of_one_core']}%, mock physics {row['mock_physics_percent_of_one_core']}%")


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=parse_parts, default=list(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--scrapes", type=int, default=200, help="measured scrapes per target and headers (200)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between scrapes (0.2: each renders anew)")
    parser.add_argument("--per-scraper", type=int, default=25, help="scrapes per concurrent scraper (25)")
    parser.add_argument("--sampler-seconds", type=float, default=30.0, help="sampler run per rate (30)")
    parser.add_argument("--repeats", type=int, default=30, help="in-process renders per figure (30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.scrapes < 1 or args.per_scraper < 1 or args.repeats < 1 or args.pause < 0 or args.sampler_seconds <= 0:
        parser.error("--scrapes, --per-scraper and --repeats must be at least 1, --pause >= 0, --sampler-seconds > 0")
    figures = run(args)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_figures(figures)


if __name__ == "__main__":
    sys.exit(main())
