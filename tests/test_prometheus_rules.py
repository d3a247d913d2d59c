"""The deployment files parse, and the Prometheus configuration and rules pass promtool: syntax
(check config, check rules) and the hand-written unit tests under deploy/prometheus/tests/, which cover
every recording rule and every alert (checked here too, so a new rule cannot go untested)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_server import (
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    REPO,
    RULES_DIR,
    require_tools,
)

DEPLOY = REPO / "deploy"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def _rules(kind: str) -> list[str]:
    names = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [r[kind] for r in group["rules"] if kind in r]
    return names


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = require_tools("promtool")["promtool"]
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO), check=False)


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_under_deploy_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents, f"{path} is empty"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(REPO)))
def test_json_under_deploy_parses(path: Path) -> None:
    json.loads(path.read_text())


def test_rule_names_unique_and_well_formed() -> None:
    records, alerts = _rules("record"), _rules("alert")
    assert records and alerts
    assert len(set(records)) == len(records), "recording rule recorded twice"
    assert len(set(alerts)) == len(alerts), "alert defined twice"
    for name in records:
        assert re.fullmatch(r"wattledger:[a-z0-9_]+(:[a-z0-9_]+)?", name), name
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_unit_tests_cover_every_rule() -> None:
    text = "\n".join(p.read_text() for p in UNIT_TESTS)
    tested_exprs = set(re.findall(r"^\s*- expr:\s*(\S+)\s*$", text, re.MULTILINE))
    tested_alerts = set(re.findall(r"^\s*alertname:\s*(\S+)\s*$", text, re.MULTILINE))
    assert set(_rules("record")) - tested_exprs == set(), "recording rules without a promtool unit test"
    assert set(_rules("alert")) - tested_alerts == set(), "alerts without a promtool unit test"


def test_promtool_check_config() -> None:
    done = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    done = _promtool("check", "rules", *map(str, RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # runs the real promtool binary over every rule test
def test_promtool_unit_tests() -> None:
    assert UNIT_TESTS
    done = _promtool("test", "rules", *map(str, UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
