"""The floors of docs' ARCHITECTURE: no import cycles, and no import from a floor to one above it.

    simulations/  cli/       may import client, server, common
    client/       server/    may import common (and not each other)
    common/                  imports only itself

Every ``.py`` file of the project's packages is parsed with ``ast`` (never imported); every
``import`` counts, also those inside functions and ``if TYPE_CHECKING:`` blocks, because a
cycle or an upward import there is still one a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"common": 0, "client": 1, "server": 1, "simulations": 2, "cli": 2}
SIBLINGS_APART = {"client", "server"}  # same floor, but neither may import the other

# Known violations, each with the reason it is tolerated for now. An entry that no longer
# happens fails test_allowlist_is_not_stale, so it is removed as soon as it is fixed.
ALLOWED_EDGES: set[tuple[str, str]] = set()  # none today


# --------------------------------------------------------------------------- the graph


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that ``name`` is or lies in (``common.config.AppConfig`` -> ``common.config``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in ``tree`` (module level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports a module; `from mod import name` imports from one.
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = tuple(LAYERS)) -> dict[str, set[str]]:
    """module -> the project modules it imports, for every .py under ``root/<package>/``."""
    files = {module_name(root, p): p for pkg in packages if (root / pkg).is_dir()
             for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = imports_of(tree, module, path.name == "__init__.py", modules)
    return graph


# --------------------------------------------------------------------------- the checks


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None if the graph has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_violations(graph: dict[str, set[str]], allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Every import from a floor to a higher one, or between client and server, not in ``allowed``."""
    bad = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            a, b = src.partition(".")[0], dst.partition(".")[0]
            if (src, dst) in allowed or a == b:
                continue
            if LAYERS[b] > LAYERS[a]:
                bad.append(f"{src} imports {dst}: {a}/ (floor {LAYERS[a]}) must not import {b}/ (floor {LAYERS[b]})")
            elif a in SIBLINGS_APART and b in SIBLINGS_APART:
                bad.append(f"{src} imports {dst}: client/ and server/ must not import each other")
    return bad


# --------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_graph_sees_the_project(graph):
    # A parser that found nothing would pass every check: make sure it reads real imports,
    # including one inside a function (cli.audit_commands') and a relative one (common.data.images').
    assert {"common.config", "client.dp", "server.rounds", "simulations.launch"} <= set(graph)
    assert "common.config" in graph["common.tasks"]
    assert "simulations.audit" in graph["cli.audit_commands"]
    assert "common.data.partition" in graph["common.data.images"]


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_from_a_lower_floor_to_a_higher_one(graph):
    bad = layer_violations(graph, ALLOWED_EDGES)
    assert not bad, "layer violations:\n  " + "\n  ".join(bad)


def test_allowlist_is_not_stale(graph):
    stale = [f"{src} -> {dst}" for src, dst in sorted(ALLOWED_EDGES) if dst not in graph.get(src, set())]
    assert not stale, f"these allowed imports no longer happen; delete them from ALLOWED_EDGES: {stale}"


# --------------------------------------------------------------------------- the checks catch what they should


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"x": {"x2"}, "x2": {"x3"}, "x3": {"x"}}) == ["x", "x2", "x3", "x"]


def test_layer_violations_name_the_edge():
    synthetic = {"common.a": {"server.b"}, "client.c": {"server.b", "common.a"}, "server.b": {"simulations.d"},
                 "simulations.d": {"client.c", "common.a"}}
    bad = layer_violations(synthetic)
    assert len(bad) == 3, bad
    assert any(v.startswith("common.a imports server.b: common/ (floor 0)") for v in bad)
    assert any(v.startswith("client.c imports server.b: client/ and server/") for v in bad)
    assert any(v.startswith("server.b imports simulations.d") for v in bad)
    assert layer_violations(synthetic, {("common.a", "server.b"), ("client.c", "server.b"),
                                        ("server.b", "simulations.d")}) == []


def test_an_injected_cycle_in_a_source_tree_is_found(tmp_path):
    (tmp_path / "common" / "data").mkdir(parents=True)
    (tmp_path / "common" / "__init__.py").write_text("")
    (tmp_path / "common" / "data" / "__init__.py").write_text("")
    (tmp_path / "common" / "data" / "images.py").write_text("from .partition import split\n")
    (tmp_path / "common" / "data" / "partition.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from common.data.images import Images\n")
    (tmp_path / "common" / "config.py").write_text("def f():\n    import server.x\n")
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "x.py").write_text("from common import config\n")
    graph = import_graph(tmp_path)
    assert graph["common.data.images"] == {"common.data.partition"}
    assert graph["common.config"] == {"server.x"}  # an import inside a function counts
    cycle = find_cycle(graph)
    assert cycle is not None
    assert cycle in (["common.config", "server.x", "common.config"],
                     ["common.data.images", "common.data.partition", "common.data.images"]), cycle
    assert layer_violations(graph) == [
        "common.config imports server.x: common/ (floor 0) must not import server/ (floor 1)"]
