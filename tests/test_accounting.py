"""The accounting store: validation before any change, token sums, spans, open spans."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings, strategies as st

from fakes import NS_PER_S, FakeClock
from wattledger.agent.accounting import MAX_TOKENS_PER_CALL, Accounting, AccountingError
from wattledger.agent.span_activity import SpanActivitySource
from wattledger.probes.activity import Activity


def state(acct: Accounting):
    return acct.tokens(), acct.workloads(), acct.recent_spans(), acct.pids()


def test_tokens_per_kind_add_up_across_threads():
    acct = Accounting([0])

    def report(kind):
        for _ in range(500):
            acct.add_tokens("chat", kind, 3)

    threads = [threading.Thread(target=report, args=(k,)) for k in ("prompt", "generated", "generated")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acct.tokens() == {("chat", "prompt"): 1500, ("chat", "generated"): 3000}


@pytest.mark.parametrize("call", [
    lambda a: a.add_tokens("chat", "generated", -1),
    lambda a: a.add_tokens("chat", "generated", MAX_TOKENS_PER_CALL + 1),
    lambda a: a.add_tokens("chat", "generated", 1.5),
    lambda a: a.add_tokens("chat", "generated", True),
    lambda a: a.add_tokens("chat", "output", 1),
    lambda a: a.add_tokens("Chat", "generated", 1),
    lambda a: a.add_tokens("x" * 65, "generated", 1),
    lambda a: a.start("train", [5]),
    lambda a: a.start("train", []),
    lambda a: a.start("train", [0, 0]),
    lambda a: a.start("train", [0], pid=-3),
    lambda a: a.stop("never-started"),
    lambda a: a.set_memory("never-started", 0, 10),
    lambda a: a.add_spans([a.make_span("chat", "compute", 10, 5, [0])]),
    lambda a: a.add_spans([a.make_span("chat", "nap", 0, 5, [0])]),
    lambda a: a.add_spans([a.make_span("chat", "compute", 0, 5, [0], {"gpu": 1.5})]),
    lambda a: a.add_spans([a.make_span("chat", "compute", 0, 5, [0], {"warp": 0.5})]),
])
def test_bad_calls_raise_and_change_nothing(call):
    acct = Accounting([0, 1], max_workloads=3)
    acct.add_tokens("chat", "prompt", 7)
    before = state(acct)
    with pytest.raises(AccountingError):
        call(acct)
    assert state(acct) == before


def test_workload_limit_is_checked_for_a_whole_span_batch():
    acct = Accounting([0], max_workloads=2)
    acct.add_tokens("a", "prompt", 1)
    spans = [acct.make_span(name, "compute", 0, 10, [0]) for name in ("a", "b", "c")]
    with pytest.raises(AccountingError) as err:
        acct.add_spans(spans)
    assert err.value.status == 409
    assert acct.recent_spans() == [] and len(acct.workloads()) == 1


def test_start_twice_is_refused_and_stop_closes_the_interval():
    clock = FakeClock()
    acct = Accounting([0, 1], clock_ns=clock.ns)
    acct.start("train", [0, 1], pid=1234)
    with pytest.raises(AccountingError, match="already running"):
        acct.start("train", [0])
    clock.advance(5)
    acct.stop("train")
    (view,) = acct.workloads()
    assert not view.running and view.pid is None
    start = clock.ns() - 5 * NS_PER_S
    assert acct.running_on(1, start - NS_PER_S, clock.ns() + NS_PER_S) == [("train", start, clock.ns())]


def test_open_spans_drive_the_mock_while_they_run():
    clock = FakeClock()
    acct = Accounting([0], clock_ns=clock.ns)
    source = SpanActivitySource(acct)
    handle = acct.begin_span("train", "compute", [0], Activity(gpu=1, sm=0.5))
    clock.advance(2)
    (segment,) = source.segments(0, clock.ns() - NS_PER_S, clock.ns())
    assert segment.activity.sm == 0.5 and segment.end_ns == clock.ns()
    span = acct.end_span(handle)
    assert span.end_ns - span.start_ns == 2 * NS_PER_S
    assert acct.open_spans() == [] and acct.recent_spans() == [span]


def test_tool_calls_leave_the_gpu_idle_in_the_mock():
    acct = Accounting([0])
    source = SpanActivitySource(acct)
    acct.add_spans([acct.make_span("agent", "compute", 0, 100, [0]), acct.make_span("agent", "tool_call", 100, 300, [0]),
                    acct.make_span("agent", "compute", 300, 400, [0])])
    segments = source.segments(0, 0, 400)
    assert [(s.start_ns, s.end_ns) for s in segments] == [(0, 100), (300, 400)]


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.tuples(st.sampled_from(["prompt", "generated", "trained"]),
                                 st.integers(min_value=-10, max_value=2 * MAX_TOKENS_PER_CALL)), max_size=30))
def test_token_totals_equal_the_sum_of_the_accepted_calls(counts):
    acct = Accounting([0])
    expected: dict = {}
    for kind, count in counts:
        try:
            acct.add_tokens("w", kind, count)
        except AccountingError:
            assert not 0 <= count <= MAX_TOKENS_PER_CALL
            continue
        expected[("w", kind)] = expected.get(("w", kind), 0) + count
    assert acct.tokens() == expected
