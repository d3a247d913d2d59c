"""Token counts from a serving engine's own Prometheus endpoint, for ``wattledger run --tokens-from URL``.

A command that cannot report its tokens to the agent (an unmodified vLLM, SGLang or TGI server) still
counts them: the engine's ``/metrics`` endpoint holds cumulative prompt and generated token counts. The
reader in ``probes/engine_counters.py`` (shared with the agent, so free of torch and pandas) reads them per
series and turns them into increases with Prometheus' counter semantics; its docstring says where each
engine keeps its counts, when they move (SGLang's and TGI's generated tokens only when a request
finishes), and what a figure guarantees. This module is the ``run`` glue: a poller that feeds the
increases into the agent's accounting, so the profiled command gets joules per token like a bundled
workload.

``engine="auto"`` picks the engine whose counters the exposition holds (else whose metric prefix it
holds: a TGI that has not finished a request yet) and keeps it once found. Every failure is a
:class:`TokenSourceError` with a one-line message.

When the first read fails, the engine is read again every interval; what a series already held at its
first successful reading counts only where its ``_created`` shows it began after the run started (vLLM).
Otherwise it is not counted and, if it was not zero, the figure is flagged a lower bound
(``TokenPoller.counters.lower_bound``), which ``wattledger run`` writes in its summary.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from wattledger.probes.engine_counters import (
    DEFAULT_TIMEOUT_S,
    ENGINE_CHOICES,
    ENGINES,
    MAX_BODY_BYTES,
    TOKEN_KINDS,
    Engine,
    EngineReading,
    EngineScraper,
    TokenCounters,
    detect_engine,
    fetch_url,
    parse_samples,
)
from wattledger.probes.engine_counters import EngineReadError as TokenSourceError

__all__ = ["DEFAULT_TIMEOUT_S", "ENGINE_CHOICES", "ENGINES", "ENGINE_PROBE", "MAX_BODY_BYTES", "TOKEN_KINDS", "Engine",
           "EngineReading", "TokenCounters", "TokenPoller", "TokenScraper", "TokenSourceError", "check_url",
           "detect_engine", "fetch_url", "parse_samples"]

log = logging.getLogger(__name__)

TokenScraper = EngineScraper  # reads one endpoint: ``read()`` returns an EngineReading (``.totals()`` sums it)
ENGINE_PROBE = "engine"  # the poller's reads in the probe self-metrics (see TokenPoller's on_read)


def check_url(url: str) -> str:
    """The URL if it is an http(s) URL; ValueError (one line) otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise ValueError(f"--tokens-from: not a URL: {url!r} ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--tokens-from: expected an http:// URL of a /metrics endpoint, got {url!r}")
    return url


class TokenPoller:
    """Every ``interval_s``, reads the scraper and adds the increases to ``workload`` in ``accounting`` (the
    agent's ``accounting_api()``, or anything with its ``add_tokens(workload, kind, count)``).

    ``start()`` takes a first reading: if the endpoint answers, what it has counted so far is the baseline
    (an engine already serving before the command); if not, the run's start time is remembered and series
    count from zero only where their ``_created`` is later (see ``probes/engine_counters.py``). A failure is
    reported once per streak (to ``on_error`` if given, else the log) and retried each interval; recovery is
    reported too (``on_recover``). ``stop()`` takes a last reading, so tokens up to the end count.

    ``on_read(success, duration_seconds, error)`` hears every reading, for the probe self-metrics: pass
    ``lambda *read: agent.record_probe(ENGINE_PROBE, *read)`` and the reads show as
    ``wattledger_probe_success{probe="engine"}`` (durations on the scraper's clock).
    """

    def __init__(self, scraper: EngineScraper, accounting, workload: str, interval_s: float = 1.0,
                 on_error: Callable[[str], None] | None = None, on_recover: Callable[[str], None] | None = None,
                 on_read: Callable[[bool, float, str | None], None] | None = None):
        from wattledger.agent.daemon import MAX_TOKENS_PER_CALL

        self.scraper = scraper
        self._accounting = accounting
        self._workload = workload
        self._interval_s = interval_s
        self._on_error = on_error
        self._on_recover = on_recover
        self._on_read = on_read
        self._max_per_call = MAX_TOKENS_PER_CALL
        self.counters = TokenCounters()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing: str | None = None  # the current failure's message; None while reads succeed
        self.errors = 0
        self.reads = 0
        self.skipped = {kind: 0 for kind in TOKEN_KINDS}  # implausible increases not added

    @property
    def totals(self) -> dict[str, int]:
        """Tokens added to the accounting so far, by kind."""
        return {kind: self.counters.totals[kind] - self.skipped[kind] for kind in TOKEN_KINDS}

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        with self._lock:
            attempted_at_s = self.scraper.clock_s()
            try:
                baseline = self._read()
            except TokenSourceError as err:
                self._failed(str(err))
                self.counters.baseline_failed(attempted_at_s)
            else:
                self.reads += 1
                self.counters.set_baseline(baseline)
        self._thread = threading.Thread(target=self._run, name="token-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()

    def summary(self) -> dict:
        """What ``wattledger run`` writes as the phase's ``token_source``."""
        engine = self.scraper.engine
        return {"url": self.scraper.url, "engine": engine.name if engine else None, "tokens": self.totals,
                "reads": self.reads, "errors": self.errors, "last_error": self.failing,
                "series": self.counters.series, "resets": self.counters.resets,
                "lower_bound": self.counters.lower_bound,
                "lower_bound_reasons": list(self.counters.lower_bound_reasons)}

    def poll(self) -> dict[str, int] | None:
        """One reading; returns the increases counted, or None when the read failed."""
        with self._lock:
            try:
                reading = self._read()
            except TokenSourceError as err:
                self._failed(str(err))
                self.counters.note_failed_read()
                return None
            self.reads += 1
            if self.failing is not None:
                message = f"token counters at {self.scraper.url} readable again"
                if self._on_recover:
                    self._on_recover(message)
                else:
                    log.info(message)
                self.failing = None
            increases = self.counters.update(reading)
            for kind, count in increases.items():
                self._add(kind, count)
            return increases

    def _read(self) -> EngineReading:
        """``scraper.read()``, its outcome told to ``on_read``."""
        if self._on_read is None:
            return self.scraper.read()
        started_s = self.scraper.clock_s()
        try:
            reading = self.scraper.read()
        except TokenSourceError as err:
            self._on_read(False, self.scraper.clock_s() - started_s, str(err))
            raise
        self._on_read(True, self.scraper.clock_s() - started_s, None)
        return reading

    def _add(self, kind: str, count: int) -> None:
        if count <= 0:
            return
        if count > self._max_per_call:
            self.skipped[kind] += count
            message = f"{self.scraper.url}: {count} {kind} tokens in one reading is not plausible; skipped"
            (self._on_error or log.warning)(message)
            return
        self._accounting.add_tokens(self._workload, kind, count)

    def _failed(self, message: str) -> None:
        self.errors += 1
        if self.failing is None:  # once per failure streak
            if self._on_error:
                self._on_error(message)
            else:
                log.warning("token source: %s (retrying every %g s)", message, self._interval_s)
        self.failing = message
