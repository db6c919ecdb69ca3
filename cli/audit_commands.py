"""Commands that start work: privacy audits that train models, run through ``simulations/``.

``simulations.audit`` imports torch, flwr and opacus, so it is imported inside each
command: the read-only commands stay quick to start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from cli.options import JsonOpt, RunArg, RunsDirOpt
from cli.output import emit_json, fail, stdout
from cli.views import audits_table
from server.runs_index import resolve_run
from server.store import RunStore

__all__ = ["VIOLATION_EXIT", "audit_run_cmd", "audit_sample_cmd"]

VIOLATION_EXIT = 3  # `fedgen audit run` when a measured epsilon exceeds the claim


def audit_run_cmd(
    preset: Annotated[str, typer.Option("--preset", help="Run-config preset (simulations/<name>.toml) or a TOML path.")]
    = "audit-vae",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                           help="Override one run-config key (repeatable).")] = None,
    num_sites: Annotated[int, typer.Option("--num-sites", min=2, help="Simulated sites.")] = 10,
    sample: Annotated[bool, typer.Option("--sample/--no-sample", help="Also audit one site at sample level.")] = True,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Audit the privacy a configuration claims, on models it really trains.

    1. A federated simulation with canary clients (audit.user-canaries): the user-level
       estimate (Andrew et al. 2024) against the user-level accountant's epsilon.
    2. With --sample, one site (audit.sample-partition) trains an audit-only model with
       canary records (audit.sample-canaries): the one-run lower bound (Steinke et al.
       2023) against the site's accountant. Priced and charged on the site's ledger.
    Both land in the run's store; `fedgen status` and `fedgen audit show` show them.
    Exits 3 if a measured epsilon exceeds its claim.
    """
    from simulations.audit import run_audit  # imports torch and flwr: only here

    result = run_audit(preset, list(overrides or []), num_sites, runs_dir, sample=sample, quiet=json_out)
    if json_out:
        emit_json(result)
    else:
        console = stdout()
        console.print(Text(f"audit run {result['run_id']} ({result['run_dir']}): {result['status']}", style="bold"))
        table = audits_table(result["audits"])
        if table is not None:
            console.print(table)
        console.print(Text(result["cost"], style="dim"))
    if result["status"] != "completed":
        raise fail(f"the audit run did not complete ({result['status']}); see `fedgen status {result['run_id']}`")
    if any(a["violation"] for a in result["audits"]):
        raise typer.Exit(VIOLATION_EXIT)


def audit_sample_cmd(
    run: RunArg,
    num_sites: Annotated[Optional[int], typer.Option("--num-sites", min=1, help="Sites of the run (default: as "
                                                     "many as reported).")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Audit one site of an existing run at sample level, with the run's own settings.

    The site (audit.sample-partition) trains an audit-only model on its data plus canary
    records; the one-run lower bound is stored in RUN beside the site's claimed epsilon.
    Exits 3 if the bound exceeds the claim.
    """
    from simulations.audit import sample_audit  # imports torch and opacus: only here

    run_dir = resolve_run(runs_dir, run)
    note = sample_audit(run_dir, num_sites)
    with RunStore.open(run_dir) as store:
        audits = store.audits()
    if json_out:
        emit_json({"run_id": run_dir.name, "audits": audits, "note": note})
    else:
        table = audits_table(audits)
        if table is not None:
            stdout().print(table)
        stdout().print(Text(note, style="dim"))
    if any(a["violation"] for a in audits):
        raise typer.Exit(VIOLATION_EXIT)
