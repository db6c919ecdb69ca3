"""Commands that only read the run store (``server.store``), so they are safe to run while
the server is writing: runs, status, watch, plot, samples, audit show.

Each is a plain function; ``cli.app`` registers it under its name and wraps it in the CLI's
error handler (a ``StoreError`` becomes one red line and exit 1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.live import Live
from rich.text import Text

from cli.options import JsonOpt, RunArg, RunsDirOpt
from cli.output import emit_json, stdout
from cli.plots import build_figure
from cli.views import audits_table, render_status, runs_table, status_payload, status_text
from server.runs_index import list_runs, resolve_run
from server.store import RunStore, StoreError

__all__ = ["audit_show_cmd", "plot_cmd", "runs_cmd", "samples_cmd", "status_cmd", "watch_cmd"]

# Indirection so tests can simulate Ctrl-C / avoid real waiting in `watch`.
_sleep: Callable[[float], None] = time.sleep


def _open(runs_dir: Path, ref: str) -> RunStore:
    return RunStore.open(resolve_run(runs_dir, ref))


def runs_cmd(runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """List runs, newest first."""
    rows = list_runs(runs_dir)
    if json_out:
        emit_json(rows)
        return
    console = stdout()
    if not rows:
        console.print(f"No runs in {runs_dir}.")
        return
    console.print(runs_table(rows, title=f"Runs in {runs_dir}"))
    for r in rows:
        if r.get("error"):
            console.print(Text(f"{r['run_id']}: {r['error']}", style="red"), soft_wrap=True)


def status_cmd(run: RunArg, runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """Progress, latest metrics, per-site privacy budget and site failures of a run.

    RUN is a run id, a unique prefix of one, or 'latest'.
    """
    with _open(runs_dir, run) as store:
        info, rounds, audits = store.run_info(), store.rounds(), store.audits()
    if json_out:
        emit_json(status_payload(info, rounds, audits))
    else:
        stdout().print(render_status(info, rounds, audits=audits))


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
                    emit_json(status_payload(info, rounds, store.audits()), indent=None)
                if info["status"] != "running":
                    return
                _sleep(interval)
        console = stdout()
        with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                info, rounds = store.run_info(), store.rounds()
                live.update(render_status(info, rounds, audits=store.audits()), refresh=True)
                if info["status"] != "running":
                    break
                _sleep(interval)
        if not console.is_terminal:  # Live leaves the cursor after its last frame when piped
            console.line()
    final = Text.assemble(f"Run {info['run_id']} ", status_text(info["status"]),
                          f" after {info['rounds_done']}/{info['num_rounds']} rounds")
    if info.get("status_reason"):
        final.append(f": {info['status_reason']}")
    console.print(final)


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
        emit_json({"run_id": info["run_id"], "path": str(path), "rounds": len(rounds),
                    "panels": [ax.get_title() for ax in fig.axes]})
    else:
        typer.echo(str(path))


def _artifact_paths(run_dir: Path, value: Any) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [(run_dir / str(v)).resolve() for v in values if v]


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
        emit_json({
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


def audit_show_cmd(run: RunArg, runs_dir: RunsDirOpt = Path("runs"), json_out: JsonOpt = False) -> None:
    """The audits of a run: claimed and empirical epsilon side by side.

    RUN is a run id, a unique prefix of one, or 'latest'.
    """
    with _open(runs_dir, run) as store:
        info, audits = store.run_info(), store.audits()
    if json_out:
        emit_json({"run_id": info["run_id"], "audits": audits})
        return
    table = audits_table(audits)
    if table is None:
        raise StoreError(f"run {info['run_id']} has no audit; start one with `fedgen audit run`")
    stdout().print(table)
