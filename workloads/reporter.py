"""How a workload reports itself to the agent's accounting API.

A ``Reporter`` is what every workload talks to: start and stop on its GPUs, token counts by kind, spans of
activity with monotonic timestamps, declared GPU memory. It forwards to a sink: nothing (the workload runs
alone), the agent's accounting API in the same process (``Agent.accounting_api()``), or a running agent
over HTTP (batched, flushed in the background, so the hot loop never waits on the network). It also keeps
its own totals and, if asked, the spans, so a workload's summary and the tests read the same figures the
agent saw.

Span timing is taken from the CPU clock at points where the loop already waits for the device (reading
sampled tokens back, a loss value, a finished copy), so reporting adds no device synchronisation.

How soon the agent hears of a span matters on CPU-only machines: the mock GPU simulates time t once t is
its lag old (``--mock-delay``, 1 s) and counts a span by its own timestamps only if it arrived by then
(``agent/span_activity.py``). So a reporter bounds its delivery delay:

- in-process (``AccountingReporter``): a step the workload announces with ``span_started`` counts as
  active from its start while it runs (an open span): never late, however long it takes. Any other step is
  shown to the mock the moment the workload reports it (``Accounting.announce_spans``); merging only shapes
  what is recorded. Delay: the step's own length.
- over HTTP (``HttpReporter``): a merged span is held at most ``MAX_MERGED_NS`` (or until ``MERGE_GAP_NS``
  passes without an extension) and batches go out every ``flush_interval_s`` (0.25 s). Delay: a step,
  plus 0.25 s, plus 0.25 s, plus the post, inside the agent's default lag.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from wattledger.probes.activity import Activity

log = logging.getLogger(__name__)

# ASSUMPTION: what the GPU does in each phase, for the mock GPU on CPU-only machines (a real GPU ignores
# these). Prefill and training are matrix-bound (tensor pipes busy); decode is bandwidth-bound (HBM busy,
# tensor pipes mostly idle).
PREFILL_ACTIVITY = Activity(gpu=1.0, sm=0.9, tensor=0.8, dram=0.45)
DECODE_ACTIVITY = Activity(gpu=1.0, sm=0.55, tensor=0.2, dram=0.85)
TRAIN_ACTIVITY = Activity(gpu=1.0, sm=0.92, tensor=0.75, dram=0.55)
TRANSFER_ACTIVITY = Activity(gpu=0.0, sm=0.0, tensor=0.0, dram=0.2,
                             pcie_transmit_bytes_per_second=20e9, pcie_receive_bytes_per_second=20e9)


@dataclass(frozen=True, slots=True)
class ReportedSpan:
    kind: str
    start_ns: int
    end_ns: int
    activity: Activity | None

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class Reporter:
    """Collects a workload's reports and forwards them to a sink (see the module docstring).

    Back-to-back spans of one kind (decode steps, training steps) reach the sink as one span: a decode
    loop would otherwise send hundreds a second. Gaps up to ``MERGE_GAP_NS`` count as part of the span. A
    background thread sends a merged span once nothing has extended it for that long, or once it is
    ``MAX_MERGED_NS`` long, so the agent hears of activity within about ``flush_interval_s``.
    """

    MERGE_GAP_NS = 1_000_000
    MAX_MERGED_NS = 250_000_000

    def __init__(self, workload: str, gpus: list[int], keep_spans: bool = False,
                 flush_interval_s: float | None = None):
        self.workload = workload
        self.gpus = list(gpus)
        self.tokens: dict[str, int] = {"prompt": 0, "generated": 0, "trained": 0}
        self.span_seconds: dict[str, float] = {}
        self.spans: list[ReportedSpan] | None = [] if keep_spans else None
        self.started_ns: int | None = None
        self.stopped_ns: int | None = None
        self._flush_interval_s = flush_interval_s
        self._pending: ReportedSpan | None = None
        self._pending_lock = threading.Lock()
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        self._started_span: tuple[str, int, Activity | None] | None = None  # from span_started, not yet ended

    # -- what workloads call --------------------------------------------------------------------

    def start(self, pid: int | None = None) -> None:
        self.started_ns = time.monotonic_ns()
        self._sink_start(pid)
        if self._flush_interval_s is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name="wattledger-reporter", daemon=True)
            self._flusher.start()

    def stop(self) -> None:
        self.stopped_ns = time.monotonic_ns()
        self._stop_flusher.set()
        if self._flusher is not None:
            self._flusher.join(5)
        self.flush()
        self._sink_stop()

    def add_tokens(self, kind: str, count: int) -> None:
        if count:
            self.tokens[kind] += count
            self._sink_tokens(kind, count)

    def span_started(self, kind: str, start_ns: int, activity: Activity | None = None) -> None:
        """Say that a span has begun at ``start_ns`` (monotonic ns); ``span()`` with the same kind and start
        ends it. An in-process mock GPU counts it active while it runs, so a long step is never late;
        other sinks ignore it. A span started and never ended is ended by the next ``span()`` or ``flush()``."""
        self._end_started_span(start_ns)
        self._started_span = (kind, start_ns, activity)
        self._sink_open(kind, start_ns, activity)

    def _end_started_span(self, end_ns: int) -> bool:
        """End the span from ``span_started`` at ``end_ns``, if there is one."""
        if self._started_span is None:
            return False
        self._started_span = None
        self._sink_close(end_ns)
        return True

    def span(self, kind: str, start_ns: int, end_ns: int, activity: Activity | None = None) -> None:
        """Report a finished span (monotonic ns)."""
        span = ReportedSpan(kind, start_ns, end_ns, activity)
        self.span_seconds[kind] = self.span_seconds.get(kind, 0.0) + span.seconds
        if self.spans is not None:
            self.spans.append(span)
        if self._started_span == (kind, start_ns, activity):
            self._end_started_span(end_ns)  # the mock has seen it from its start: close it, at its end
        else:
            self._end_started_span(start_ns)  # not what was started: that one ended when this began
            self._sink_progress(span)
        with self._pending_lock:
            pending = self._pending
            if (pending is not None and pending.kind == kind and pending.activity == activity
                    and 0 <= start_ns - pending.end_ns <= self.MERGE_GAP_NS):
                pending = ReportedSpan(kind, pending.start_ns, max(pending.end_ns, end_ns), activity)
            else:
                if pending is not None:
                    self._sink_span(pending)
                pending = span
            if pending.end_ns - pending.start_ns >= self.MAX_MERGED_NS:
                self._sink_span(pending)
                pending = None
            self._pending = pending

    def set_memory(self, memory_bytes: int) -> None:
        """Declare the GPU memory the workload holds on each of its GPUs (drives the mock's memory.used)."""
        self._sink_memory(memory_bytes)

    def flush(self) -> None:
        """Send everything held back: the span being merged, and whatever the sink batches."""
        self._end_started_span(time.monotonic_ns())
        with self._pending_lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._sink_span(pending)
        self._flush_sink()

    def _flush_loop(self) -> None:
        while not self._stop_flusher.wait(self._flush_interval_s):
            with self._pending_lock:
                pending = self._pending
                if pending is not None and time.monotonic_ns() - pending.end_ns > self.MERGE_GAP_NS:
                    self._sink_span(pending)
                    self._pending = None
            self._flush_sink()

    # -- sinks (overridden) ---------------------------------------------------------------------

    def _sink_start(self, pid: int | None) -> None:
        pass

    def _sink_stop(self) -> None:
        pass

    def _sink_tokens(self, kind: str, count: int) -> None:
        pass

    def _sink_open(self, kind: str, start_ns: int, activity: Activity | None) -> None:
        """A span began (``span_started``); ``_sink_close`` ends it. Only the in-process sink uses these."""

    def _sink_close(self, end_ns: int) -> None:
        pass

    def _sink_progress(self, span: ReportedSpan) -> None:
        """A step, as soon as the workload reports it (before merging). Sinks that can show activity to
        the mock at once do so here; ``_sink_span`` then gets the merged span to record."""

    def _sink_span(self, span: ReportedSpan) -> None:
        pass

    def _sink_memory(self, memory_bytes: int) -> None:
        pass

    def _flush_sink(self) -> None:
        pass


class AccountingReporter(Reporter):
    """Reports straight into an in-process accounting (``Agent.accounting_api()``: the benchmark and tests).

    A step announced with ``span_started`` is an open span in the accounting while it runs; any other step
    reaches the mock as it is reported (``announce_spans``). The merged spans are recorded with
    ``add_spans(announced=True)``, so the mock's activity never waits for a merged span to close."""

    def __init__(self, accounting, workload: str, gpus: list[int], keep_spans: bool = False):
        super().__init__(workload, gpus, keep_spans, flush_interval_s=0.1)
        self._accounting = accounting
        self._open_handle: int | None = None

    def _sink_start(self, pid):
        self._accounting.start(self.workload, self.gpus, pid=pid)

    def _sink_stop(self):
        self._accounting.stop(self.workload)

    def _sink_tokens(self, kind, count):
        self._accounting.add_tokens(self.workload, kind, count)

    def _make_span(self, span: ReportedSpan):
        return self._accounting.make_span(self.workload, span.kind, span.start_ns, span.end_ns, self.gpus,
                                          span.activity)

    def _sink_open(self, kind, start_ns, activity):
        self._open_handle = self._accounting.begin_span(self.workload, kind, self.gpus, activity, start_ns=start_ns)

    def _sink_close(self, end_ns):
        handle, self._open_handle = self._open_handle, None
        if handle is not None:
            self._accounting.end_span(handle, end_ns=end_ns, record=False)

    def _sink_progress(self, span):
        self._accounting.announce_spans([self._make_span(span)])

    def _sink_span(self, span):
        self._accounting.add_spans([self._make_span(span)], announced=True)

    def _sink_memory(self, memory_bytes):
        for gpu in self.gpus:
            self._accounting.set_memory(self.workload, gpu, memory_bytes)


class HttpReporter(Reporter):
    """Reports to a running agent over HTTP, batching tokens and spans every ``flush_interval_s``.

    A failed post is logged and its batch dropped (the workload keeps running; the agent's figures then
    fall short of the workload's own summary, which the log says).
    """

    def __init__(self, base_url: str, workload: str, gpus: list[int], token: str | None = None,
                 keep_spans: bool = False, flush_interval_s: float = 0.25):
        super().__init__(workload, gpus, keep_spans, flush_interval_s=flush_interval_s)
        from wattledger.agent.client import AgentClient

        self._client = AgentClient(base_url, token=token)
        self._lock = threading.Lock()
        self._pending_tokens: dict[str, int] = {}
        self._pending_spans: list[dict] = []
        self.failed_posts = 0

    def _sink_start(self, pid):
        self._client.start(self.workload, self.gpus, pid=pid)

    def _sink_stop(self):
        self._client.stop(self.workload)

    def _sink_tokens(self, kind, count):
        with self._lock:
            self._pending_tokens[kind] = self._pending_tokens.get(kind, 0) + count

    def _sink_span(self, span):
        body = {"workload": self.workload, "kind": span.kind, "start_ns": span.start_ns, "end_ns": span.end_ns,
                "gpus": self.gpus}
        if span.activity is not None:
            a = span.activity
            body["activity"] = {"gpu": a.gpu, "sm": a.sm, "tensor": a.tensor, "dram": a.dram}
        with self._lock:
            self._pending_spans.append(body)

    def _sink_memory(self, memory_bytes):
        for gpu in self.gpus:
            self._post(lambda g=gpu: self._client.set_memory(self.workload, g, memory_bytes))

    def _flush_sink(self) -> None:
        from wattledger.agent.client import MAX_SPANS_PER_REQUEST

        with self._lock:
            tokens, self._pending_tokens = self._pending_tokens, {}
            spans, self._pending_spans = self._pending_spans, []
        for kind, count in tokens.items():
            self._post(lambda k=kind, c=count: self._client.add_tokens(self.workload, k, c))
        for first in range(0, len(spans), MAX_SPANS_PER_REQUEST):
            batch = spans[first:first + MAX_SPANS_PER_REQUEST]
            self._post(lambda b=batch: self._client.add_spans(b))

    def _post(self, call) -> None:
        from wattledger.agent.client import AgentClientError

        try:
            call()
        except AgentClientError as err:
            self.failed_posts += 1
            log.warning("report to the agent failed (dropped): %s", err)


def make_reporter(workload: str, gpus: list[int], agent_url: str | None = None, token: str | None = None,
                  accounting=None, keep_spans: bool = False) -> Reporter:
    """The reporter for how the workload runs: in-process, over HTTP, or alone."""
    if accounting is not None:
        return AccountingReporter(accounting, workload, gpus, keep_spans)
    if agent_url:
        return HttpReporter(agent_url, workload, gpus, token=token, keep_spans=keep_spans)
    return Reporter(workload, gpus, keep_spans)
