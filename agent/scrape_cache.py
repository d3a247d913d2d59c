"""Shares one rendering of /metrics between scrapes that arrive together.

Collecting and formatting the exposition is most of a scrape's cost (with the direct renderer of
``exporters/render.py`` about 1-2 us a line; 8 GPUs make about 770 lines, 64 about 5,400). The figures
only change when the sampler records, so scrapes that arrive within ``max_age_seconds`` of each other
(HA Prometheus pairs, federation, a dashboard and Prometheus) are answered from one rendering, and only one scrape renders at a time. Entries expire by age alone, so
a stalled sampler still shows as a growing ``wattledger_sample_age_seconds``. At most ``max_entries``
renderings are kept (the oldest goes first), so varied requests cannot grow it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Rendered = tuple[int, list[tuple[str, str]], bytes]


class ScrapeCache:
    """Memoises ``render(key)`` for ``max_age_seconds``, rendering once for concurrent callers."""

    def __init__(self, render: Callable[[tuple], Rendered], max_age_seconds: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 16):
        self._render = render
        self._max_age = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()  # held while rendering: concurrent scrapes wait and share
        self._entries: dict[tuple, tuple[float, Rendered]] = {}
        self._max_entries = max_entries
        self.renders = 0

    def get(self, key: tuple, render: Callable[[tuple], Rendered] | None = None) -> Rendered:
        """The rendering for ``key``: shared if fresh, else made by ``render`` (default: the cache's)."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] < self._max_age:
                return entry[1]
            rendered = (render or self._render)(key)
            self.renders += 1
            # Only successful renderings are shared; keep just the fresh entries (one per key).
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self._max_age and k != key}
            if rendered[0] == 200 and self._max_age > 0:
                self._entries[key] = (now, rendered)
                while len(self._entries) > self._max_entries:
                    del self._entries[next(iter(self._entries))]  # dicts keep insertion order: oldest first
            return rendered
