"""The Prometheus configuration and rules pass promtool: syntax (check config, check rules) and the
hand-written unit tests under deploy/prometheus/tests/, which cover every recording rule and every alert
(checked here too, so a new rule cannot go untested). That every file under deploy/ parses is
test_deploy_manifests.py's."""

from __future__ import annotations

import re

import pytest
from deploy_files import rule_files, rule_names, rules, run_promtool
from prometheus_server import PROMETHEUS_CONFIG, PROMETHEUS_DIR

UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def test_rule_names_unique_and_well_formed() -> None:
    records, alerts = rule_names("record"), rule_names("alert")
    assert records and alerts
    assert len(set(records)) == len(records), "recording rule recorded twice"
    assert len(set(alerts)) == len(alerts), "alert defined twice"
    for name in records:
        assert re.fullmatch(r"wattledger:[a-z0-9_]+(:[a-z0-9_]+)?", name), name
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_unit_tests_cover_every_rule() -> None:
    text = "\n".join(p.read_text() for p in UNIT_TESTS)
    tested_exprs = set(re.findall(r"^\s*- expr:\s*(\S+)\s*$", text, re.MULTILINE))
    tested_alerts = set(re.findall(r"^\s*alertname:\s*(\S+)\s*$", text, re.MULTILINE))
    assert set(rule_names("record")) - tested_exprs == set(), "recording rules without a promtool unit test"
    assert set(rule_names("alert")) - tested_alerts == set(), "alerts without a promtool unit test"


def test_promtool_check_config() -> None:
    done = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    done = run_promtool("check", "rules", *map(str, rule_files()))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # runs the real promtool binary over every rule test
def test_promtool_unit_tests() -> None:
    assert UNIT_TESTS
    done = run_promtool("test", "rules", *map(str, UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
