"""The file exporter: raw samples and spans as JSON lines, the format the replay backend plays.

``JsonlWriter`` appends records and flushes at least every ``flush_interval_seconds`` (default 2 s), and on
close, so a process killed outright loses at most that much; a clean stop loses nothing.
A write that fails (a full disk: ENOSPC) closes the file and raises once; later writes are dropped
quietly, so the agent's sink guard can switch recording off with one line while sampling goes on.
``JsonlRecorder`` is the agent's ``--record`` file: a header, then samples and spans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from wattledger.probes import records
from wattledger.probes.base import GpuInfo, GpuSample, HostSample


class JsonRecord(Protocol):
    """What the recorder writes for a span: the accounting's ``Span`` (exporters read the agent's records
    through their JSON form, so this module needs nothing from the accounting itself)."""

    def to_json(self) -> dict: ...


class JsonlWriter:
    """Writes JSON records to a new file; safe to call from several threads at once.

    ``flush_interval_seconds`` 0 flushes every write (event logs that must survive a kill).
    """

    def __init__(self, path: str | Path, flush_interval_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._flush_interval = flush_interval_seconds
        self._clock = clock
        self._last_flush = clock()
        self._closed = False

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, batch: Iterable[dict]) -> None:
        text = "".join(records.dumps(record) + "\n" for record in batch)
        with self._lock:
            if self._closed:
                return
            try:
                self._file.write(text)
                if self._clock() - self._last_flush >= self._flush_interval:
                    self._file.flush()
                    self._last_flush = self._clock()
            except OSError:
                self._abandon()
                raise

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    self._file.flush()
                except OSError:
                    self._abandon()
                    raise
                self._last_flush = self._clock()

    def close(self) -> None:
        """Flush and close; never raises for a file that could not be written (the failure was raised
        by the write that met it)."""
        with self._lock:
            if not self._closed:
                try:
                    self._file.close()
                except OSError:
                    pass  # the buffered tail could not be written either; the file is closed anyway
                self._closed = True

    def _abandon(self) -> None:
        """Close after a failed write, dropping what is still buffered. Call with the lock held."""
        self._closed = True
        try:
            self._file.close()
        except OSError:
            pass


class JsonlRecorder:
    """The recorded-sample file: a header, then GPU and host samples, spans and any extra records."""

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
        self._writer = JsonlWriter(path, flush_interval_seconds, clock)
        self.path = self._writer.path
        self._writer.write(records.header(backend, simulated, gpus, interval_seconds))
        self._writer.flush()  # a replayable file from the first moment

    def write_samples(self, gpu_samples: list[GpuSample], host_sample: HostSample | None) -> None:
        """A sampler sink: one record per GPU sample and one for the host."""
        batch = [records.gpu_sample_to_record(s) for s in gpu_samples]
        if host_sample is not None:
            batch.append(records.host_sample_to_record(host_sample))
        self._writer.write_many(batch)

    def write_records(self, extra: list[dict]) -> None:
        """Records of other types (the benchmark's token counts and the mock's ground truth)."""
        self._writer.write_many(extra)

    def write_span(self, span: JsonRecord) -> None:
        """An accounting span listener."""
        self._writer.write({"type": "span", **span.to_json()})

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
