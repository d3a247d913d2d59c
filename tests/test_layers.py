"""The import rule between the rooms (docs/architecture.md), checked by reading the source, not by importing it.

Every module under agent/, probes/, exporters/ and workloads/ is parsed with ``ast``. An arrow is any way a
module can come to load another wattledger module: ``import`` and ``from ... import`` at the top or inside a
function (lazy), ``importlib.import_module("...")`` and ``__import__("...")`` with a literal name, and a
string literal that is a wattledger module path (``"wattledger.workloads.chat"`` in a table that is handed
to importlib later: agent/cli.py's commands, workloads/registry.py's regimes). Each arrow must be allowed by
``RULE`` below; the failure names the file, the line and the arrow.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "wattledger"
# The four code folders install as subpackages of the one import package (pyproject.toml's package-dir).
FOLDERS = ("agent", "probes", "exporters", "workloads")
MODULE_PATH = re.compile(r"wattledger\.[a-z_.]+")

# ---------------------------------------------------------------------------------------------------------
# The rule, as data. A room is a module-name prefix; the longest prefix that matches names a module's room.
ROOMS = {
    "probes": "wattledger.probes",
    "agent": "wattledger.agent",
    "exporters": "wattledger.exporters",
    "regimes": "wattledger.workloads",
    "bench": "wattledger.workloads.bench",
}


@dataclass(frozen=True)
class Allowed:
    """What a room may import: whole rooms, and single modules of other rooms."""

    rooms: frozenset[str]
    modules: frozenset[str] = frozenset()


RULE = {
    # Hardware and external sources know nothing above them.
    "probes": Allowed(frozenset({"probes"})),
    # The daemon: sampler, ledger, accounting, HTTP API, config, client.
    "agent": Allowed(frozenset({"probes", "agent", "exporters"})),
    # Exporters read the agent's snapshot (the ledger's types) and its version, nothing else of it.
    "exporters": Allowed(frozenset({"probes", "exporters"}),
                         frozenset({"wattledger.agent.ledger", "wattledger.agent.version"})),
    # The regimes talk to the agent only through its client API and its value parsers; the activity types
    # come from probes.activity as long as agent.client does not re-export them. The simulated device
    # (workloads/device_time.py, issue 14) reads the mock GPU's presets and power law where the mock keeps
    # them (plain data and arithmetic, no backend), so the two cannot drift apart.
    "regimes": Allowed(frozenset({"regimes"}),
                       frozenset({"wattledger.agent.client", "wattledger.agent.config",
                                  "wattledger.probes.activity", "wattledger.probes.mock_presets"})),
    # The measurement reaches the regimes only through the registry (Regime.load()), and may build an agent
    # through its public face (agent.daemon).
    "bench": Allowed(frozenset({"bench"}),
                     frozenset({"wattledger.workloads.registry", "wattledger.workloads.reporter",
                                "wattledger.workloads.cli_args", "wattledger.probes.engine_counters",
                                "wattledger.probes.records", "wattledger.exporters.jsonl",
                                "wattledger.agent.config", "wattledger.agent.version",
                                "wattledger.agent.client", "wattledger.agent.daemon"})),
}

# The one arrow upward, by design: the `wattledger` console script (agent/cli.py) loads the other commands
# by module path, on demand, so `wattledger agent` never loads them. Not followed when checking what the
# daemon can reach.
COMMAND_DISPATCH = {
    ("wattledger.agent.cli", "wattledger.workloads.cli"),
    ("wattledger.agent.cli", "wattledger.workloads.bench.cli"),
    ("wattledger.agent.cli", "wattledger.workloads.bench.run_command"),
}

# Third-party packages the daemon must never load (a GPU node's agent installs without them), and the one
# the measurement must never import (`wattledger run` and `report` install without torch).
NOT_IN_THE_DAEMON = frozenset({"torch", "pandas", "matplotlib", "numpy"})
NOT_IN_THE_MEASUREMENT = frozenset({"torch"})

# Arrows against the rule that are tolerated for now, as (importer, imported) pairs, each with its reason.
# Empty: the rule holds everywhere. An entry whose arrow is gone fails too, so none outlives its arrow.
KNOWN_UNTIL_REFACTOR: set[tuple[str, str]] = set()
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrow:
    """One way ``importer`` (in ``path`` at ``line``) loads ``imported``; ``by_path_string`` when it is a
    module path in a string that something loads on demand rather than an import statement or call;
    ``lazy`` when it sits inside a function (it runs when the function does, not when the module loads).
    ``named`` is the name as written (``imported`` is the module that holds it, or a third-party package)."""

    importer: str
    imported: str
    path: str
    line: int
    by_path_string: bool = False
    lazy: bool = False
    named: str = ""

    def __str__(self) -> str:
        how = " (module path in a string)" if self.by_path_string else ""
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported}{how}"


def module_files() -> dict[str, Path]:
    """Every wattledger module in the tree, by dotted name."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def room_of(module: str) -> str:
    """The room whose prefix is the longest that names ``module``."""
    matches = [room for room, prefix in ROOMS.items() if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=lambda room: len(ROOMS[room]))


def resolve_relative(importer: str, level: int, name: str | None) -> str:
    """``from .x import y`` in ``importer``: the absolute name of ``.x``."""
    base = importer.split(".")
    if not is_package(importer):
        base.pop()
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def from_import_targets(base: str, names: list[str]) -> list[str]:
    """``from base import a, b``: the submodules a and b where they are modules, else ``base`` itself."""
    targets = [f"{base}.{name}" for name in names if f"{base}.{name}" in MODULES]
    if len(targets) < len(names):
        targets.append(base)
    return targets


def literal_import_call(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")``, ``import_module("x")`` or ``__import__("x")``."""
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def arrows_of(module: str) -> list[Arrow]:
    """Every arrow out of ``module``, to wattledger modules and to top-level third-party packages."""
    path = MODULES[module]
    return arrows_in_source(module, path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


def arrows_in_source(module: str, source: str, relative: str) -> list[Arrow]:
    """The arrows in ``source`` read as the text of ``module`` (at ``relative``, for messages)."""
    tree = ast.parse(source, relative)
    in_functions = {id(inner) for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                    for inner in ast.walk(node) if inner is not node}
    found: list[Arrow] = []

    def add(node: ast.AST, named: str, by_path_string: bool = False) -> None:
        if named != module:
            found.append(Arrow(module, named, relative, node.lineno, by_path_string, id(node) in in_functions,
                               named))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(module, node.level, node.module) if node.level else node.module
            for target in from_import_targets(base, [alias.name for alias in node.names]):
                add(node, target)
        elif isinstance(node, ast.Call) and (name := literal_import_call(node)):
            add(node, name)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and MODULE_PATH.fullmatch(node.value)):
            # The constant part of f"wattledger.workloads.{name}" names the package it loads from.
            add(node, node.value.rstrip("."), by_path_string=True)
    return sorted((normalise(arrow) for arrow in found), key=lambda arrow: (arrow.line, arrow.imported))


def normalise(arrow: Arrow) -> Arrow:
    """wattledger targets as the module that holds them (``a.b.Name`` -> ``a.b``); others as their top-level
    package (``torch.nn.functional`` -> ``torch``)."""
    imported = arrow.imported
    if imported == PACKAGE or imported.startswith(PACKAGE + "."):
        while imported not in MODULES and "." in imported:
            imported = imported.rsplit(".", 1)[0]
    else:
        imported = imported.split(".")[0]
    return replace(arrow, imported=imported)


ALL_ARROWS = [arrow for module in MODULES for arrow in arrows_of(module)]
INTERNAL_ARROWS = [arrow for arrow in ALL_ARROWS if arrow.imported in MODULES]


def is_allowed(arrow: Arrow) -> bool:
    allowed = RULE[room_of(arrow.importer)]
    return (room_of(arrow.imported) in allowed.rooms or arrow.imported in allowed.modules
            or (arrow.importer, arrow.imported) in COMMAND_DISPATCH)


def reachable(start: set[str], follow) -> dict[str, list[str]]:
    """The modules reachable from ``start`` over the arrows ``follow`` accepts, each with one path to it."""
    paths = {module: [module] for module in start}
    frontier = sorted(start)
    while frontier:
        module = frontier.pop()
        for arrow in INTERNAL_ARROWS:
            if arrow.importer == module and arrow.imported not in paths and follow(arrow):
                paths[arrow.imported] = paths[module] + [arrow.imported]
                frontier.append(arrow.imported)
    return paths


def known(arrow: Arrow) -> bool:
    return (arrow.importer, arrow.imported) in KNOWN_UNTIL_REFACTOR


# ---------------------------------------------------------------------------------------------------------


def test_the_tree_has_every_room_and_the_rule_names_modules_that_exist():
    assert {room_of(module) for module in MODULES} == set(ROOMS) == set(RULE)
    named = {module for allowed in RULE.values() for module in allowed.modules}
    named |= {module for pair in COMMAND_DISPATCH for module in pair}
    assert sorted(named - set(MODULES)) == [], "the rule names modules the tree no longer has"


def test_every_wattledger_module_named_exists():
    # A lazy import, or a module path in a table that importlib reads later, fails only when that function,
    # command or regime runs; here it fails at once (a module moved by the refactor, its old name left).
    stale = [f"{arrow}  (names {arrow.named}, which is no module)" for arrow in ALL_ARROWS
             if arrow.named.startswith(PACKAGE + ".") and arrow.named not in MODULES]
    assert stale == [], "\n".join(stale)


def test_every_arrow_between_rooms_follows_the_rule():
    against = [f"{arrow}  [{room_of(arrow.importer)} -> {room_of(arrow.imported)}]"
               for arrow in INTERNAL_ARROWS if not is_allowed(arrow) and not known(arrow)]
    assert against == [], "arrows against the import rule (docs/architecture.md):\n" + "\n".join(against)


def test_the_measurement_never_imports_torch():
    # Every import in a measurement module, lazy ones included, and what loading those modules loads in
    # turn (their module-level imports). The lazy imports of the modules it uses are theirs to make: the
    # registry loads a regime (and torch) only when `bench` is about to run it, which is its job. Arrows the
    # allow-list tolerates are not followed.
    bench = {module for module in MODULES if room_of(module) == "bench"}

    def loads(arrow: Arrow) -> bool:
        return (not arrow.by_path_string and not known(arrow)
                and (arrow.importer in bench or not arrow.lazy))

    paths = reachable(bench, follow=loads)
    found = [f"{arrow}  (via {' -> '.join(paths[arrow.importer])})" for arrow in ALL_ARROWS
             if arrow.importer in paths and arrow.imported in NOT_IN_THE_MEASUREMENT and loads(arrow)]
    assert found == [], "torch imported by the measurement:\n" + "\n".join(found)


def test_nothing_the_daemon_can_reach_imports_torch_pandas_matplotlib_or_numpy():
    # The static side of tests/test_cli.py::test_the_agent_never_imports_torch_or_pandas (which imports
    # every agent, probe and exporter module in a fresh interpreter and runs a mock agent): this one also
    # sees lazy imports in functions that run never or rarely. The command dispatch table is not followed:
    # those commands are not the daemon.
    daemon = {module for module in MODULES if room_of(module) in ("agent", "probes", "exporters")}
    paths = reachable(daemon, follow=lambda arrow: (arrow.importer, arrow.imported) not in COMMAND_DISPATCH)
    found = [f"{arrow}  (via {' -> '.join(paths[arrow.importer])})" for arrow in ALL_ARROWS
             if arrow.importer in paths and arrow.imported in NOT_IN_THE_DAEMON]
    assert found == [], "heavy packages reachable from the daemon:\n" + "\n".join(found)


def test_the_allow_list_names_only_arrows_still_in_the_tree():
    # So it empties as the refactor lands: an entry whose arrow is gone must be deleted.
    present = {(arrow.importer, arrow.imported) for arrow in ALL_ARROWS}
    gone = sorted(KNOWN_UNTIL_REFACTOR - present)
    assert gone == [], "KNOWN_UNTIL_REFACTOR lists arrows no longer in the tree; delete them:\n" + "\n".join(
        f"{a} -> {b}" for a, b in gone)


def test_the_allow_list_holds_only_arrows_against_the_rule():
    # An allowed arrow in the allow-list would hide nothing but make the list look longer than the work left.
    fine = sorted(pair for pair in KNOWN_UNTIL_REFACTOR
                  if pair[1] in MODULES and is_allowed(Arrow(pair[0], pair[1], "", 0)))
    assert fine == []


# ---------------------------------------------------------------------------------------------------------
# The checker itself, on made-up modules: each kind of arrow is seen, so the tests above can fail.

MADE_UP_PROBE = '''"""A docstring that mentions wattledger.agent.ledger is prose, not an arrow."""
import torch.nn
from wattledger.agent import ledger
from .base import FieldStatus


def lazy():
    from wattledger.agent.sampler import Sampler
    import importlib
    importlib.import_module("wattledger.exporters.jsonl")
    __import__("wattledger.agent.daemon")
    return {"serve": ("wattledger.agent.http_api", "serve")}, f"wattledger.workloads.{Sampler}"
'''


def test_the_checker_sees_every_kind_of_arrow():
    arrows = arrows_in_source("wattledger.probes.host", MADE_UP_PROBE, "probes/host.py")
    assert {(arrow.imported, arrow.line, arrow.by_path_string, arrow.lazy) for arrow in arrows} == {
        ("torch", 2, False, False),                         # third-party, as its top-level package
        ("wattledger.agent.ledger", 3, False, False),       # from a package import a submodule
        ("wattledger.probes.base", 4, False, False),        # relative
        ("wattledger.agent.sampler", 8, False, True),       # lazy, inside a function
        ("importlib", 9, False, True),
        ("wattledger.exporters.jsonl", 10, False, True),    # importlib with a literal
        ("wattledger.agent.daemon", 11, False, True),       # __import__ with a literal
        ("wattledger.exporters.jsonl", 10, True, True),     # ... whose literal is also a module path
        ("wattledger.agent.daemon", 11, True, True),
        ("wattledger.agent.http_api", 12, True, True),      # a module path in a table for importlib
        ("wattledger.workloads", 12, True, True),           # the package an f-string loads from
    }


def test_the_rule_refuses_an_arrow_upward_and_names_file_line_and_arrow():
    arrows = arrows_in_source("wattledger.probes.host", MADE_UP_PROBE, "probes/host.py")
    refused = sorted(str(arrow) for arrow in arrows if arrow.imported in MODULES and not is_allowed(arrow))
    assert refused[0] == "probes/host.py:10: wattledger.probes.host -> wattledger.exporters.jsonl"
    assert {arrow.imported for arrow in arrows if arrow.imported in MODULES and not is_allowed(arrow)} == {
        "wattledger.agent.ledger", "wattledger.agent.sampler", "wattledger.exporters.jsonl",
        "wattledger.agent.daemon", "wattledger.agent.http_api", "wattledger.workloads"}
    # The same import from the exporters is allowed for the ledger and refused for the sampler.
    as_exporter = arrows_in_source("wattledger.exporters.prometheus", MADE_UP_PROBE, "exporters/prometheus.py")
    verdicts = {arrow.imported: is_allowed(arrow) for arrow in as_exporter
                if arrow.imported in MODULES and not arrow.by_path_string}
    assert verdicts["wattledger.agent.ledger"] and not verdicts["wattledger.agent.sampler"]


def test_the_measurement_may_reach_the_regimes_only_through_the_registry():
    bench = Arrow("wattledger.workloads.bench.analysis", "wattledger.workloads.chat", "", 0)
    through_registry = Arrow("wattledger.workloads.bench.analysis", "wattledger.workloads.registry", "", 0)
    assert not is_allowed(bench) and is_allowed(through_registry)


def test_a_name_the_tree_does_not_hold_is_seen_even_where_it_loads_late():
    source = 'def later():\n    return {"gone": "wattledger.workloads.telemetry"}\n'
    (arrow,) = arrows_in_source("wattledger.workloads.cli", source, "workloads/cli.py")
    assert arrow.named == "wattledger.workloads.telemetry" and arrow.named not in MODULES
    assert arrow.imported == "wattledger.workloads" and arrow.lazy and arrow.by_path_string


def test_citations_in_the_code_resolve_inside_the_repository():
    """Sources cite docs/ (the figures with their sources, the measurement rules), never reference files a
    clone does not have."""
    outside = [str(path.relative_to(ROOT)) for folder in ("agent", "probes", "exporters", "workloads")
               for path in (ROOT / folder).rglob("*.py") if "shared/reference" in path.read_text()]
    assert not outside, f"cite docs/ instead of shared/reference in: {', '.join(outside)}"
    for cited in ("docs/workload-figures.md", "docs/measurement.md"):
        assert (ROOT / cited).is_file(), f"{cited} is cited in the code but missing"
