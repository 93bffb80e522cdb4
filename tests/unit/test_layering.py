"""The floors of the code base (shared/DESIGN.md): common/ imports nothing above it, nothing imports the
CLI, and no two modules import each other, directly or round a circle (lazy imports inside functions
count: they hide a circle, they do not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "scheduler", "api", "worker", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue  # Alembic's scripts, run by Alembic
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _module_of(dotted: str) -> str | None:
    """The project module an import names (`from a.b import c` may import module a.b.c or name c of a.b)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(name: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                found.add(_module_of(target))
    found.discard(None)
    found.discard(name)
    found.discard(name.rpartition(".")[0])  # a module's own package __init__
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert {"common.checkpoints", "common.store_uri", "common.hub_store"} <= imports_of("common.stores")  # lazy too


def test_common_imports_nothing_above_it():
    upward = {name: sorted(d for d in deps if not d.startswith("common"))
              for name, deps in GRAPH.items() if name.startswith("common")}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_nothing_below_the_cli_imports_it():
    users = {name: sorted(d for d in deps if d.startswith("cli"))
             for name, deps in GRAPH.items() if not name.startswith("cli")}
    assert {name: deps for name, deps in users.items() if deps} == {}


def test_no_import_circles():
    assert circles(GRAPH) == []


def test_an_old_agents_entry_point_still_starts():
    """Workers started before the move re-exec `python -m common.cli ...` after a self-update."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "common.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "submit" in done.stdout and "worker" in done.stdout
    from common.cli import app as forwarded
    from cli.main import app

    assert forwarded is app
