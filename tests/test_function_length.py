"""The regimes and the measurement read on one screen: no function in workloads/ (workloads/bench/ included)
is longer than 80 lines, so a newcomer can follow any of them top to bottom (issue 11's bar). A long flat
table belongs in data, not in a function."""

from __future__ import annotations

import ast
from pathlib import Path

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
MAX_FUNCTION_LINES = 80


def long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` for every function or method under ``root`` longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_regimes_or_the_measurement_is_over_80_lines():
    assert long_functions(WORKLOADS, MAX_FUNCTION_LINES) == []


def test_the_check_sees_a_long_function(tmp_path):
    package = tmp_path / "workloads"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text(f"def too_long():\n{body}\n\n\ndef short():\n    return 1\n")
    expected = f"workloads/long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"
    assert long_functions(package, MAX_FUNCTION_LINES) == [expected]
