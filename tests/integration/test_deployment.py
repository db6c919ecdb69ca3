"""A real deployment on loopback: SuperLink with TLS and SuperNode auth, registered SuperNodes.

One topology and one run (to stay within a few minutes on two shared cores):

* a CA and SuperLink certificate, a node key per site; ``flower-superlink`` with TLS and
  ``--enable-supernode-auth`` (ServerApp runner in "process" isolation with the SuperExec
  secret, as in docker/compose.yaml); the sites' public keys registered with
  ``flwr supernode register``;
* three good sites, each with its own folder of digits images (the data a site holds; the
  server evaluates on all of a held-out folder of its own, ``data.eval-path``, and never reads a
  site's folder), and a fourth, registered site whose ``data-path`` does not exist;
* a SuperNode with an unregistered key, which the SuperLink must refuse;
* 2 rounds of the VAE (digits-quick preset); one good site is SIGKILLed (SuperNode,
  SuperExec and ClientApp: a crashed machine) while it works on round 2.

Every process is stopped by PID (and swept by FLWR_HOME) even when a test fails.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from server.store import RunStore
from simulations.deployment import Deployment
from simulations.procs import processes_with_env

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 300.0  # a safety net only: the SuperLink reports a dead SuperNode by itself (<= 60 s)
RUN_TIMEOUT = 420.0


def _write_digit_folders(base: Path) -> tuple[Path, list[Path]]:
    """sklearn's digits as PNG folders: three site folders and the server's held-out folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = (load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    server, sites = base / "server-heldout", [base / f"site-{i}-data" for i in range(1, 4)]
    cut = 1440  # 3 x 480 site images; the rest (357) only the server holds
    for i, img in enumerate(images):
        folder = sites[i // 480] if i < cut else server
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return server, sites


def _records(runs_dir: Path) -> list[dict]:
    files = list(runs_dir.glob("*/rounds.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    base = tmp_path_factory.mktemp("deployment")
    server_data, site_data = _write_digit_folders(base)
    runs_dir = base / "runs"
    dep = Deployment(base / "work")
    try:
        t0 = time.time()
        dep.start_superlink()
        good = dep.new_sites([{"data-path": str(p)} for p in site_data])
        (bad,) = dep.new_sites([{"data-path": str(base / "no-such-folder")}], names=["site-missing-data"])
        intruder = dep.new_site({}, name="intruder", register=False)
        for site in [*good, bad, intruder]:
            dep.start_site(site)
        dep.wait_online(4)
        online_s = time.time() - t0

        overrides = [
            "data.dataset=image-folder", f"data.eval-path={json.dumps(str(server_data))}", "data.image-size=8",
            "strategy.min-available-nodes=4", "strategy.min-train-nodes=2",
            f"run.round-timeout={ROUND_TIMEOUT}",
            "eval.fid-domain-n=0", "eval.fid-inception-n=0",  # FID is not what this tests
        ]
        handle = dep.submit(dep.write_run_config("digits-quick", overrides, runs_dir))

        # Kill one good site while it works on round 2: after round 1 is recorded and its
        # SuperNode has received the round-2 message.
        victim = good[0]
        _wait_for(lambda: any(r["round"] == 1 for r in _records(runs_dir)), RUN_TIMEOUT, "round 1")
        _wait_for(lambda: victim.log.read_text(errors="replace").count("Receiving: train message") >= 2,
                  120, "the victim's round-2 message")
        killed_at = time.time()
        dep.kill_site(victim, signal.SIGKILL)
        status = dep.wait(handle, RUN_TIMEOUT)

        # A secure-aggregation run on the same deployment (issue 22), the victim back: the site
        # without data fails in the training stage, after it shared its keys; the others go on.
        # The first run spent the sites' budget of 8 on these records (their ledgers refuse a
        # ninth): this run grants 30 in all.
        victim.procs.clear()  # the killed ones (wait_online reads the first as the SuperNode)
        dep.start_site(victim)
        dep.wait_online(4)
        secure_runs = base / "secure-runs"
        secure = dep.submit(dep.write_run_config(
            "digits-quick", [*overrides, "run.num-rounds=1", "strategy.secure-aggregation=true", "privacy.budget=30"],
            secure_runs))
        secure_status = dep.wait(secure, RUN_TIMEOUT)
        yield {"dep": dep, "status": status, "runs": runs_dir, "good": good, "bad": bad, "victim": victim,
               "intruder": intruder, "killed_at": killed_at, "online_s": online_s, "t0": t0, "handle": handle,
               "secure_status": secure_status, "secure_runs": secure_runs}
    finally:
        dep.close()


def test_run_completes_with_a_record_per_round(deployed):
    assert deployed["status"]["status"] == "finished:completed", deployed["status"]
    recs = _records(deployed["runs"])
    assert [r["round"] for r in recs] == [0, 1, 2]
    (run_dir,) = [p for p in deployed["runs"].iterdir() if (p / "run.db").exists()]
    with RunStore.open(run_dir) as store:
        info = store.run_info()
        assert info["status"] == "completed" and info["rounds_done"] == 2
    assert (run_dir / "final_model.pt").exists()


def test_the_server_evaluates_on_all_of_its_own_held_out_folder(deployed):
    served = deployed["handle"].log.read_text(errors="replace")  # the ServerApp's log, streamed by `flwr run`
    assert "server evaluation on 357 held-out examples (all of data.eval-path" in served


def test_round_one_trains_at_every_good_site(deployed):
    (r1,) = [r for r in _records(deployed["runs"]) if r["round"] == 1]
    rows = {s["node_id"]: s for s in r1["sites"]}
    for site in deployed["good"]:
        row = rows[site.node_id]
        assert row["status"] == "ok", row
        assert 0 < row["epsilon"] <= 8.0
        # Under DP the exact count and loss stay at the site; the merge weight is uniform.
        assert row["num_examples"] is None and row["train_loss"] is None and row["metrics"]["weight"] == 1.0
    assert r1["train"] and "train-loss" not in r1["train"]
    assert np.isfinite(r1["eval"]["neg-elbo"])


def test_missing_data_path_fails_with_a_clear_error_in_the_record(deployed):
    bad = deployed["bad"]
    for rec in _records(deployed["runs"])[1:]:
        (row,) = [s for s in rec["sites"] if s["node_id"] == bad.node_id]
        assert row["status"] == "failed"
        assert "image folder not found" in row["reason"] and bad.node_config["data-path"] in row["reason"], row
    assert not (bad.dir / "ledger.json").exists(), "a site that could not read its data spent no privacy"


def test_killed_site_is_recorded_and_the_others_finish_the_round(deployed):
    (r2,) = [r for r in _records(deployed["runs"]) if r["round"] == 2]
    victim, good = deployed["victim"], deployed["good"]
    failed = [s for s in r2["sites"] if s["status"] == "failed"]
    assert victim.node_id in {s["node_id"] for s in failed}, r2["sites"]
    # The SuperLink itself reports the dead node once its heartbeats stop (2 x 30 s), well
    # before run.round-timeout.
    assert any("Node Unavailable" in (s["reason"] or "") for s in failed), failed
    assert r2["ended_at"] - deployed["killed_at"] < ROUND_TIMEOUT - 60
    ok = {s["node_id"] for s in r2["sites"] if s["status"] == "ok"}
    assert ok == {s.node_id for s in good[1:]}
    assert r2["train"]["sites"] == 2.0 and np.isfinite(r2["eval"]["neg-elbo"])


def test_privacy_ledgers_stay_at_the_sites(deployed):
    for site in deployed["good"]:
        ledger = json.loads((site.dir / "ledger.json").read_text())
        # One entry, keyed by the digest of this site's own records (not by its folder).
        ((key, entry),) = ledger["entries"].items()
        assert key.startswith("image-folder|sha256:") and [r["round"] for r in entry["rounds"]][:1] == [1]


def test_a_secure_round_completes_over_tls_and_survives_a_site_dropping_after_key_sharing(deployed):
    assert deployed["secure_status"]["status"] == "finished:completed", deployed["secure_status"]
    (r1,) = [r for r in _records(deployed["secure_runs"]) if r["round"] == 1]
    sa = r1["secagg"]
    assert sa["reason"] == "" and sa["sampled"] == 4 and sa["sent"] == 3 and sa["dropped-after-sharing"] == 1, sa
    rows = {s["node_id"]: s for s in r1["sites"]}
    assert "image folder not found" in rows[deployed["bad"].node_id]["reason"]
    assert all(rows[site.node_id]["status"] == "ok" for site in deployed["good"])
    assert r1["bytes_received"] == sa["masked-bytes"] > 0 and np.isfinite(r1["eval"]["neg-elbo"])


def test_unregistered_supernode_is_refused(deployed):
    intruder = deployed["intruder"]
    proc = intruder.procs[0]
    assert proc.wait(timeout=60) != 0
    assert re.search(r"Failed to activate SuperNode", intruder.log.read_text(errors="replace"))
    listed = {int(n["node-id"]) for n in deployed["dep"].nodes()}
    registered = {s.node_id for s in deployed["dep"].sites if s.registered}
    assert listed == registered


def test_every_process_is_stopped(deployed):
    dep = deployed["dep"]
    print(f"\ndeployment: 4 SuperNodes online {deployed['online_s']:.1f}s after start; round 1 recorded "
          f"{[r for r in _records(deployed['runs']) if r['round'] == 1][0]['ended_at'] - deployed['t0']:.1f}s "
          f"after start; round seconds {[round(r['ended_at'] - r['started_at'], 1) for r in _records(deployed['runs'])]}")
    dep.close()
    time.sleep(0.5)
    assert processes_with_env("FLWR_HOME", str(dep.work_dir), below=True) == []
