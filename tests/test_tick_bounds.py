"""The sampler's work per tick stays bounded whatever writers do (issue 8, item 12).

Work is counted, never timed: how many spans one query of the mock's activity source flattens, what a
full pending-span index answers, how much span history is held. The sweeps that replaced quadratic
scans are checked against those scans as references.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.agent import span_activity
from wattledger.agent.accounting import Accounting, AccountingError, time_shares
from wattledger.agent.span_activity import SpanActivitySource
from wattledger.probes.activity import Activity, ActivitySegment, combine, flatten


def compute(acct: Accounting, start_ns: int, end_ns: int, gpus=(0,), workload="train"):
    return acct.make_span(workload, "compute", start_ns, end_ns, list(gpus))


def test_a_query_flattens_only_the_spans_overlapping_it(monkeypatch):
    clock = FakeClock()
    acct = Accounting([0], clock_ns=clock.ns)
    source = SpanActivitySource(acct)
    now = clock.ns()
    # 25 posts of 200 spans each, all in the next 50 s: the old source flattened all 5,000 every tick.
    for post in range(25):
        acct.add_spans([compute(acct, now + (post * 200 + i) * 10**7, now + (post * 200 + i) * 10**7 + 5 * 10**6)
                        for i in range(200)])
    flattened: list[int] = []
    real_flatten = span_activity.flatten
    monkeypatch.setattr(span_activity, "flatten",
                        lambda candidates, lo, hi: flattened.append(len(candidates)) or real_flatten(candidates, lo, hi))
    window = NS_PER_S // 10
    for tick in range(10):
        source.segments(0, now + tick * window, now + (tick + 1) * window)
    assert max(flattened) <= 11  # ten spans start in each 100 ms, plus one still running
    assert 4900 <= source.pending_spans() < 5000  # the second's hundred spans are simulated and gone


def test_pending_spans_past_the_limit_are_refused_whole_with_429():
    acct = Accounting([0, 1])
    source = SpanActivitySource(acct, max_pending_spans=10)
    acct.add_spans([compute(acct, 10**12 + i, 10**12 + i + 1, gpus=(0, 1)) for i in range(4)])  # 8 entries
    before = acct.recent_spans(), acct.workloads()
    with pytest.raises(AccountingError) as error:
        acct.add_spans([compute(acct, 10**12, 10**12 + 5, gpus=(0, 1), workload="other")] * 2)  # 4 more
    assert error.value.status == 429 and "retry" in str(error.value)
    assert (acct.recent_spans(), acct.workloads()) == before and source.pending_spans() == 8
    # Spans the mock has already simulated past, and idle spans, take no room.
    source.segments(0, 0, 2 * 10**12)
    source.segments(1, 0, 2 * 10**12)
    assert source.pending_spans() == 0
    acct.add_spans([acct.make_span("other", "tool_call", 0, 10**13, [0, 1])] +
                   [compute(acct, 10**12, 10**12 + 5, gpus=(0, 1))] * 5)


def test_429_over_the_api_is_json_and_documented():
    from prometheus_client import CollectorRegistry

    from test_http_api import assert_json_error, call_app, check_against_doc
    from wattledger.agent.http_api import make_app

    acct = Accounting([0])
    SpanActivitySource(acct, max_pending_spans=3)
    app = make_app(acct, CollectorRegistry(), lambda: True, max_future_ns=None)
    spans = [{"workload": "w", "kind": "compute", "start_ns": 10**15 + i, "end_ns": 10**15 + i + 9, "gpus": [0]}
             for i in range(4)]
    status, headers, body = call_app(app, "POST", "/v1/spans", json.dumps({"spans": spans}).encode())
    assert_json_error(status, headers, body, 429)
    check_against_doc("/v1/spans", "POST", status, headers, body)
    assert acct.recent_spans() == [] and acct.workloads() == []


def test_span_history_is_bounded_in_bytes_oldest_first():
    acct = Accounting([0], span_history_bytes=20_000)
    for i in range(1000):
        acct.add_spans([compute(acct, i, i + 1)])
    held = acct.recent_spans()
    assert 0 < acct.span_history_bytes() <= 20_000
    assert len(held) < 1000 and held[-1].start_ns == 999 and [s.start_ns for s in held] == sorted(s.start_ns for s in held)


def test_running_on_reads_one_gpus_workloads():
    acct = Accounting(range(8), max_workloads=1000)
    for n in range(1000):
        acct.start(f"w{n}", [n % 8], at_ns=n)
    assert len(acct.running_on(3, 0, 10**6)) == 125


# -- the sweeps against the scans they replaced -----------------------------------------------------


def reference_flatten(intervals, start_ns, end_ns):
    clipped = [(max(s, start_ns), min(e, end_ns), a) for s, e, a in intervals if s < end_ns and e > start_ns]
    clipped = [c for c in clipped if c[0] < c[1]]
    if not clipped:
        return []
    edges = sorted({t for s, e, _ in clipped for t in (s, e)})
    out = []
    for lo, hi in zip(edges, edges[1:]):
        active = [a for s, e, a in clipped if s <= lo and e >= hi]
        if active:
            merged = combine(active)
            if out and out[-1].end_ns == lo and out[-1].activity == merged:
                out[-1] = ActivitySegment(out[-1].start_ns, hi, merged)
            else:
                out.append(ActivitySegment(lo, hi, merged))
    return out


activities = st.builds(Activity, *(st.sampled_from([0.0, 0.25, 0.5, 1.0]) for _ in range(4)),
                       st.sampled_from([0.0, 1e9]), st.sampled_from([0.0, 2e9]))
intervals = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 30), activities)
                     .map(lambda t: (t[0], t[0] + t[1], t[2])), max_size=12)


@settings(max_examples=400, deadline=None)
@given(intervals=intervals, start=st.integers(0, 40), length=st.integers(0, 60))
def test_the_flatten_sweep_equals_the_scan(intervals, start, length):
    assert flatten(intervals, start, start + length) == reference_flatten(intervals, start, start + length)


def reference_time_shares(stretches):
    if len(stretches) == 1:
        name, lo, hi = stretches[0]
        return {name: float(hi - lo)}, hi - lo
    weights, covered = {}, 0
    edges = sorted({t for _, lo, hi in stretches for t in (lo, hi)})
    for lo, hi in zip(edges, edges[1:]):
        holders = {name for name, s, e in stretches if s <= lo and e >= hi}
        if holders:
            covered += hi - lo
            for name in holders:
                weights[name] = weights.get(name, 0.0) + (hi - lo) / len(holders)
    return weights, covered


stretches = st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 50), st.integers(1, 30))
                     .map(lambda t: (t[0], t[1], t[1] + t[2])), min_size=1, max_size=10)


@settings(max_examples=400, deadline=None)
@given(stretches=stretches)
def test_the_time_share_sweep_equals_the_scan(stretches):
    weights, covered = time_shares(stretches)
    expected_weights, expected_covered = reference_time_shares(stretches)
    assert covered == expected_covered and set(weights) == set(expected_weights)
    for name, weight in weights.items():
        assert weight == pytest.approx(expected_weights[name], rel=1e-9, abs=1e-9)
