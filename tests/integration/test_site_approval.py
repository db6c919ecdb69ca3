"""Sites that require their operator's approval, in a real loopback deployment (TLS, node auth,
warm site workers; issue 24): the first round is refused at every site, the test approves the
run config at two of the three sites with the `fedgen site` CLI, and the run goes on with those
two; the third never trains and spends nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app as cli_app
from client.site_log import SiteLog
from simulations.deployment import Deployment

pytestmark = pytest.mark.slow

ROUNDS = 5
POLICY = 'require-approval = true\nmax-epsilon = 20.0\nallowed-families = ["vae"]\n'


def _records(runs_dir: Path) -> list[dict]:
    files = list(runs_dir.glob("*/rounds.jsonl")) if runs_dir.exists() else []
    return [json.loads(x) for f in files for x in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def approved_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("approval")
    runs = base / "runs"
    with Deployment(base / "work") as dep:
        dep.start_superlink()
        configs = []
        for i in range(3):
            policy = base / f"policy-{i}.toml"
            policy.write_text(POLICY)
            configs.append({"partition-id": i, "num-partitions": 3, "policy-path": str(policy)})
        sites = dep.add_sites(configs)
        dep.wait_online(3)
        handle = dep.submit(dep.write_run_config("digits-quick", [
            f"run.num-rounds={ROUNDS}", "strategy.min-available-nodes=3", "strategy.min-train-nodes=2",
            "eval.fid-domain-n=0", "eval.fid-inception-n=0"], runs))
        deadline = time.monotonic() + 300
        while not any(r["round"] == 1 for r in _records(runs)):
            assert time.monotonic() < deadline and handle.proc.poll() is None, "round 1 was never recorded"
            time.sleep(0.2)
        runner = CliRunner()
        pending = [json.loads(runner.invoke(cli_app, ["site", "pending", "--json", "--ledger",
                                                      site.node_config["ledger-path"]]).stdout) for site in sites]
        for site, requests in zip(sites[:2], pending):
            result = runner.invoke(cli_app, ["site", "approve", requests[0]["digest"], "--ledger",
                                             site.node_config["ledger-path"]])
            assert result.exit_code == 0, result.output
        status = dep.wait(handle, 600)
        yield {"status": status, "records": _records(runs), "sites": sites, "pending": pending}


def test_the_first_round_is_refused_at_every_site_awaiting_approval(approved_run):
    (r1,) = [r for r in approved_run["records"] if r["round"] == 1]
    assert len(r1["sites"]) == 3
    for row in r1["sites"]:
        assert row["status"] == "refused" and "awaiting approval" in row["reason"], row
    digests = {p[0]["digest"] for p in approved_run["pending"]}
    assert len(digests) == 1  # the same run config: the same digest at every site


def test_the_run_goes_on_with_the_two_approved_sites(approved_run):
    assert approved_run["status"]["status"] == "finished:completed", approved_run["status"]
    last = max(approved_run["records"], key=lambda r: r["round"])
    assert last["round"] == ROUNDS
    rows = {row["node_id"]: row for row in last["sites"]}
    approved, waiting = approved_run["sites"][:2], approved_run["sites"][2]
    assert all(rows[s.node_id]["status"] == "ok" for s in approved)
    assert rows[waiting.node_id]["status"] == "refused" and "awaiting approval" in rows[waiting.node_id]["reason"]


def test_the_unapproved_site_spent_nothing_and_its_log_says_why(approved_run):
    waiting = approved_run["sites"][2]
    ledger = Path(waiting.node_config["ledger-path"])
    assert not ledger.exists() or not any(json.loads(ledger.read_text())["entries"].values())
    site_log = SiteLog(ledger)
    lines = site_log.lines()
    assert len(lines) == ROUNDS and {line["decision"] for line in lines} == {"awaiting-approval"}
    assert site_log.verify().ok
    for site in approved_run["sites"][:2]:  # the approved sites' logs and ledgers agree on every charge
        entry = next(iter(json.loads(Path(site.node_config["ledger-path"]).read_text())["entries"].values()))
        trained = [line for line in SiteLog(site.node_config["ledger-path"]).lines() if line["decision"] == "ok"]
        assert [c["request"] for c in entry["rounds"]] == [line["request"] for line in trained] and trained
