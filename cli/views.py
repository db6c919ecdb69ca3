"""How runs look on a terminal: number formats, rich tables, and the status view.

Pure rendering: every function takes data the run store returned and gives text or a
rich renderable; nothing here opens a store or prints.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = [
    "audits_table", "fmt_best", "fmt_bytes", "fmt_duration", "fmt_eps", "fmt_num", "fmt_time",
    "render_status", "runs_table", "status_payload", "status_text",
]

NEAR_BUDGET = 0.9  # highlight sites whose epsilon is over this fraction of their budget
STATUS_STYLES = {
    "running": "bold cyan", "completed": "bold green", "failed": "bold red",
    "stopped": "bold yellow", "corrupt": "bold red",
}


# --------------------------------------------------------------------------- formatting


def fmt_num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-3:
            return f"{value:.3e}"
        return f"{value:.{max(0, 3 - math.floor(math.log10(a)))}f}"  # 4 significant digits
    return str(value)


def fmt_eps(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "–"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def fmt_best(best: dict | None) -> str:
    return "–" if not best else f"{best['key']}={fmt_num(best['value'])}"


def status_text(status: str | None) -> Text:
    return Text(status or "–", style=STATUS_STYLES.get(status or "", ""))


# --------------------------------------------------------------------------- status view


def status_payload(info: dict, rounds: list[dict], audits: list[dict] | None = None) -> dict:
    """Everything `status` shows, as plain data (also the `--json` output)."""
    done, planned = info.get("rounds_done") or 0, info.get("num_rounds") or 0
    last = rounds[-1] if rounds else None
    site_round = next((r for r in reversed(rounds) if r.get("sites")), None)
    sites = []
    for site in (site_round or {}).get("sites", []):
        eps, budget = site.get("epsilon"), site.get("budget")
        frac = eps / budget if eps is not None and budget else None
        sites.append({**site, "budget_fraction": frac, "near_budget": frac is not None and frac > NEAR_BUDGET})
    problems = [
        {
            "round": r["round"],
            "node_id": s.get("node_id"),
            "partition_id": s.get("partition_id"),
            "status": s.get("status"),
            "reason": s.get("reason"),
        }
        for r in reversed(rounds)
        for s in r.get("sites", [])
        if s.get("status") != "ok"
    ]
    running = info.get("status") == "running"
    return {
        "run": info,
        "progress": {
            "rounds_done": done,
            "num_rounds": planned,
            "fraction": min(done / planned, 1.0) if planned else None,
            "last_round": last["round"] if last else None,
            "current_round": done + 1 if running and done < planned else None,
        },
        "last_round": last,
        # Why a metric is missing from the last round's evaluation (an FID refused for too few reference images).
        "eval_notes": list((last or {}).get("eval_notes") or []),
        "sites_round": site_round["round"] if site_round else None,
        "sites": sites,
        "problems": problems,
        "audits": audits or [],
    }


def _metrics_table(last: dict) -> Table | None:
    rows = [("train", k, v) for k, v in (last.get("train") or {}).items()]
    rows += [("eval", k, v) for k, v in (last.get("eval") or {}).items()]
    if not rows:
        return None
    table = Table(title=f"Metrics, round {last['round']}", title_justify="left", title_style="bold")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for split, key, value in rows:
        table.add_row(split, key, fmt_num(value))
    return table


def _eval_notes(payload: dict) -> Text | None:
    if not payload["eval_notes"]:
        return None
    return Text("\n".join(f"Note: {note}" for note in payload["eval_notes"]), style="bold yellow")


def _sites_table(payload: dict) -> Table | None:
    if not payload["sites"]:
        return None
    table = Table(title=f"Sites, round {payload['sites_round']}", title_justify="left", title_style="bold")
    for col, justify in [("node", "right"), ("partition", "right"), ("status", "left"), ("ε", "right"),
                         ("budget", "right"), ("used", "right"), ("examples", "right"),
                         ("train loss", "right"), ("clip frac", "right"), ("note", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for site in payload["sites"]:
        frac = site["budget_fraction"]
        note, style = "", ""
        if frac is not None and frac >= 1.0:
            note, style = "OVER BUDGET", "bold red"
        elif site["near_budget"]:
            note, style = f"over {NEAR_BUDGET:.0%} of budget", "bold yellow"
        if site.get("status") != "ok":
            note = (note + "; " if note else "") + (site.get("reason") or site.get("status") or "")
            style = style or "red"
        table.add_row(
            str(site.get("node_id")),
            fmt_num(site.get("partition_id")),
            site.get("status") or "–",
            fmt_eps(site.get("epsilon")),
            fmt_eps(site.get("budget")),
            "–" if frac is None else f"{frac:.0%}",
            fmt_num(site.get("num_examples")),
            fmt_num(site.get("train_loss")),
            fmt_num(site.get("clip_fraction")),
            note,
            style=style or None,
        )
    return table


def _problems_table(payload: dict, limit: int = 20) -> Table | None:
    problems = payload["problems"]
    if not problems:
        return None
    more = len(problems) - limit
    title = "Failed / refused sites (latest first)" + (f", {more} older not shown" if more > 0 else "")
    table = Table(title=title, title_justify="left", title_style="bold")
    table.add_column("round", justify="right")
    table.add_column("node", justify="right")
    table.add_column("partition", justify="right")
    table.add_column("status")
    table.add_column("reason")
    for p in problems[:limit]:
        table.add_row(str(p["round"]), str(p["node_id"]), fmt_num(p["partition_id"]),
                      Text(p["status"] or "–", style="red" if p["status"] == "failed" else "yellow"),
                      p["reason"] or "–")
    return table


AUDIT_LEVELS = {"user": "user (federation)", "sample": "sample (site)"}


def audits_table(audits: list[dict]) -> Table | None:
    """Claimed epsilon beside what each audit measured on the trained model."""
    if not audits:
        return None
    table = Table(title="Privacy audits: claimed ε (accountant) vs empirical ε (measured)", title_justify="left",
                  title_style="bold")
    for col, justify in [("level", "left"), ("canaries", "right"), ("confidence", "right"), ("claimed ε", "right"),
                         ("empirical ε", "right"), ("verdict", "left"), ("cost", "right"), ("method", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for a in audits:
        claimed, empirical = a.get("claimed_epsilon"), a.get("empirical_epsilon")
        kind = "estimate" if a.get("level") == "user" else "lower bound"
        if a.get("violation"):
            verdict, style = "VIOLATION: measured above the claim", "bold red"
        elif claimed is not None and not math.isfinite(claimed):
            verdict, style = f"no DP claim; {kind} {fmt_eps(empirical)}", "yellow"
        else:
            verdict, style = f"ok: {kind} within the claim", "green"
        conf = a.get("confidence")
        table.add_row(AUDIT_LEVELS.get(a.get("level"), str(a.get("level"))), fmt_num(a.get("canaries")),
                      "estimate" if conf is None else f"{conf:.0%}", _fmt_eps_inf(claimed), _fmt_eps_inf(empirical),
                      Text(verdict, style=style), fmt_duration(a.get("seconds")), str(a.get("method") or ""))
    return table


def _fmt_eps_inf(value: Any) -> str:
    return "∞" if isinstance(value, float) and math.isinf(value) else fmt_eps(value)


def render_status(info: dict, rounds: list[dict], *, audits: list[dict] | None = None,
                  now: float | None = None) -> RenderableType:
    payload = status_payload(info, rounds, audits)
    prog = payload["progress"]
    now = time.time() if now is None else now
    parts: list[RenderableType] = []

    head = Text.assemble(
        ("Run ", "bold"), (info["run_id"], "bold"), "  model ", (str(info.get("model")), "bold"),
        "  strategy ", (str(info.get("strategy")), "bold"), "  status ", status_text(info.get("status")),
    )
    if info.get("status_reason"):
        head.append(f" ({info['status_reason']})")
    parts.append(head)
    when = f"started {fmt_time(info.get('created_at'))}"
    if info.get("ended_at"):
        when += f", ended {fmt_time(info['ended_at'])} (took {fmt_duration(info['ended_at'] - info['created_at'])})"
    elif info.get("updated_at"):
        when += f", last update {fmt_duration(now - info['updated_at'])} ago"
    parts.append(Text(f"{when}; {info.get('run_dir')}", style="dim"))

    bar = Table.grid(padding=(0, 1))
    bar.add_column()
    bar.add_column(width=40)
    bar.add_column()
    planned = prog["num_rounds"] or 0
    label = f"{prog['rounds_done']}/{planned} rounds"
    if prog["fraction"] is not None:
        label += f" ({prog['fraction']:.0%})"
    if prog["current_round"] is not None:
        label += f", round {prog['current_round']} in progress"
    bar.add_row("Rounds", ProgressBar(total=max(planned, 1), completed=min(prog["rounds_done"], planned)), label)
    parts.append(bar)

    last = payload["last_round"]
    if last is None:
        parts.append(Text("No rounds recorded yet.", style="italic"))
    else:
        dur = None
        if last.get("started_at") is not None and last.get("ended_at") is not None:
            dur = last["ended_at"] - last["started_at"]
        line = Text.assemble(
            ("Last round ", "bold"), (str(last["round"]), "bold"),
            f": took {fmt_duration(dur)}, sent {fmt_bytes(last.get('bytes_sent'))}, "
            f"received {fmt_bytes(last.get('bytes_received'))}, "
            f"ε max {fmt_eps(last.get('epsilon_max'))}",
        )
        if last.get("user_epsilon") is not None:
            line.append(f", user-level ε {fmt_eps(last['user_epsilon'])}")
        parts.append(line)
        parts.append(Text(
            f"Best {fmt_best(info.get('best_metric'))}"
            + (f" (round {info['best_metric']['round']})" if info.get("best_metric") else "")
            + f"; max ε so far {fmt_eps(info.get('max_epsilon'))}"
        ))
    for table in (_metrics_table(last) if last else None, _eval_notes(payload), _sites_table(payload),
                  _problems_table(payload), audits_table(payload["audits"])):
        if table is not None:
            parts.append(table)
    return Group(*parts)


def runs_table(rows: list[dict], title: str) -> Table:
    """One line per run (rows as ``list_runs`` gives them)."""
    table = Table(title=title, title_justify="left")
    for col, justify in [("id", "left"), ("model", "left"), ("strategy", "left"), ("rounds", "right"),
                         ("status", "left"), ("best", "left"), ("max ε", "right"), ("started", "left")]:
        table.add_column(col, justify=justify, no_wrap=col != "id")  # type: ignore[arg-type]
    for r in rows:
        rounds = "–" if r["rounds_done"] is None else f"{r['rounds_done']}/{r['num_rounds']}"
        table.add_row(r["run_id"], r["model"] or "–", r["strategy"] or "–", rounds, status_text(r["status"]),
                      fmt_best(r["best_metric"]), fmt_eps(r["max_epsilon"]), fmt_time(r["created_at"]))
    return table
