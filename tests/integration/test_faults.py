"""Fault injection in real simulations: bad updates, poisoning, crashes, an exhausted budget."""

from __future__ import annotations

import json
import math

import pytest

from server.store import RunStore
from simulations.launch import launch
from simulations.procs import processes_with_env
from tests.integration.runs import only_run, records

pytestmark = pytest.mark.slow


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
