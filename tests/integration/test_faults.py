"""Fault injection in real simulations: bad updates, poisoning, crashes, a killed server."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from server.store import RunStore
from simulations.launch import ROOT, launch
from simulations.procs import processes_with_env

pytestmark = pytest.mark.slow


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def only_run(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if (p / "run.db").exists()]
    return run_dir


# One job serves the two tests below (a Flower cold start is most of a job's time): 5 sites
# under the median; partitions 0, 1 and 2 misbehave in every round they train (NaN weights, a
# wrongly shaped array, an update scaled a million-fold); fixed noise and a privacy budget that
# fits exactly two rounds, so that every site refuses round 3 and the run stops there.
FAULT_SITES = 5
FAULT_SETTINGS = {"strategy.name": "median", "strategy.min-train-nodes": 2, "run.num-rounds": 4,
                  "privacy.noise-multiplier": 1.0, "privacy.delta": 1e-5}


def site_epsilons(cfg, num_sites: int, rounds: int) -> list[float]:
    """Each site's epsilon after ``rounds`` rounds, from its own partition and DP plan."""
    from client.privacy_state import make_plan
    from common import privacy
    from common.config import parse_node_config
    from common.data.site import site_dataset

    out = []
    for pid in range(num_sites):
        data, _ = site_dataset(cfg, parse_node_config({"partition-id": pid, "num-partitions": num_sites}))
        plan = make_plan(cfg, len(data))
        out.append(privacy.epsilon([(plan.noise_multiplier, plan.sample_rate, rounds * plan.steps_per_round)],
                                   plan.delta, plan.accountant))
    return out


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    from tests.conftest import quick_config

    base = tmp_path_factory.mktemp("faulty-run")
    cfg = quick_config(**FAULT_SETTINGS)
    eps2, eps3 = site_epsilons(cfg, FAULT_SITES, 2), site_epsilons(cfg, FAULT_SITES, 3)
    assert max(eps2) < min(eps3)
    budget = (max(eps2) + min(eps3)) / 2  # two rounds fit at every site, the third would exceed it
    home = base / "flwr-home"
    code = launch("digits-quick", [*(f"{k}={json.dumps(v)}" for k, v in FAULT_SETTINGS.items()),
                                   f"privacy.budget={budget}"],
                  num_sites=FAULT_SITES, runs_dir=base / "runs", quiet=True, flwr_home=home,
                  extra_env={"FEDGEN_INJECT_FAULTS": "0:nan,1:shape,2:norm"})
    left = processes_with_env("FLWR_HOME", str(home))
    run_dir = only_run(base / "runs")
    return {"code": code, "left": left, "run_dir": run_dir, "recs": records(run_dir), "eps2": eps2,
            "budget": budget}


def test_nan_and_misshapen_updates_are_dropped_and_poisoning_is_resisted(faulty_run):
    assert faulty_run["code"] == 0
    assert faulty_run["left"] == []  # the launcher left nothing running
    trained = faulty_run["recs"][:3]  # rounds 0-2; every site refuses round 3 (the budget)
    assert [r["round"] for r in trained] == [0, 1, 2]
    for rec in trained[1:]:
        by_pid = {s["partition_id"]: s for s in rec["sites"]}
        assert by_pid[0]["status"] == "failed" and "NaN" in by_pid[0]["reason"]
        assert by_pid[1]["status"] == "failed" and "shape" in by_pid[1]["reason"]
        assert by_pid[2]["status"] == "ok"  # well-formed, just enormous: the median must absorb it
        assert sum(s["status"] == "ok" for s in rec["sites"]) == 3
    elbo = [r["eval"]["neg-elbo"] for r in trained]
    assert all(math.isfinite(x) for x in elbo)
    assert elbo[-1] < elbo[0]  # the model still learned


def test_sites_out_of_budget_refuse_and_the_run_stops_cleanly(faulty_run):
    eps2, budget = faulty_run["eps2"], faulty_run["budget"]
    assert faulty_run["code"] == 0  # running out of budget is a clean end, not a crash
    recs = faulty_run["recs"]
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    # Rounds 1 and 2: every site trained and paid (partitions 0 and 1 then sent the broken
    # updates injected after training: dropped, see the test above); none was refused.
    for rec in recs[1:3]:
        assert len(rec["sites"]) == FAULT_SITES
        assert all(s["status"] == "ok" or s["partition_id"] in (0, 1) for s in rec["sites"])
        assert all(s["status"] != "refused" for s in rec["sites"])
    assert all(s["status"] == "refused" and "budget-exhausted" in s["reason"] for s in recs[3]["sites"])
    assert len(recs[3]["sites"]) == FAULT_SITES
    assert all(s["epsilon"] == pytest.approx(eps2[s["partition_id"]], rel=1e-6) for s in recs[2]["sites"])
    assert recs[2]["epsilon_max"] == pytest.approx(max(eps2), rel=1e-6) and recs[2]["epsilon_max"] <= budget
    with RunStore.open(faulty_run["run_dir"]) as store:
        info = store.run_info()
    assert info["status"] == "stopped" and "privacy budget" in info["status_reason"]


def test_every_site_failing_stops_the_run_with_the_reason(tmp_path):
    code = launch("digits-quick", [], num_sites=2, runs_dir=tmp_path, quiet=True,
                  extra_env={"FEDGEN_INJECT_FAULTS": "0:crash,1:crash"})
    assert code == 1
    run_dir = only_run(tmp_path)
    with RunStore.open(run_dir) as store:
        info = store.run_info()
    assert info["status"] == "failed"
    assert "every sampled site failed in round 1" in info["status_reason"]
    assert "injected crash" in info["status_reason"]


def test_killed_server_resumes_from_its_last_checkpoint(tmp_path):
    from client.privacy_state import Ledger
    from common import privacy

    runs = tmp_path / "runs"
    # The noise is calibrated to spend the budget (target-epsilon 8) in exactly 4 rounds. The
    # kill lands after the round-2 checkpoint; the sites may have trained (and paid for) a
    # later round the server never checkpointed. The resumed run asks for that round again
    # with the same model: were the sites to train it again they would pay twice and refuse
    # round 4; a site that had sent it sends the update it saved instead, and one killed
    # mid-training (its charge written ahead, pending) trains it again under that same charge.
    settings = ["run.num-rounds=4"]
    cmd = [sys.executable, "-m", "simulations.launch", "--preset", "digits-quick", "--num-sites", "2",
           "--runs-dir", str(runs), *[x for kv in settings for x in ("--set", kv)]]

    def trained() -> dict[str, list[int]]:
        """Rounds each site's ledger charged, by ledger file."""
        out = {}
        for path in sorted(runs.glob(".site-ledgers/*/partition-*.json")):
            (key,) = json.loads(path.read_text())["entries"]
            out[path.name] = [r["round"] for r in Ledger(path).load(key).rounds]
        return out

    def sent() -> dict[str, list[int]]:
        """Rounds whose update each site had saved to send: confirmed, or pending with the saved update."""
        out = {}
        for path in sorted(runs.glob(".site-ledgers/*/partition-*.json")):
            (key,) = json.loads(path.read_text())["entries"]
            saved = [torch.load(f, weights_only=True)["digest"] for f in path.parent.glob(f"{path.name}.*.last-reply.pt")]
            out[path.name] = [r["round"] for r in Ledger(path).load(key).rounds
                              if r.get("state") == "confirmed" or r.get("request") in saved]
        return out

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    ckpt = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.glob("*/checkpoints/round-0002.pt"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.2)
    assert ckpt is not None, "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGTERM)  # the whole job dies mid-run
    proc.wait(timeout=60)
    run_dir = ckpt.parent.parent
    done_before = [r["round"] for r in records(run_dir)]
    assert 4 not in done_before
    paid_before = sent()
    first_resumed = 1 + max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*.pt"))

    # A different setting is refused, naming the key...
    code = launch("digits-quick", [*settings, "run.resume=latest", "train.lr=0.5"], num_sites=2,
                  runs_dir=runs, quiet=True)
    assert code == 1
    # ...the same settings resume and finish the run.
    code = launch("digits-quick", [*settings, "run.resume=latest"], num_sites=2, runs_dir=runs, quiet=True)
    assert code == 0
    recs = records(run_dir)
    assert sorted({r["round"] for r in recs}) == [0, 1, 2, 3, 4]
    with RunStore.open(run_dir) as store:
        assert store.run_info()["status"] == "completed"
        assert [r["round"] for r in store.rounds()] == [0, 1, 2, 3, 4]
    eps = {r["round"]: r["epsilon_max"] for r in recs if r["round"] > 0}
    assert eps[4] > eps[2]  # the sites kept composing across the crash
    # A site that had sent the first resumed round sends its saved update again; one that had not
    # (or was killed mid-training, its charge pending) trains it.
    resumed = [r for r in recs if r["round"] == first_resumed][-1]
    for row in resumed["sites"]:
        paid = first_resumed in paid_before[f"partition-{row['partition_id']}-of-2.json"]
        assert row["status"] == "ok" and row["metrics"]["replayed"] == (1.0 if paid else 0.0)
    # Each round was trained and charged once, and the epsilon the sites reported in round 4
    # is the composition of exactly those rounds: the budget, not exceeded.
    assert trained() == {f"partition-{i}-of-2.json": [1, 2, 3, 4] for i in range(2)}
    reported = []
    for path in sorted(runs.glob(".site-ledgers/*/partition-*.json")):
        (key,) = json.loads(path.read_text())["entries"]
        entry = Ledger(path).load(key)
        assert sum(s for _, _, s in entry.history) == sum(r["steps"] for r in entry.rounds)
        assert entry.epsilon == pytest.approx(privacy.epsilon(entry.history, entry.delta, entry.accountant))
        reported.append(entry.epsilon)
    assert eps[4] == pytest.approx(max(reported))
    assert 7.9 < eps[4] <= 8.0
