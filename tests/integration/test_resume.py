"""A killed server: the job resumes from its last checkpoint and no site pays twice for a round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from server.store import RunStore
from simulations.launch import ROOT, launch
from tests.integration.runs import records

pytestmark = pytest.mark.slow


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
        assert sum(s for _, _, s in entry.history) == sum(r["steps"] for r in Ledger(path).all_rounds(key))
        assert entry.epsilon == pytest.approx(privacy.epsilon(entry.history, entry.delta, entry.accountant))
        reported.append(entry.epsilon)
    assert eps[4] == pytest.approx(max(reported))
    assert 7.9 < eps[4] <= 8.0
