"""A site's privacy state: composed epsilon, restarts, budgets, corrupt ledgers (VAE on digits)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from client.privacy_state import Ledger, LedgerError, make_plan
from client.site import train_round
from common import privacy
from common import records as R
from common.config import parse_node_config
from common.data.site import site_dataset
from common.tasks import build_task
from tests.conftest import quick_config, site_entry

STEPS = 3


def cfg_(**o):
    return quick_config(**{"train.max-steps": STEPS, "run.num-rounds": 4, **o})


def site_(tmp_path=None, **extra):
    cfg = {"partition-id": 1, "num-partitions": 3, **extra}
    if tmp_path is not None:
        cfg["ledger-path"] = str(tmp_path / "ledger.json")
    elif "ledger-path" not in cfg:
        cfg["unsafe-memory-ledger"] = True  # Context.state only: these tests need no file
    return parse_node_config(cfg)


def global_arrays(cfg):
    data, spec = site_dataset(cfg, site_())
    return R.to_arrayrecord(build_task(cfg, spec).modules)


def test_epsilon_composes_over_rounds_and_matches_a_fresh_accountant(tmp_path):
    cfg, s = cfg_(), site_(tmp_path)
    arrays, state = global_arrays(cfg), RecordDict()
    eps = []
    for rnd in range(1, 4):
        res = train_round(cfg, s, arrays, rnd, state)
        eps.append(res.metrics[R.EPSILON])
    assert eps[0] < eps[1] < eps[2]
    entry = site_entry(cfg, s)
    assert entry.history == [(res.metrics[R.NOISE], res.metrics[R.SAMPLE_RATE], 3 * STEPS)]
    assert entry.epsilon == pytest.approx(eps[-1])
    assert privacy.epsilon(entry.history, res.metrics[R.DELTA]) == pytest.approx(eps[-1], rel=1e-12)
    assert [r["round"] for r in entry.rounds] == [1, 2, 3]


def test_noise_is_the_calibrated_one_and_meets_the_target_at_the_last_round(tmp_path):
    cfg = cfg_()
    data, _ = site_dataset(cfg, site_())
    plan = make_plan(cfg, len(data))
    expected = privacy.calibrate_noise(cfg.privacy.target_epsilon, plan.delta, sample_rate=plan.sample_rate,
                                       total_steps=plan.steps_per_round * cfg.run.num_rounds, accountant="rdp")
    assert plan.noise_multiplier == pytest.approx(expected)
    s, arrays, state = site_(tmp_path), global_arrays(cfg), RecordDict()
    for rnd in range(1, cfg.run.num_rounds + 1):
        res = train_round(cfg, s, arrays, rnd, state)
    assert res.metrics[R.NOISE] == pytest.approx(expected)
    assert res.metrics[R.EPSILON] <= cfg.privacy.target_epsilon
    assert res.metrics[R.EPSILON] == pytest.approx(cfg.privacy.target_epsilon, rel=0.01)


def test_restarted_site_continues_from_its_ledger(tmp_path):
    cfg = cfg_()
    s, arrays = site_(tmp_path), global_arrays(cfg)
    train_round(cfg, s, arrays, 1, RecordDict())
    # The SuperNode process dies: Context.state is gone, the ledger file is not.
    res = train_round(cfg, s, arrays, 2, RecordDict())
    other = tmp_path / "other"
    other.mkdir()
    s2, state = site_(other), RecordDict()
    train_round(cfg, s2, arrays, 1, state)
    uninterrupted = train_round(cfg, s2, arrays, 2, state)
    assert res.metrics[R.EPSILON] == pytest.approx(uninterrupted.metrics[R.EPSILON])
    assert res.metrics[R.EPSILON] > 0


def test_site_refuses_a_round_that_would_exceed_its_budget_and_spends_nothing(tmp_path):
    cfg, arrays = cfg_(), global_arrays(cfg_())
    s = site_(tmp_path)
    first = train_round(cfg, s, arrays, 1, RecordDict())
    # A budget just above what one round costs: the second round must be refused.
    tight = site_(tmp_path, **{"privacy-budget": first.metrics[R.EPSILON] * 1.01})
    before = (tmp_path / "ledger.json").read_bytes()
    res = train_round(cfg, tight, arrays, 2, RecordDict())
    assert res.status == "budget-exhausted" and res.arrays is None
    assert res.metrics[R.BUDGET_EXHAUSTED] == 1.0
    assert "budget-exhausted" in res.reason and "nothing was trained or spent" in res.reason
    assert (tmp_path / "ledger.json").read_bytes() == before


def test_corrupt_ledger_fails_closed(tmp_path):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict())
    path = tmp_path / "ledger.json"
    doc = json.loads(path.read_text())
    key = next(iter(doc["entries"]))
    doc["entries"][key]["history"] = []  # someone "resets" the spend
    path.write_text(json.dumps(doc))
    tampered = path.read_bytes()
    with pytest.raises(LedgerError, match="checksum"):
        train_round(cfg, s, arrays, 2, RecordDict())
    path.write_bytes(b"\x00garbage")
    with pytest.raises(LedgerError, match="unreadable"):
        train_round(cfg, s, arrays, 2, RecordDict())
    assert path.read_bytes() == b"\x00garbage" != tampered  # never silently rewritten


def test_delta_not_below_one_over_n_is_refused():
    cfg = cfg_(**{"privacy.delta": 0.01})
    with pytest.raises(ValueError, match="privacy.delta = 0.01 is not below 1/N"):
        train_round(cfg, site_(), global_arrays(cfg), 1, RecordDict())


def test_privacy_off_trains_without_accounting():
    cfg = cfg_(**{"privacy.enabled": False})
    res = train_round(cfg, site_(), global_arrays(cfg), 1, RecordDict())
    assert res.status == "ok" and R.EPSILON not in res.metrics and res.metrics[R.STEPS] == STEPS


def test_a_site_folder_cannot_stand_in_for_the_bundled_digits(tmp_path):
    from common.data.site import site_dataset

    with pytest.raises(ValueError, match="data.dataset = 'image-folder'"):
        site_dataset(cfg_(), site_(**{"data-path": str(tmp_path)}))


def _rounds_in_ledger(cfg, s) -> list[int]:
    return [r["round"] for r in site_entry(cfg, s).rounds]


def _same(a, b) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        (a[k].numpy() == b[k].numpy()).all() for k in a.keys())


def test_a_round_asked_again_is_answered_with_the_paid_update_and_costs_nothing(tmp_path):
    # A server died after this site trained round 2 and resumed from its round-1 checkpoint:
    # the same run asks for round 2 again with the same model.
    cfg, s = cfg_(), site_(tmp_path)
    arrays = global_arrays(cfg)
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    first = train_round(cfg, s, arrays, 2, RecordDict(), run_name="run-a")
    ledger = (tmp_path / "ledger.json").read_bytes()
    again = train_round(cfg, s, arrays, 2, RecordDict(), run_name="run-a")
    assert again.status == "ok" and again.metrics[R.REPLAYED] == 1.0 and first.metrics[R.REPLAYED] == 0.0
    assert set(again.metrics) == set(first.metrics)  # Flower aggregates replies only when their keys agree
    assert _same(again.arrays, first.arrays)
    assert again.metrics[R.EPSILON] == first.metrics[R.EPSILON]
    assert R.TRAIN_LOSS not in again.metrics  # not a DP output: never sent under DP
    assert (tmp_path / "ledger.json").read_bytes() == ledger  # nothing charged
    assert _rounds_in_ledger(cfg, s) == [1, 2]
    # Its time is its own: no training, only the lookup.
    assert again.metrics[R.TRAIN_SECONDS] == again.metrics[R.TRAIN_CPU_SECONDS] == 0.0 < again.metrics[R.SITE_SECONDS]
    # A site at its budget still answers with what it already paid for.
    spent = site_(tmp_path, **{"privacy-budget": first.metrics[R.EPSILON]})
    assert train_round(cfg, spent, arrays, 2, RecordDict(), run_name="run-a").metrics[R.REPLAYED] == 1.0
    assert train_round(cfg, spent, arrays, 3, RecordDict(), run_name="run-a").status == "budget-exhausted"


@pytest.mark.parametrize("dp", [True, False])
def test_every_trained_reply_says_how_long_the_site_took(dp):
    cfg = cfg_(**{"privacy.enabled": dp})
    res = train_round(cfg, site_(), global_arrays(cfg), 1, RecordDict())
    m = res.metrics
    assert res.status == "ok" and m[R.STEPS] == STEPS
    # The whole call includes the training loop, which used CPU.
    assert 0 < m[R.TRAIN_SECONDS] < m[R.SITE_SECONDS] and m[R.TRAIN_CPU_SECONDS] > 0


@pytest.mark.parametrize("change", ["model", "setting", "run", "round", "no-run-name"])
def test_anything_different_in_the_request_trains_and_is_charged(tmp_path, change):
    cfg, s = cfg_(), site_(tmp_path)
    arrays = global_arrays(cfg)
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    cfg2, arrays2, name, rnd = cfg, arrays, "run-a", 1
    if change == "model":
        arrays2 = global_arrays(cfg_(**{"run.seed": 1}))
    elif change == "setting":
        cfg2 = cfg_(**{"train.lr": 0.001})
    elif change == "run":
        name = "run-b"
    elif change == "round":
        rnd = 2
    else:
        name = ""
    res = train_round(cfg2, s, arrays2, rnd, RecordDict(), run_name=name)
    assert res.metrics[R.REPLAYED] == 0.0
    assert _rounds_in_ledger(cfg, s) == [1, rnd]


def test_resume_only_settings_do_not_stop_a_replay(tmp_path):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    resumed = cfg_(**{"run.resume": "latest", "run.round-timeout": 30.0})
    assert train_round(resumed, s, arrays, 1, RecordDict(), run_name="run-a").metrics[R.REPLAYED] == 1.0
    # The server's evaluation settings never reach a site's training either: a run resumed with
    # another evaluation (its own held-out folder, another FID size) is not charged again.
    evaluated = cfg_(**{"run.resume": "latest", "eval.fid-domain-n": 10, "eval.every": 3,
                        "data.eval-max-examples": 100})
    assert train_round(evaluated, s, arrays, 1, RecordDict(), run_name="run-a").metrics[R.REPLAYED] == 1.0
    assert _rounds_in_ledger(cfg, s) == [1]


def test_a_damaged_saved_update_is_ignored_and_the_round_trained(tmp_path):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    (saved,) = tmp_path.glob("ledger.json.*.last-reply.pt")
    saved.write_bytes(b"\x00not a checkpoint")
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 0.0 and _rounds_in_ledger(cfg, s) == [1, 1]


def _failing_write(monkeypatch, fail_on: int):
    """Make the ledger's ``fail_on``-th write (1-based) from now raise, as a full disk would."""
    real, calls = Ledger.write, {"n": 0}

    def write(self, entries):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise OSError("disk full")
        return real(self, entries)

    monkeypatch.setattr(Ledger, "write", write)
    return lambda: monkeypatch.setattr(Ledger, "write", real)


def test_a_charge_that_cannot_be_recorded_stops_the_round_before_training(tmp_path, monkeypatch):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    restore = _failing_write(monkeypatch, fail_on=1)  # the charge ahead of training
    with pytest.raises(OSError, match="disk full"):
        train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert not list(tmp_path.glob("*.last-reply.pt"))  # nothing trained, nothing to send
    restore()
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 0.0 and _rounds_in_ledger(cfg, s) == [1]


def test_a_crash_after_training_leaves_the_charge_on_record_and_the_update_is_sent_again(tmp_path, monkeypatch):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    restore = _failing_write(monkeypatch, fail_on=2)  # the confirmation after training
    with pytest.raises(OSError, match="disk full"):
        train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    restore()
    entry = site_entry(cfg, s)
    assert [r["state"] for r in entry.rounds] == ["pending"] and sum(x for _, _, x in entry.history) == STEPS
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")  # paid (pending): sent, not charged again
    assert res.metrics[R.REPLAYED] == 1.0 and sum(x for _, _, x in site_entry(cfg, s).history) == STEPS


def test_a_round_whose_process_died_mid_training_is_trained_again_under_its_charge(tmp_path):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    # Round 2's process charged ahead, then died before training ended: no saved update.
    from client.privacy_state import SitePrivacy, dataset_key
    from client.site import request_digest

    data, _ = site_dataset(cfg, s)
    plan, key = make_plan(cfg, len(data)), dataset_key(cfg, data)
    sp = SitePrivacy(cfg, s, key)
    digest = request_digest(cfg, s, key=key, run_name="run-a", server_round=2, proximal_mu=0.0, global_arrays=arrays)
    sp.reserve(plan, plan.steps_per_round, line={"run": "0", "family": "vae", "round": 2, "request": digest})
    charged = sum(x for _, _, x in site_entry(cfg, s).history)
    res = train_round(cfg, s, arrays, 2, RecordDict(), run_name="run-a")
    entry = site_entry(cfg, s)
    assert res.metrics[R.REPLAYED] == 0.0 and sum(x for _, _, x in entry.history) == charged == 2 * STEPS
    assert [(r["round"], r["state"]) for r in entry.rounds] == [(1, "confirmed"), (2, "confirmed")]


def test_two_trainings_priced_before_either_saves_record_the_sum(tmp_path):
    # Two runs on one ledger interleave: both price, both train, both save. Charged ahead,
    # each sees the other's pending charge, and the ledger ends with the sum of their steps.
    cfg, s = cfg_(), site_(tmp_path)
    from client.privacy_state import SitePrivacy, dataset_key

    data, _ = site_dataset(cfg, s)
    plan = make_plan(cfg, len(data))
    a, b = (SitePrivacy(cfg, s, dataset_key(cfg, data)) for _ in range(2))
    ra = a.reserve(plan, 3, line={"run": "a", "family": "vae", "round": 1})
    rb = b.reserve(plan, 3, line={"run": "b", "family": "vae", "round": 1})
    assert rb.spent == pytest.approx(privacy.epsilon([(plan.noise_multiplier, plan.sample_rate, 3)], plan.delta))
    step = [(plan.noise_multiplier, plan.sample_rate, 1)]
    a.confirm(ra, step * 3)
    b.confirm(rb, step * 3)
    entry = site_entry(cfg, s)
    assert entry.history == [(plan.noise_multiplier, plan.sample_rate, 6)]
    assert [r["state"] for r in entry.rounds] == ["confirmed", "confirmed"]
    assert entry.epsilon == pytest.approx(privacy.epsilon(entry.history, plan.delta))


def test_concurrent_training_processes_on_one_ledger_record_the_sum_of_their_steps(tmp_path):
    import multiprocessing as mp

    cfg, s = cfg_(), site_(tmp_path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_train_in_process, args=(str(tmp_path), run)) for run in ("run-a", "run-b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    entry = site_entry(cfg, s)
    assert sum(x for _, _, x in entry.history) == 2 * STEPS
    assert sorted(r["run"] for r in entry.rounds) == ["run-a", "run-b"]


def _train_in_process(folder: str, run: str) -> None:
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    cfg = cfg_()
    train_round(cfg, site_(Path(folder)), global_arrays(cfg), 1, RecordDict(), run_id=run, run_name=run)


def test_a_moved_data_folder_keeps_its_spend(tmp_path):
    import numpy as np
    from PIL import Image

    cfg = cfg_(**{"data.dataset": "image-folder"})
    first, moved = tmp_path / "data", tmp_path / "elsewhere" / "data"
    first.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(first / f"{i:02d}.png")
    ledger = tmp_path / "ledger.json"
    s = parse_node_config({"data-path": str(first), "ledger-path": str(ledger)})
    arrays = global_arrays_for(cfg, s)
    one = train_round(cfg, s, arrays, 1, RecordDict())
    first.rename(moved.parent.mkdir(parents=True) or moved)
    s2 = parse_node_config({"data-path": str(moved), "ledger-path": str(ledger)})
    two = train_round(cfg, s2, arrays, 2, RecordDict())
    assert two.metrics[R.EPSILON] > one.metrics[R.EPSILON]  # composed on the same records
    assert [r["round"] for r in site_entry(cfg, s2).rounds] == [1, 2]


def global_arrays_for(cfg, s):
    data, spec = site_dataset(cfg, s)
    return R.to_arrayrecord(build_task(cfg, spec).modules)


def test_a_site_without_a_ledger_file_refuses_dp_training_unless_told_otherwise():
    cfg = cfg_()
    s = parse_node_config({"partition-id": 1, "num-partitions": 3})
    with pytest.raises(LedgerError, match="no privacy ledger file.*ledger-path.*unsafe-memory-ledger"):
        train_round(cfg, s, global_arrays(cfg), 1, RecordDict())
    ok = parse_node_config({"partition-id": 1, "num-partitions": 3, "unsafe-memory-ledger": True})
    assert train_round(cfg, ok, global_arrays(cfg), 1, RecordDict()).status == "ok"
    # Without DP there is nothing to account: no ledger needed.
    off = cfg_(**{"privacy.enabled": False})
    assert train_round(off, s, global_arrays(off), 1, RecordDict()).status == "ok"


def test_a_version_1_ledger_keyed_by_folder_carries_its_spend_over(tmp_path):
    from client.privacy_state import legacy_dataset_key

    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    res = train_round(cfg, s, arrays, 1, RecordDict())
    path = tmp_path / "ledger.json"
    doc = json.loads(path.read_text())
    (entry,) = doc["entries"].values()
    old = {legacy_dataset_key(cfg, s): entry}  # what fedgen wrote before the digest key
    Ledger(path).write(old)
    again = train_round(cfg, s, arrays, 2, RecordDict())
    assert again.metrics[R.EPSILON] > res.metrics[R.EPSILON]
    assert [r["round"] for r in site_entry(cfg, s).rounds] == [1, 2]


def test_a_dp_reply_carries_only_accounted_or_declared_values():
    # Every key of a real DP reply is in the README's table of what a site sends, as a DP
    # output, a value independent of the records, or a declared public one.
    cfg = cfg_()
    res = train_round(cfg, site_(), global_arrays(cfg), 1, RecordDict())
    allowed = {R.PARTITION, R.EPSILON, R.BUDGET, R.DELTA, R.NOISE, R.SAMPLE_RATE, R.WEIGHT, R.STEPS, R.REPLAYED,
               R.SITE_SECONDS, R.TRAIN_SECONDS, R.TRAIN_CPU_SECONDS}
    assert set(res.metrics) <= allowed, set(res.metrics) - allowed
    for private in (R.NUM_EXAMPLES, R.TRAIN_LOSS, R.CLIP_FRACTION):
        assert private not in res.metrics
    assert res.metrics[R.WEIGHT] == 1.0  # uniform unless the site declares a public size
    declared = site_(**{"public-num-examples": 500})
    assert train_round(cfg, declared, global_arrays(cfg), 1, RecordDict()).metrics[R.WEIGHT] == 500.0
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in res.metrics:
        assert f"`{key}`" in readme, f"README's table of what a site sends does not list {key!r}"


def test_a_dp_site_does_not_answer_an_evaluation_on_its_records():
    from client.site import evaluate_round

    cfg = cfg_()
    with pytest.raises(PermissionError, match="exact evaluation metrics"):
        evaluate_round(cfg, site_(), global_arrays(cfg))


def test_the_first_round_of_a_site_whose_ledger_folder_does_not_exist_yet(tmp_path):
    cfg, arrays = cfg_(), global_arrays(cfg_())
    s = parse_node_config({"partition-id": 1, "num-partitions": 3, "ledger-path": str(tmp_path / "new" / "l.json")})
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a").metrics[R.REPLAYED] == 1.0


@pytest.mark.usefixtures("flower_identity")
def test_a_round_mixing_a_sent_again_and_a_trained_update_aggregates(tmp_path):
    from flwr.app import ConfigRecord, Message, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from server.strategy import aggregate_train_metrics
    from tests.conftest import FakeGrid

    cfg, arrays = cfg_(), global_arrays(cfg_())
    a, b = site_(tmp_path / "a"), parse_node_config({"partition-id": 2, "num-partitions": 3,
                                                     "ledger-path": str(tmp_path / "b.json")})
    train_round(cfg, a, arrays, 1, RecordDict(), run_name="run-a")
    results = [train_round(cfg, a, arrays, 1, RecordDict(), run_name="run-a"),  # sent again
               train_round(cfg, b, arrays, 1, RecordDict(), run_name="run-a")]  # trained
    assert [r.metrics[R.REPLAYED] for r in results] == [1.0, 0.0]
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0, weighted_by_key=R.WEIGHT,
                      train_metrics_aggr_fn=aggregate_train_metrics)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(2)))
    replies = [Message(content=RecordDict({"arrays": r.arrays, "metrics": MetricRecord(r.metrics)}), reply_to=m)
               for r, m in zip(results, msgs)]
    merged, metrics = strategy.aggregate_train(1, replies)
    assert merged is not None and metrics["replayed"] == pytest.approx(0.5)  # uniform weights under DP


def test_noised_diagnostics_send_a_loss_charged_as_one_more_gaussian_release(tmp_path):
    cfg = cfg_(**{"privacy.diagnostics": "noised", "privacy.diagnostics-noise": 5.0,
                  "privacy.diagnostics-loss-bound": 200.0})
    s = site_(tmp_path)
    res = train_round(cfg, s, global_arrays(cfg), 1, RecordDict())
    assert math.isfinite(res.metrics[R.TRAIN_LOSS])
    entry = site_entry(cfg, s)
    q = res.metrics[R.SAMPLE_RATE]
    assert sorted(entry.history) == sorted([(res.metrics[R.NOISE], q, STEPS), (5.0, q, 1)])
    assert res.metrics[R.EPSILON] == pytest.approx(privacy.epsilon(entry.history, res.metrics[R.DELTA]))
    plain = train_round(cfg_(), site_(tmp_path / "b"), global_arrays(cfg), 1, RecordDict())
    assert res.metrics[R.EPSILON] > plain.metrics[R.EPSILON]  # the diagnostic is paid for
    with pytest.raises(Exception, match="diagnostics-loss-bound"):
        cfg_(**{"privacy.diagnostics": "noised"})


def test_the_noised_loss_moves_by_at_most_one_clipped_record_between_neighbours(monkeypatch):
    # Add one record with an enormous loss: without noise, at rate 1, the released sum moves by
    # at most the bound (sensitivity sqrt(2) of (loss / L, 1)); unclipped it would move by 1e9.
    import torch

    from client import diagnostics

    class Task:
        class spec:
            kind = "image"

        def canary_losses(self, x, seed):
            return x.reshape(len(x), -1)[:, 0].double()  # each record's "loss" is its first pixel

    bound, n = 10.0, 20
    base = torch.full((n, 1, 2, 2), 3.0)
    neighbour = torch.cat([base, torch.full((1, 1, 2, 2), 1e9)])
    data = torch.utils.data.TensorDataset(base, torch.zeros(n))
    data2 = torch.utils.data.TensorDataset(neighbour, torch.zeros(n + 1))
    a = diagnostics.noised_mean_loss(Task(), data, 1.0, 1e-12, bound)
    b = diagnostics.noised_mean_loss(Task(), data2, 1.0, 1e-12, bound)
    assert a == pytest.approx(3.0)
    assert abs(b * (n + 1) - a * n) <= bound * (1 + 1e-6)  # the added record counts at most L


def test_dp_noise_and_sampling_are_secret_unless_a_test_asks_for_reproducible_noise(monkeypatch):
    # A seed derived from the config (run.seed, round, partition) would let the server regenerate
    # the noise and the Poisson sample and subtract them. Real runs draw them from OS entropy.
    from common.privacy import INSECURE_REPRODUCIBLE_NOISE
    from server.strategy import build_strategy

    cfg = cfg_()
    arrays = global_arrays(cfg)

    def weights():
        res = train_round(cfg, site_(), arrays, 1, RecordDict())
        return [a.numpy().copy() for a in res.arrays.values()]

    monkeypatch.setenv(INSECURE_REPRODUCIBLE_NOISE, "1")
    assert all((a == b).all() for a, b in zip(weights(), weights()))  # tests: the same numbers every run
    monkeypatch.delenv(INSECURE_REPRODUCIBLE_NOISE)
    assert not all((a == b).all() for a, b in zip(weights(), weights()))  # a real run: fresh noise
    central = cfg_(**{"central-dp.enabled": True})
    assert build_strategy(central).rng.normal() != build_strategy(central).rng.normal()


def test_a_model_opacus_would_get_wrong_is_refused_before_anything_is_charged(tmp_path, monkeypatch):
    """A convolution that pads with reflections (hooks, ghost and bk compute its per-example
    gradients as if it padded with zeros) fails the round before the ledger is charged."""
    import client.site
    from common.tasks import build_task as real_build_task

    def reflecting(*args, **kwargs):
        task = real_build_task(*args, **kwargs)
        convs = [m for m in task.modules["vae"].modules() if isinstance(m, torch.nn.Conv2d)]
        convs[0].padding_mode = "reflect"
        return task

    monkeypatch.setattr(client.site, "build_task", reflecting)
    cfg, s = cfg_(), site_(tmp_path)
    with pytest.raises(ValueError, match=r"vae: vae\..* \(Conv2d\) has padding_mode='reflect'"):
        train_round(cfg, s, global_arrays(cfg), 1, RecordDict())
    assert site_entry(cfg, s).history == []


def _cycles(cfg, s, n: int, *, crash_at: int | None = None):
    """``n`` one-step releases through SitePrivacy (reserve, then confirm), lines like an audit's (no
    request: no saved update); the ``crash_at``-th is reserved and never confirmed (its process
    died). Returns the SitePrivacy, the plan and the lines' ids."""
    from client.privacy_state import SitePrivacy, dataset_key

    data, _ = site_dataset(cfg, s)
    plan = make_plan(cfg, len(data))
    sp, ids = SitePrivacy(cfg, s, dataset_key(cfg, data)), []
    for i in range(1, n + 1):
        res = sp.reserve(plan, 1, line={"run": "r", "family": "vae", "round": i, "audit": True})
        ids.append(res.line_id)
        if i != crash_at:
            sp.confirm(res, [(plan.noise_multiplier, plan.sample_rate, 1)])
    return sp, plan, ids


def test_old_confirmed_lines_move_to_the_archive_and_none_is_lost(tmp_path, monkeypatch):
    """The ledger file keeps the pending lines and the newest ROUND_LINES_KEPT confirmed ones, so a
    round's read and write do not grow with the rounds served; the older lines are appended to the
    archive beside it first, and the history (every epsilon's source) stays whole in the file."""
    import client.privacy_state as ps

    monkeypatch.setattr(ps, "ROUND_LINES_KEPT", 3)
    cfg, s = cfg_(), site_(tmp_path)
    sp, plan, ids = _cycles(cfg, s, 10, crash_at=2)
    entry = site_entry(cfg, s)
    assert [(r["round"], r["state"]) for r in entry.rounds] == [(2, "pending"), (8, "confirmed"), (9, "confirmed"),
                                                                 (10, "confirmed")]
    archived = sp.ledger.archived(sp.key)
    assert [r["round"] for r in archived] == [1, 3, 4, 5, 6, 7] and {r["state"] for r in archived} == {"confirmed"}
    every = sp.ledger.all_rounds(sp.key)
    assert sorted(r["id"] for r in every) == sorted(ids)
    assert sum(r["steps"] for r in every) == sum(x for _, _, x in entry.history) == 10
    assert entry.epsilon == pytest.approx(privacy.epsilon(entry.history, plan.delta))
    assert sp.ledger.archived("another dataset") == []


def test_an_interrupted_archiving_leaves_lines_in_both_places_and_each_is_read_once(tmp_path, monkeypatch):
    import client.privacy_state as ps

    monkeypatch.setattr(ps, "ROUND_LINES_KEPT", 2)
    cfg, s = cfg_(), site_(tmp_path)
    sp, plan, ids = _cycles(cfg, s, 3)  # round 1's line already archived
    res = sp.reserve(plan, 1, line={"run": "r", "family": "vae", "round": 4, "audit": True})
    restore = _failing_write(monkeypatch, fail_on=1)  # round 2's line appended to the archive, then the write failed
    with pytest.raises(OSError, match="disk full"):
        sp.confirm(res, [(plan.noise_multiplier, plan.sample_rate, 1)])
    restore()
    assert [(r["round"], r["state"]) for r in site_entry(cfg, s).rounds] == [(2, "confirmed"), (3, "confirmed"),
                                                                             (4, "pending")]  # as it was
    with open(sp.ledger.archive_path, "a") as fh:
        fh.write('{"key": "torn')  # and the machine then died in an append
    _, _, more = _cycles(cfg, s, 2)  # two more releases: rounds 2 (again) and 3 archived
    lines = sp.ledger.archive_path.read_text().splitlines()
    assert len(lines) == 5 and lines[2] == '{"key": "torn'  # 1, 2, the torn one, 2 again, 3: each on its own line
    every = sp.ledger.all_rounds(sp.key)
    assert sorted(r["id"] for r in every) == sorted([*ids, res.line_id, *more])  # each once
    assert sum(r["steps"] for r in every) == sum(x for _, _, x in site_entry(cfg, s).history) == 6


def test_the_saved_updates_line_stays_in_the_file_however_many_lines_come_after_it(tmp_path, monkeypatch):
    """A request asked again is answered with the saved update only if its line is in the file:
    audits (and rounds without a run name) add lines that name no request and save no update,
    so the newest line naming one is kept whatever its age (else a second charge and release)."""
    import client.privacy_state as ps

    monkeypatch.setattr(ps, "ROUND_LINES_KEPT", 2)
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    sp, _, _ = _cycles(cfg, s, 4)  # four audit-like releases after it
    assert [r["round"] for r in sp.ledger.archived(sp.key)] == [1, 2]  # two of the audit-like lines
    assert [r["round"] for r in site_entry(cfg, s).rounds] == [1, 3, 4]  # round 1 of run-a, then the newest two
    steps = sum(x for _, _, x in site_entry(cfg, s).history)
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 1.0 and sum(x for _, _, x in site_entry(cfg, s).history) == steps == STEPS + 4


def test_lines_written_before_ids_are_archived_and_counted_once_each(tmp_path, monkeypatch):
    import client.privacy_state as ps
    from client.privacy_state import SitePrivacy, dataset_key

    monkeypatch.setattr(ps, "ROUND_LINES_KEPT", 3)
    cfg, s = cfg_(), site_(tmp_path)
    data, _ = site_dataset(cfg, s)
    plan, key = make_plan(cfg, len(data)), dataset_key(cfg, data)
    n, q = plan.noise_multiplier, plan.sample_rate
    old = [{"run": "old", "family": "vae", "round": i, "steps": 1, "noise": n, "sample_rate": q} for i in range(1, 7)]
    old.append(dict(old[-1]))  # the same audit seed run twice wrote two identical lines
    Ledger(tmp_path / "ledger.json").write({key: {"history": [[n, q, 7]], "delta": plan.delta, "epsilon": 0.0,
                                                  "budget": 8.0, "accountant": "rdp", "rounds": old}})
    assert len(Ledger(tmp_path / "ledger.json").all_rounds(key)) == 7  # each counted, none archived yet
    sp = SitePrivacy(cfg, s, key)
    restore = _failing_write(monkeypatch, fail_on=1)  # ids given to the old lines, then the write failed
    with pytest.raises(OSError, match="disk full"):
        sp.reserve(plan, 1, line={"run": "new", "family": "vae", "round": 1})
    restore()
    sp.confirm(sp.reserve(plan, 1, line={"run": "new", "family": "vae", "round": 1}), [(n, q, 1)])
    assert [r["round"] for r in sp.ledger.archived(key)] == [1, 2, 3, 4, 5]  # ids first (the reserve), then archived
    every = sp.ledger.all_rounds(key)
    assert [(r["run"], r["round"]) for r in every] == [("old", i) for i in (1, 2, 3, 4, 5, 6, 6)] + [("new", 1)]
    assert len({r["id"] for r in every}) == 8
    assert sum(r["steps"] for r in every) == sum(x for _, _, x in site_entry(cfg, s).history) == 8


def test_a_round_taken_over_keeps_its_line_for_the_replay(tmp_path, monkeypatch):
    """Run a's round was charged ahead and its process died; run b then trained a round (its update
    saved); run a's round, asked again, is trained under its charge and saved last. Its line is
    confirmed last, so it is the one kept for the replay however many lines follow."""
    import client.privacy_state as ps
    from client.privacy_state import SitePrivacy, dataset_key
    from client.site import request_digest

    monkeypatch.setattr(ps, "ROUND_LINES_KEPT", 1)
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    data, _ = site_dataset(cfg, s)
    plan, key = make_plan(cfg, len(data)), dataset_key(cfg, data)
    digest = request_digest(cfg, s, key=key, run_name="run-a", server_round=1, proximal_mu=0.0, global_arrays=arrays)
    SitePrivacy(cfg, s, key).reserve(plan, plan.steps_per_round,
                                     line={"run": "a", "family": "vae", "round": 1, "request": digest})
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-b")
    assert train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a").metrics[R.REPLAYED] == 0.0  # taken over
    _cycles(cfg, s, 2)  # two audit-like releases after it
    steps = sum(x for _, _, x in site_entry(cfg, s).history)
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 1.0 and sum(x for _, _, x in site_entry(cfg, s).history) == steps == 2 * STEPS + 2


def test_an_update_sent_again_from_a_pending_charge_is_never_trained_again_under_it(tmp_path, monkeypatch):
    """Round 1 saved its update and its process died before confirming; asked again, the saved
    update is sent (no charge). Round 2 then replaces the saved update; round 1 asked a third
    time must be trained under a new charge, not taken over under the old one (two different
    updates for one charge)."""
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    restore = _failing_write(monkeypatch, fail_on=2)  # the confirmation after training
    with pytest.raises(OSError, match="disk full"):
        train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    restore()
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 1.0 and [r["state"] for r in site_entry(cfg, s).rounds] == ["confirmed"]
    train_round(cfg, s, arrays, 2, RecordDict(), run_name="run-a")
    assert sum(x for _, _, x in site_entry(cfg, s).history) == 2 * STEPS
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 0.0 and sum(x for _, _, x in site_entry(cfg, s).history) == 3 * STEPS
