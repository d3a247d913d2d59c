"""``promtool check metrics`` passes on the whole exposition (issue 8, item 15).

promtool lints metric names as Prometheus' conventions ask: ``_count``, ``_sum`` and ``_bucket`` belong to
histograms and summaries, counters end in ``_total``, base units. It found ``wattledger_host_cpu_count``
(now ``wattledger_host_cpus``). The golden file is checked, and so is the exporter as it renders now; a
pure-Python version of the suffix rules runs where promtool cannot be had."""

from __future__ import annotations

import re

import pytest
from deploy_files import ROOT, run_promtool
from test_golden_exposition import GOLDEN, render_mock_exposition

RESERVED_SUFFIXES = ("_count", "_sum", "_bucket")


@pytest.mark.parametrize("source", ["golden file", "exporter now"])
def test_promtool_check_metrics_passes_on_the_whole_exposition(source):
    text = GOLDEN.read_text() if source == "golden file" else render_mock_exposition()
    result = run_promtool("check", "metrics", input_text=text)
    problems = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and problems == "", problems


def test_the_cpu_count_family_is_named_as_promtool_wants():
    text = GOLDEN.read_text()
    assert "wattledger_host_cpus 4.0" in text.splitlines()
    assert "wattledger_host_cpu_count" not in text


def family_types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def test_suffix_rules_without_promtool():
    for name, kind in family_types(render_mock_exposition()).items():
        if kind not in ("histogram", "summary"):
            assert not name.endswith(RESERVED_SUFFIXES), f"{name} ({kind}) ends in a suffix histograms own"
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} does not end in _total"


def test_dashboards_and_rules_do_not_use_the_old_name():
    for path in [*ROOT.glob("deploy/**/*.json"), *ROOT.glob("deploy/**/*.yml"), ROOT / "README.md",
                 *ROOT.glob("docs/**/*.md")]:
        assert "wattledger_host_cpu_count" not in path.read_text(encoding="utf-8"), path
