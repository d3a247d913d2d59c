"""The deployment material under deploy/ as the tests read it: where each part lives, and the one way each
kind of file is parsed (YAML documents, Prometheus rule files, Grafana panels) and promtool is run.

The deploy tests (test_deploy_manifests, test_prometheus_rules, test_grafana_dashboards,
test_promtool_metrics) share these so that a file is parsed the same way wherever it is checked.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
GRAFANA = DEPLOY / "grafana"
PROMTOOL_TIMEOUT_S = 120  # `promtool test rules` over every rule test takes seconds; a hang must end


def relative(path: Path) -> str:
    """``path`` from the repository root, for test ids and messages."""
    return str(path.relative_to(ROOT))


def yaml_documents(path: Path) -> list:
    """Every non-empty YAML document in ``path`` (a ``---`` with nothing after it is no document)."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def rule_files() -> list[Path]:
    """The Prometheus rule files, in name order (both extensions Prometheus accepts)."""
    return sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")])


def rules() -> list[dict]:
    """Every rule of every group of every rule file, in file and group order."""
    return [rule for path in rule_files() for group in yaml_documents(path)[0]["groups"]
            for rule in group["rules"]]


def rule_names(kind: str) -> list[str]:
    """The names of the recording rules (``kind="record"``) or of the alerts (``kind="alert"``)."""
    return [rule[kind] for rule in rules() if kind in rule]


def walk_panels(panels: Iterable[dict] | None) -> Iterator[dict]:
    """A dashboard's panels, each row followed by the panels nested in it."""
    for panel in panels or []:
        yield panel
        yield from walk_panels(panel.get("panels"))


def run_promtool(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    """``promtool ARGS`` from the repository root (paths in the config resolve from there); ends the test
    when promtool cannot be had (``require_tools``)."""
    from prometheus_server import require_tools  # only the promtool tests need it (it may apt-get install)

    promtool = require_tools("promtool")["promtool"]
    return subprocess.run([promtool, *args], input=input_text, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S, cwd=str(ROOT), check=False)
