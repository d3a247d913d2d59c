"""Token counters of serving engines (vLLM, SGLang, TGI), read from their Prometheus ``/metrics``, per series.

An engine's ``/metrics`` holds cumulative prompt and generated token counts, often as several series: one
per data-parallel engine, per model, per priority or custom label. This module reads them and turns
successive readings into token increases with Prometheus' counter semantics **per series** (sample name
and sorted labels), so that one series restarting or disappearing never looks like the whole engine
restarting. Nothing here imports torch or pandas: the agent can use it too. ``wattledger run
--tokens-from`` is the first user (``workloads/bench/token_sources.py`` holds that glue).

Where each engine keeps its totals, and when they move
------------------------------------------------------

- **vLLM** (V1): counters ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``, labels
  ``model_name`` and ``engine`` (one series per data-parallel engine, created at 0 when the server starts).
  They move while requests run: the front end adds each engine step's tokens as its outputs arrive
  (prompt tokens once a request's prefill is done, generated tokens as they are sampled). prometheus_client
  exports ``vllm:prompt_tokens_created`` (Unix seconds the series started) beside each series, except in
  multiprocess mode (``--api-server-count`` above 1 sets ``PROMETHEUS_MULTIPROC_DIR``) or with
  ``PROMETHEUS_DISABLE_CREATED_SERIES`` set. ``vllm:request_prompt_tokens_sum`` (a histogram of finished
  requests) and ``vllm:prompt_tokens_by_source_total`` (a split of the same tokens) are not read.
- **SGLang**: counters ``sglang:prompt_tokens_total`` and ``sglang:generation_tokens_total``, labels
  ``model_name`` and ``engine_type`` (plus ``priority`` and custom request labels when enabled, each value
  its own series). They move **only when a request finishes** (the tokenizer manager adds the request's
  whole prompt and output then), so a long request's tokens land at its end. SGLang always runs
  prometheus_client in multiprocess mode: there is **no** ``_created``.
- **TGI** (text-generation-inference, metrics-exporter-prometheus): histograms ``tgi_request_input_length``
  and ``tgi_request_generated_tokens`` without labels, one observation per request, whose ``_sum`` is the
  total. The input length is recorded when a request passes validation (before it is generated), the
  generated count **only when a request finishes successfully** (failed and cancelled requests add
  nothing). A histogram only appears after its first observation, and there is no ``_created``.

Counting rules (what a figure guarantees)
-----------------------------------------

- Each series is differenced on its own. A value below the last one is a restart of that series alone:
  what it counts now is all new. Where ``_created`` is exported, a changed ``_created`` is a restart too,
  which also catches a restart that regrew past its old value between two reads.
- A series that vanishes stops contributing; its last value is kept, so if it comes back it is compared
  with that value (a drop there is a restart, as above).
- A series seen for the first time after a successful read that did not show it began after that read
  (client libraries create a series at its first count, or at 0 when the engine starts), so all of it
  counts. If its ``_created`` says it began before that read, it is counted from its first reading and the
  figure is flagged a lower bound.
- When the first read (the baseline) failed, nothing saw the engine before: a series counts whole only
  when its ``_created`` is at or after the run started; otherwise it counts from its first successful
  reading, and if it already held tokens there the figure is flagged a lower bound (it may miss tokens
  counted between the run start and that reading, but never counts the engine's older history).
- A restart loses the tokens a series counted between its last read and the restart: at most one poll
  interval's worth. Where that could be more (the restart happened while reads were failing), or where a
  restart could have gone unseen (a series without ``_created`` not read for a while), the figure is
  flagged a lower bound too. Without the flag, the count is within one poll interval of the engine's own
  counters, and never above them.

``_created`` is compared with this host's clock (``time.time()``): the engine is normally on this host.
Every failure is an :class:`EngineReadError` with a one-line message.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

# The token kinds a serving engine's /metrics counts: an engine serves, it does not train, so this is not
# the ledger's list (agent.accounting.TOKEN_KINDS, which adds "trained"), only the part of it an engine
# can report. It lives here because a probe imports nothing above it.
TOKEN_KINDS = ("prompt", "generated")
MAX_BODY_BYTES = 32 * 2**20  # an exposition larger than this is not a serving engine's /metrics
DEFAULT_TIMEOUT_S = 2.0

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
SeriesKey = tuple[str, Labels]  # (sample name, labels): what Prometheus calls one series


class EngineReadError(Exception):
    """An engine endpoint that cannot be read; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Engine:
    name: str
    label: str
    prefix: str  # every metric the engine exports starts with it: detects it before it has counted a token
    # kind -> sample names holding its cumulative count (the first one present is used)
    samples: dict[str, tuple[str, ...]]


ENGINES: dict[str, Engine] = {
    "vllm": Engine("vllm", "vLLM", "vllm:", {
        "prompt": ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
        "generated": ("vllm:generation_tokens_total", "vllm:generation_tokens"),
    }),
    "sglang": Engine("sglang", "SGLang", "sglang:", {
        "prompt": ("sglang:prompt_tokens_total", "sglang:prompt_tokens"),
        "generated": ("sglang:generation_tokens_total", "sglang:generation_tokens"),
    }),
    "tgi": Engine("tgi", "TGI", "tgi_", {
        "prompt": ("tgi_request_input_length_sum",),
        "generated": ("tgi_request_generated_tokens_sum",),
    }),
}
ENGINE_CHOICES = ("auto", *ENGINES)


def known_counter_names() -> str:
    return ", ".join(names[0] for engine in ENGINES.values() for names in engine.samples.values())


def describe_series(key: SeriesKey) -> str:
    """A series as PromQL writes it: ``name{label="value",...}``."""
    name, labels = key
    if not labels:
        return name
    return name + "{" + ",".join(f'{label}="{value}"' for label, value in labels) + "}"


def created_sample_name(sample_name: str) -> str:
    """The ``_created`` sample prometheus_client exports beside a counter's ``_total`` or a histogram's ``_sum``."""
    for suffix in ("_total", "_sum"):
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)] + "_created"
    return sample_name + "_created"


def parse_samples(text: str) -> dict[str, dict[Labels, list[float]]]:
    """Prometheus text exposition -> {sample name: {labels: [values]}} (a repeated series: several values)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[Labels, list[float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {}).setdefault(labels, []).append(float(sample.value))
    except Exception as err:  # noqa: BLE001 - the parser raises ValueError and, on odd input, others
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise EngineReadError(f"not a Prometheus text exposition ({detail})") from None
    return samples


def detect_engine(samples: dict[str, object]) -> Engine | None:
    """The first engine with a token counter in ``samples``; else the first with any metric of its prefix."""
    for engine in ENGINES.values():
        if any(name in samples for names in engine.samples.values() for name in names):
            return engine
    for engine in ENGINES.values():
        if any(name.startswith(engine.prefix) for name in samples):
            return engine
    return None


@dataclass(frozen=True)
class SeriesValue:
    count: int  # the series' cumulative count, as the engine reports it
    created_s: float | None  # Unix seconds it (re)started, from its _created sample; None: not exported


@dataclass(frozen=True)
class EngineReading:
    """One successful read of an engine: every token series, by kind."""

    engine: Engine
    read_at_s: float  # this host's Unix time when the read began
    series: dict[str, dict[SeriesKey, SeriesValue]]  # kind -> series -> value

    def totals(self) -> dict[str, int]:
        """{"prompt": n, "generated": n}: the sum over each kind's series (a kind not exposed: 0)."""
        return {kind: sum(value.count for value in self.series.get(kind, {}).values()) for kind in TOKEN_KINDS}


def _single_value(name: str, labels: Labels, values: list[float], engine: Engine) -> float:
    if len(values) > 1:
        raise EngineReadError(f"{engine.label} series {describe_series((name, labels))} appears {len(values)} times")
    return values[0]


def _created_s(samples, name: str, labels: Labels) -> float | None:
    values = samples.get(created_sample_name(name), {}).get(labels)
    if not values or len(values) > 1:
        return None
    created = values[0]
    return created if math.isfinite(created) and created > 0 else None


def engine_reading(samples: dict[str, dict[Labels, list[float]]], engine: Engine, read_at_s: float) -> EngineReading:
    """The engine's token series from parsed samples. EngineReadError if none of its metrics is there."""
    if not any(name.startswith(engine.prefix) for name in samples):
        wanted = ", ".join(names[0] for names in engine.samples.values())
        raise EngineReadError(f"no {engine.label} token counters ({wanted})")
    series: dict[str, dict[SeriesKey, SeriesValue]] = {}
    for kind in TOKEN_KINDS:
        name = next((n for n in engine.samples[kind] if n in samples), None)
        series[kind] = {}
        if name is None:  # e.g. TGI before its first finished request: the histogram does not exist yet
            continue
        for labels, values in samples[name].items():
            value = _single_value(name, labels, values, engine)
            if not math.isfinite(value) or value < 0:
                raise EngineReadError(f"{engine.label} token total {describe_series((name, labels))} is "
                                      f"{value!r}, not a count")
            series[kind][(name, labels)] = SeriesValue(int(value), _created_s(samples, name, labels))
    return EngineReading(engine, read_at_s, series)


def fetch_url(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """GET ``url`` and return the body as text; EngineReadError (one line) on any failure."""
    # No proxies: the engine is normally on this host, and an http_proxy must not see its metrics.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as err:
        with err:
            raise EngineReadError(f"{url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = getattr(err.reason, "strerror", None) or err.reason
        raise EngineReadError(f"cannot reach {url}: {reason}") from None
    except (OSError, ValueError) as err:  # timeouts, resets, a short body, a malformed URL
        raise EngineReadError(f"cannot read {url}: {getattr(err, 'strerror', None) or err}") from None
    if len(body) > MAX_BODY_BYTES:
        raise EngineReadError(f"{url} answered more than {MAX_BODY_BYTES // 2**20} MiB: not a metrics endpoint")
    return body.decode("utf-8", errors="replace")


class EngineScraper:
    """Reads one engine endpoint into :class:`EngineReading` objects.

    ``fetch(url) -> str`` gets the exposition (default: an HTTP GET); ``clock_s() -> float`` is this host's
    Unix time in seconds (default ``time.time``), compared with the engine's ``_created`` samples. Tests pass
    both.
    """

    def __init__(self, url: str, engine: str = "auto", fetch: Callable[[str], str] | None = None,
                 clock_s: Callable[[], float] = time.time):
        if engine not in ENGINE_CHOICES:
            raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINE_CHOICES)})")
        self.url = url
        self.clock_s = clock_s
        self._fetch = fetch or fetch_url
        self.engine: Engine | None = ENGINES[engine] if engine != "auto" else None

    def read(self) -> EngineReading:
        """One reading of every token series. EngineReadError (one line) on any failure."""
        read_at_s = self.clock_s()
        text = self._fetch_text()
        try:
            samples = parse_samples(text)
        except EngineReadError as err:
            raise EngineReadError(f"{self.url}: {err}") from None
        engine = self.engine or detect_engine(samples)
        if engine is None:
            raise EngineReadError(f"{self.url}: no known token counters (looked for {known_counter_names()})")
        try:
            reading = engine_reading(samples, engine, read_at_s)
        except EngineReadError as err:
            raise EngineReadError(f"{self.url}: {err}") from None
        self.engine = engine  # auto: keep the engine once found, so a mixed exposition cannot flip it
        return reading

    def _fetch_text(self) -> str:
        try:
            text = self._fetch(self.url)
        except EngineReadError:
            raise
        except Exception as err:  # noqa: BLE001 - a caller's fetch function: any failure is one line
            raise EngineReadError(f"cannot read {self.url}: {err}") from None
        if isinstance(text, (bytes, bytearray)):
            return bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise EngineReadError(f"{self.url}: the fetch function returned {type(text).__name__}, not text")
        return text


@dataclass
class _Seen:
    count: int
    created_s: float | None
    read_index: int  # the successful read that last showed the series


@dataclass
class TokenCounters:
    """Engine readings -> token increases, per series, with the counting rules of the module docstring.

    Call :meth:`set_baseline` with the first reading (what is already counted there is not ours), or
    :meth:`baseline_failed` when it could not be read; then :meth:`update` with each later reading and
    :meth:`note_failed_read` for each read that failed. ``totals`` holds the tokens counted, ``lower_bound``
    says whether they may miss more than one poll interval's worth, ``lower_bound_reasons`` why (one line
    each, the first occurrence of each reason).
    """

    totals: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in TOKEN_KINDS})
    resets: int = 0  # series restarts seen (a drop, or a new _created)
    lower_bound_reasons: list[str] = field(default_factory=list)
    _seen: dict[tuple[str, SeriesKey], _Seen] = field(default_factory=dict)
    _reads: int = 0  # successful readings so far (the baseline included)
    _last_read_at_s: float | None = None
    _started_at_s: float | None = None  # set when the baseline failed: when the run began
    _failed_after: set[int] = field(default_factory=set)  # read indexes followed by a failed read
    _reason_codes: set[str] = field(default_factory=set)

    @property
    def lower_bound(self) -> bool:
        return bool(self.lower_bound_reasons)

    @property
    def series(self) -> int:
        """Distinct token series seen."""
        return len(self._seen)

    def set_baseline(self, reading: EngineReading) -> None:
        """The reading taken as the run starts: its counts are history, not counted."""
        self._record(reading)

    def baseline_failed(self, at_s: float) -> None:
        """The first read, at ``at_s`` (Unix seconds, this host), failed: nothing saw the engine before."""
        self._started_at_s = at_s

    def note_failed_read(self) -> None:
        self._failed_after.add(self._reads)

    def update(self, reading: EngineReading) -> dict[str, int]:
        """The tokens counted since the previous reading, by kind (also added to ``totals``)."""
        if self._reads == 0 and self._started_at_s is None:  # no baseline given: this reading is it
            self._record(reading)
            return {kind: 0 for kind in TOKEN_KINDS}
        increases = {kind: 0 for kind in TOKEN_KINDS}
        for kind, series in reading.series.items():
            for key, now in series.items():
                seen = self._seen.get((kind, key))
                increases[kind] += self._first_sight(key, now) if seen is None else self._since(key, seen, now)
        self._record(reading)
        for kind, count in increases.items():
            self.totals[kind] += count
        return increases

    def _record(self, reading: EngineReading) -> None:
        self._reads += 1
        self._last_read_at_s = reading.read_at_s
        for kind, series in reading.series.items():
            for key, now in series.items():
                self._seen[(kind, key)] = _Seen(now.count, now.created_s, self._reads)

    def _first_sight(self, key: SeriesKey, now: SeriesValue) -> int:
        """Tokens of a series never seen before that count for us."""
        name = describe_series(key)
        if self._last_read_at_s is not None:  # a successful read did not show it: it began after that read
            if now.created_s is None or now.created_s >= self._last_read_at_s:
                return now.count
            if now.count > 0:
                self._flag("created_before_read", f"{name} appeared with {now.count} tokens although its _created "
                           "is before the previous read, which did not show it: counted from its first reading")
            return 0
        # The baseline failed: only _created can tell what this series counted after the run began.
        if now.created_s is not None and now.created_s >= self._started_at_s:
            return now.count
        if now.count > 0:
            self._flag("baseline_failed", f"the first read failed and {name} already held {now.count} tokens at its "
                       "first successful reading, with no _created after the run start: counted from there")
        return 0

    def _since(self, key: SeriesKey, seen: _Seen, now: SeriesValue) -> int:
        """Tokens a known series counted since it was last seen."""
        name = describe_series(key)
        restarted = (now.count < seen.count
                     or (now.created_s is not None and seen.created_s is not None and now.created_s != seen.created_s))
        unread_after = seen.read_index in self._failed_after  # the interval after its last sighting was not read
        if restarted:
            self.resets += 1
            if unread_after:
                self._flag("reset_unread", f"{name} restarted while reads were failing: the tokens it counted "
                           "between its last read and the restart are not known")
            return now.count
        away = unread_after or seen.read_index != self._reads
        if away and now.created_s is None:
            self._flag("unseen_without_created", f"{name} went unread for a while and exports no _created: a "
                       "restart that regrew past its old value meanwhile would go unseen")
        return now.count - seen.count

    def _flag(self, code: str, message: str) -> None:
        if code not in self._reason_codes:
            self._reason_codes.add(code)
            self.lower_bound_reasons.append(message)
