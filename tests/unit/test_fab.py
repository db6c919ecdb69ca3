"""The app package (FAB) that `flwr run` ships to the SuperLink and every site's worker holds
what the ServerApp and the ClientApp import, and nothing else (pyproject's ``fab-include``)."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parents[2]
FEDGEN_PACKAGES = ("client", "common", "server", "simulations", "cli")


def _imported_modules(*roots: str) -> set[str]:
    """The fedgen modules ``roots`` import, directly or not (every import statement, lazy ones too)."""
    todo, seen = list(roots), set()
    while todo:
        mod = todo.pop()
        path = ROOT / (mod.replace(".", "/") + ".py")
        if mod in seen or not path.exists():  # a package's name alone: its __init__ is added below
            continue
        seen.add(mod)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            todo += [n for n in names if n.split(".")[0] in FEDGEN_PACKAGES]
    return seen


def test_the_fab_holds_every_module_the_apps_import_and_no_docs_tests_or_tools():
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist())
    needed = {m.replace(".", "/") + ".py" for m in _imported_modules("server.app", "client.app")}
    needed |= {f"{p}/__init__.py" for p in ("client", "common", "server")}
    assert "server/app.py" in needed and "client/dp.py" in needed  # the walk follows imports
    assert needed <= names, f"the FAB lacks {sorted(needed - names)}: widen fab-include in pyproject.toml"
    outside = {n for n in names if n.split("/")[0] not in ("client", "common", "server", ".info", "pyproject.toml")}
    assert not outside, f"the FAB carries {sorted(outside)}"
    assert not any(n.startswith(p) for n in names for p in ("docs/", "tests/", "simulations/", "cli/", "docker/"))
