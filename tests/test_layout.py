"""The package layout stays true: who may import whom, no cycles, no giant files.

The rules are the ones each package's docstring states (and docs/architecture.md
draws). They are checked on the source with :mod:`ast`, so an import hidden inside
a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvpeer"

#: package -> the kvpeer packages its modules may import (besides itself and kvpeer's
#: root module, which holds only constants). The most specific prefix applies.
ALLOWED: dict[str, set[str]] = {
    "kvpeer.v1": set(),
    "kvpeer.api": {"kvpeer.v1"},
    "kvpeer.transport": {"kvpeer.api", "kvpeer.v1"},
    "kvpeer.client": {"kvpeer.api", "kvpeer.v1", "kvpeer.transport"},
    "kvpeer.server": {"kvpeer.api", "kvpeer.v1", "kvpeer.transport"},
    "kvpeer.server.peer": {
        "kvpeer.api",
        "kvpeer.v1",
        "kvpeer.transport",
        "kvpeer.server.grpc_server",
    },
    "kvpeer.server.directory": {
        "kvpeer.api",
        "kvpeer.v1",
        "kvpeer.transport",
        "kvpeer.server.grpc_server",
    },
    "kvpeer.tier": {
        "kvpeer.api",
        "kvpeer.v1",
        "kvpeer.transport",
        "kvpeer.client",
        "kvpeer.server.peer",
        "kvpeer.server.grpc_server",
    },
    "kvpeer.proxy": {"kvpeer.api", "kvpeer.v1", "kvpeer.client"},
    # Tools may use everything.
    "kvpeer.sim": {"kvpeer"},
    "kvpeer.bench": {"kvpeer"},
    "kvpeer.cli": {"kvpeer"},
    "kvpeer.__main__": {"kvpeer.cli"},
}

#: Longest module, in lines, whose docstring need not say why it is long.
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def kvpeer_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvpeer modules ``name`` imports anywhere in its source (nested imports too)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # ``from kvpeer.x import y`` imports the module kvpeer.x.y when it is one.
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t == "kvpeer" or t.startswith("kvpeer."))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: kvpeer_imports(name, path, known) for name, path in mods.items()}


def rule_for(name: str) -> tuple[str, set[str]] | None:
    matches = [pkg for pkg in ALLOWED if name == pkg or name.startswith(pkg + ".")]
    if not matches:
        return None
    pkg = max(matches, key=len)
    return pkg, ALLOWED[pkg]


def within(target: str, prefixes: set[str]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_every_package_is_covered_by_a_rule() -> None:
    uncovered = [name for name in modules() if name != "kvpeer" and rule_for(name) is None]
    assert not uncovered, f"add these modules' packages to ALLOWED: {uncovered}"


def test_dependency_direction() -> None:
    broken = []
    for name, targets in import_graph().items():
        rule = rule_for(name)
        if rule is None:
            continue
        pkg, allowed = rule
        for target in sorted(targets):
            if target == "kvpeer" or within(target, {pkg}) or within(target, allowed):
                continue
            broken.append(f"{name} imports {target} ({pkg} may import {sorted(allowed)})")
    assert not broken, "layout rules broken:\n" + "\n".join(broken)


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules is not a cycle of design.
    for name in graph:
        graph[name] = {t for t in graph[name] if t in graph and not t.startswith(name + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_long_modules_say_why(name: str) -> None:
    path = modules()[name]
    if name.startswith("kvpeer.v1"):
        return
    lines = path.read_text().count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Why it is long:" in doc, (
        f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it along its seams "
        "or say in its docstring, after 'Why it is long:', why it stays whole"
    )


def test_the_rules_catch_a_broken_import(tmp_path: Path) -> None:
    """The checker itself: a proxy module importing the tier is reported."""
    module = tmp_path / "kvpeer" / "proxy" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("from kvpeer.tier.tier import PeerSecondaryTier\n")
    name = "kvpeer.proxy.bad"
    targets = kvpeer_imports(name, module, {"kvpeer.tier.tier"})
    pkg, allowed = rule_for(name)  # type: ignore[misc]
    assert targets == {"kvpeer.tier.tier"}
    assert not within("kvpeer.tier.tier", allowed | {pkg})
