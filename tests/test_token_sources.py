"""Token counters read from serving engines' Prometheus endpoints (workloads/token_sources.py)."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wattledger.workloads.token_sources import (
    CounterDeltas,
    TokenPoller,
    TokenScraper,
    TokenSourceError,
    check_url,
    fetch_url,
    parse_exposition,
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
    assert scraper.read() == EXPECTED[engine]
    assert scraper.engine.name == engine


@pytest.mark.parametrize("engine", sorted(EXPECTED))
def test_forcing_the_right_engine_reads_the_same(engine):
    assert scraper_of(fixture_text(engine), engine).read() == EXPECTED[engine]


def test_vllm_ignores_histograms_with_token_names_and_created_samples():
    # vllm:request_prompt_tokens_sum and vllm:iteration_tokens_total_* are in the fixture and must not count.
    totals = parse_exposition(fixture_text("vllm"))
    assert "vllm:request_prompt_tokens_sum" in totals and "vllm:iteration_tokens_total_sum" in totals
    assert scraper_of(fixture_text("vllm")).read()["prompt"] == EXPECTED["vllm"]["prompt"]


def test_forcing_another_engine_says_its_counters_are_missing():
    with pytest.raises(TokenSourceError, match="no TGI token counters") as caught:
        scraper_of(fixture_text("vllm"), "tgi").read()
    assert "\n" not in str(caught.value)


def test_no_known_counters_is_one_line():
    # TGI before its first finished request: gauges only, no token histograms yet.
    text = ("# TYPE tgi_queue_size gauge\ntgi_queue_size 0\n"
            "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 0\n")
    with pytest.raises(TokenSourceError, match="no known token counters") as caught:
        scraper_of(text).read()
    assert "\n" not in str(caught.value) and URL in str(caught.value)


def test_only_one_kind_exposed_counts_the_other_as_zero():
    text = "# TYPE sglang:generation_tokens_total counter\nsglang:generation_tokens_total 42\n"
    assert scraper_of(text).read() == {"prompt": 0, "generated": 42}


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
    assert scraper.read() == EXPECTED["sglang"]  # vLLM's counters appearing later do not flip it


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

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = state["body"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_reads_over_http(local_server):
    base, _ = local_server
    assert TokenScraper(base + "/metrics").read() == EXPECTED["tgi"]
    assert "# TYPE tgi_queue_size gauge" in fetch_url(base + "/metrics")


def test_http_error_is_one_line(local_server):
    base, _ = local_server
    with pytest.raises(TokenSourceError, match="HTTP 404"):
        TokenScraper(base + "/nothing").read()


# -- counter resets and the poller ----------------------------------------------------------------


def test_counter_deltas_treat_a_drop_as_a_restart():
    deltas = CounterDeltas()
    deltas.set_baseline({"prompt": 1000, "generated": 100})
    assert deltas.update({"prompt": 1300, "generated": 150}) == {"prompt": 300, "generated": 50}
    # The engine restarted: its counters began again at zero and now say 20 / 7.
    assert deltas.update({"prompt": 20, "generated": 7}) == {"prompt": 20, "generated": 7}
    assert deltas.update({"prompt": 25, "generated": 7}) == {"prompt": 5, "generated": 0}
    assert deltas.totals == {"prompt": 325, "generated": 57}


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


def test_poller_counts_from_zero_when_the_engine_comes_up_with_the_command():
    refused = TokenSourceError("cannot reach http://127.0.0.1:1/metrics: Connection refused")
    fetch = Sequence(refused, refused, vllm_text(12, 3), vllm_text(20, 9))
    errors, recoveries = [], []
    accounting = FakeAccounting()
    poller = TokenPoller(TokenScraper(URL, fetch=fetch), accounting, "command", interval_s=3600,
                         on_error=errors.append, on_recover=recoveries.append)
    poller.start()  # fails: the engine is not up yet
    assert poller.poll() is None  # fails again: reported once only
    poller.poll()
    poller.stop()
    assert errors == [str(refused)] and poller.errors == 2
    assert len(recoveries) == 1 and "readable again" in recoveries[0]
    assert accounting.total("prompt") == 20 and accounting.total("generated") == 9


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
        counts = scraper.read()
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
