"""A site's privacy state: composed epsilon, restarts, budgets, corrupt ledgers (VAE on digits)."""

from __future__ import annotations

import json

import pytest
from flwr.app import RecordDict

from client.dp import Ledger, LedgerError
from client.site import dataset_key, make_plan, train_round
from common import privacy
from common import records as R
from common.config import parse_node_config
from common.data.site import site_dataset
from common.tasks import build_task
from tests.conftest import quick_config

STEPS = 3


def cfg_(**o):
    return quick_config(**{"train.max-steps": STEPS, "run.num-rounds": 4, **o})


def site_(tmp_path=None, **extra):
    cfg = {"partition-id": 1, "num-partitions": 3, **extra}
    if tmp_path is not None:
        cfg["ledger-path"] = str(tmp_path / "ledger.json")
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
    entry = Ledger(s.ledger_path).load(dataset_key(cfg, s))
    assert entry.history == [(res.metrics[R.NOISE], res.metrics[R.SAMPLE_RATE], 3 * STEPS)]
    assert entry.epsilon == pytest.approx(eps[-1])
    assert privacy.epsilon(entry.history, res.metrics[R.DELTA]) == pytest.approx(eps[-1], rel=1e-12)
    assert [r["round"] for r in entry.rounds] == [1, 2, 3]


def test_noise_is_the_calibrated_one_and_meets_the_target_at_the_last_round(tmp_path):
    cfg = cfg_()
    data, _ = site_dataset(cfg, site_())
    plan = make_plan(cfg, len(data))
    expected = privacy.calibrate_noise(cfg.privacy.target_epsilon, plan.delta, plan.sample_rate,
                                       plan.steps_per_round * cfg.run.num_rounds, "rdp")
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
    return [r["round"] for r in Ledger(s.ledger_path).load(dataset_key(cfg, s)).rounds]


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
    assert again.metrics[R.TRAIN_LOSS] == first.metrics[R.TRAIN_LOSS]
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


def test_a_damaged_saved_update_is_ignored_and_the_round_trained(tmp_path):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    (saved,) = tmp_path.glob("ledger.json.*.last-reply.pt")
    saved.write_bytes(b"\x00not a checkpoint")
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 0.0 and _rounds_in_ledger(cfg, s) == [1, 1]


def test_an_update_whose_charge_was_not_recorded_is_never_sent_again(tmp_path, monkeypatch):
    cfg, s, arrays = cfg_(), site_(tmp_path), global_arrays(cfg_())
    real_save = Ledger.save

    def ledger_write_fails(self, key, entry):
        raise OSError("disk full")

    monkeypatch.setattr(Ledger, "save", ledger_write_fails)
    with pytest.raises(OSError, match="disk full"):
        train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert len(list(tmp_path.glob("*.last-reply.pt"))) == 1  # written, but the ledger never said it was paid
    monkeypatch.setattr(Ledger, "save", real_save)
    res = train_round(cfg, s, arrays, 1, RecordDict(), run_name="run-a")
    assert res.metrics[R.REPLAYED] == 0.0 and _rounds_in_ledger(cfg, s) == [1]


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
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0,
                      train_metrics_aggr_fn=aggregate_train_metrics)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(2)))
    replies = [Message(content=RecordDict({"arrays": r.arrays, "metrics": MetricRecord(r.metrics)}), reply_to=m)
               for r, m in zip(results, msgs)]
    merged, metrics = strategy.aggregate_train(1, replies)
    assert merged is not None and metrics["replayed"] == pytest.approx(0.5, abs=0.01)  # weighted by examples
