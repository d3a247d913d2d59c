"""The file exporter: raw samples and spans as JSON lines, the format the replay backend plays.

Records are buffered and flushed at least every ``flush_interval_seconds`` (default 2 s), and on
close, so an agent killed outright loses at most that much; a clean stop loses nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from wattledger.agent.accounting import Span
from wattledger.probes import records
from wattledger.probes.base import GpuInfo, GpuSample, HostSample


class JsonlRecorder:
    """Appends records to a file; safe to call from the sampler thread and span listeners at once."""

    def __init__(
        self,
        path: str | Path,
        backend: str | None,
        simulated: bool,
        gpus: list[GpuInfo],
        interval_seconds: float,
        flush_interval_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._clock = clock
        self._flush_interval = flush_interval_seconds
        self._buffer: list[str] = [records.dumps(records.header(backend, simulated, gpus, interval_seconds))]
        self._last_flush = float("-inf")
        self._closed = False
        self._flush_locked()

    def write_samples(self, gpu_samples: list[GpuSample], host_sample: HostSample | None) -> None:
        """A sampler sink: one record per GPU sample and one for the host."""
        lines = [records.dumps(records.gpu_sample_to_record(s)) for s in gpu_samples]
        if host_sample is not None:
            lines.append(records.dumps(records.host_sample_to_record(host_sample)))
        self._append(lines)

    def write_records(self, extra: list[dict]) -> None:
        """Records of other types (the benchmark's token counts and the mock's ground truth)."""
        self._append([records.dumps(record) for record in extra])

    def write_span(self, span: Span) -> None:
        """An accounting span listener."""
        self._append([records.dumps({"type": "span", **span.to_json()})])

    def _append(self, lines: list[str]) -> None:
        with self._lock:
            if self._closed:
                return
            self._buffer.extend(lines)
            if self._clock() - self._last_flush >= self._flush_interval:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._buffer:
            self._file.write("\n".join(self._buffer) + "\n")
            self._buffer.clear()
        self._file.flush()
        self._last_flush = self._clock()

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush_locked()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._file.close()
            self._closed = True
