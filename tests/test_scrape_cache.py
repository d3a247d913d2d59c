"""Scrapes that arrive together share one rendering; the cache never hides a stalled sampler."""

from __future__ import annotations

import threading
import time

from fakes import FakeClock
from wattledger.agent.scrape_cache import ScrapeCache


def test_scrapes_within_the_max_age_share_one_rendering_per_key():
    clock = FakeClock()
    rendered = []
    cache = ScrapeCache(lambda key: (rendered.append(key) or (200, [], repr(key).encode())), 0.1, clock.seconds)
    assert cache.get(("text",)) == cache.get(("text",))
    cache.get(("openmetrics",))
    assert rendered == [("text",), ("openmetrics",)]
    clock.advance(0.1)  # expired by age alone: a stalled sampler's sample age keeps growing
    cache.get(("text",))
    assert rendered == [("text",), ("openmetrics",), ("text",)]


def test_failed_renderings_are_not_shared():
    cache = ScrapeCache(lambda key: (500, [], b"boom"), 10.0)
    cache.get(("text",))
    cache.get(("text",))
    assert cache.renders == 2


def test_concurrent_scrapes_wait_for_one_rendering():
    def slow_render(key):
        time.sleep(0.2)
        return 200, [], b"x"

    cache = ScrapeCache(slow_render, 5.0)
    threads = [threading.Thread(target=cache.get, args=(("text",),)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.renders == 1


def test_zero_max_age_renders_every_time():
    cache = ScrapeCache(lambda key: (200, [], b"x"), 0.0)
    for _ in range(3):
        cache.get(("text",))
    assert cache.renders == 3


def test_twenty_concurrent_prometheus_scrapes_of_a_64_gpu_node_all_get_the_whole_exposition():
    """A fleet-size node (64 GPUs, the mock's most) under 20 scrapers at once, over real HTTP with the
    headers Prometheus sends: every scrape answers 200 with a whole, parseable OpenMetrics body."""
    import gzip
    import http.client

    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from fakes import run_ticks
    from wattledger.agent.accounting import Accounting
    from wattledger.agent.http_api import make_app, serve
    from wattledger.agent.ledger import Ledger
    from wattledger.agent.sampler import Sampler
    from wattledger.exporters.prometheus import make_registry
    from wattledger.probes.mock import MockGpuBackend

    clock = FakeClock()
    accounting = Accounting(list(range(64)), clock_ns=clock.ns)
    ledger = Ledger(accounting, clock_ns=clock.ns)
    run_ticks(Sampler(ledger, MockGpuBackend(64, clock_ns=clock.ns), None, 0.1, clock=clock.seconds), clock, 1.0)
    app = make_app(accounting, make_registry(ledger, "0.0.0-test"), lambda: True, scrape_cache_seconds=0.1)
    headers = {"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                         "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
               "Accept-Encoding": "gzip", "X-Prometheus-Scrape-Timeout-Seconds": "10"}
    answers, failures = [], []

    def scraper(port: int) -> None:
        for _ in range(5):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", "/metrics", headers=headers)
                response = connection.getresponse()
                answers.append((response.status, response.getheader("Content-Encoding"), response.read()))
                connection.close()
            except Exception as exc:  # collected: the assertion below names it
                failures.append(repr(exc))

    with serve(app, "127.0.0.1", 0) as server:
        threads = [threading.Thread(target=scraper, args=(server.port,)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert {(status, encoding) for status, encoding, _ in answers} == {(200, "gzip")} and len(answers) == 100
    bodies = {gzip.decompress(body) for _, _, body in answers}
    assert len(bodies) == 1  # the ledger's clock stands still: every rendering is the same
    families = {f.name: f for f in text_string_to_metric_families(bodies.pop().decode())}
    assert len(families["wattledger_gpu_up"].samples) == 64
    assert len(families["wattledger_gpu_utilization_ratio"].samples) > 64 * 9
