"""``fedgen site ...``: a site operator's commands, run on the site's own machine (issue 24).

They read and write the files beside the site's ledger (``--ledger``, the SuperNode's
``ledger-path``): the approvals (``client/approvals.py``) and the hash-chained log of every
computation (``client/site_log.py``); ``status`` also reads the ledger and the site's policy.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cli.options import JsonOpt
from cli.output import emit_json, fail, stdout
from client.approvals import APPROVED, PENDING, REJECTED, ApprovalError, Approvals
from client.policy import PolicyError, load_policy
from client.privacy_state import Ledger, LedgerError
from client.site_log import SiteLog

LedgerOpt = Annotated[Path, typer.Option("--ledger", envvar="FEDGEN_SITE_LEDGER",
                                         help="the site's ledger file (its SuperNode's ledger-path)")]
DigestArg = Annotated[str, typer.Argument(help="the request's config digest (a unique prefix will do)")]


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _requests_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("digest", "state", "run", "family", "dataset", "target eps", "noise", "rounds", "asked"):
        table.add_column(col)
    for r in rows:
        eps = r.get("planned_epsilon")
        # Text(): names the server chose are shown as they are, never read as rich markup (review)
        noise = r.get("noise_multiplier")
        table.add_row(Text(r["digest"][:16]), r["state"], Text(str(r.get("run_prefix") or r.get("run_name") or "-")),
                      Text(str(r.get("family", "-"))), Text(str(r.get("dataset", "-"))),
                      "-" if eps is None else f"{eps:g}", "-" if not noise else f"{noise:g}",
                      str(r.get("rounds", "-")), _when(r.get("asked")))
    return table


def pending_cmd(ledger: LedgerOpt, json_out: JsonOpt = False) -> None:
    """Run configs waiting for this site's approval (--json: each with every setting its digest covers)."""
    rows = Approvals(ledger).requests(PENDING)
    if json_out:
        emit_json(rows)
    elif not rows:
        stdout().print("No request awaits approval.")
    else:
        stdout().print(_requests_table(rows, "Awaiting approval"))


def _decide(ledger: Path, digest: str, state: str) -> None:
    try:
        req = Approvals(ledger).set(digest, state)
    except ApprovalError as err:
        raise fail(str(err)) from None
    stdout().print(f"{state}: run config {req['digest']} ({req.get('family')}, {req.get('rounds')} rounds); "
                   f"{'it trains from its next round' if state == APPROVED else 'every request with it is refused'}")


def approve_cmd(digest: DigestArg, ledger: LedgerOpt) -> None:
    """Approve a run config: rounds asked with it train from now on."""
    _decide(ledger, digest, APPROVED)


def reject_cmd(digest: DigestArg, ledger: LedgerOpt) -> None:
    """Reject a run config: every request with it is refused."""
    _decide(ledger, digest, REJECTED)


def log_cmd(ledger: LedgerOpt, verify: Annotated[bool, typer.Option(
        "--verify", help="recompute the hash chain; exit 1 naming the first line that breaks it")] = False,
            json_out: JsonOpt = False) -> None:
    """Every computation asked of this site, one line each, hash-chained."""
    site_log = SiteLog(ledger)
    if verify:
        verdict = site_log.verify()
        if json_out:
            emit_json(verdict.__dict__)
        if not verdict.ok:
            raise fail(f"{site_log.path}: line {verdict.broken_at}: {verdict.reason}")
        if not json_out:
            stdout().print(f"{site_log.path}: {verdict.lines} line(s), chain intact; head {verdict.head}")
        return
    lines = site_log.lines()
    if json_out:
        emit_json(lines)
        return
    table = Table(title=f"{site_log.path} ({len(lines)} line(s))")
    for col in ("time", "run", "round", "kind", "config", "decision", "steps", "epsilon", "reason"):
        table.add_column(col)
    for line in lines:
        eps = line.get("epsilon")
        table.add_row(_when(line.get("time")), Text(str(line.get("run_name") or line.get("run", "-"))),
                      str(line.get("round", "-")), Text(str(line.get("kind", "-"))),
                      Text(str(line.get("config", "-"))[:16]), Text(str(line.get("decision", "-"))),
                      str(line.get("steps") or "-"),
                      "-" if eps is None else f"{eps:.4f}", Text(str(line.get("reason") or "")[:80]))
    stdout().print(table)


def status_cmd(ledger: LedgerOpt, policy: Annotated[Path | None, typer.Option(
        "--policy", help="the site's policy file (its SuperNode's policy-path)")] = None,
               json_out: JsonOpt = False) -> None:
    """This site's policy, its spend per dataset against it, and the requests awaiting approval."""
    rules = None
    if policy is not None:
        try:
            rules = load_policy(policy).model_dump(by_alias=True)
        except PolicyError as err:
            raise fail(str(err)) from None
    try:
        entries = Ledger(ledger).read()  # verified: a damaged ledger is said so, not shown
        lines = {key: len(Ledger(ledger).all_rounds(key)) for key in entries}  # the archived lines too
    except LedgerError as err:
        raise fail(str(err)) from None
    spend = [{"dataset": key, "epsilon": e.get("epsilon"), "budget": e.get("budget"), "delta": e.get("delta"),
              "rounds": lines[key]} for key, e in entries.items()]
    pending = Approvals(ledger).requests(PENDING)
    verdict = SiteLog(ledger).verify()
    payload = {"policy": rules, "spend": spend, "pending": pending,
               "log": {"lines": verdict.lines, "intact": verdict.ok, "head": verdict.head}}
    if json_out:
        emit_json(payload)
        return
    console = stdout()
    if rules is None:
        console.print("No policy file given (--policy): the budget comes from the node config or the run.")
    else:
        table = Table(title=f"Policy {policy}")
        table.add_column("rule")
        table.add_column("value")
        for k, v in rules.items():
            table.add_row(k, json.dumps(v))
        console.print(table)
    table = Table(title=f"Spend in {ledger}")
    for col in ("dataset", "epsilon", "budget", "delta", "charges"):
        table.add_column(col)
    for s in spend:
        table.add_row(s["dataset"], f"{s['epsilon'] or 0:.4f}", f"{s['budget'] or 0:g}", f"{s['delta'] or 0:g}",
                      str(s["rounds"]))
    console.print(table)
    console.print(_requests_table(pending, "Awaiting approval") if pending else "No request awaits approval.")
    console.print(f"log: {verdict.lines} line(s), " + ("chain intact" if verdict.ok else
                                                       f"BROKEN at line {verdict.broken_at}: {verdict.reason}"))
