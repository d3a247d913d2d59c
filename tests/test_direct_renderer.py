"""The direct renderer (exporters/render.py) against prometheus_client, the reference.

Random ledger snapshots (odd label values included: quotes, backslashes, newlines, unicode) go through
the agent's collector once; the same rows are replayed into prometheus_client's own family classes and
encoded by prometheus_client, and written by the direct renderer. Both must parse, with
prometheus_client's own parsers, to exactly the same families and samples, in the text format and in
OpenMetrics. The golden snapshot must be byte-identical. /metrics keeps prometheus_client's content
negotiation and ``name[]`` semantics.
"""

from __future__ import annotations

import gzip
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.utils import floatToGoString

from test_golden_exposition import GOLDEN, build_mock_registry
from wattledger.agent.ledger import UTILIZATION_BUCKETS, GpuFigures, Histogram, LedgerSnapshot
from wattledger.agent.ledger import ATTRIBUTION_OK, AttributionFigures, OwnerFigures, WorkloadProcessFigures
from wattledger.exporters.prometheus import LedgerCollector, SinkStatusCollector, _cumulative
from wattledger.exporters.render import (
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    RowFamily,
    choose_renderer,
    go_float,
    render_openmetrics,
    render_text,
)
from wattledger.probes.base import GpuInfo, HostSample, MigInstance, ProbeStats

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

# -- random ledger snapshots ---------------------------------------------------------------------

ODD = ['quote"d', "back\\slash", "new\nline", "ünïcødé ☃ 日本", 'all\\"\n', "", " ", "}{,=", "le", "#",
       "\\n", "tab\tand\rreturn", "\U0001F525"]
odd_text = st.one_of(st.sampled_from(ODD), st.text(st.characters(blacklist_categories=("Cs",)), max_size=10))
# Gauges may be anything a float can be; counters are finite and >= 0 (the ledger guarantees it).
gauge_value = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**63, 2**63),
                        st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e21, 123456789.0, 1234567.0, 1e6]))
counter_value = st.one_of(st.floats(min_value=0, allow_nan=False, allow_infinity=False), st.integers(0, 2**63),
                          st.sampled_from([0.0, 1e21, 1234567.0, 0.1]))
maybe_gauge = st.none() | gauge_value
ENGINES = ("gpu", "memory_controller", "sm", "tensor", "dram")


@st.composite
def histograms(draw) -> Histogram:
    counts = draw(st.lists(st.integers(0, 2**40), min_size=len(UTILIZATION_BUCKETS),
                           max_size=len(UTILIZATION_BUCKETS)))
    return Histogram(counts, sum(counts) + draw(st.integers(0, 1000)),
                     draw(st.floats(min_value=0, max_value=1e12, allow_nan=False)))


@st.composite
def gpu_figures(draw, index: int) -> GpuFigures:
    """One GPU's exported figures: each counter and gauge independently present or None."""
    info = GpuInfo(index, draw(odd_text), draw(odd_text), draw(odd_text), None, None, simulated=draw(st.booleans()))
    migs = draw(st.lists(st.tuples(st.integers(0, 14), st.integers(0, 7), odd_text, maybe_gauge, maybe_gauge,
                                   maybe_gauge), max_size=2, unique_by=lambda m: (m[0], m[1], m[2])))
    engines = draw(st.lists(st.sampled_from(ENGINES), unique=True, max_size=3))
    maybe_counter = st.none() | counter_value
    return GpuFigures(
        info=info, up=draw(st.booleans()),
        energy_joules=draw(maybe_counter), unattributed_energy_joules=draw(maybe_counter),
        pcie_transmit_bytes=draw(maybe_counter), pcie_receive_bytes=draw(maybe_counter),
        nvlink_transmit_bytes=draw(maybe_counter), nvlink_receive_bytes=draw(maybe_counter),
        ecc_corrected_errors=draw(maybe_counter), ecc_uncorrected_errors=draw(maybe_counter),
        busy_seconds={e: draw(counter_value) for e in engines},
        utilization_histograms={e: draw(histograms()) for e in engines},
        throttle_seconds=draw(st.dictionaries(odd_text, counter_value, max_size=2)),
        lost_fields=tuple(draw(st.lists(odd_text, unique=True, max_size=2))),
        power_watts=draw(maybe_gauge), power_average_watts=draw(maybe_gauge), power_limit_watts=draw(maybe_gauge),
        memory_used_bytes=draw(maybe_gauge), memory_total_bytes=draw(maybe_gauge),
        memory_reserved_bytes=draw(maybe_gauge), sm_occupancy_ratio=draw(maybe_gauge),
        sm_clock_hertz=draw(maybe_gauge), memory_clock_hertz=draw(maybe_gauge),
        temperature_gpu_celsius=draw(maybe_gauge), temperature_memory_celsius=draw(maybe_gauge),
        throttle_reasons_active=tuple(sorted(set(draw(st.lists(odd_text, max_size=3))))),
        mig_instances=tuple(MigInstance(*m) for m in migs),
    )


@st.composite
def attribution_figures(draw) -> AttributionFigures:
    """Owner attribution's figures (issue 13): owners with odd label values, "other", a status."""
    owners = draw(st.lists(st.builds(
        OwnerFigures, st.tuples(odd_text, odd_text, odd_text, odd_text, odd_text), odd_text, counter_value,
        counter_value, st.none() | st.integers(0, 2**50), st.integers(0, 64)),
        max_size=3, unique_by=lambda o: o.labels))
    reason = draw(st.sampled_from([ATTRIBUTION_OK]) | odd_text)
    return AttributionFigures(tuple(owners), draw(st.dictionaries(st.integers(0, 3), counter_value, max_size=2)),
                              reason)


@st.composite
def snapshots(draw) -> LedgerSnapshot:
    gpus = tuple(draw(gpu_figures(i)) for i in range(draw(st.integers(0, 3))))
    indexes = st.integers(0, 3)
    workload = odd_text
    host = HostSample(0, cpu_count=draw(st.none() | st.integers(1, 512)), memory_total_bytes=draw(maybe_gauge),
                      memory_used_bytes=draw(maybe_gauge), memory_locked_bytes=draw(maybe_gauge)) \
        if draw(st.booleans()) else None
    return LedgerSnapshot(
        backend=draw(st.none() | odd_text),
        simulated=True,
        gpus=[],  # the ledger's own records: the exporter reads gpu_figures only
        gpu_figures=gpus,
        host=host,
        host_cpu_busy_seconds=draw(st.none() | counter_value),
        host_cpu_core_busy_seconds=draw(st.dictionaries(st.integers(0, 255), counter_value, max_size=3)),
        host_energy_joules=draw(st.dictionaries(odd_text, counter_value, max_size=2)),
        workload_energy_joules=draw(st.dictionaries(st.tuples(workload, indexes), counter_value, max_size=3)),
        workload_active_seconds=draw(st.dictionaries(st.tuples(workload, indexes), counter_value, max_size=3)),
        workload_tokens=draw(st.dictionaries(st.tuples(workload, odd_text), st.integers(0, 2**62), max_size=3)),
        workload_processes=draw(st.dictionaries(workload, st.builds(
            WorkloadProcessFigures, st.integers(0, 2**50), counter_value, st.integers(0, 2**40),
            st.integers(0, 2**40)), max_size=2)),
        workload_gpu_memory_bytes=draw(st.dictionaries(st.tuples(workload, indexes), st.integers(0, 2**50),
                                                       max_size=2)),
        probes=draw(st.dictionaries(odd_text, st.builds(ProbeStats, st.booleans(), gauge_value), max_size=3)),
        overruns=draw(st.integers(0, 2**40)),
        sample_age_seconds=draw(st.none() | gauge_value),
        xid_counts=draw(st.dictionaries(st.tuples(indexes, st.integers(0, 200)), st.integers(0, 2**40), max_size=2)),
        backend_error_counts=draw(st.dictionaries(st.tuples(st.none() | indexes, odd_text, odd_text),
                                                  st.integers(0, 2**40), max_size=2)),
        attribution=draw(st.none() | attribution_figures()),
    )


class _FixedLedger:
    def __init__(self, snapshot: LedgerSnapshot):
        self._snapshot = snapshot

    def snapshot(self) -> LedgerSnapshot:
        return self._snapshot


class _Collected:
    def __init__(self, families):
        self._families = list(families)

    def collect(self):
        return self._families


def as_prometheus_client_family(family: RowFamily):
    """The same rows replayed into prometheus_client's own family class."""
    if family.type == "histogram":
        made = HistogramMetricFamily(family.name, family.documentation, labels=family.label_names)
        for values, buckets, sum_value in family.rows:
            made.add_metric(list(values), buckets, sum_value)
        return made
    cls = GaugeMetricFamily if family.type == "gauge" else CounterMetricFamily
    made = cls(family.name, family.documentation, labels=family.label_names)
    for values, value in family.rows:
        made.add_metric(list(values), value)
    return made


def comparable(families) -> list:
    """Parsed families as plain values (NaN compared by spelling, as it is not equal to itself)."""
    def number(value):
        return "NaN" if isinstance(value, float) and math.isnan(value) else (type(value).__name__, repr(value))

    return [(f.name, f.documentation, f.type, f.unit,
             [(s.name, sorted(s.labels.items()), number(s.value), s.timestamp, s.exemplar) for s in f.samples])
            for f in families]


def collected(snapshot: LedgerSnapshot, version: str = "0.0.0") -> list[RowFamily]:
    return list(LedgerCollector(_FixedLedger(snapshot), version).collect())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(snapshot=snapshots(), version=odd_text)
def test_direct_output_parses_to_the_same_samples_as_prometheus_clients_encoder(snapshot, version):
    families = collected(snapshot, version)
    reference = [as_prometheus_client_family(f) for f in families]
    # Readers of the row families (the golden file, restricted registries) see prometheus_client's samples.
    assert [f.samples for f in families] == [f.samples for f in reference]

    text, reference_text = render_text(families).decode(), generate_latest(_Collected(reference)).decode()
    assert comparable(parse_text(text)) == comparable(parse_text(reference_text))

    om = render_openmetrics(families).decode()
    reference_om = openmetrics.generate_latest(_Collected(reference)).decode()
    assert comparable(parse_openmetrics(om)) == comparable(parse_openmetrics(reference_om))

    # Stronger than the same samples: the same spelling (float format, label order) as the installed
    # prometheus_client, as the golden file already requires of the text format.
    assert (text, om) == (reference_text, reference_om)


@settings(max_examples=2000, deadline=None)
@given(value=st.one_of(st.floats(), st.integers(), st.booleans(), st.sampled_from(
    [1e6, -1e6, 999999.9999999999, 1_000_000, 999_999, -999_999, 0.0, -0.0, 1e16, 1e-7, 5e-324])))
def test_values_are_spelled_as_prometheus_client_spells_them(value):
    assert go_float(value) == floatToGoString(value)


@given(histogram=histograms())
def test_histogram_buckets_are_the_ledgers_own(histogram):
    assert _cumulative(histogram) == histogram.cumulative()


def test_odd_label_values_survive_the_round_trip():
    family = GaugeFamily("wattledger_test", 'help with "quotes", \\ and\nnewline', labels=["b", "a"])
    for value in ODD:
        family.add_metric([value, "x"], 1.0)
    for render, parse in ((render_text, parse_text), (render_openmetrics, parse_openmetrics)):
        (parsed,) = list(parse(render([family]).decode()))
        assert [s.labels for s in parsed.samples] == [{"b": v, "a": "x"} for v in ODD]
        assert parsed.documentation == family.documentation


def test_the_golden_snapshot_is_byte_identical_in_both_formats():
    registry = build_mock_registry()
    families = list(registry.collect())
    assert render_text(families).decode() == GOLDEN.read_text()
    assert render_openmetrics(families) == openmetrics.generate_latest(registry)


def test_families_from_other_collectors_are_written_by_prometheus_client():
    registry = CollectorRegistry()
    Counter("other_requests", "Requests.", ["path"], registry=registry).labels('a"b').inc(3)
    registry.register(SinkStatusCollector(lambda: []))
    families = list(registry.collect())
    assert not isinstance(families[0], RowFamily)
    assert render_text(families) == generate_latest(registry)
    assert render_openmetrics(families) == openmetrics.generate_latest(registry)


def test_histograms_follow_prometheus_client_without_a_sum_or_with_negative_bounds():
    family = HistogramFamily("wattledger_h", "h", labels=["gpu"])
    family.add_metric(["0"], [("0.5", 1), ("+Inf", 2)], None)
    family.add_metric(["1"], [("-1.0", 1), ("+Inf", 2)], 3.0)
    family.add_metric(["2"], [("0.5", 1), ("+Inf", 4)], 2.5)
    assert render_text([family]) == generate_latest(_Collected([as_prometheus_client_family(family)]))


@pytest.mark.parametrize("name, labels", [("bad:name", []), ("9lives", []), ("ok", ["bad-label"])])
def test_names_the_direct_path_would_have_to_escape_are_refused_where_the_family_is_made(name, labels):
    with pytest.raises(ValueError, match="direct renderer"):
        GaugeFamily(name, "doc", labels=labels)


def test_a_counter_name_ending_in_total_is_stripped_as_prometheus_client_does():
    family = CounterFamily("wattledger_things_total", "doc")
    family.add_metric([], 1)
    assert render_text([family]) == generate_latest(_Collected([as_prometheus_client_family(family)]))


@pytest.mark.parametrize("accept, content_type, direct", [
    (PROMETHEUS_ACCEPT, "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores",
     render_openmetrics),
    ("application/openmetrics-text", "application/openmetrics-text; version=1.0.0; charset=utf-8",
     render_openmetrics),
    ("", "text/plain; version=0.0.4; charset=utf-8", render_text),
    ("text/plain;version=0.0.4", "text/plain; version=0.0.4; charset=utf-8", render_text),
    ("application/openmetrics-text;version=0.0.1", "text/plain; version=0.0.4; charset=utf-8", render_text),
    ("text/plain;version=1.0.0;escaping=allow-utf-8",
     "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8", render_text),
    ("application/openmetrics-text;version=1.0.0;escaping=dots",
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=dots", None),
    ("application/openmetrics-text;version=2.0.0",
     "application/openmetrics-text; version=2.0.0; charset=utf-8; escaping=underscores", None),
])
def test_content_negotiation_is_prometheus_clients(accept, content_type, direct):
    encoder, chosen = choose_renderer(accept)
    assert chosen == content_type
    assert getattr(encoder, "func", None) is direct  # None: prometheus_client's encoder answers
    families = list(mixed_registry().collect())
    # Whichever encoder answers, the bytes are prometheus_client's for that Accept header.
    app = make_wsgi_app(_Collected(families))
    expected = call_wsgi(app, "/metrics", accept)[2]
    assert encoder(families) == expected


def mixed_registry() -> CollectorRegistry:
    """The golden registry plus families of prometheus_client's own metrics, one with a UTF-8 name."""
    registry = build_mock_registry()
    Counter("other_requests", "Requests.", ["path"], registry=registry).labels('a"b\n').inc(3)
    Gauge("other.dotted_ratio", "A name escapings rewrite.", registry=registry).set(0.5)
    return registry


def call_wsgi(app, path: str, accept: str = "", accept_encoding: str = "") -> tuple[str, dict, bytes]:
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "HTTP_ACCEPT": accept,
               "HTTP_ACCEPT_ENCODING": accept_encoding, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "9400",
               "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:9400", "wsgi.url_scheme": "http",
               "wsgi.input": None}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


NAME_FILTERS = [
    ["wattledger_gpu_power_watts"],
    ["wattledger_gpu_energy_joules_total", "wattledger_build_info"],
    ["wattledger_gpu_utilization_ratio_bucket", "wattledger_gpu_utilization_ratio_count",
     "wattledger_gpu_utilization_ratio_sum"],
    ["wattledger_gpu_utilization_ratio_count"],  # part of a histogram: filtered sample by sample
    ["wattledger_gpu_energy_joules"],  # a family name, not a sample name: nothing (prometheus_client's rule)
    ["wattledger_gpu_xid_errors_total"],  # a family with no rows: nothing
    ["no_such_metric"],
]


@pytest.mark.parametrize("names", NAME_FILTERS)
@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT])
def test_name_filters_answer_as_prometheus_clients_own_app(names, accept):
    from wattledger.agent.accounting import Accounting
    from wattledger.agent.http_api import make_app

    query = "&".join(f"name[]={name}" for name in names)
    agent = make_app(Accounting([0, 1]), build_mock_registry(), lambda: True)
    status, headers, body = call_wsgi(agent, "/metrics?" + query, accept, "gzip")
    assert status.startswith("200") and headers["Content-Encoding"] == "gzip"
    # prometheus_client's own app over its own families with the same rows (a registry that filters
    # collectors without describe(), as the agent's are).
    reference = CollectorRegistry(support_collectors_without_names=True)
    reference.register(_Collected(as_prometheus_client_family(f) for f in build_mock_registry().collect()))
    _, expected_headers, expected = call_wsgi(make_wsgi_app(reference), "/metrics?" + query, accept)
    assert headers["Content-Type"] == expected_headers["Content-Type"]
    assert gzip.decompress(body) == expected


@pytest.mark.parametrize("accept, parse", [("", parse_text), (PROMETHEUS_ACCEPT, parse_openmetrics)])
def test_the_metrics_endpoint_serves_the_golden_exposition(accept, parse):
    from wattledger.agent.accounting import Accounting
    from wattledger.agent.http_api import make_app

    app = make_app(Accounting([0, 1]), build_mock_registry(), lambda: True)
    status, headers, body = call_wsgi(app, "/metrics", accept, "gzip")
    assert status.startswith("200") and headers["Content-Encoding"] == "gzip"
    expected = GOLDEN.read_bytes() if accept == "" else openmetrics.generate_latest(build_mock_registry())
    assert gzip.decompress(body) == expected
    assert comparable(parse(gzip.decompress(body).decode())) == comparable(parse(expected.decode()))
