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


def test_a_signal_while_the_superlink_starts_leaves_no_process_behind(tmp_path, monkeypatch):
    """SIGTERM (SystemExit via the launcher's handler) during the health wait used to leak it."""
    import pytest

    from simulations import launch as L

    def interrupted(*_a, **_k):
        raise SystemExit(143)

    monkeypatch.setattr(L.urllib.request, "urlopen", interrupted)
    env = L.flower_env(tmp_path)
    with pytest.raises(SystemExit):
        L.start_superlink(tmp_path, env)
    assert L.processes_with_env("FLWR_HOME", str(tmp_path)) == []


def test_a_failed_quiet_run_reports_the_end_of_its_stream_and_the_superlinks_errors(tmp_path):
    from simulations.launch import failure_tail

    (tmp_path / "run.log").write_text("".join(f"line {i}\n" for i in range(100)) + "ValueError: the cause\n")
    (tmp_path / "superlink.log").write_text("INFO ok\nERROR the simulation failed\nINFO bye\n")
    text = failure_tail(tmp_path, lines=5)
    assert "ValueError: the cause" in text and "line 96" in text and "line 94" not in text
    assert "ERROR the simulation failed" in text and "INFO ok" not in text
    assert "no log" in failure_tail(tmp_path / "absent")
