"""``fedgen``: the operator CLI for inspecting runs written by the fedgen server.

Every command reads the run store (``server.store``) read-only, so it is safe to run
while the server is writing. Errors the operator can act on (unknown run, missing runs
directory, damaged database, ...) print one red line on stderr and exit 1.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import click
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from server.runs_index import list_runs, resolve_run
from server.store import RunStore, StoreError

if TYPE_CHECKING:  # matplotlib is imported lazily: it is slow and only `plot` needs it
    from matplotlib.figure import Figure

__all__ = ["app", "main", "build_figure", "status_payload", "render_status"]

NEAR_BUDGET = 0.9  # highlight sites whose epsilon is over this fraction of their budget
#: Server-evaluation metrics plotted (one panel each, when present), with axis labels.
PLOT_EVAL_METRICS = {
    "fid-inception": ("FID (Inception features)", "FID"),
    "fid-domain": ("FID (domain features)", "FID"),
    "perplexity": ("Perplexity", "perplexity"),
    "neg-elbo": ("Negative ELBO", "−ELBO"),
}
STATUS_STYLES = {
    "running": "bold cyan", "completed": "bold green", "failed": "bold red",
    "stopped": "bold yellow", "corrupt": "bold red",
}

app = typer.Typer(
    name="fedgen",
    help="Inspect fedgen runs: list them, follow progress, plot metrics, find samples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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

# Indirection so tests can simulate Ctrl-C / avoid real waiting in `watch`.
_sleep: Callable[[float], None] = time.sleep


# --------------------------------------------------------------------------- plumbing


def _stdout() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped / captured: do not squeeze tables into 80 columns
        console.width = max(console.width, 160)
    return console


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    line = " ".join(str(message).split())  # always exactly one line
    _stderr().print(Text("error: ", style="bold red") + Text(line, style="red"))
    return typer.Exit(code)


audit_app = typer.Typer(
    help="Empirical privacy audits: run one (a simulation with canaries), or show a run's audits.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


def _command(name: str, target: typer.Typer | None = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command wrapped in the CLI's single error handler."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise  # typer/click's own exits and usage errors (exit 2)
            except KeyboardInterrupt:
                _stderr().print(Text("interrupted", style="yellow"))
                raise typer.Exit(130) from None
            except StoreError as exc:
                raise _fail(str(exc)) from None
            except sqlite3.Error as exc:
                raise _fail(f"database error: {exc}") from None
            except OSError as exc:
                where = f": {exc.filename}" if exc.filename else ""
                raise _fail(f"{exc.strerror or exc}{where}") from None
            except Exception as exc:  # a bug: still no traceback unless asked for
                if os.environ.get("FEDGEN_DEBUG"):
                    raise
                raise _fail(
                    f"internal error: {type(exc).__name__}: {exc} (set FEDGEN_DEBUG=1 for a traceback)"
                ) from None

        return (target or app).command(name, **kwargs)(wrapper)

    return decorate


def _jsonable(obj: Any) -> Any:
    """Strict JSON: NaN/inf become null, paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _emit_json(obj: Any, *, indent: int | None = 2) -> None:
    typer.echo(json.dumps(_jsonable(obj), indent=indent, allow_nan=False))


def _open(runs_dir: Path, ref: str) -> RunStore:
    return RunStore.open(resolve_run(runs_dir, ref))


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


def _status_text(status: str | None) -> Text:
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
        "  strategy ", (str(info.get("strategy")), "bold"), "  status ", _status_text(info.get("status")),
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
    for table in (_metrics_table(last) if last else None, _sites_table(payload), _problems_table(payload),
                  audits_table(payload["audits"])):
        if table is not None:
            parts.append(table)
    return Group(*parts)


# --------------------------------------------------------------------------- commands


@_command("runs")
def runs_cmd(runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """List runs, newest first."""
    rows = list_runs(runs_dir)
    if json_out:
        _emit_json(rows)
        return
    console = _stdout()
    if not rows:
        console.print(f"No runs in {runs_dir}.")
        return
    table = Table(title=f"Runs in {runs_dir}", title_justify="left")
    for col, justify in [("id", "left"), ("model", "left"), ("strategy", "left"), ("rounds", "right"),
                         ("status", "left"), ("best", "left"), ("max ε", "right"), ("started", "left")]:
        table.add_column(col, justify=justify, no_wrap=col != "id")  # type: ignore[arg-type]
    for r in rows:
        rounds = "–" if r["rounds_done"] is None else f"{r['rounds_done']}/{r['num_rounds']}"
        table.add_row(r["run_id"], r["model"] or "–", r["strategy"] or "–", rounds, _status_text(r["status"]),
                      fmt_best(r["best_metric"]), fmt_eps(r["max_epsilon"]), fmt_time(r["created_at"]))
    console.print(table)
    for r in rows:
        if r.get("error"):
            console.print(Text(f"{r['run_id']}: {r['error']}", style="red"), soft_wrap=True)


@_command("status")
def status_cmd(run: RunArg, runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """Progress, latest metrics, per-site privacy budget and site failures of a run.

    RUN is a run id, a unique prefix of one, or 'latest'.
    """
    with _open(runs_dir, run) as store:
        info, rounds, audits = store.run_info(), store.rounds(), store.audits()
    if json_out:
        _emit_json(status_payload(info, rounds, audits))
    else:
        _stdout().print(render_status(info, rounds, audits=audits))


@_command("watch")
def watch_cmd(
    run: RunArg,
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.01, help="Seconds between refreshes.")] = 2.0,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Follow a run live until it stops running (Ctrl-C to leave).

    RUN is a run id, a unique prefix of one, or 'latest'. With --json, prints one JSON
    object per line whenever the run changes.
    """
    with _open(runs_dir, run) as store:
        if json_out:  # one JSON object per line, whenever something changed
            seen = None
            while True:
                info, rounds = store.run_info(), store.rounds()
                key = (info["status"], info["updated_at"], info["last_round"])
                if key != seen:
                    seen = key
                    _emit_json(status_payload(info, rounds, store.audits()), indent=None)
                if info["status"] != "running":
                    return
                _sleep(interval)
        console = _stdout()
        with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                info, rounds = store.run_info(), store.rounds()
                live.update(render_status(info, rounds, audits=store.audits()), refresh=True)
                if info["status"] != "running":
                    break
                _sleep(interval)
        if not console.is_terminal:  # Live leaves the cursor after its last frame when piped
            console.line()
    final = Text.assemble(f"Run {info['run_id']} ", _status_text(info["status"]),
                          f" after {info['rounds_done']}/{info['num_rounds']} rounds")
    if info.get("status_reason"):
        final.append(f": {info['status_reason']}")
    console.print(final)


def _series(rounds: list[dict], get: Callable[[dict], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        value = get(r)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(r["round"])
            ys.append(float(value))
    return xs, ys


def _train_loss_key(rounds: list[dict]) -> str | None:
    keys = [k for r in rounds for k in (r.get("train") or {})]
    if "train-loss" in keys:
        return "train-loss"
    return next((k for k in keys if "loss" in k), None)


def build_figure(rounds: list[dict], *, title: str | None = None) -> "Figure":
    """Figure with one panel for training loss, one per server-eval metric present, one for ε."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    eval_keys = [k for k in PLOT_EVAL_METRICS if _series(rounds, lambda r, k=k: (r.get("eval") or {}).get(k))[0]]
    n = 2 + len(eval_keys)
    fig = Figure(figsize=(8, 2.4 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title)

    def finish(ax: Any, ylabel: str, empty: str) -> None:
        ax.set_xlabel("round")
        ax.tick_params(labelbottom=True)  # shared x axis, but keep round numbers on every panel
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")

    ax = axes[0]
    loss_key = _train_loss_key(rounds)
    if loss_key:
        xs, ys = _series(rounds, lambda r: (r.get("train") or {}).get(loss_key))
        ax.plot(xs, ys, marker="o", label=f"{loss_key} (aggregated)")
    ax.set_title("Training loss")
    finish(ax, "loss", "no training loss recorded")

    for ax, key in zip(axes[1:-1], eval_keys):
        xs, ys = _series(rounds, lambda r, k=key: (r.get("eval") or {}).get(k))
        ax.plot(xs, ys, marker="o", color="tab:green", label=key)
        panel_title, ylabel = PLOT_EVAL_METRICS[key]
        ax.set_title(f"Server evaluation: {panel_title}")
        finish(ax, ylabel, "")

    ax = axes[-1]
    xs, ys = _series(rounds, lambda r: r.get("epsilon_max"))
    if xs:
        ax.plot(xs, ys, marker="o", color="tab:red", label="max sample-level ε (over sites)")
    xs, ys = _series(rounds, lambda r: r.get("user_epsilon"))
    if xs:
        ax.plot(xs, ys, marker="s", color="tab:purple", label="user-level ε")
    budgets = {s["budget"] for r in rounds for s in r.get("sites") or [] if s.get("budget") is not None}
    if budgets:
        tight = min(budgets)
        label = f"site budget ε={tight:g}" if len(budgets) == 1 else f"tightest site budget ε={tight:g}"
        ax.axhline(tight, color="grey", linestyle="--", label=label)
    ax.set_ylim(bottom=0)
    ax.set_title("Privacy spent")
    finish(ax, "ε", "no privacy accounting recorded")
    return fig


@_command("plot")
def plot_cmd(
    run: RunArg,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Image file to write (.png, .pdf, .svg). Default: <run dir>/metrics.png"),
    ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Plot training loss, server evaluation metrics and privacy spent over rounds.

    RUN is a run id, a unique prefix of one, or 'latest'. Prints the image path.
    """
    with _open(runs_dir, run) as store:
        info, rounds = store.run_info(), store.rounds()
    if not rounds:
        raise StoreError(f"run {info['run_id']} has no recorded rounds yet; nothing to plot")
    out = (output if output is not None else Path(info["run_dir"]) / "metrics.png").expanduser()
    fig = build_figure(rounds, title=f"{info['run_id']} ({info['model']}, {info['strategy']})")
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise typer.BadParameter(f"unsupported image type {out.suffix or '(none)'!r}; use .png, .pdf or .svg",
                                 param_hint="'--output'")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    path = out.resolve()
    if json_out:
        _emit_json({"run_id": info["run_id"], "path": str(path), "rounds": len(rounds),
                    "panels": [ax.get_title() for ax in fig.axes]})
    else:
        typer.echo(str(path))


def _artifact_paths(run_dir: Path, value: Any) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [(run_dir / str(v)).resolve() for v in values if v]


@_command("samples")
def samples_cmd(
    run: RunArg,
    round_: Annotated[Optional[int], typer.Option("--round", "-r", min=0, help="Round (default: last with samples).")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Artefact paths (samples, checkpoint, ...) of a round; prints text samples.

    RUN is a run id, a unique prefix of one, or 'latest'.
    """
    with _open(runs_dir, run) as store:
        info, rounds = store.run_info(), store.rounds()
    run_dir = Path(info["run_dir"])
    if round_ is None:
        record = next((r for r in reversed(rounds) if (r.get("artifacts") or {}).get("samples")), None)
        if record is None:
            raise StoreError(f"run {info['run_id']} has no round with samples yet")
    else:
        record = next((r for r in rounds if r["round"] == round_), None)
        if record is None:
            have = f"rounds {rounds[0]['round']}-{rounds[-1]['round']}" if rounds else "no rounds yet"
            raise StoreError(f"run {info['run_id']} has no round {round_} ({have})")
        if not record.get("artifacts"):
            with_samples = [str(r["round"]) for r in rounds if r.get("artifacts")]
            hint = f"rounds with artefacts: {', '.join(with_samples)}" if with_samples else "no round has artefacts"
            raise StoreError(f"round {round_} of run {info['run_id']} has no artefacts ({hint})")

    artifacts = {name: _artifact_paths(run_dir, value) for name, value in record["artifacts"].items()}
    texts = {}
    for path in artifacts.get("samples", []):
        if path.suffix.lower() == ".txt" and path.is_file():
            texts[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    if json_out:
        _emit_json({
            "run_id": info["run_id"],
            "round": record["round"],
            "artifacts": {n: [str(p) for p in ps] if len(ps) != 1 else str(ps[0]) for n, ps in artifacts.items()},
            "missing": sorted(str(p) for ps in artifacts.values() for p in ps if not p.exists()),
            "samples_text": texts or None,
        })
        return
    width = max(len(n) for n in artifacts) if artifacts else 0
    typer.echo(f"run {info['run_id']}, round {record['round']}")
    for name, paths in artifacts.items():
        for path in paths:
            typer.echo(f"{name:<{width}}  {path}" + ("" if path.exists() else "  (missing)"))
    for path, text in texts.items():
        typer.echo(f"\n--- {path} ---")
        typer.echo(text.rstrip("\n"))


# --------------------------------------------------------------------------- audits

VIOLATION_EXIT = 3  # `fedgen audit run` when a measured epsilon exceeds the claim


@_command("show", target=audit_app)
def audit_show_cmd(run: RunArg, runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """The audits of a run: claimed and empirical epsilon side by side.

    RUN is a run id, a unique prefix of one, or 'latest'.
    """
    with _open(runs_dir, run) as store:
        info, audits = store.run_info(), store.audits()
    if json_out:
        _emit_json({"run_id": info["run_id"], "audits": audits})
        return
    table = audits_table(audits)
    if table is None:
        raise StoreError(f"run {info['run_id']} has no audit; start one with `fedgen audit run`")
    _stdout().print(table)


@_command("run", target=audit_app)
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
        _emit_json(result)
    else:
        console = _stdout()
        console.print(Text(f"audit run {result['run_id']} ({result['run_dir']}): {result['status']}", style="bold"))
        table = audits_table(result["audits"])
        if table is not None:
            console.print(table)
        console.print(Text(result["cost"], style="dim"))
    if result["status"] != "completed":
        raise _fail(f"the audit run did not complete ({result['status']}); see `fedgen status {result['run_id']}`")
    if any(a["violation"] for a in result["audits"]):
        raise typer.Exit(VIOLATION_EXIT)


@_command("sample", target=audit_app)
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
        _emit_json({"run_id": run_dir.name, "audits": audits, "note": note})
    else:
        table = audits_table(audits)
        if table is not None:
            _stdout().print(table)
        _stdout().print(Text(note, style="dim"))
    if any(a["violation"] for a in audits):
        raise typer.Exit(VIOLATION_EXIT)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
