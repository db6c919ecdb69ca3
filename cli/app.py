"""``fedgen``: the operator CLI for fedgen runs.

Most commands read the run store (``server.store``) read-only, so they are safe to run
while the server is writing (``cli.read_commands``). ``generate`` draws synthetic data from a
run's saved model into a path outside the run (``cli.generate_commands``). The audit commands
``audit run`` and ``audit sample`` start work: they train models through ``simulations/``
(``cli.audit_commands``). Errors the operator can act on (unknown run, missing runs
directory, damaged database, ...) print one red line on stderr and exit 1.

This module only wires: it names each command, wraps it in the one error handler, and
holds ``main``.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from typing import Any, Callable

import click
import typer
from rich.text import Text

from cli import audit_commands, export_commands, generate_commands, read_commands, site_commands
from cli.output import fail, stderr
from server.store import StoreError

__all__ = ["app", "audit_app", "main", "site_app"]

app = typer.Typer(
    name="fedgen",
    help="Inspect fedgen runs: list them, follow progress, plot metrics, find samples, generate synthetic data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
audit_app = typer.Typer(
    help="Empirical privacy audits: run one (a simulation with canaries), or show a run's audits.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
site_app = typer.Typer(
    help="A site operator's commands, on the site's machine: approvals, the log of every computation, status.",
    no_args_is_help=True,
)
app.add_typer(site_app, name="site")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind the CLI's single error handler: one red line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer/click's own exits and usage errors (exit 2)
        except KeyboardInterrupt:
            stderr().print(Text("interrupted", style="yellow"))
            raise typer.Exit(130) from None
        except StoreError as exc:
            raise fail(str(exc)) from None
        except sqlite3.Error as exc:
            raise fail(f"database error: {exc}") from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise fail(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:  # a bug: still no traceback unless asked for
            if os.environ.get("FEDGEN_DEBUG"):
                raise
            raise fail(
                f"internal error: {type(exc).__name__}: {exc} (set FEDGEN_DEBUG=1 for a traceback)"
            ) from None

    return wrapper


#: (group, command name, function), in the order `--help` lists them.
COMMANDS: tuple[tuple[typer.Typer, str, Callable[..., Any]], ...] = (
    (app, "runs", read_commands.runs_cmd),
    (app, "status", read_commands.status_cmd),
    (app, "watch", read_commands.watch_cmd),
    (app, "plot", read_commands.plot_cmd),
    (app, "samples", read_commands.samples_cmd),
    (app, "generate", generate_commands.generate_cmd),
    (app, "export", export_commands.export_cmd),
    (audit_app, "show", read_commands.audit_show_cmd),
    (audit_app, "run", audit_commands.audit_run_cmd),
    (audit_app, "sample", audit_commands.audit_sample_cmd),
    (site_app, "status", site_commands.status_cmd),
    (site_app, "pending", site_commands.pending_cmd),
    (site_app, "approve", site_commands.approve_cmd),
    (site_app, "reject", site_commands.reject_cmd),
    (site_app, "log", site_commands.log_cmd),
)
for _group, _name, _fn in COMMANDS:
    _group.command(_name)(guarded(_fn))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
