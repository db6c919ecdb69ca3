"""The warm site worker (client/worker.py) in a real deployment on loopback: TLS, node auth.

One topology of three sites, each a SuperNode in process isolation with fedgen's worker beside
it, under a supervisor that restarts a dead worker (``simulations.deployment``), and two runs:

* run A, 3 rounds of digits-quick (200 local steps): partition 2's ClientApp raises in round 1
  (fault injection: an error reply, the worker serves the next message); site 1's worker is
  SIGKILLed while it trains round 2, after its charge is on the ledger (the round goes on
  without it; the supervisor's new worker serves round 3);
* run B, right after on the same workers, with another config (epsilon 4): the loaded app is
  reused, nothing of run A's configuration leaks into it, and the ledgers continue.
"""

from __future__ import annotations

import json
import re
import signal
import time
import tomllib
from pathlib import Path

import pytest

from common import privacy
from common.config import parse_run_config
from simulations.benchlib import load_run_config
from simulations.deployment import Deployment
from simulations.procs import processes_with_env

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 420.0
COMMON = ["strategy.min-available-nodes=3", "strategy.min-train-nodes=2", "run.round-timeout=300",
          "eval.fid-domain-n=0", "eval.fid-inception-n=0"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _pending_round(ledger: Path) -> int | None:
    """The round whose charge a site has written ahead and not yet confirmed (it is training it)."""
    try:
        entries = json.loads(ledger.read_text())["entries"].values()
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or caught mid-write (the ledger is replaced atomically, but be safe)
    return next((r["round"] for e in entries for r in e["rounds"] if r.get("state") == "pending"), None)


def _new_run(runs_dir: Path) -> Path:
    (run_dir,) = [p for p in runs_dir.iterdir() if (p / "run.db").exists()]
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("site-worker")
    runs_a, runs_b = base / "runs-a", base / "runs-b"
    dep = Deployment(base / "work", extra_env={"FEDGEN_INJECT_FAULTS": "2:crash@1"})
    try:
        dep.start_superlink()
        # A budget above both runs' spend: run B is trained, not refused, on the ledgers run A left.
        sites = dep.add_sites([{"partition-id": i, "num-partitions": 3, "privacy-budget": 100.0} for i in range(3)])
        dep.wait_online(3)
        # 200 local steps: long enough a round to kill a worker in the middle of its training.
        handle = dep.submit(dep.write_run_config("digits-quick", [*COMMON, "run.num-rounds=3", "train.max-steps=200"],
                                                 runs_a))
        victim = sites[0]
        _wait_for(lambda: _pending_round(victim.dir / "ledger.json") == 2, RUN_TIMEOUT,
                  "the victim's round-2 charge (written ahead, before training)", poll=0.02)
        first_worker = victim.worker
        first_worker.send_signal(signal.SIGKILL)  # the worker alone: its SuperNode stays up
        status_a = dep.wait(handle, RUN_TIMEOUT)
        run_a = _new_run(runs_a)
        config_b = dep.write_run_config("digits-quick", [*COMMON, "run.num-rounds=1", "privacy.target-epsilon=4.0"],
                                        runs_b)
        status_b = dep.wait(dep.submit(config_b), RUN_TIMEOUT)
        yield {"dep": dep, "sites": sites, "victim": victim, "first_worker": first_worker, "status_a": status_a,
               "status_b": status_b, "run_a": run_a, "run_b": _new_run(runs_b), "config_b": config_b}
    finally:
        dep.close()


def _by_site(two_runs) -> dict[int, dict[int, dict]]:
    """Run A's site rows: round -> site index (partition) -> row, matched by node id."""
    index = {site.node_id: i for i, site in enumerate(two_runs["sites"])}
    return {r["round"]: {index[s["node_id"]]: s for s in r["sites"]} for r in _records(two_runs["run_a"])[1:]}


def test_both_runs_complete_through_the_warm_workers(two_runs):
    assert two_runs["status_a"]["status"] == "finished:completed", two_runs["status_a"]
    assert two_runs["status_b"]["status"] == "finished:completed", two_runs["status_b"]
    assert [r["round"] for r in _records(two_runs["run_a"])] == [0, 1, 2, 3]
    for site in two_runs["sites"]:
        assert "flwr-clientapp" not in " ".join(p.args if isinstance(p.args, str) else " ".join(p.args)
                                                for p in site.procs)


def test_a_clientapp_that_raises_gets_an_error_reply_and_the_worker_serves_the_next_message(two_runs):
    recs = _by_site(two_runs)
    assert recs[1][2]["status"] == "failed" and "injected crash" in recs[1][2]["reason"], recs[1][2]
    assert recs[2][2]["status"] == "ok" and recs[3][2]["status"] == "ok"
    log = two_runs["sites"][2].worker_log.read_text(errors="replace")
    assert "supervisor:" not in log  # the same worker process served every message
    assert log.count("(app loaded)") == 1


def test_a_killed_worker_costs_its_site_one_round_and_the_supervisor_brings_it_back(two_runs):
    recs = _by_site(two_runs)
    assert recs[2][0]["status"] == "failed", recs[2][0]  # the SuperNode replied for the dead task
    assert recs[2][1]["status"] == "ok" and recs[2][2]["status"] == "ok"
    assert recs[3][0]["status"] == "ok"  # served by the restarted worker
    victim = two_runs["victim"]
    assert victim.worker_restarts == 1 and victim.worker is not two_runs["first_worker"]
    assert "supervisor: worker exited -9; restart 1" in victim.worker_log.read_text(errors="replace")
    # The ledger holds the charge of the round the dead worker was training (charged ahead,
    # before any record was read), then run A's round 3 and run B's round 1.
    ((_, entry),) = json.loads((victim.dir / "ledger.json").read_text())["entries"].items()
    assert [r["round"] for r in entry["rounds"]] == [1, 2, 3, 1]


def test_the_second_run_reuses_the_loaded_app_without_the_first_runs_state(two_runs):
    site = two_runs["sites"][1]  # neither killed nor faulty: one worker process for both runs
    log = site.worker_log.read_text(errors="replace")
    assert log.count("(app loaded)") == 1 and log.count(": acquired") == 4  # 3 rounds of run A, 1 of run B
    assert len(re.findall(r" memory \d+\.\d+\)", log)) == 4  # every task ends freeing what it left (worker._settle_memory)
    assert "supervisor:" not in log
    # Its SuperNode wakes it for each task (client.wake): it does not poll every 0.1 s.
    assert log.count("the SuperNode wakes this worker for each task") == 1 and "came without a wake" not in log
    (r1,) = [r for r in _records(two_runs["run_b"]) if r["round"] == 1]
    row = {s["node_id"]: s for s in r1["sites"]}[site.node_id]
    assert row["status"] == "ok", row
    ((_, entry),) = json.loads((site.dir / "ledger.json").read_text())["entries"].items()
    (noise_a, q_a, steps_a), (noise_b, q_b, steps_b) = entry["history"]
    # Run B's noise is calibrated for its own plan (epsilon 4 in 1 round), not run A's (8 in 3).
    cfg_b = parse_run_config(load_run_config(None, tomllib.loads(two_runs["config_b"].read_text())))
    assert noise_b == row["metrics"]["noise-multiplier"] != noise_a and q_b == q_a and steps_b < steps_a
    assert privacy.epsilon([(noise_b, q_b, steps_b)], row["metrics"]["delta"]) == pytest.approx(
        cfg_b.privacy.target_epsilon, abs=0.05)
    # The ledger continued: run B's epsilon composes run A's spend with its own.
    assert row["epsilon"] == pytest.approx(privacy.epsilon([tuple(h) for h in entry["history"]],
                                                           row["metrics"]["delta"]), rel=1e-9)
    assert row["epsilon"] > cfg_b.privacy.target_epsilon + 1


def test_only_the_sites_own_worker_may_take_its_tasks(two_runs):
    """The SuperNode's Runtime API (loopback) requires the site's SuperExec secret: a process
    without it is refused; with it, the same request is answered (no task waiting)."""
    import httpx

    from common.flwr_runtime import acquire_task, runtime_client

    site = two_runs["sites"][1]
    address = f"127.0.0.1:{site.port}"
    secret = (site.dir / "superexec.secret").read_bytes().strip()
    stranger = runtime_client(address, insecure=True, root_certificates=None, secret=None, retry=False)
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            acquire_task(stranger)
        assert refused.value.response.status_code in (401, 403)
    finally:
        stranger.close()
    own = runtime_client(address, insecure=True, root_certificates=None, secret=secret, retry=False)
    try:
        assert acquire_task(own) is None
    finally:
        own.close()


def test_every_process_is_stopped(two_runs):
    dep = two_runs["dep"]
    dep.close()
    time.sleep(0.5)
    assert processes_with_env("FLWR_HOME", str(dep.work_dir), below=True) == []

