"""Token counts from a serving engine's own Prometheus endpoint, for ``wattledger run --tokens-from URL``.

A command that cannot report its tokens to the agent (an unmodified vLLM, SGLang or TGI server) still
counts them: the engine's ``/metrics`` endpoint holds cumulative prompt and generated token totals. This
module reads them and feeds the differences into the agent's accounting, so the profiled command gets
joules per token like a bundled workload.

Known engines and where their totals are (each summed over every series, e.g. one per ``model_name``):

- vLLM: counters ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``;
- SGLang: counters ``sglang:prompt_tokens_total`` and ``sglang:generation_tokens_total``;
- TGI (text-generation-inference): histograms ``tgi_request_input_length`` and
  ``tgi_request_generated_tokens``, one observation per finished request, whose ``_sum`` is the total.

``engine="auto"`` picks the engine whose counters the exposition holds (the first in the order above when
several do) and keeps it once found. Every failure is a :class:`TokenSourceError` with a one-line message:
the endpoint cannot be reached, does not answer a Prometheus text exposition, or holds no known counters.

Counter semantics follow the ledger's ``MonotonicCounter``: a total that goes down means the engine
restarted, and the new total is what it counted since. A TGI total only moves when a request finishes,
so its tokens land at request ends rather than as they are generated.
"""

from __future__ import annotations

import logging
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOKEN_KINDS = ("prompt", "generated")
MAX_BODY_BYTES = 32 * 2**20  # an exposition larger than this is not a serving engine's /metrics
DEFAULT_TIMEOUT_S = 2.0


class TokenSourceError(Exception):
    """A token source that cannot be read; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Engine:
    name: str
    label: str
    # kind -> sample names that hold its cumulative total (the first one present is used)
    samples: dict[str, tuple[str, ...]]


ENGINES: dict[str, Engine] = {
    "vllm": Engine("vllm", "vLLM", {
        "prompt": ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
        "generated": ("vllm:generation_tokens_total", "vllm:generation_tokens"),
    }),
    "sglang": Engine("sglang", "SGLang", {
        "prompt": ("sglang:prompt_tokens_total", "sglang:prompt_tokens"),
        "generated": ("sglang:generation_tokens_total", "sglang:generation_tokens"),
    }),
    "tgi": Engine("tgi", "TGI", {
        "prompt": ("tgi_request_input_length_sum",),
        "generated": ("tgi_request_generated_tokens_sum",),
    }),
}
ENGINE_CHOICES = ("auto", *ENGINES)


def _known_names() -> str:
    return ", ".join(names[0] for engine in ENGINES.values() for names in engine.samples.values())


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: sum of its series}. TokenSourceError if it is not one."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                totals[sample.name] = totals.get(sample.name, 0.0) + value
    except Exception as err:  # noqa: BLE001 - the parser raises ValueError and, on odd input, others
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise TokenSourceError(f"not a Prometheus text exposition ({detail})") from None
    return totals


def detect_engine(totals: dict[str, float]) -> Engine | None:
    """The first known engine with at least one of its token totals in ``totals``."""
    for engine in ENGINES.values():
        if any(name in totals for names in engine.samples.values() for name in names):
            return engine
    return None


def token_totals(totals: dict[str, float], engine: Engine) -> dict[str, int]:
    """The engine's cumulative {"prompt", "generated"} from parsed totals (a kind not exposed: 0)."""
    out: dict[str, int] = {}
    found = False
    for kind in TOKEN_KINDS:
        name = next((n for n in engine.samples[kind] if n in totals), None)
        if name is None:
            out[kind] = 0
            continue
        found = True
        value = totals[name]
        if not math.isfinite(value) or value < 0:
            raise TokenSourceError(f"{engine.label} token total {name} is {value!r}, not a count")
        out[kind] = int(value)
    if not found:
        wanted = ", ".join(names[0] for names in engine.samples.values())
        raise TokenSourceError(f"no {engine.label} token counters ({wanted})")
    return out


def fetch_url(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """GET ``url`` and return the body as text; TokenSourceError (one line) on any failure."""
    # No proxies: the engine is normally on this host, and an http_proxy must not see its metrics.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as err:
        with err:
            raise TokenSourceError(f"{url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = getattr(err.reason, "strerror", None) or err.reason
        raise TokenSourceError(f"cannot reach {url}: {reason}") from None
    except (OSError, ValueError) as err:  # timeouts, resets, a malformed URL
        raise TokenSourceError(f"cannot read {url}: {getattr(err, 'strerror', None) or err}") from None
    if len(body) > MAX_BODY_BYTES:
        raise TokenSourceError(f"{url} answered more than {MAX_BODY_BYTES // 2**20} MiB: not a metrics endpoint")
    return body.decode("utf-8", errors="replace")


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


class TokenScraper:
    """Reads cumulative token totals from one engine endpoint.

    ``fetch(url) -> str`` gets the exposition (default: an HTTP GET); tests pass a function.
    """

    def __init__(self, url: str, engine: str = "auto", fetch: Callable[[str], str] | None = None):
        if engine not in ENGINE_CHOICES:
            raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINE_CHOICES)})")
        self.url = url
        self._fetch = fetch or fetch_url
        self._forced = engine != "auto"
        self.engine: Engine | None = ENGINES[engine] if self._forced else None

    def read(self) -> dict[str, int]:
        """{"prompt": n, "generated": n}, cumulative as the engine counts them. TokenSourceError on failure."""
        try:
            text = self._fetch(self.url)
        except TokenSourceError:
            raise
        except Exception as err:  # noqa: BLE001 - a caller's fetch function: any failure is one line
            raise TokenSourceError(f"cannot read {self.url}: {err}") from None
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif not isinstance(text, str):
            raise TokenSourceError(f"{self.url}: the fetch function returned {type(text).__name__}, not text")
        try:
            totals = parse_exposition(text)
        except TokenSourceError as err:
            raise TokenSourceError(f"{self.url}: {err}") from None
        engine = self.engine or detect_engine(totals)
        if engine is None:
            raise TokenSourceError(f"{self.url}: no known token counters (looked for {_known_names()})")
        try:
            counts = token_totals(totals, engine)
        except TokenSourceError as err:
            raise TokenSourceError(f"{self.url}: {err}") from None
        self.engine = engine  # auto: keep the engine once found, so a mixed exposition cannot flip it
        return counts


class CounterDeltas:
    """Cumulative readings -> increases, per kind; a reading below the last means a restart (counted whole).

    The first reading is the baseline (tokens counted before it are not ours) unless ``baseline_zero``.
    """

    def __init__(self) -> None:
        self._previous: dict[str, int] | None = None
        self.totals = {kind: 0 for kind in TOKEN_KINDS}

    def set_baseline(self, reading: dict[str, int] | None) -> None:
        """``reading``: counts already there before the run (not counted); None: count from zero."""
        self._previous = dict(reading) if reading is not None else {kind: 0 for kind in TOKEN_KINDS}

    def update(self, reading: dict[str, int]) -> dict[str, int]:
        previous, self._previous = self._previous, dict(reading)
        if previous is None:
            return {kind: 0 for kind in TOKEN_KINDS}
        deltas = {}
        for kind in TOKEN_KINDS:
            new, old = reading.get(kind, 0), previous.get(kind, 0)
            deltas[kind] = new - old if new >= old else new
            self.totals[kind] += deltas[kind]
        return deltas


class TokenPoller:
    """Every ``interval_s``, reads the scraper and adds the increases to ``workload`` in ``accounting``.

    ``start()`` takes a first reading: if the endpoint answers, what it has counted so far is the baseline
    (an engine already serving before the command); if not, the engine is taken to come up with the command
    and counts from zero. A failure is reported once per streak (to ``on_error`` if given, else the log) and
    retried each interval; recovery is reported too (``on_recover``). ``stop()`` takes a last reading, so
    tokens up to the end count.
    """

    def __init__(self, scraper: TokenScraper, accounting, workload: str, interval_s: float = 1.0,
                 on_error: Callable[[str], None] | None = None, on_recover: Callable[[str], None] | None = None):
        from wattledger.agent.accounting import MAX_TOKENS_PER_CALL

        self.scraper = scraper
        self._accounting = accounting
        self._workload = workload
        self._interval_s = interval_s
        self._on_error = on_error
        self._on_recover = on_recover
        self._max_per_call = MAX_TOKENS_PER_CALL
        self._deltas = CounterDeltas()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing: str | None = None  # the current failure's message; None while reads succeed
        self.errors = 0
        self.reads = 0

    @property
    def totals(self) -> dict[str, int]:
        """Tokens added to the accounting so far, by kind."""
        return dict(self._deltas.totals)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        try:
            baseline = self.scraper.read()
            self.reads += 1
        except TokenSourceError as err:
            self._failed(str(err))
            baseline = None
        self._deltas.set_baseline(baseline)
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

    def poll(self) -> dict[str, int] | None:
        """One reading; returns the increases added, or None when the read failed."""
        with self._lock:
            try:
                reading = self.scraper.read()
            except TokenSourceError as err:
                self._failed(str(err))
                return None
            self.reads += 1
            if self.failing is not None:
                message = f"token counters at {self.scraper.url} readable again"
                if self._on_recover:
                    self._on_recover(message)
                else:
                    log.info(message)
                self.failing = None
            deltas = self._deltas.update(reading)
            for kind, count in deltas.items():
                if count <= 0:
                    continue
                if count > self._max_per_call:
                    message = f"{self.scraper.url}: {count} {kind} tokens in one reading is not plausible; skipped"
                    (self._on_error or log.warning)(message)
                    continue
                self._accounting.add_tokens(self._workload, kind, count)
            return deltas

    def _failed(self, message: str) -> None:
        self.errors += 1
        if self.failing is None:  # once per failure streak
            if self._on_error:
                self._on_error(message)
            else:
                log.warning("token source: %s (retrying every %g s)", message, self._interval_s)
        self.failing = message
