"""The floors of /work/shared/ARCHITECTURE.md: each package imports only from the floors below it.

common/ <- client/, server/ <- simulations/, cli/. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: For each package, the fedgen packages it must never import.
FORBIDDEN = {
    "common": {"client", "server", "simulations", "cli"},
    "client": {"server", "simulations", "cli"},
    "server": {"client", "simulations", "cli"},
}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_from_a_floor_above(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in files for name, line in sorted(_imported_packages(path)) if name in FORBIDDEN[package]]
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)
