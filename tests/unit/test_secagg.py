"""Secure aggregation (issue 22): the protocol between the real site handlers (client/app.py,
client/secagg.py) and the real server side (server/secagg.py, server/rounds.py), over a grid
that delivers messages in-process; each site's training is scripted (a known update), so the
sum the server computes can be checked against the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

import client.secagg as site_secagg
from client.app import app
from client.site import RoundResult
from common import secagg as S
from common.config import ROBUST_STRATEGIES, ConfigError
from server.exchange import exchange
from server.rounds import run_rounds
from server.secagg import SecureRound
from server.strategy import aggregate_train_metrics
from tests.conftest import FakeGrid, quick_config

pytestmark = pytest.mark.usefixtures("flower_identity")

DIM = 4000
GLOBAL = ArrayRecord({"a.w": Array(np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100)),
                      "b.w": Array(np.zeros(1000, dtype=np.float32)),
                      "b.steps": Array(np.array([7], dtype=np.int64))})  # an integer buffer: not summed
NODES = [2**63 + 17 * i + 5 for i in range(6)]  # real node ids exceed int64


def updates_for(nodes, seed=0, scale=0.05) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-scale, scale, DIM) for n in nodes}


class SiteGrid(FakeGrid):
    """Delivers each message to ``client.app.app`` with the node's own Context (kept across
    messages, as a SuperNode keeps it). ``drop(node, message_type, round)`` True: the node never
    answers; ``tamper(node, message_type, reply)`` may change a reply before the server sees it."""

    def __init__(self, nodes, run_config, drop=lambda node, kind, rnd: False, tamper=None) -> None:
        super().__init__(0)
        self.nodes, self.drop, self.tamper, self.seen = list(nodes), drop, tamper, []
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": len(nodes)},
                                    state=RecordDict(), run_config=run_config) for i, n in enumerate(nodes)}

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            msg = self.pending[mid]
            node = int(msg.metadata.dst_node_id)
            kind = msg.metadata.message_type
            rnd = int(msg.content["config"]["server-round"] if kind.startswith("train")
                      else msg.content["secagg"]["round"])
            if self.drop(node, kind, rnd):
                continue  # never answered: the server waits for it until run.round-timeout
            del self.pending[mid]
            reply = app(message=msg, context=self.contexts[node])
            if self.tamper is not None:
                self.tamper(node, kind, reply)
            masked = reply.content.array_records.get(S.MASKED)  # copied: the server deletes it once read
            self.seen.append((node, msg.metadata.message_type,
                              None if masked is None else masked[S.MASKED_ARRAY].numpy().copy()))
            out.append(reply)
        return out


@pytest.fixture
def scripted_training(monkeypatch):
    """Each site 'trains' to the global model plus its scripted update."""
    script: dict[int, np.ndarray] = {}

    def fake_train_round(cfg, site, global_arrays, server_round, state, **kwargs):
        node = NODES[site.partition_id]
        ref = {k: v.numpy() for k, v in global_arrays.items()}
        flat = S.flatten(ref, S.float_keys(ref)) + script[node]
        trained = S.unflatten(flat, ref, S.float_keys(ref))
        arrays = ArrayRecord({k: Array(np.asarray(trained.get(k, ref[k]), dtype=ref[k].dtype)) for k in ref})
        return RoundResult(status="ok", metrics={"partition-id": float(site.partition_id), "weight": 1.0,
                                                 "epsilon": 1.0}, arrays=arrays)

    monkeypatch.setattr(site_secagg, "train_round", fake_train_round)
    return script


def config(**overrides):
    return quick_config(**{"strategy.secure-aggregation": True, "strategy.min-available-nodes": 2,
                           "strategy.min-train-nodes": 2, "run.round-timeout": 0.3, **overrides})


def secure_round(cfg, nodes, drop=lambda node, kind, rnd: False, tamper=None):
    grid = SiteGrid(nodes, dict(cfg.to_flat()), drop, tamper)
    train = [Message(content=RecordDict({"arrays": GLOBAL, "config": ConfigRecord({"server-round": 1})}),
                     dst_node_id=n, message_type="train") for n in nodes]
    clip = cfg.central_dp.clipping_norm if cfg.central_dp.enabled else 0.0  # as the round loop passes it
    return SecureRound(grid, cfg, exchange).run(1, train, GLOBAL, clip_norm=clip), grid


def true_sum(updates, nodes):
    return sum(updates[n] for n in nodes)


def secure_vector(outcome):
    ref = {k: v.numpy() for k, v in GLOBAL.items()}
    return S.flatten(outcome.total, S.float_keys(ref))


def test_the_secure_sum_is_the_plain_sum_within_the_stated_quantization_error(scripted_training):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes))
    outcome, _ = secure_round(config(), nodes)
    assert outcome.reason == "" and sorted(outcome.senders) == sorted(nodes)
    err = np.abs(secure_vector(outcome) - true_sum(scripted_training, nodes))
    assert err.max() <= outcome.stats["max-abs-error-bound"]
    assert np.sqrt(np.mean(err**2)) <= 1.5 * outcome.stats["rms-error-bound"]
    assert "b.steps" not in outcome.total  # integer buffers are not summed
    assert outcome.stats["messages"] == 2 * 4 * 5  # four exchanges with every site


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


@pytest.mark.parametrize("broken", [False, True])
def test_what_the_server_receives_from_a_site_is_not_its_update(scripted_training, monkeypatch, broken):
    """Each site's masked update against its own quantized update: no correlation beyond chance.
    ``broken``: masks of zeros (what a PRG that failed would give): the same check sees the update."""
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=1))
    quantized = {}
    real_quantize = S.Quantizer.quantize

    def spy(self, x, rng):
        q = real_quantize(self, x, rng)
        quantized[len(quantized)] = q
        return q

    monkeypatch.setattr(S.Quantizer, "quantize", spy)
    if broken:
        monkeypatch.setattr(S, "prg", lambda seed, label, length: np.zeros(length, dtype=np.uint32))
    _, grid = secure_round(config(), nodes)
    sent = [masked for node, kind, masked in grid.seen if kind == "train.secagg"]
    assert len(sent) == 5 and len(quantized) == 5 and all(y is not None for y in sent)
    # The sites are served in order: the i-th quantized update is the i-th masked reply's.
    corr = [correlation(quantized[i], sent[i]) for i in range(5)]
    if broken:
        assert min(corr) > 0.99
    else:
        assert max(abs(c) for c in corr) < 5 / np.sqrt(DIM), corr


def test_one_site_dropping_after_key_sharing_is_survived(scripted_training):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=2))
    gone = nodes[3]
    outcome, _ = secure_round(config(), nodes, drop=lambda n, kind, rnd: n == gone and kind == "train.secagg")
    alive = [n for n in nodes if n != gone]
    assert outcome.reason == "" and sorted(outcome.senders) == sorted(alive)
    assert outcome.stats["dropped-after-sharing"] == 1
    err = np.abs(secure_vector(outcome) - true_sum(scripted_training, alive))
    assert err.max() <= outcome.stats["max-abs-error-bound"]


def test_a_site_dropping_in_the_unmask_stage_is_survived_its_update_counts(scripted_training):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=3))
    outcome, _ = secure_round(config(), nodes,
                              drop=lambda n, kind, rnd: n == nodes[0] and kind == "query.secagg_unmask")
    assert outcome.reason == "" and sorted(outcome.senders) == sorted(nodes)
    assert np.abs(secure_vector(outcome) - true_sum(scripted_training, nodes)).max() \
        <= outcome.stats["max-abs-error-bound"]


def test_a_sparse_neighbour_graph_with_a_dropout(scripted_training):
    """SecAgg+: 6 sites, 2 neighbours each (threshold 2 of 3 holders), one drops after sharing."""
    nodes = NODES[:6]
    scripted_training.update(updates_for(nodes, seed=4))
    outcome, _ = secure_round(config(**{"strategy.secagg-degree": 2}), nodes,
                              drop=lambda n, kind, rnd: n == nodes[2] and kind == "train.secagg")
    alive = [n for n in nodes if n != nodes[2]]
    assert outcome.reason == "" and outcome.stats["holders"] == 3 and outcome.stats["threshold"] == 2
    assert np.abs(secure_vector(outcome) - true_sum(scripted_training, alive)).max() \
        <= outcome.stats["max-abs-error-bound"]


def test_the_neighbour_graph_is_symmetric():
    order = list(range(11))
    for degree in (0, 1, 2, 3, 4, 9, 10):
        for u in order:
            for v in S.neighbours(order, u, degree)[1:]:
                assert u in S.neighbours(order, v, degree), (degree, u, v)


def test_too_many_dropping_fails_the_round_cleanly_nothing_is_aggregated(scripted_training, tmp_path):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=5))
    drop = {nodes[1], nodes[2], nodes[4]}  # 2 of 5 send: below the threshold of 3
    outcome, _ = secure_round(config(), nodes, drop=lambda n, kind, rnd: n in drop and kind == "train.secagg")
    assert outcome.total is None and "fewer than the threshold 3" in outcome.reason

    cfg = config(**{"run.num-rounds": 1})
    grid = SiteGrid(nodes, dict(cfg.to_flat()), drop=lambda n, kind, rnd: n in drop and kind == "train.secagg")
    recorded: list[dict] = []
    out = run_rounds(grid, cfg, fedavg(), NoEval(), recorded.append, tmp_path, arrays=GLOBAL)
    (rec,) = [r for r in recorded if r["round"] == 1]
    assert "fewer than the threshold" in rec["secagg"]["reason"]
    assert all(np.array_equal(out.arrays[k].numpy(), GLOBAL[k].numpy()) for k in GLOBAL.keys())
    assert {r["status"] for r in rec["sites"]} == {"failed"}


def fedavg():
    return FedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0, weighted_by_key="weight",
                  train_metrics_aggr_fn=aggregate_train_metrics)


class NoEval:
    notes: list[str] = []

    def server_update(self, arrays):
        return arrays, {}

    def evaluate(self, arrays, server_round=None):
        return {}

    def save_samples(self, arrays, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


def test_the_round_loop_steps_by_the_mean_of_the_secure_sum(scripted_training, tmp_path):
    nodes = NODES[:4]
    scripted_training.update(updates_for(nodes, seed=6))
    cfg = config(**{"run.num-rounds": 1})
    recorded: list[dict] = []
    out = run_rounds(SiteGrid(nodes, dict(cfg.to_flat())), cfg, fedavg(), NoEval(), recorded.append, tmp_path,
                     arrays=GLOBAL)
    ref = {k: v.numpy() for k, v in GLOBAL.items()}
    got = S.flatten({k: v.numpy() for k, v in out.arrays.items()}, S.float_keys(ref))
    want = S.flatten(ref, S.float_keys(ref)) + true_sum(scripted_training, nodes) / 4
    (rec,) = [r for r in recorded if r["round"] == 1]
    assert np.abs(got - want).max() <= rec["secagg"]["step"] + 1e-6
    assert out.arrays["b.steps"].numpy().tolist() == [7]
    assert [r["status"] for r in rec["sites"]] == ["ok"] * 4 and rec["bytes_received"] == 4 * DIM * 4


def test_user_level_dp_sites_clip_their_own_update_so_the_sum_has_sensitivity_c(scripted_training):
    """Under user-level DP the server cannot clip: each site clips to C minus the rounding slack,
    so its dequantized contribution has norm at most C. A site whose update is 40x too long,
    summed with a zero one, must come out with norm <= C (the guarantee the noise is scaled to)."""
    c = 0.5
    nodes = NODES[:3]
    scripted_training.update({nodes[0]: np.full(DIM, 0.3), nodes[1]: np.zeros(DIM), nodes[2]: np.zeros(DIM)})
    cfg = config(**{"central-dp.enabled": True, "central-dp.clipping-norm": c, "privacy.enabled": False})
    outcome, _ = secure_round(cfg, nodes)
    contribution = secure_vector(outcome)
    assert np.linalg.norm(np.full(DIM, 0.3)) > 30 * c
    assert np.linalg.norm(contribution) <= c  # and not far below it: the clip is to C minus the slack
    assert np.linalg.norm(contribution) >= c - 3 * S.Quantizer(c, 20).l2_slack(DIM)


def test_a_site_reveals_nothing_when_the_server_counts_it_as_dropped():
    state = RecordDict()
    site_secagg.keys(ConfigRecord({"round": 1}), state)
    state[site_secagg.STATE]["stage"] = "train"
    state[site_secagg.STATE].update({"pk-nodes": [], "c-pk": [], "inbox-from": [], "inbox": [], "holders": ["5"],
                                     "own-b": b"x", "own-k": b"y"})
    with pytest.raises(site_secagg.ProtocolError, match="revealing nothing"):
        site_secagg.unmask(ConfigRecord({"round": 1, "sent": ["6"], "dropped": ["5"]}), state, 5)
    with pytest.raises(site_secagg.ProtocolError, match="both as sent and as dropped"):
        site_secagg.unmask(ConfigRecord({"round": 1, "sent": ["5", "6"], "dropped": ["6"]}), state, 5)


def test_a_message_of_another_round_or_out_of_order_is_refused():
    state = RecordDict()
    site_secagg.keys(ConfigRecord({"round": 2}), state)
    with pytest.raises(site_secagg.ProtocolError, match="round 3"):
        site_secagg.shares(ConfigRecord({"round": 3, "order": [], "nodes": [], "c-pk": [], "s-pk": [],
                                         "degree": 0, "threshold": 0}), state, 5)


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_a_robust_strategy_with_secure_aggregation_is_refused_at_config_time(name):
    with pytest.raises(ConfigError, match="needs every site's own update"):
        config(**{"strategy.name": name})


def test_other_conflicts_with_secure_aggregation_are_refused_all_at_once():
    with pytest.raises(ConfigError) as err:
        config(**{"strategy.max-update-norm": 1.0, "central-dp.enabled": True, "central-dp.clipping": "adaptive",
                  "strategy.secagg-range": 2.0})
    text = str(err.value)
    assert "max-update-norm" in text and "adaptive" in text and "secagg-range" in text


def test_quantization_refuses_out_of_range_and_the_field_refuses_too_many_sites():
    q = S.Quantizer(1.0, 20)
    with pytest.raises(S.OutOfRange, match="raise strategy.secagg-range"):
        q.quantize(np.array([0.5, -1.5]), np.random.default_rng(0))
    S.check_field(q, q.max_summands())
    with pytest.raises(OverflowError, match="lower strategy.secagg-bits"):
        S.check_field(q, q.max_summands() + 1)
    # At the limit, the largest values of every summand still sum exactly (no wrap-around).
    top = np.full(3, q.levels, dtype=np.uint32)
    total = np.zeros(3, dtype=np.uint32)
    for _ in range(q.max_summands()):
        total += top
    assert q.dequantize_sum(total, q.max_summands()) == pytest.approx(np.full(3, q.max_summands() * 1.0))


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    q = S.Quantizer(1.0, 8)
    x = np.full(200_000, 0.123456)
    back = q.quantize(x, np.random.default_rng(0)).astype(np.float64) * q.step - 1.0
    assert np.abs(back - x).max() < q.step
    assert abs(back.mean() - 0.123456) < 4 * q.step / np.sqrt(x.size)


def test_the_masks_use_the_whole_seed():
    """Flower's pseudo_rand_gen folds a seed to 32 bits; ours must not: seeds that agree on every
    32-bit word's XOR give different masks."""
    a = bytes(range(32))
    words = [int.from_bytes(a[i:i + 4], "little") for i in range(0, 32, 4)]
    words[0] ^= 0xDEADBEEF
    words[1] ^= 0xDEADBEEF  # same XOR fold as a
    b = b"".join(w.to_bytes(4, "little") for w in words)
    assert not np.array_equal(S.prg(a, b"self", 64), S.prg(b, b"self", 64))
    assert not np.array_equal(S.prg(a, b"self", 64), S.prg(a, b"pair", 64))


class FixedRing:
    """In place of ``secrets.SystemRandom``: the ring is the order the sites were sampled in."""

    def shuffle(self, order):
        pass


def test_senders_cut_apart_on_a_sparse_graph_are_refused_not_unmasked(scripted_training, monkeypatch):
    """Found by review: 8 sites on a ring of degree 2, the 3rd and 6th drop after sharing. The
    server would hold the self masks of all senders and the keys of both dropped sites, enough to
    strip the masks from the sum of the 4th and 5th alone. The round must fail instead."""
    monkeypatch.setattr("server.secagg.secrets.SystemRandom", FixedRing)
    nodes = NODES[:6] + [2**63 + 1001, 2**63 + 1002]
    NODES.extend(nodes[6:])  # the scripted training finds a site's node by its partition
    try:
        scripted_training.update(updates_for(nodes, seed=7))
        outcome, grid = secure_round(config(**{"strategy.secagg-degree": 2}), nodes,
                                     drop=lambda n, kind, rnd: n in (nodes[2], nodes[5]) and kind == "train.secagg")
    finally:
        del NODES[6:]
    assert outcome.total is None and "not connected" in outcome.reason
    assert not [kind for _, kind, _ in grid.seen if kind == "query.secagg_unmask"]  # nothing was revealed


def test_a_site_refuses_to_unmask_senders_that_are_cut_apart():
    """The same check at the site, against a server that would ask anyway."""
    order = [str(i) for i in range(1, 9)]
    state = RecordDict({site_secagg.STATE: ConfigRecord({
        "round": 1, "stage": "train", "order": order, "degree": 2, "pk-nodes": [], "c-pk": [], "inbox-from": [],
        "inbox": [], "holders": ["4"], "own-b": b"x", "own-k": b"y"})})
    with pytest.raises(site_secagg.ProtocolError, match="not connected"):
        site_secagg.unmask(ConfigRecord({"round": 1, "sent": ["1", "2", "4", "5", "7", "8"], "dropped": ["3", "6"]}),
                           state, 4)


def test_a_malformed_masked_update_drops_that_site_only(scripted_training):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=8))

    def short(node, kind, reply):
        if node == nodes[1] and kind == "train.secagg":
            reply.content[S.MASKED] = ArrayRecord({S.MASKED_ARRAY: Array(np.zeros(10, dtype=np.uint32))})

    outcome, _ = secure_round(config(), nodes, tamper=short)
    alive = [n for n in nodes if n != nodes[1]]
    assert outcome.reason == "" and sorted(outcome.senders) == sorted(alive)
    assert "malformed masked update" in outcome.failed[nodes[1]]
    assert np.abs(secure_vector(outcome) - true_sum(scripted_training, alive)).max() \
        <= outcome.stats["max-abs-error-bound"]


def test_a_threshold_the_round_cannot_meet_fails_it_cleanly(scripted_training):
    nodes = NODES[:3]
    scripted_training.update(updates_for(nodes))
    outcome, _ = secure_round(config(**{"strategy.secagg-threshold": 5}), nodes)
    assert outcome.total is None and "secagg-threshold = 5" in outcome.reason


def test_a_failed_secure_round_does_not_end_the_run_three_in_a_row_do(scripted_training, tmp_path):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=9))
    drop = {nodes[1], nodes[2], nodes[4]}
    cfg = config(**{"run.num-rounds": 2})
    recorded: list[dict] = []
    grid = SiteGrid(nodes, dict(cfg.to_flat()), drop=lambda n, kind, rnd: rnd == 1 and n in drop
                    and kind == "train.secagg")
    out = run_rounds(grid, cfg, fedavg(), NoEval(), recorded.append, tmp_path, arrays=GLOBAL)
    assert out.status == "completed", out.reason
    r1, r2 = [r for r in recorded if r["round"] >= 1]
    assert "fewer than the threshold" in r1["secagg"]["reason"] and r2["secagg"]["reason"] == ""
    assert [r["status"] for r in r2["sites"]] == ["ok"] * 5

    cfg = config(**{"run.num-rounds": 4})
    grid = SiteGrid(nodes, dict(cfg.to_flat()), drop=lambda n, kind, rnd: n in drop and kind == "train.secagg")
    out = run_rounds(grid, cfg, fedavg(), NoEval(), [].append, tmp_path / "b", arrays=GLOBAL)
    assert out.status == "failed" and "failed in 3 rounds in a row" in out.reason and out.rounds_done == 2


def test_a_site_with_unusable_keys_or_malformed_replies_is_dropped_alone(scripted_training):
    """Found by the second review: one site's bad reply crashed the ServerApp or failed the round
    for everyone. A key off the curve (stage 1), a malformed share list (stage 2) and an unreadable
    unmask reply (stage 4) now cost only their own site (or its shares)."""
    nodes = NODES[:6]
    scripted_training.update(updates_for(nodes, seed=10))

    def tamper(node, kind, reply):
        rec = reply.content.config_records.get("secagg")
        if node == nodes[0] and kind == "query.secagg_keys":
            rec["c-pk"] = b"\x05" + b"\x01" * 48  # not an encoded point at all
        if node == nodes[1] and kind == "query.secagg_shares":
            rec["dst"] = ["not-a-node"] * len(rec["dst"])
        if node == nodes[2] and kind == "query.secagg_unmask":
            rec["b"] = ["garbage"] * len(rec["b"])

    outcome, _ = secure_round(config(), nodes, tamper=tamper)
    alive = nodes[2:]
    assert outcome.reason == "" and sorted(outcome.senders) == sorted(alive)
    assert "unusable public keys" in outcome.failed[nodes[0]] and "malformed reply" in outcome.failed[nodes[1]]
    assert np.abs(secure_vector(outcome) - true_sum(scripted_training, alive)).max() \
        <= outcome.stats["max-abs-error-bound"]


def test_a_wrong_share_is_outvoted_and_a_secret_no_subset_rebuilds_fails_the_round(scripted_training):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=11))

    def wrong_share(liars):
        def tamper(node, kind, reply):
            if node in liars and kind == "query.secagg_unmask":
                rec = reply.content["secagg"]
                rec["b"] = [x[:4] + bytes(len(x) - 4) for x in rec["b"]]  # right index, wrong value
        return tamper

    outcome, _ = secure_round(config(), nodes, tamper=wrong_share({nodes[0]}))  # 4 good shares of each, t = 3
    assert outcome.reason == ""
    assert np.abs(secure_vector(outcome) - true_sum(scripted_training, nodes)).max() \
        <= outcome.stats["max-abs-error-bound"]
    outcome, _ = secure_round(config(), nodes, tamper=wrong_share(set(nodes[:3])))  # 2 good ones: too few
    assert outcome.total is None and "do not rebuild them" in outcome.reason


def test_a_failed_last_round_fails_the_run(scripted_training, tmp_path):
    nodes = NODES[:5]
    scripted_training.update(updates_for(nodes, seed=12))
    cfg = config(**{"run.num-rounds": 2})
    drop = {nodes[1], nodes[2], nodes[4]}
    grid = SiteGrid(nodes, dict(cfg.to_flat()), drop=lambda n, kind, rnd: rnd == 2 and n in drop
                    and kind == "train.secagg")
    out = run_rounds(grid, cfg, fedavg(), NoEval(), [].append, tmp_path, arrays=GLOBAL)
    assert out.status == "failed" and "round 2, the last" in out.reason and out.rounds_done == 1


def test_thresholds_no_round_could_meet_are_refused_at_config_time():
    with pytest.raises(ConfigError, match="secagg-threshold = 1"):
        config(**{"strategy.secagg-threshold": 1})
    with pytest.raises(ConfigError, match="each secret has 3 holders"):
        config(**{"strategy.secagg-threshold": 4, "strategy.secagg-degree": 2})
    config(**{"strategy.secagg-threshold": 3, "strategy.secagg-degree": 2})
