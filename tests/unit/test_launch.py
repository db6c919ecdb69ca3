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


def test_a_child_that_no_longer_shows_flwr_home_is_stopped_with_its_parent(tmp_path):
    """Ray's agents overwrite their environment with their title; the launcher must still stop them."""
    import subprocess
    import sys
    import time

    from simulations.launch import kill_started_under
    from simulations.procs import descendants, live_stat

    # The parent carries FLWR_HOME; its child is started with an empty environment.
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env={}); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], env={"FLWR_HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 10
        while not (kids := descendants(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kids, "the child never started"
        kill_started_under(tmp_path, patience=5)
        parent.wait(timeout=5)
        deadline = time.monotonic() + 5
        while live_stat(kids[0][0]) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_stat(kids[0][0]) is None, "the child without FLWR_HOME outlived the stop"
    finally:
        parent.kill()
        for pid, _ in descendants(parent.pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)


def test_the_launcher_without_a_preset_runs_the_default_job_and_vae_fashion_is_the_base_config(tmp_path, monkeypatch):
    """`python -m simulations.launch` (= scripts/run.sh) runs simulations/default.toml, the job the
    README describes; --preset vae-fashion adds nothing to pyproject.toml's settings."""
    from simulations import launch as L

    seen = {}
    monkeypatch.delenv("FEDGEN_RAY_ADDRESS", raising=False)
    monkeypatch.setattr(L, "launch", lambda preset, overrides, num_sites, runs_dir, ray_address=None:
                        seen.update(preset=preset, ray_address=ray_address) or 0)
    assert L.main([]) == 0 and seen["preset"] == "default" and seen["ray_address"] is None  # a private local Ray
    assert L.main(["--ray-address", "10.0.0.1:6379"]) == 0 and seen["ray_address"] == "10.0.0.1:6379"
    job = merged_run_config(seen["preset"], [], tmp_path)
    assert (job["task.family"], job["data.dataset"], job["privacy.target-epsilon"]) == ("merf", "fashion-mnist", 8.0)
    base = merged_run_config("vae-fashion", [], tmp_path)
    assert set(base) == {"run.runs-dir", "privacy.ledger-dir"}, "vae-fashion must stay pyproject.toml's settings alone"
