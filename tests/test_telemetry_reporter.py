"""Workload reporters: merged spans, totals, in-process and HTTP sinks."""

from __future__ import annotations

import time

import pytest

from wattledger.agent.accounting import Accounting
from wattledger.workloads.reporter import DECODE_ACTIVITY, PREFILL_ACTIVITY, AccountingReporter, Reporter

MS = 1_000_000


def test_back_to_back_spans_reach_the_sink_merged_and_totals_stay_exact():
    accounting = Accounting([0])
    reporter = AccountingReporter(accounting, "chat", [0], keep_spans=True)
    reporter.start()
    t = time.monotonic_ns()
    for step in range(10):  # 10 decode steps of 2 ms with 0.1 ms gaps
        reporter.span("compute", t + step * 2_100_000, t + step * 2_100_000 + 2 * MS, DECODE_ACTIVITY)
    reporter.span("compute", t + 30 * MS, t + 31 * MS, DECODE_ACTIVITY)  # after a 9 ms gap: a new span
    reporter.span("compute", t + 31 * MS, t + 32 * MS, PREFILL_ACTIVITY)  # other activity: a new span
    reporter.add_tokens("generated", 10)
    reporter.stop()
    spans = accounting.recent_spans()
    assert [(s.start_ns - t, s.end_ns - t) for s in spans] == [(0, 20_900_000), (30 * MS, 31 * MS), (31 * MS, 32 * MS)]
    assert len(reporter.spans) == 12  # the workload's own record keeps every step
    assert reporter.span_seconds["compute"] == pytest.approx((10 * 2 + 2) / 1000)
    assert accounting.tokens() == {("chat", "generated"): 10}


def test_a_quiet_merged_span_is_sent_by_the_background_flusher():
    accounting = Accounting([0])
    reporter = AccountingReporter(accounting, "chat", [0])
    reporter.start()
    now = time.monotonic_ns()
    reporter.span("compute", now - 5 * MS, now - 2 * MS, DECODE_ACTIVITY)
    deadline = time.monotonic() + 30  # a bound on a hung flusher, not a speed: it flushes every 0.1 s
    while not accounting.recent_spans() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(accounting.recent_spans()) == 1  # sent while the workload was still running
    reporter.stop()


def test_long_busy_stretches_are_sent_in_pieces():
    accounting = Accounting([0])
    reporter = AccountingReporter(accounting, "train", [0])
    t = 0
    for _ in range(100):  # 100 steps of 10 ms, back to back: 1 s
        reporter.span("compute", t, t + 10 * MS, None)
        t += 10 * MS
    reporter.flush()
    spans = accounting.recent_spans()
    assert len(spans) == 4 and sum(s.end_ns - s.start_ns for s in spans) == 1000 * MS


def test_the_null_reporter_counts_without_a_sink():
    reporter = Reporter("w", [0])
    reporter.start()
    reporter.add_tokens("trained", 5)
    reporter.stop()
    assert reporter.tokens["trained"] == 5
