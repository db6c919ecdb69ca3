"""The launcher's run config: presets, overrides, and where simulated sites keep ledgers."""

from __future__ import annotations

from pathlib import Path

from simulations.launch import merged_run_config


def test_site_ledgers_go_beside_the_runs_the_job_writes(tmp_path):
    mine = tmp_path / "mine"
    cfg = merged_run_config("digits-quick", [f"run.runs-dir={str(mine)!r}".replace("'", '"')], tmp_path / "default")
    assert cfg["run.runs-dir"] == str(mine) and cfg["data.dataset"] == "digits"
    assert Path(cfg["privacy.ledger-dir"]).parent == mine / ".site-ledgers"
    plain = merged_run_config(None, [], tmp_path / "default")
    assert Path(plain["privacy.ledger-dir"]).parent == tmp_path / "default" / ".site-ledgers"
