"""Real Prometheus tools for tests: promtool, a throwaway Prometheus server, the agent in a subprocess.

``require_tools("promtool")`` returns the binaries' paths or ends the test: it tries ``apt-get install
prometheus`` once when the process is root, then FAILS in CI (env CI=true) and SKIPS elsewhere, with a
one-line reason. Everything listens on 127.0.0.1 only, on free ports, with temporary data directories;
every process started here is stopped by its own handle (terminate, then kill) when its context ends.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Self

from debian_packages import try_install, unavailable
import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_tools(*names: str) -> dict[str, str]:
    """Paths of the named Prometheus binaries; else fail (CI=true) or skip, with a one-line reason."""
    found = {n: shutil.which(n) for n in names}
    if not all(found.values()):
        attempt = try_install("prometheus")
        found = {n: shutil.which(n) for n in names}
        missing = [n for n, p in found.items() if not p]
        if missing:
            unavailable(f"Prometheus unavailable: {', '.join(missing)} not on PATH ({attempt})")
    return {n: str(p) for n, p in found.items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with _NO_PROXY.open(url, timeout=timeout) as resp:
        return resp.read()


def _stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, frozenset(labels.items())): value} of a text exposition (the agent's, no escapes in labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


class Agent:
    """``wattledger agent`` on the mock backend, 127.0.0.1, a free port; ``url`` is its /metrics URL."""

    def __init__(self, gpus: int = 2, mock_delay: str = "0.5", startup_timeout: float = 30.0):
        self.args = [sys.executable, "-m", "wattledger.agent.cli", "agent", "--backend", "mock",
                     "--mock-gpus", str(gpus), "--address", "127.0.0.1", "--port", "0",
                     "--mock-delay", mock_delay]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return self.url.rsplit("/metrics", 1)[0]

    @property
    def address(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.url is None and "metrics at http://" in line:
                self.url = line.split("metrics at ", 1)[1].split()[0]
                self._ready.set()
        self._ready.set()

    def __enter__(self) -> Self:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=str(REPO))
        threading.Thread(target=self._drain, daemon=True).start()
        self._ready.wait(self.startup_timeout)
        if self.url is None:
            _stop(self.proc)
            raise RuntimeError("agent did not print its metrics URL: " + " | ".join(self.lines[-5:]))
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        return parse_exposition(http_get(self.url).decode())


def render_config(target: str, interval: str = "1s", source: Path = PROMETHEUS_CONFIG) -> dict:
    """The repo's scrape configuration, pointed at ``target`` and sped up to ``interval``; rule files are
    made absolute (they are relative to the repo's config file)."""
    config = copy.deepcopy(yaml.safe_load(source.read_text()))
    config.setdefault("global", {}).update(scrape_interval=interval, evaluation_interval=interval,
                                           scrape_timeout=interval)
    config["rule_files"] = [str((source.parent / f).resolve()) for f in config.get("rule_files", [])]
    jobs = [j for j in config.get("scrape_configs", []) if j.get("job_name") == "wattledger"]
    if not jobs:
        raise ValueError(f"{source}: no scrape job named wattledger")
    job = jobs[0]
    job.update(scrape_interval=interval, scrape_timeout=interval)
    job["static_configs"] = [{"targets": [target]}]
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]
    config["scrape_configs"] = [job]
    return config


class PrometheusServer:
    """A Prometheus server on 127.0.0.1 with a temporary data directory, scraping ``target`` every
    ``interval`` with the repo's rules."""

    def __init__(self, binary: str, target: str, interval: str = "1s", startup_timeout: float = 30.0):
        self.binary = binary
        self.target = target
        self.interval = interval
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> Self:
        self._tmp = tempfile.TemporaryDirectory(prefix="wattledger-prometheus-")
        tmp = Path(self._tmp.name)
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(render_config(self.target, self.interval)))
        self.log_path = tmp / "prometheus.log"
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp),
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                http_get(self.url + "/-/ready", timeout=1.0)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        tail = self.log_tail()
        self.__exit__(None, None, None)
        raise RuntimeError(f"Prometheus did not become ready: {tail}")

    def __exit__(self, *exc) -> None:
        _stop(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text().splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def api(self, path: str, **params) -> dict | list:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            body = json.loads(http_get(url, timeout=10.0))
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            raise RuntimeError(f"{path} {params}: HTTP {err.code}: {body.get('error', body)}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; the result list (vector or matrix), [] when empty."""
        data = self.api("query", query=expr, time=None if at is None else f"{at:.3f}")
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def scrapes(self) -> int:
        """Samples of up{job="wattledger"} stored so far (one per scrape)."""
        result = self.query('count_over_time(up{job="wattledger"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0
