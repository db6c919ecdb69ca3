"""``fedgen export RUN``: a recorded run into TensorBoard and/or MLflow (``server/trackers.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import RunArg, RunsDirOpt
from cli.output import fail, stdout
from server.runs_index import resolve_run
from server.store import RunStore
from server.trackers import TrackerError, export, nested_config, trackers_for


def export_cmd(run: RunArg, runs_dir: RunsDirOpt = Path("runs"),
               tensorboard: Annotated[Path | None, typer.Option(
                   "--tensorboard", help="write TensorBoard event files under this folder (DIR/<run>)")] = None,
               mlflow: Annotated[str | None, typer.Option(
                   "--mlflow", help="an MLflow tracking URI: sqlite:///path/mlflow.db (local) or http://server")] = None,
               experiment: Annotated[str, typer.Option("--experiment", help="the MLflow experiment")] = "fedgen",
               ) -> None:
    """Export a run's rounds (metrics, epsilons, sites, bytes, times, sample grids), its config and
    its audits to TensorBoard and/or MLflow. Idempotent: exporting again adds no duplicate point.
    Works on a finished run and on one still training (what is recorded so far)."""
    if tensorboard is None and not mlflow:
        raise fail("name a tracker: --tensorboard DIR and/or --mlflow URI")
    run_dir = resolve_run(runs_dir, run)
    with RunStore.open(run_dir) as store:  # one record per round, whole (a resumed run's last), audits, status
        records, audits, status = store.rounds(), store.audits(), store.run_info()["status"]
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    try:
        done = export(run_dir, records, nested_config(config), audits, trackers_for(tensorboard, mlflow, experiment),
                      status)
    except TrackerError as err:
        raise fail(str(err)) from None
    except Exception as err:  # noqa: BLE001 - the tracker's own error (an unreachable server, a bad URI)
        raise fail(f"the tracker refused the export: {type(err).__name__}: {err}") from None
    where = " and ".join(x for x in (f"TensorBoard {tensorboard / run_dir.name}" if tensorboard else "",
                                     f"MLflow {mlflow} (experiment {experiment})" if mlflow else "") if x)
    stdout().print(f"exported {done} round record(s) of {run_dir.name} to {where}")
