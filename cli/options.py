"""Arguments and options shared by several commands (their help text is the CLI's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["JsonOpt", "RunArg", "RunsDirOpt"]

RunsDirOpt = Annotated[
    Path,
    typer.Option(
        "--runs-dir",
        envvar="FEDGEN_RUNS_DIR",
        help="Folder holding one sub-folder per run.",
        show_default="./runs",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout (nothing else).")]
RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id, unique id prefix, or 'latest'.", show_default=False)]
