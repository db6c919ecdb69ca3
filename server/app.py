"""fedgen ServerApp: parse the config once, run the job, fail loudly on a bad end."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from common.flwr_runtime import quick_reply_pulls
from common.logs import setup_logging
from server.job import run_job

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    quick_reply_pulls()  # a deployment's replies: Flower's first retry of a missing array is 1 s
    cfg = parse_run_config(context.run_config)  # every config error, before round 1
    outcome = run_job(grid, cfg, context.run_id)
    if outcome.status == "failed":
        # Make Flower mark the run as failed, so `flwr ls` and our launcher see it.
        raise RuntimeError(f"fedgen run failed: {outcome.reason}")
