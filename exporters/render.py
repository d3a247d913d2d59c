"""Writes the agent's own families straight to exposition bytes, in the text format and OpenMetrics.

prometheus_client's encoders cost about 85% of a scrape (a regex and three replaces per label in the
text format, a character-by-character escape of every sample name in OpenMetrics), and that cost moves
with the version pip resolves. The agent's families are ``RowFamily`` objects: ordinary
prometheus_client families to every reader (``.samples`` is built on first use, so
``generate_latest`` and the golden file see exactly what they always did), which also keep their rows
as ``(label values, value)``. ``render_text`` and ``render_openmetrics`` write those rows directly:

- the ``name{labels} `` prefix of a row is built once per label-value tuple and kept (the gpu, uuid,
  engine, sensor, ... of a node do not change between scrapes), so a steady-state line costs a dict
  lookup, the value's spelling (``go_float``: prometheus_client's ``floatToGoString``, with a shortcut
  for the values where it equals ``repr``) and a join;
- label values are escaped as prometheus_client escapes them (``\\``, newline, ``"``), labels are
  sorted by name, and histograms follow ``HistogramMetricFamily`` (``_count`` and ``_sum`` only with
  a sum and a non-negative first bound).

Any other family (a collector that builds prometheus_client families itself) is written by
prometheus_client's own encoder, one family at a time, so a registry may mix both. prometheus_client
stays the reference: ``tests/test_direct_renderer.py`` checks, over random ledger snapshots, that both
parse to the same samples, and that the golden snapshot is byte-identical.
"""

from __future__ import annotations

import gzip
import re
from functools import partial
from operator import itemgetter
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as _reference_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _openmetrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Chosen by measurement (``tests/benchmarks/bench_scrape.py --only render``, the 2-core machine):
# OpenMetrics of 8 mock GPUs (86 KB) at levels 1 / 3 / 6 / 9: 0.12 / 0.14 / 0.51 / 1.20 ms, 6.8 / 6.7 /
# 5.9 / 5.8 KB; of 64 (643 KB): 1.1 / 1.4 / 4.0 / 10.8 ms, 38 / 38 / 31 / 30 KB. Level 1 costs a tenth
# of level 9 (prometheus_client's) for at most 8 KB more a scrape, which a LAN carries in microseconds.
GZIP_LEVEL = 1

# Names the direct path writes as they are: legacy Prometheus names, no colons, so every escaping
# scheme prometheus_client offers for them leaves them unchanged where the direct path is used.
_LEGACY_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Escapings under which prometheus_client writes legacy names unchanged; others (dots, values)
# rewrite names, and are answered by prometheus_client's own encoders.
_DIRECT_ESCAPINGS = (_openmetrics.UNDERSCORES, _openmetrics.ALLOWUTF8)
# A prefix cache of one family that grows past this (label values that churn: workload names) starts
# again, so the cache stays bounded whatever comes and goes.
_MAX_PREFIXES_PER_FAMILY = 4096

_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}


def go_float(value: float) -> str:
    """``floatToGoString(value)``, prometheus_client's spelling of a sample value, sooner for most values.

    Below a million in size, ``floatToGoString`` returns ``repr`` of the float (Go's exponent form
    starts at seven integer digits); NaN and the infinities fail both comparisons and go to it too."""
    kind = type(value)
    if kind is float and -1e6 < value < 1e6:
        return repr(value)
    if kind is int and -1_000_000 < value < 1_000_000:
        return repr(float(value))
    return floatToGoString(value)


def _escape_label_value(value: str) -> str:
    """As prometheus_client escapes a label value (both formats): backslash, newline, double quote."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_string(names: Sequence[str], values: Sequence[str]) -> str:
    """``{a="1",b="2"}`` sorted by label name, or "" with no labels (prometheus_client's spelling)."""
    if not names:
        return ""
    pairs = sorted(zip(names, values))
    return "{" + ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in pairs) + "}"


class RowFamily(Metric):
    """A gauge or counter family kept as rows of ``(label values tuple, value)``.

    To prometheus_client it is an ordinary family: ``samples`` is built from the rows on first read
    (as ``GaugeMetricFamily`` / ``CounterMetricFamily`` would have built them). ``add_metric`` takes
    the same arguments as theirs. Names must be legacy Prometheus names (checked here, once).
    """

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str] = ()):
        if typ not in ("gauge", "counter", "histogram") or typ == "histogram" and type(self) is RowFamily:
            raise ValueError(f"RowFamily holds gauges and counters (HistogramFamily histograms), not {typ!r}")
        if typ == "counter" and name.endswith("_total"):
            name = name[:-6]  # as CounterMetricFamily does
        Metric.__init__(self, name, documentation, typ)  # its "self.samples = []" goes to the setter
        for label in labels:
            if not _LEGACY_NAME.match(label) or label == "le" and typ == "histogram":
                raise ValueError(f"label name {label!r} is not one the direct renderer writes as it is")
        if not _LEGACY_NAME.match(name):
            raise ValueError(f"metric name {name!r} is not one the direct renderer writes as it is")
        self.label_names: tuple[str, ...] = tuple(labels)
        self.rows: list[tuple] = []
        self._samples: list[Sample] | None = None

    @property
    def sample_names(self) -> frozenset[str]:
        """Names of the samples this family can hold (for ``name[]`` filters)."""
        suffix = "_total" if self.type == "counter" else ""
        return frozenset({self.name + suffix})

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.rows.append((tuple(labels), value))
        self._samples = None

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        if self._samples is None:
            self._samples = self._build_samples()
        return self._samples

    @samples.setter
    def samples(self, samples: list[Sample]) -> None:
        # Metric.__init__ assigns []: rows then stay the source. Anything else replaces them.
        self._samples = list(samples) if samples else None

    def _build_samples(self) -> list[Sample]:
        name = self.name + ("_total" if self.type == "counter" else "")
        return [Sample(name, dict(zip(self.label_names, values)), value, None, None)
                for values, value in self.rows]

    def _write(self, out: list[str]) -> None:
        """Append this family's sample lines to ``out``."""
        name = self.name + ("_total" if self.type == "counter" else "")
        prefixes = _prefix_cache(name, self.label_names)
        names = self.label_names
        for values, value in self.rows:
            prefix = prefixes.get(values)
            if prefix is None:
                prefix = prefixes[values] = f"{name}{_label_string(names, values)} "
            out.append(f"{prefix}{go_float(value)}\n")


def GaugeFamily(name: str, documentation: str, labels: Sequence[str] = ()) -> RowFamily:
    """A gauge family written by the direct renderer (``GaugeMetricFamily``'s ``add_metric``)."""
    return RowFamily(name, documentation, "gauge", labels)


def CounterFamily(name: str, documentation: str, labels: Sequence[str] = ()) -> RowFamily:
    """A counter family written by the direct renderer (``CounterMetricFamily``'s ``add_metric``)."""
    return RowFamily(name, documentation, "counter", labels)


class HistogramFamily(RowFamily):
    """A histogram kept as rows of ``(label values tuple, buckets, sum)``, as ``HistogramMetricFamily``.

    ``buckets`` are ``(le string, cumulative count)`` pairs ending with ``+Inf``."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()):
        super().__init__(name, documentation, "histogram", labels)

    @property
    def sample_names(self) -> frozenset[str]:
        return frozenset({self.name + "_bucket", self.name + "_count", self.name + "_sum"})

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]],  # type: ignore[override]
                   sum_value: float | None) -> None:
        self.rows.append((tuple(labels), buckets, sum_value))
        self._samples = None

    @staticmethod
    def _has_count_and_sum(buckets: Sequence[tuple[str, float]], sum_value: float | None) -> bool:
        # HistogramMetricFamily leaves _count and _sum out when the first bound is negative.
        return float(buckets[0][0]) >= 0 and sum_value is not None

    def _build_samples(self) -> list[Sample]:
        out = []
        for values, buckets, sum_value in self.rows:
            labels = list(zip(self.label_names, values))
            for le, count in buckets:
                out.append(Sample(self.name + "_bucket", dict(labels + [("le", le)]), count, None, None))
            if self._has_count_and_sum(buckets, sum_value):
                out.append(Sample(self.name + "_count", dict(labels), buckets[-1][1], None, None))
                out.append(Sample(self.name + "_sum", dict(labels), sum_value, None, None))
        return out

    def _write(self, out: list[str]) -> None:
        prefixes = _prefix_cache(self.name + "_bucket", self.label_names)
        names, bucket_names = self.label_names, self.label_names + ("le",)
        for values, buckets, sum_value in self.rows:
            les = tuple(map(itemgetter(0), buckets))
            key = (values, les)
            cached = prefixes.get(key)
            if cached is None:
                cached = prefixes[key] = (
                    tuple(f"{self.name}_bucket{_label_string(bucket_names, values + (le,))} " for le in les),
                    f"{self.name}_count{_label_string(names, values)} ",
                    f"{self.name}_sum{_label_string(names, values)} ",
                )
            bucket_prefixes, count_prefix, sum_prefix = cached
            for prefix, (_, count) in zip(bucket_prefixes, buckets):
                out.append(f"{prefix}{go_float(count)}\n")
            if self._has_count_and_sum(buckets, sum_value):
                out.append(f"{count_prefix}{go_float(buckets[-1][1])}\n")
                out.append(f"{sum_prefix}{go_float(sum_value)}\n")


_PREFIXES: dict[tuple[str, tuple[str, ...]], dict] = {}


def _prefix_cache(sample_name: str, label_names: tuple[str, ...]) -> dict:
    """The kept ``name{labels} `` prefixes of one family, by label values (bounded, see above).

    Shared by scrapes on any thread: dict reads and writes are atomic, and a lost race only builds a
    prefix twice."""
    key = (sample_name, label_names)
    prefixes = _PREFIXES.get(key)
    if prefixes is None or len(prefixes) > _MAX_PREFIXES_PER_FAMILY:
        prefixes = _PREFIXES[key] = {}
    return prefixes


class _One:
    """A collector of one family, for prometheus_client's encoders."""

    def __init__(self, family: Metric):
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


def _text_header(family: RowFamily) -> str:
    name = family.name + ("_total" if family.type == "counter" else "")
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {_TEXT_TYPES[family.type]}\n"


def _openmetrics_header(family: RowFamily) -> str:
    doc = _escape_label_value(family.documentation)  # OpenMetrics escapes quotes in HELP too
    return f"# HELP {family.name} {doc}\n# TYPE {family.name} {family.type}\n"


def render_text(families: Iterable[Metric], escaping: str = _openmetrics.UNDERSCORES) -> bytes:
    """The Prometheus text format of ``families``, as ``prometheus_client.generate_latest`` writes it.

    ``escaping`` (underscores or allow-utf-8) only matters to families of other collectors, which
    prometheus_client writes: the row families' names are the same under both."""
    out: list[str] = []
    for family in families:
        if isinstance(family, RowFamily):
            out.append(_text_header(family))
            family._write(out)
        else:
            out.append(_reference_text(_One(family), escaping=escaping).decode("utf-8"))
    return "".join(out).encode("utf-8")


def render_openmetrics(families: Iterable[Metric], escaping: str = _openmetrics.UNDERSCORES) -> bytes:
    """OpenMetrics 1.0 text of ``families``, as ``prometheus_client.openmetrics``' ``generate_latest``
    writes it (``escaping`` as for ``render_text``)."""
    out: list[str] = []
    for family in families:
        if isinstance(family, RowFamily):
            out.append(_openmetrics_header(family))
            family._write(out)
        else:
            written = _openmetrics.generate_latest(_One(family), escaping=escaping, version="1.0.0")
            out.append(written.decode("utf-8").removesuffix("# EOF\n"))
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


Encoder = Callable[[list[Metric]], bytes]


def choose_renderer(accept_header: str) -> tuple[Encoder, str]:
    """``(encoder of a family list, content type)`` for an Accept header.

    The format and content type are prometheus_client's choice (``choose_encoder``: OpenMetrics when
    asked for with version 1.0.0 or later, else the text format 0.0.4). The direct renderer answers
    wherever its output is the same as prometheus_client's; the rare escapings that rewrite names
    (``escaping=dots`` or ``values``) go to prometheus_client's encoder."""
    reference, content_type = choose_encoder(accept_header or "")
    escaping = content_type.partition("escaping=")[2].split(";")[0].strip() or _openmetrics.UNDERSCORES
    if escaping in _DIRECT_ESCAPINGS:
        if not content_type.startswith("application/openmetrics-text"):
            return partial(render_text, escaping=escaping), content_type
        if "version=1.0.0;" in content_type:  # 2.0.0 differs for native histograms only: left to the reference
            return partial(render_openmetrics, escaping=escaping), content_type
    return (lambda families: reference(_Collected(families))), content_type


class _Collected:
    """Already collected families, shaped as a collector for prometheus_client's encoders."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def compress(body: bytes) -> bytes:
    """gzip at ``GZIP_LEVEL`` (see there for why)."""
    return gzip.compress(body, compresslevel=GZIP_LEVEL)
