"""Contract: every aggregation strategy is declared once, in server/strategy.py, with the
server state a resumed run must get back; a strategy that keeps array state it does not
declare fails here, naming the attribute."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import records as R
from common.config import StrategySection
from server.central_dp import single_reply
from server.checkpoints import restore_strategy_state, strategy_state
from server.strategy import STRATEGIES, build_strategy, spec_of, state_attributes
from tests.conftest import FakeGrid, quick_config

NAMES = typing.get_args(StrategySection.model_fields["name"].annotation)
pytestmark = pytest.mark.usefixtures("flower_identity")


def test_every_configurable_strategy_has_exactly_one_spec():
    assert set(NAMES) == set(STRATEGIES), (
        f"strategy.name in common/config.py and STRATEGIES in server/strategy.py disagree: "
        f"config only {sorted(set(NAMES) - set(STRATEGIES))}, spec only {sorted(set(STRATEGIES) - set(NAMES))}")


def _one_round(strategy, rnd: int, arrays: ArrayRecord, n: int = 7) -> ArrayRecord:
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(n)))
    rng = np.random.default_rng(rnd)
    replies = []
    for m in msgs:
        w = arrays["w"].numpy() + rng.normal(0, 0.1, 6).astype(np.float32)
        replies.append(Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                                                   "metrics": MetricRecord({R.WEIGHT: 1.0})}), reply_to=m))
    new, _ = strategy.aggregate_train(rnd, replies)
    return new


def _array_state(strategy) -> set[str]:
    """Attributes that hold numpy arrays (alone, or in a dict or list): server state a resume needs."""
    def holds_arrays(v) -> bool:
        if isinstance(v, np.ndarray):
            return True
        if isinstance(v, dict):
            return any(holds_arrays(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(holds_arrays(x) for x in v)
        return False
    return {k for k, v in vars(strategy).items() if holds_arrays(v)}


@pytest.mark.parametrize("name", NAMES)
def test_a_strategy_declares_all_the_server_state_it_keeps_and_a_checkpoint_restores_it(name):
    cfg = quick_config(**{"strategy.name": name, "strategy.min-train-nodes": 1, "strategy.min-available-nodes": 1})
    strategy = build_strategy(cfg)
    arrays = ArrayRecord({"w": Array(np.zeros(6, dtype=np.float32))})
    for rnd in (1, 2):
        arrays = _one_round(strategy, rnd, arrays)
    spec = spec_of(strategy)
    undeclared = _array_state(strategy) - set(spec.state) - set(spec.per_round)
    assert not undeclared, (f"strategy {name!r} keeps server state {sorted(undeclared)} after a round that "
                            f"STRATEGIES[{name!r}] in server/strategy.py declares neither as state (checkpointed) "
                            "nor as per_round (set again each round): a resumed run would lose it")
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, strategy_state(strategy))
    for attr in state_attributes(strategy):
        assert _array_state(fresh) >= {attr}, f"{name}: {attr} was not restored from the checkpoint state"
    # The restored strategy continues exactly like the original.
    a, b = _one_round(strategy, 3, arrays), _one_round(fresh, 3, arrays)
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())


def test_an_undeclared_strategy_class_is_refused_with_the_place_to_declare_it():
    from flwr.serverapp.strategy import FedAvg

    class Homemade(FedAvg):
        pass

    with pytest.raises(ValueError, match="server/strategy.py's STRATEGIES"):
        state_attributes(Homemade())


def test_the_strategies_secure_aggregation_refuses_are_exactly_those_that_need_each_update():
    from common.config import ROBUST_STRATEGIES

    assert {n for n, sp in STRATEGIES.items() if not sp.sum_only} == set(ROBUST_STRATEGIES)


@pytest.mark.parametrize("name", [n for n in NAMES if STRATEGIES[n].sum_only])
def test_a_sum_only_strategy_steps_the_same_on_the_mean_as_on_the_replies(name):
    """Secure aggregation hands a strategy the uniform mean of the updates as one reply
    (server/rounds.py, _aggregate_sum): for every strategy declared ``sum_only``, two rounds of
    that give the model that aggregating the equally weighted replies themselves gives
    (server momentum and moments included)."""
    cfg = quick_config(**{"strategy.name": name, "strategy.min-train-nodes": 2, "strategy.min-available-nodes": 2})
    plain, secure = build_strategy(cfg), build_strategy(cfg)
    a_plain = a_secure = ArrayRecord({"w": Array(np.linspace(-1, 1, 6).astype(np.float32))})
    for rnd in (1, 2):
        msgs = list(plain.configure_train(rnd, a_plain, ConfigRecord(), FakeGrid(4)))
        list(secure.configure_train(rnd, a_secure, ConfigRecord(), FakeGrid(4)))
        rng = np.random.default_rng(rnd)
        deltas = [rng.normal(0, 0.1, 6).astype(np.float32) for _ in msgs]
        replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(a_plain["w"].numpy() + d)}),
                                               "metrics": MetricRecord({R.WEIGHT: 1.0})}), reply_to=m)
                   for m, d in zip(msgs, deltas)]
        a_plain, _ = plain.aggregate_train(rnd, replies)
        mean = a_secure["w"].numpy() + np.mean(deltas, axis=0)
        a_secure, _ = secure.aggregate_train(rnd, [single_reply(ArrayRecord({"w": Array(mean.astype(np.float32))}))])
        np.testing.assert_allclose(a_secure["w"].numpy(), a_plain["w"].numpy(), rtol=1e-5, atol=1e-6)
