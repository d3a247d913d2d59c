"""Token counters read from serving engines' Prometheus endpoints (workloads/bench/token_sources.py)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metrics_server import MetricsServer
from wattledger.workloads.bench.token_sources import (
    ENGINE_PROBE,
    TokenPoller,
    TokenScraper,
    TokenSourceError,
    check_url,
    fetch_url,
    parse_samples,
)

FIXTURES = Path(__file__).parent / "fixtures" / "expositions"
URL = "http://127.0.0.1:1/metrics"  # never fetched: the tests pass their own fetch function

# Totals in the fixture files, summed over every series by hand.
EXPECTED = {
    "vllm": {"prompt": 120345 + 98000, "generated": 45678 + 39012},
    "sglang": {"prompt": 8128902, "generated": 7557572},
    "tgi": {"prompt": 104592, "generated": 96311},
}


def fixture_text(engine: str) -> str:
    return (FIXTURES / f"{engine}.prom").read_text()


def scraper_of(text: str, engine: str = "auto") -> TokenScraper:
    return TokenScraper(URL, engine, fetch=lambda url: text)


class FakeAccounting:
    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []

    def add_tokens(self, name, kind, count):
        self.calls.append((name, kind, count))

    def total(self, kind):
        return sum(n for _, k, n in self.calls if k == kind)


class Sequence:
    """A fetch function answering one scripted item per call (an exception is raised), the last repeated."""

    def __init__(self, *items):
        self.items = list(items)
        self.calls = 0

    def __call__(self, url):
        item = self.items[min(self.calls, len(self.items) - 1)]
        self.calls += 1
        if isinstance(item, Exception):
            raise item
        return item


def vllm_text(prompt: int, generated: int) -> str:
    return (f"# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
            f"# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{model_name="m"}} {prompt}.0\n'
            f"# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="m"}} {generated}.0\n')


# -- the fixtures, one engine each ----------------------------------------------------------------


@pytest.mark.parametrize("engine", sorted(EXPECTED))
def test_each_engine_is_detected_and_summed_over_series(engine):
    scraper = scraper_of(fixture_text(engine))
    assert scraper.read().totals() == EXPECTED[engine]
    assert scraper.engine.name == engine


@pytest.mark.parametrize("engine", sorted(EXPECTED))
def test_forcing_the_right_engine_reads_the_same(engine):
    assert scraper_of(fixture_text(engine), engine).read().totals() == EXPECTED[engine]


def test_vllm_ignores_histograms_with_token_names_and_created_samples():
    # vllm:request_prompt_tokens_sum and vllm:iteration_tokens_total_* are in the fixture and must not count.
    samples = parse_samples(fixture_text("vllm"))
    assert "vllm:request_prompt_tokens_sum" in samples and "vllm:iteration_tokens_total_sum" in samples
    assert scraper_of(fixture_text("vllm")).read().totals()["prompt"] == EXPECTED["vllm"]["prompt"]


def test_forcing_another_engine_says_its_counters_are_missing():
    with pytest.raises(TokenSourceError, match="no TGI token counters") as caught:
        scraper_of(fixture_text("vllm"), "tgi").read()
    assert "\n" not in str(caught.value)


def test_no_known_counters_is_one_line():
    # Something that is no serving engine (node_exporter): no engine's metrics at all.
    text = ("# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.42\n"
            "# TYPE process_open_fds gauge\nprocess_open_fds 9\n")
    with pytest.raises(TokenSourceError, match="no known token counters") as caught:
        scraper_of(text).read()
    assert "\n" not in str(caught.value) and URL in str(caught.value)


def test_tgi_before_its_first_request_reads_zero_tokens():
    # metrics-exporter-prometheus shows a histogram only after its first observation: before the first
    # request TGI serves gauges only. That is a successful read of zero tokens (it used to be an error,
    # which made the baseline "fail" and lost the first request), and auto detection knows TGI by its prefix.
    scraper = scraper_of(fixture_text("tgi_before_first_request"))
    assert scraper.read().totals() == {"prompt": 0, "generated": 0}
    assert scraper.engine.name == "tgi"


def test_only_one_kind_exposed_counts_the_other_as_zero():
    text = "# TYPE sglang:generation_tokens_total counter\nsglang:generation_tokens_total 42\n"
    assert scraper_of(text).read().totals() == {"prompt": 0, "generated": 42}


def test_html_is_not_an_exposition():
    with pytest.raises(TokenSourceError, match="not a Prometheus text exposition"):
        scraper_of("<!doctype html>\n<html><body>Not Found</body></html>\n").read()


def test_a_negative_or_nan_total_is_rejected():
    for value in ("NaN", "-5", "+Inf"):
        with pytest.raises(TokenSourceError, match="not a count"):
            scraper_of(f"vllm:generation_tokens_total {value}\n").read()


def test_auto_keeps_the_engine_it_found():
    fetch = Sequence(fixture_text("sglang"), fixture_text("sglang") + fixture_text("vllm"))
    scraper = TokenScraper(URL, fetch=fetch)
    scraper.read()
    assert scraper.read().totals() == EXPECTED["sglang"]  # vLLM's counters appearing later do not flip it


def test_unknown_engine_name_is_refused():
    with pytest.raises(ValueError, match="unknown engine"):
        TokenScraper(URL, "triton")


def test_check_url():
    assert check_url("http://127.0.0.1:8000/metrics")
    for bad in ("127.0.0.1:8000/metrics", "ftp://127.0.0.1/metrics", "http://", "http://127.0.0.1:99999/metrics"):
        with pytest.raises(ValueError, match="--tokens-from"):
            check_url(bad)


# -- HTTP -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_one_line():
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    with pytest.raises(TokenSourceError, match="cannot reach") as caught:
        TokenScraper(url).read()
    assert "\n" not in str(caught.value)


@pytest.fixture
def local_server():
    """A tiny HTTP server on 127.0.0.1: /metrics serves ``state["body"]``, anything else is 404."""
    state = {"body": fixture_text("tgi")}
    with MetricsServer(lambda: state["body"]) as server:
        yield f"http://{server.address}", state


def test_reads_over_http(local_server):
    base, _ = local_server
    assert TokenScraper(base + "/metrics").read().totals() == EXPECTED["tgi"]
    assert "# TYPE tgi_queue_size gauge" in fetch_url(base + "/metrics")


def test_http_error_is_one_line(local_server):
    base, _ = local_server
    with pytest.raises(TokenSourceError, match="HTTP 404"):
        TokenScraper(base + "/nothing").read()


# -- counter resets and the poller ----------------------------------------------------------------


def test_poller_counts_from_the_baseline_and_through_a_reset():
    fetch = Sequence(vllm_text(500, 50), vllm_text(800, 90), vllm_text(30, 4), vllm_text(40, 10))
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=fetch), accounting, "command", interval_s=3600)
    poller.start()  # baseline 500 / 50: counted before the command, not ours
    poller.poll()
    poller.poll()  # reset: 30 / 4 since the restart
    poller.stop()  # the last reading: 40 / 10
    assert accounting.total("prompt") == 300 + 30 + 10
    assert accounting.total("generated") == 40 + 4 + 6
    assert {name for name, _, _ in accounting.calls} == {"command"}
    assert poller.totals == {"prompt": 340, "generated": 50}


def vllm_text_created(prompt: int, generated: int, created_s: float) -> str:
    return (vllm_text(prompt, generated)
            + "# HELP vllm:prompt_tokens_created Number of prefill tokens processed.\n"
            + f"# TYPE vllm:prompt_tokens_created gauge\nvllm:prompt_tokens_created{{model_name=\"m\"}} {created_s!r}\n"
            + "# HELP vllm:generation_tokens_created Number of generation tokens processed.\n"
            + "# TYPE vllm:generation_tokens_created gauge\n"
            + f"vllm:generation_tokens_created{{model_name=\"m\"}} {created_s!r}\n")


def test_poller_counts_from_zero_when_the_engine_comes_up_with_the_command():
    # The first reads fail (the engine is still loading); its series' _created says it began after the run
    # started, so everything it counted is ours.
    refused = TokenSourceError("cannot reach http://127.0.0.1:1/metrics: Connection refused")
    clock = FakeClock(1_750_000_000.0)
    came_up_s = clock.now_s + 5
    fetch = Sequence(refused, refused, vllm_text_created(12, 3, came_up_s), vllm_text_created(20, 9, came_up_s))
    errors, recoveries = [], []
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=fetch, clock_s=clock), accounting, "command", interval_s=3600,
                         on_error=errors.append, on_recover=recoveries.append)
    poller.start()  # fails: the engine is not up yet
    assert poller.poll() is None  # fails again: reported once only
    poller.poll()
    poller.stop()
    assert errors == [str(refused)] and poller.errors == 2
    assert len(recoveries) == 1 and "readable again" in recoveries[0]
    assert accounting.total("prompt") == 20 and accounting.total("generated") == 9
    assert poller.counters.lower_bound is False


def test_a_failed_first_read_without_created_counts_from_the_first_success_and_says_lower_bound():
    # The same without _created (multiprocess mode): 12 / 3 may be history, so they are not counted, and
    # the figure says it is a lower bound. (It used to count from zero: a whole history, +15,903%.)
    refused = TokenSourceError("cannot reach http://127.0.0.1:1/metrics: Connection refused")
    fetch = Sequence(refused, vllm_text(12, 3), vllm_text(20, 9))
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=fetch), accounting, "command", interval_s=3600,
                         on_error=lambda m: None, on_recover=lambda m: None)
    poller.start()
    poller.poll()
    poller.stop()
    assert accounting.total("prompt") == 8 and accounting.total("generated") == 6
    summary = poller.summary()
    assert summary["lower_bound"] is True and "first read failed" in summary["lower_bound_reasons"][0]
    assert all("\n" not in reason for reason in summary["lower_bound_reasons"])


def test_poller_thread_polls_on_its_own():
    values = iter(range(0, 10_000, 10))
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=lambda url: vllm_text(next(values), 0)), accounting, "command",
                         interval_s=0.01)
    poller.start()
    deadline = threading.Event()
    deadline.wait(0.3)
    poller.stop()
    assert poller.reads > 5
    assert accounting.total("prompt") == 10 * (poller.reads - 1)


def test_implausible_jump_is_skipped_not_raised():
    fetch = Sequence(vllm_text(0, 0), vllm_text(0, 10**12))
    errors = []
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=fetch), accounting, "command", interval_s=3600,
                         on_error=errors.append)
    poller.start()
    poller.poll()
    assert accounting.calls == [] and "not plausible" in errors[0]


# -- a simulated engine: every case of per-series counting, against the engine's own truth ----------


class FakeClock:
    """This host's Unix time, moved by the test."""

    def __init__(self, now_s: float = 1_750_000_000.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class FakeSeries:
    labels: dict[str, str]
    created_s: float
    prompt: int = 0
    generated: int = 0
    requests: int = 0  # TGI's histogram _count
    visible: bool = True
    window_tokens: int = 0  # served since a successful read last showed it
    restarted_unseen: bool = False  # restarted since a successful read last showed it


FLAVOURS = ("vllm", "vllm_mp", "sglang", "tgi")
MULTI_SERIES = ("vllm", "vllm_mp", "sglang")


class FakeEngine:
    """A serving engine whose every series the test drives, serving /metrics as the real engine formats it.

    Flavours: ``vllm`` (one series per data-parallel engine, with ``_created``), ``vllm_mp`` (vLLM with
    ``--api-server-count 2``: multiprocess mode, no ``_created``), ``sglang`` (one series per priority, no
    ``_created``; counts land when a request finishes), ``tgi`` (one unlabelled histogram per kind, shown only
    once a request was observed since the start, no ``_created``). ``truth`` is what the engine counted after
    the test began; ``tolerance`` the tokens a restart could hide from any reader (those a restarted series
    served between the reads that last showed it before and first after the restart).
    """

    def __init__(self, flavour: str, clock: FakeClock, series: int = 2, history: int = 0, up: bool = True):
        self.flavour, self.clock, self.up = flavour, clock, up
        self.series: list[FakeSeries] = []
        for _ in range(1 if flavour == "tgi" else series):
            index = self.add_series(created_s=clock() - 3600)
            self.series[index].prompt, self.series[index].generated = history, history // 3
            self.series[index].requests = history // 500
            self.series[index].visible = flavour != "tgi" or history > 0
        self.truth = {"prompt": 0, "generated": 0}
        self.tolerance = {"prompt": 0, "generated": 0}
        self.served_before_first_read = {"prompt": 0, "generated": 0}
        self._read_once = False

    def _labels(self, index: int) -> dict[str, str]:
        if self.flavour in ("vllm", "vllm_mp"):
            return {"engine": str(index), "model_name": "meta-llama/Llama-3.1-8B-Instruct"}
        if self.flavour == "sglang":
            return {"engine_type": "unified", "model_name": "Qwen/Qwen2.5-7B-Instruct", "priority": str(index)}
        return {}

    def add_series(self, created_s: float | None = None) -> int:
        """A new series, at zero (a DP engine, model or priority the engine had not counted yet)."""
        labels = self._labels(len(self.series))
        created = self.clock() if created_s is None else created_s
        self.series.append(FakeSeries(labels, created, visible=self.flavour != "tgi"))
        return len(self.series) - 1

    def serve(self, index: int, prompt: int, generated: int) -> None:
        """Requests on series ``index`` (SGLang, TGI: finished ones, which is when they count)."""
        series = self.series[index]
        series.prompt += prompt
        series.generated += generated
        series.requests += 1
        series.visible = True  # TGI: the histograms exist once they observed a request
        series.window_tokens += prompt + generated
        for kind, n in (("prompt", prompt), ("generated", generated)):
            self.truth[kind] += n
            if not self._read_once:
                self.served_before_first_read[kind] += n

    def restart(self, index: int) -> None:
        """Series ``index`` starts again from zero (a DP engine restarted; for TGI, the whole server)."""
        series = self.series[index]
        series.prompt = series.generated = series.requests = 0
        series.created_s = self.clock()
        series.visible = self.flavour != "tgi"
        series.restarted_unseen = True

    def vanish(self, index: int) -> None:
        self.series[index].visible = False

    def fetch(self, url: str) -> str:
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        self._read_once = True
        for series in self.series:
            if series.visible:
                if series.restarted_unseen:
                    share = series.window_tokens
                    self.tolerance["prompt"] += share
                    self.tolerance["generated"] += share
                series.window_tokens, series.restarted_unseen = 0, False
        return self.render()

    def render(self) -> str:
        shown = [s for s in self.series if s.visible]
        if self.flavour == "tgi":
            return self._render_tgi(shown)
        prefix = "vllm:" if self.flavour.startswith("vllm") else "sglang:"
        lines = [f"# HELP {prefix}num_requests_running Number of requests in model execution batches.",
                 f"# TYPE {prefix}num_requests_running gauge"]
        lines += [f"{prefix}num_requests_running{_labels(s.labels)} 3.0" for s in shown]
        for kind, help_ in (("prompt", "Number of prefill tokens processed."),
                            ("generation", "Number of generation tokens processed.")):
            attr = "prompt" if kind == "prompt" else "generated"
            lines += [f"# HELP {prefix}{kind}_tokens_total {help_}", f"# TYPE {prefix}{kind}_tokens_total counter"]
            lines += [f"{prefix}{kind}_tokens_total{_labels(s.labels)} {float(getattr(s, attr))!r}" for s in shown]
            if self.flavour == "vllm":  # prometheus_client's own _created family
                lines += [f"# HELP {prefix}{kind}_tokens_created {help_}",
                          f"# TYPE {prefix}{kind}_tokens_created gauge"]
                lines += [f"{prefix}{kind}_tokens_created{_labels(s.labels)} {s.created_s!r}" for s in shown]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _render_tgi(shown: list[FakeSeries]) -> str:
        lines = ["# HELP tgi_queue_size Current queue size", "# TYPE tgi_queue_size gauge", "tgi_queue_size 0", ""]
        for series in shown:
            for name, help_, total in (("tgi_request_input_length", "Input token length per request", series.prompt),
                                       ("tgi_request_generated_tokens", "Generated tokens per request",
                                        series.generated)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram",
                          f'{name}_bucket{{le="2048"}} {series.requests}',
                          f'{name}_bucket{{le="+Inf"}} {series.requests}',
                          f"{name}_sum {total}", f"{name}_count {series.requests}", ""]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


def poll_engine(engine: FakeEngine, clock: FakeClock, steps: int, step) -> tuple[TokenPoller, FakeAccounting]:
    """start(), then ``steps`` times: one second passes, ``step(i)`` drives the engine, one poll; stop()."""
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=engine.fetch, clock_s=clock), accounting, "command",
                         interval_s=3600, on_error=lambda m: None, on_recover=lambda m: None)
    poller.start()
    for i in range(steps):
        clock.advance(1.0)
        step(i)
        poller.poll()
    clock.advance(1.0)
    poller.stop()
    return poller, accounting


def assert_within_one_poll(engine: FakeEngine, accounting: FakeAccounting, one_poll: dict[str, int]) -> None:
    for kind in ("prompt", "generated"):
        counted, truth = accounting.total(kind), engine.truth[kind]
        assert truth - one_poll[kind] <= counted <= truth, (kind, counted, truth)


PER_POLL = {"prompt": 300 + 250, "generated": 100 + 80}  # what both series serve in one poll interval


def steady(engine: FakeEngine, index: int = 0) -> None:
    engine.serve(index, 300, 100)
    if len(engine.series) > 1 and engine.series[1].visible:
        engine.serve(1, 250, 80)


@pytest.mark.parametrize("history", [0, 1_000_000])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_series_restarting_is_a_restart_of_that_series_alone(flavour, history):
    # vLLM: one of two data-parallel engines restarts; SGLang: one priority's series; TGI: the whole server
    # (its histograms vanish until a request finishes). Measured before: +20%, and 1,026,136 tokens for
    # 21,908 real ones after 1M tokens of history.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=history)
    victim = 1 if flavour in MULTI_SERIES else 0

    def step(i):
        steady(engine)
        if i == 5:
            engine.restart(victim)

    poller, accounting = poll_engine(engine, clock, 20, step)
    assert_within_one_poll(engine, accounting, PER_POLL)
    assert poller.counters.resets >= 1 and poller.counters.lower_bound is False


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_vanished_series_stops_contributing(flavour):
    # One DP engine's (or priority's) series leaves the exposition while the other goes on; for TGI the
    # histograms vanish (a restart) and come back with the next finished request. Measured before: +28-32%.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=50_000)
    victim = 1 if flavour in MULTI_SERIES else 0

    def step(i):
        if flavour == "tgi":
            if i == 4:
                engine.restart(0)
            if not 4 <= i < 8:
                engine.serve(0, 300, 100)
            return
        steady(engine)
        if i == 4:
            engine.vanish(victim)

    poller, accounting = poll_engine(engine, clock, 15, step)
    assert_within_one_poll(engine, accounting, PER_POLL)
    assert poller.counters.lower_bound is False


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_new_series_counts_from_its_start(flavour):
    # A DP engine, model or priority that had counted nothing at the baseline appears mid-run; for TGI,
    # the histograms appear with the first finished request after the baseline.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, series=1, history=0)
    engine.series[0].prompt = engine.series[0].generated = 0

    def step(i):
        if flavour != "tgi":
            engine.serve(0, 300, 100)
        if i == 3 and flavour != "tgi":
            engine.add_series()
        if i >= 3:
            engine.serve(len(engine.series) - 1, 250, 80)

    poller, accounting = poll_engine(engine, clock, 10, step)
    assert accounting.total("prompt") == engine.truth["prompt"]
    assert accounting.total("generated") == engine.truth["generated"]
    assert poller.counters.lower_bound is False


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_restart_that_regrows_past_the_old_value_between_two_reads(flavour):
    # Series 0 held 500 prompt tokens, restarted and counted 800 before the next read: its value rose.
    # Only _created (vLLM) can see that restart; without it the miss is within one poll interval.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=0)
    engine.series[0].visible = True

    def step(i):
        if i == 0:
            engine.serve(0, 500, 200)
        if i == 3:
            engine.restart(0)
            engine.serve(0, 800, 300)

    poller, accounting = poll_engine(engine, clock, 6, step)
    if flavour == "vllm":
        assert accounting.total("prompt") == engine.truth["prompt"] == 1300
        assert accounting.total("generated") == engine.truth["generated"] == 500
        assert poller.counters.resets == 2  # its prompt and its generated series, seen through _created
    else:
        assert_within_one_poll(engine, accounting, {"prompt": 800, "generated": 300})


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_failed_first_read_never_counts_the_engines_history(flavour):
    # The engine has served 1M tokens; the run's first read fails (a timeout), the next ones succeed.
    # Measured before: the whole history counted, +15,903%.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=1_000_000, up=False)

    def step(i):
        steady(engine)
        if i == 1:
            engine.up = True

    poller, accounting = poll_engine(engine, clock, 10, step)
    for kind in ("prompt", "generated"):
        counted, truth = accounting.total(kind), engine.truth[kind]
        assert truth - engine.served_before_first_read[kind] <= counted <= truth, (kind, counted, truth)
    assert poller.counters.lower_bound is True  # what came before the first good read cannot be known
    assert "first read failed" in poller.summary()["lower_bound_reasons"][0]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_engine_coming_up_with_the_command_counts_everything(flavour):
    # Reads fail while the engine loads; it comes up (vLLM: series _created after the run start; the
    # others: at zero, since no request has finished yet), then serves.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, series=2, history=0, up=False)

    def step(i):
        if i == 2:
            for series in engine.series:
                series.created_s = clock()
            engine.up = True
        if i >= 3:
            steady(engine)

    poller, accounting = poll_engine(engine, clock, 10, step)
    assert accounting.total("prompt") == engine.truth["prompt"] > 0
    assert accounting.total("generated") == engine.truth["generated"]
    assert poller.counters.lower_bound is False


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reads_failing_for_a_while_lose_nothing_and_say_what_they_could_miss(flavour):
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=10_000)

    def step(i):
        steady(engine)
        engine.up = not 3 <= i < 6

    poller, accounting = poll_engine(engine, clock, 10, step)
    assert accounting.total("prompt") == engine.truth["prompt"]
    # Without _created a restart that regrew past its old value during the gap would have gone unseen.
    assert poller.counters.lower_bound is (flavour != "vllm")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_restart_while_reads_fail_is_a_lower_bound(flavour):
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=10_000)
    victim = 1 if flavour in MULTI_SERIES else 0

    def step(i):
        steady(engine)
        engine.up = not 3 <= i < 6
        if i == 4:
            engine.restart(victim)

    poller, accounting = poll_engine(engine, clock, 10, step)
    for kind in ("prompt", "generated"):
        assert accounting.total(kind) <= engine.truth[kind]
    assert poller.counters.lower_bound is True


OPERATIONS = st.lists(st.tuples(st.sampled_from(["serve", "restart", "vanish", "add", "fail"]),
                                st.integers(0, 3), st.integers(0, 5000), st.integers(0, 2000)), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FLAVOURS), st.integers(0, 2_000_000), OPERATIONS)
def test_property_never_above_truth_and_within_the_restarts_unless_flagged(flavour, history, operations):
    # Any sequence of requests, series restarts, vanishings, new series and failed reads: the count is
    # never above what the engine counted, and unless flagged a lower bound it misses only what restarted
    # series counted between the reads around their restarts.
    clock = FakeClock()
    engine = FakeEngine(flavour, clock, history=history)

    def step(i):
        op, which, prompt, generated = operations[i]
        index = which % len(engine.series)
        engine.up = op != "fail"
        if op == "serve":
            engine.serve(index, prompt, generated)
        elif op == "restart":
            engine.restart(index)
        elif op == "vanish":
            engine.vanish(index)
        elif op == "add" and flavour != "tgi":
            engine.add_series()

    poller, accounting = poll_engine(engine, clock, len(operations), step)
    for kind in ("prompt", "generated"):
        counted, truth = accounting.total(kind), engine.truth[kind]
        assert counted <= truth
        if not poller.counters.lower_bound:
            assert counted >= truth - engine.tolerance[kind], (kind, counted, truth, poller.summary())


def test_the_fixtures_read_per_series_with_created_where_exported():
    reading = scraper_of(fixture_text("vllm")).read()
    prompt = reading.series["prompt"]
    assert len(prompt) == 2 and all(value.created_s and value.created_s > 1.7e9 for value in prompt.values())
    for name in ("vllm_multiprocess", "sglang", "sglang_priority", "tgi"):
        reading = scraper_of(fixture_text(name)).read()
        assert all(value.created_s is None for kind in reading.series.values() for value in kind.values())
    assert len(scraper_of(fixture_text("vllm_multiprocess")).read().series["generated"]) == 4
    assert scraper_of(fixture_text("sglang_priority")).read().totals() == {
        "prompt": 1044200 + 388120 + 77102, "generated": 512004 + 201337 + 40960}


def test_a_repeated_token_series_is_refused():
    text = vllm_text(5, 1) + 'vllm:generation_tokens_total{model_name="m"} 9.0\n'
    with pytest.raises(TokenSourceError, match="appears 2 times"):
        scraper_of(text).read()


# -- arbitrary input ------------------------------------------------------------------------------

EXPOSITION_ALPHABET = st.sampled_from(list("abc_:{}=\",.# \t\n0123456789eE+-") + [
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "sglang:generation_tokens_total",
    "tgi_request_input_length_sum", "tgi_request_generated_tokens", "# TYPE ", "# HELP ", " counter",
    " histogram", "_bucket", "_sum", "le=\"+Inf\"", "NaN", "Inf", "\\", "\x00", "\u00e9", "\ufffd"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=400), st.lists(EXPOSITION_ALPHABET, max_size=60).map("".join)))
def test_arbitrary_text_raises_only_the_modules_one_line_error(text):
    scraper = scraper_of(text)
    try:
        counts = scraper.read().totals()
    except TokenSourceError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert set(counts) == {"prompt", "generated"}
        assert all(isinstance(n, int) and n >= 0 for n in counts.values())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_from_the_fetch_function_raise_only_the_modules_error(body):
    try:
        TokenScraper(URL, fetch=lambda url: body).read()
    except TokenSourceError as err:
        assert "\n" not in str(err)


# -- the poller's reads as probe "engine" in the self-metrics --------------------------------------------


def test_poller_tells_each_read_to_on_read_with_its_duration():
    refused = TokenSourceError("cannot reach http://127.0.0.1:1/metrics: Connection refused")
    clock = FakeClock()
    answers = Sequence(refused, vllm_text(5, 1), vllm_text(9, 2))

    def slow_fetch(url):  # each read takes 0.25 s on the scraper's clock
        clock.advance(0.25)
        return answers(url)

    reads = []
    poller = TokenPoller(TokenScraper(URL, fetch=slow_fetch, clock_s=clock), FakeAccounting(), "command",
                         interval_s=3600, on_error=lambda m: None, on_recover=lambda m: None,
                         on_read=lambda *read: reads.append(read))
    poller.start()
    poller.poll()
    poller.stop()
    assert reads == [(False, pytest.approx(0.25), str(refused)), (True, pytest.approx(0.25), None),
                     (True, pytest.approx(0.25), None)]


def test_engine_reads_show_as_a_probe_of_the_agent():
    from wattledger.agent.config import AgentConfig
    from wattledger.agent.daemon import Agent

    agent = Agent(AgentConfig(backend="mock", mock_gpus=1, mock_delay_seconds=0.0), serve_http=False)
    try:
        fetch = Sequence(vllm_text(5, 1), TokenSourceError("cannot reach the engine: timed out"))
        poller = TokenPoller(TokenScraper(URL, fetch=fetch), agent.accounting_api(), "command", interval_s=3600,
                             on_error=lambda m: None, on_read=lambda *read: agent.record_probe(ENGINE_PROBE, *read))
        poller.start()
        assert agent.registry.get_sample_value("wattledger_probe_success", {"probe": "engine"}) == 1.0
        poller.poll()
        assert agent.registry.get_sample_value("wattledger_probe_success", {"probe": "engine"}) == 0.0
        assert agent.registry.get_sample_value("wattledger_probe_duration_seconds", {"probe": "engine"}) >= 0
    finally:
        agent.stop()
