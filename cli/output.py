"""Where the CLI writes: rich consoles, strict JSON on stdout, and the one-line error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["emit_json", "fail", "jsonable", "stderr", "stdout"]


def stdout() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped / captured: do not squeeze tables into 80 columns
        console.width = max(console.width, 160)
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: <message>`` as one red line on stderr; return the exit to raise."""
    line = " ".join(str(message).split())  # always exactly one line
    stderr().print(Text("error: ", style="bold red") + Text(line, style="red"))
    return typer.Exit(code)


def jsonable(obj: Any) -> Any:
    """Strict JSON: NaN/inf become null, paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(obj: Any, *, indent: int | None = 2) -> None:
    typer.echo(json.dumps(jsonable(obj), indent=indent, allow_nan=False))
