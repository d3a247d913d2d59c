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
