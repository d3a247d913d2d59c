"""Structural checks of the Grafana dashboards and provisioning files under deploy/grafana.

Every dashboard JSON under deploy/grafana/dashboards must parse, give each panel (rows' nested panels
included) a unique id, declare a Prometheus ``datasource`` template variable and route every panel,
target and query variable through it (no hard-coded datasource uid), give every non-row panel at least
one target with a PromQL expr, and use in its queries only metric names of the contract
(tests/golden/metrics_mock.prom) or recording rules defined in deploy/prometheus/rules/*.yml. Queries
must also have balanced brackets. Whether Prometheus accepts and answers every query is checked
against a real Prometheus elsewhere; here only the structure is checked, without network or binaries.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deploy_files import GRAFANA, ROOT, rule_names, walk_panels, yaml_documents

DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROVISIONING = sorted((GRAFANA / "provisioning").glob("**/*.yml")) + sorted((GRAFANA / "provisioning").glob("**/*.yaml"))
GOLDEN = ROOT / "tests" / "golden" / "metrics_mock.prom"

DS_REFS = {"${datasource}", "$datasource"}

# PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "atan2", "inf", "nan", "start", "end",
}
# Clauses whose parenthesised list holds label names, not metrics.
LABEL_LIST_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![\w:])")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _golden_metric_names() -> set[str]:
    """Series names in the golden exposition, plus the names each declared family may expose."""
    names: set[str] = set()
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            if kind == "histogram":
                names.update({f"{family}_bucket", f"{family}_sum", f"{family}_count"})
            elif kind == "summary":
                names.update({family, f"{family}_sum", f"{family}_count"})
            elif kind == "counter":
                names.add(family if family.endswith("_total") else f"{family}_total")
            else:
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# Series the agent exposes only with attribution on (`--attribution`), so absent from the golden
# exposition (rendered with it off): the per-owner series of docs/attribution.md, labelled owner_kind,
# namespace, pod, container, group, and the kubelet's allocations without a process (namespace, pod,
# container, resource). The fleet dashboard's "Who holds idle GPUs" panel reads them.
ATTRIBUTION_METRICS = {
    "wattledger_owner_energy_joules_total", "wattledger_owner_busy_seconds_total",
    "wattledger_owner_gpu_memory_bytes", "wattledger_owner_gpus", "wattledger_owner_info",
    "wattledger_attribution_status", "wattledger_pod_gpus_without_processes",
}
KNOWN_METRICS = _golden_metric_names() | set(rule_names("record")) | ATTRIBUTION_METRICS


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _ds_uid(ds) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds


def _variables(dash: dict) -> list[dict]:
    return (dash.get("templating") or {}).get("list") or []


def _variable_query(var: dict) -> str:
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    return query or ""


def _exprs(dash: dict):
    """(where, expr) for every panel target and every query variable."""
    for panel in walk_panels(dash.get("panels")):
        for target in panel.get("targets") or []:
            if target.get("expr") is not None:
                yield f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}", target["expr"]
    for var in _variables(dash):
        if var.get("type") == "query":
            yield f"variable {var.get('name')}", _variable_query(var)


def _strip_for_names(expr: str) -> str:
    """The expr with strings, label matchers, range/subquery brackets, numbers and label lists removed."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z]+)?\}?", " ", text)  # template variables
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery selectors
    text = LABEL_LIST_CLAUSE.sub(" ", text)
    text = re.sub(r"\blabel_values\s*\(([^(),]*?)(,[^()]*)?\)", r" \1 ", text)  # label_values(metric, label)
    text = re.sub(r"\blabel_values\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", " ", text)
    text = NUMBER.sub(" ", text)
    text = re.sub(r"\b(?:\d+[smhdwy])+\b", " ", text)  # durations (offset 5m)
    return text


def metric_names(expr: str) -> set[str]:
    """Metric names an expr refers to: identifiers that are neither functions, keywords nor labels."""
    text = _strip_for_names(expr)
    names = set()
    for match in IDENT.finditer(text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function (or aggregation) call
            continue
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)(\)?)", re.IGNORECASE)
LABEL_LIST = re.compile(r"^\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*(?:,\s*[A-Za-z_][A-Za-z0-9_]*\s*)*,?\s*)?$")


def bad_grouping(expr: str) -> list[str]:
    """Grouping clauses whose parentheses hold something other than label names.

    ``x / on (a) group_right (sum by (a, b) (y))`` parses ``(sum by ...`` as group_right's label list:
    a bare group_left / group_right before a parenthesised operand needs its own ``()``.
    """
    text = STRING.sub('""', expr)
    return [f"{m.group(1)} ({m.group(2).strip()}" for m in GROUPING.finditer(text)
            if not m.group(3) or not LABEL_LIST.match(m.group(2))]


def balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and expr.count('"') % 2 == 0


def test_dashboards_exist():
    names = {p.name for p in DASHBOARDS}
    assert {"node.json", "economics.json", "fleet.json"} <= names, names


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_parses_and_is_portable(path):
    dash = _load(path)
    assert dash.get("title") and dash.get("uid")
    assert isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36
    assert "__inputs" not in dash and "__requires" not in dash, "export for sharing without __inputs"
    assert dash.get("id") is None, "a provisioned dashboard carries no database id"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_unique_panel_ids(path):
    ids = [panel.get("id") for panel in walk_panels(_load(path).get("panels"))]
    assert all(isinstance(i, int) for i in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate panel ids {duplicates}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_datasource_variable_used_everywhere(path):
    dash = _load(path)
    ds_vars = [v for v in _variables(dash) if v.get("name") == "datasource"]
    assert len(ds_vars) == 1, "exactly one template variable named datasource"
    assert ds_vars[0].get("type") == "datasource" and ds_vars[0].get("query") == "prometheus"

    problems = []
    for panel in walk_panels(dash.get("panels")):
        if panel.get("type") == "row":
            if panel.get("datasource") is not None and _ds_uid(panel["datasource"]) not in DS_REFS:
                problems.append(f"row {panel.get('id')}: {panel['datasource']!r}")
            continue
        if _ds_uid(panel.get("datasource")) not in DS_REFS:
            problems.append(f"panel {panel.get('id')}: {panel.get('datasource')!r}")
        for target in panel.get("targets") or []:
            if _ds_uid(target.get("datasource")) not in DS_REFS:
                problems.append(f"panel {panel.get('id')} target {target.get('refId')}: {target.get('datasource')!r}")
    for var in _variables(dash):
        if var.get("type") == "query" and _ds_uid(var.get("datasource")) not in DS_REFS:
            problems.append(f"variable {var.get('name')}: {var.get('datasource')!r}")
    assert not problems, problems

    # No datasource uid other than the variable anywhere (the built-in annotation source excepted).
    text = json.dumps({k: v for k, v in dash.items() if k != "annotations"})
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dash["uid"]}
    assert uids <= DS_REFS, f"hard-coded datasource uids: {uids - DS_REFS}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_query(path):
    empty = []
    for panel in walk_panels(_load(path).get("panels")):
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets or not all((t.get("expr") or "").strip() for t in targets):
            empty.append(f"{panel.get('id')} {panel.get('title')!r}")
        if len({t.get("refId") for t in targets}) != len(targets):
            empty.append(f"{panel.get('id')} duplicate refIds")
    assert not empty, f"panels without a query: {empty}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_exprs_use_contract_metrics_only(path):
    unknown = {}
    for where, expr in _exprs(_load(path)):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        bad = sorted(n for n in names if n not in KNOWN_METRICS)
        if bad:
            unknown[where] = bad
    assert not unknown, f"metric names outside the contract and the recording rules: {unknown}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_exprs_balanced_and_use_rate_interval(path):
    problems = []
    for where, expr in _exprs(_load(path)):
        if not balanced(expr):
            problems.append(f"{where}: unbalanced brackets")
        for clause in bad_grouping(expr):
            problems.append(f"{where}: grouping clause {clause!r} is not a label list")
        # Template variables go into regex matchers, so multi-value and All selections work.
        for var in re.findall(r'[=!]~?\s*"[^"]*\$\{?([A-Za-z_]\w*)', expr):
            if not var.startswith("__") and not re.search(rf'=~\s*"\$\{{?{var}\b', expr):
                problems.append(f"{where}: ${var} used with an exact matcher; use =~")
        # Windows come from Grafana: no hard-coded rate window except inside subqueries.
        for window in re.findall(r"\b(?:rate|irate|increase)\s*\([^()\[]*\[([^\]]+)\]", expr):
            if window not in ("$__rate_interval", "$__range") and "[$__range:" not in expr:
                problems.append(f"{where}: rate window {window!r}, use $__rate_interval or $__range")
    assert not problems, problems


def test_metric_name_extraction():
    expr = ('sum by (workload) (rate(wattledger_workload_energy_joules_total{instance=~"$instance"}[$__rate_interval]))\n'
            '/ on (workload) group_right () (sum by (workload, kind) (rate(wattledger_workload_tokens_total[5m])) > 0)'
            ' * scalar(wattledger:pricing_pue) / 3.6e6 + histogram_quantile(0.99, x_bucket{le=~"0|0.0"})')
    assert metric_names(expr) == {"wattledger_workload_energy_joules_total", "wattledger_workload_tokens_total",
                                  "wattledger:pricing_pue", "x_bucket"}
    assert metric_names("label_values(wattledger_gpu_info{instance=~\"$instance\"}, gpu)") == {"wattledger_gpu_info"}
    assert not bad_grouping("a / on (w) group_right () (sum by (w, k) (b))")
    assert bad_grouping("a / on (w) group_right\n(sum by (w, k) (b))")
    assert balanced("sum(rate(a[5m]))") and not balanced("sum(rate(a[5m])") and not balanced("a{b=\"c\"")


def test_attribution_metrics_are_not_in_the_default_exposition():
    # Were one of them in the golden file (attribution on by default), this list would hide a rename.
    assert not ATTRIBUTION_METRICS & _golden_metric_names()


def test_engine_row_reads_the_engine_rules():
    """The fleet dashboard's engine row shows every per-pod, per-model and per-namespace J/token and $/Mtok
    rule of rules/engines.yml, tokens/s per GPU, and the owners holding idle GPUs."""
    exprs = [expr for _, expr in _exprs(_load(GRAFANA / "dashboards" / "fleet.json"))]
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert {"wattledger:pod_energy_per_token:joules_rate5m", "wattledger:pod_cost:usd_per_million_tokens_rate5m",
            "wattledger:model_energy_per_token:joules_rate5m", "wattledger:model_cost:usd_per_million_tokens_rate5m",
            "wattledger:namespace_energy_per_token:joules_rate5m", "wattledger:pod_tokens_per_gpu:per_second_rate5m",
            "wattledger_owner_gpus", "wattledger_owner_busy_seconds_total"} <= used


def test_known_metrics_cover_contract():
    assert {"wattledger_gpu_busy_seconds_total", "wattledger_gpu_utilization_ratio_bucket",
            "wattledger_gpu_utilization_ratio_count", "wattledger_gpu_info"} <= KNOWN_METRICS
    assert "wattledger_gpu_utilization_ratio" not in KNOWN_METRICS


@pytest.mark.parametrize("path", PROVISIONING, ids=lambda p: str(p.relative_to(GRAFANA)))
def test_provisioning_yaml_parses(path):
    (doc,) = yaml_documents(path)
    assert isinstance(doc, dict) and doc.get("apiVersion") == 1


def test_provisioning_contents():
    (datasources,) = yaml_documents(GRAFANA / "provisioning" / "datasources" / "wattledger.yml")
    (prom,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prom["uid"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    (providers,) = yaml_documents(GRAFANA / "provisioning" / "dashboards" / "wattledger.yml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
