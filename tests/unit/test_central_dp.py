"""User-level DP at the server: clipping, noise scaled to who took part, accounting."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app import Error
from flwr.serverapp.strategy import FedAdam, FedAvg

from common import privacy
from server.central_dp import UserLevelDP, clip_update
from server.strategy import aggregate_train_metrics
from tests.conftest import FakeGrid

D = 20_000  # parameters: enough to measure the noise's standard deviation


pytestmark = pytest.mark.usefixtures("flower_identity")



def arrays(value, d=D):
    x = np.full(d, value, dtype=np.float32) if np.isscalar(value) else value.astype(np.float32)
    return ArrayRecord({"w": Array(x)})


def reply_to(msg, update, n=10.0, fail=False):
    if fail:
        return Message(Error(code=1, reason="site crashed"), reply_to=msg)
    return Message(content=RecordDict({"arrays": arrays(update), "metrics": MetricRecord({"num-examples": n,
                                                                                          "train-loss": 1.0})}),
                   reply_to=msg)


def strategy(inner=None, sigma=1.0, clip=1.0):
    inner = inner or FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0,
                            train_metrics_aggr_fn=aggregate_train_metrics)
    return UserLevelDP(inner, noise_multiplier=sigma, clipping_norm=clip, delta=1e-5, seed=0)


def test_clip_update_scales_whole_update_to_the_bound():
    u = {"a": np.ones(4) * 3.0, "b": np.ones(5) * 4.0}
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(np.sqrt(9 * 4 + 16 * 5))
    assert np.sqrt(sum((v ** 2).sum() for v in clipped.values())) == pytest.approx(1.0)
    small, _ = clip_update({"a": np.array([0.1])}, 1.0)
    assert small["a"][0] == pytest.approx(0.1)


def test_each_update_clipped_and_mean_taken_over_those_who_replied():
    dp = strategy(sigma=1e-9, clip=1.0)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(3)))
    big = np.full(4, 100.0)  # norm 200 -> clipped to norm 1 (each entry 0.5)
    replies = [reply_to(msgs[0], big), reply_to(msgs[1], np.full(4, 0.1)), reply_to(msgs[2], None, fail=True)]
    new, metrics = dp.aggregate_train(1, replies)
    w = new["w"].numpy()
    assert np.allclose(w, (0.5 + 0.1) / 2, atol=1e-6)  # mean over the 2 sites that replied
    assert metrics["train-loss"] == pytest.approx(1.0)
    assert dp.last_clip_fraction == pytest.approx(0.5)


def test_noise_std_is_sigma_c_over_participants_even_when_a_site_drops():
    sigma, clip = 2.0, 0.5
    dp = strategy(sigma=sigma, clip=clip)
    msgs = list(dp.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid(4)))
    replies = [reply_to(m, np.zeros(D)) for m in msgs[:3]] + [reply_to(msgs[3], None, fail=True)]
    new, _ = dp.aggregate_train(1, replies)
    std = float(new["w"].numpy().std())
    assert std == pytest.approx(sigma * clip / 3, rel=0.03)


def test_user_level_epsilon_composes_rounds_with_client_sampling_rate():
    dp = strategy(sigma=1.5)
    grid = FakeGrid(10)
    current = arrays(0.0, 4)
    for rnd in (1, 2, 3):
        inner_msgs = list(dp.configure_train(rnd, current, ConfigRecord(), grid))
        current, _ = dp.aggregate_train(rnd, [reply_to(m, np.zeros(4)) for m in inner_msgs])
    assert dp.history == [(1.5, 1.0, 3)]  # all 10 of 10 sites sampled: no amplification
    assert dp.epsilon() == pytest.approx(privacy.epsilon([(1.5, 1.0, 3)], 1e-5))
    assert dp.epsilon_after_next(1.0) > dp.epsilon()


def test_works_around_a_server_optimiser_and_keeps_its_state():
    inner = FedAdam(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, eta=0.1,
                    train_metrics_aggr_fn=aggregate_train_metrics)
    dp = strategy(inner=inner, sigma=1e-9)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(2)))
    new, _ = dp.aggregate_train(1, [reply_to(m, np.full(4, 0.2)) for m in msgs])
    assert inner.m_t is not None  # FedAdam post-processed the private release
    assert np.all(new["w"].numpy() > 0)


# --- adaptive clipping (sites clip with Flower's adaptiveclipping_mod) ------------------


def adaptive(sigma=1.0, clip=1.0, count_stddev=1.0, lr=0.2, target=0.5):
    inner = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0,
                   train_metrics_aggr_fn=aggregate_train_metrics)
    return UserLevelDP(inner, noise_multiplier=sigma, clipping_norm=clip, delta=1e-5, seed=0, adaptive=True,
                       target_quantile=target, clip_norm_lr=lr, count_stddev=count_stddev)


def site_reply(msg, update, n=10.0):
    """What a site's ClientApp sends through central_dp_clipping_mod: clipped, with its norm bit."""
    from client.mods import central_dp_clipping_mod

    def app(m, _ctx):
        return reply_to(m, update, n)

    return central_dp_clipping_mod(msg, None, app)


def test_adaptive_sends_the_bound_and_sites_clip_to_it_with_their_norm_bit():
    dp = adaptive(sigma=1e-3, clip=0.5, count_stddev=1e-3)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(2)))
    assert msgs[0].content["config"]["clipping_norm"] == 0.5
    big, small = site_reply(msgs[0], np.full(4, 10.0)), site_reply(msgs[1], np.full(4, 0.1))
    assert np.linalg.norm(big.content["arrays"]["w"].numpy()) == pytest.approx(0.5, rel=1e-5)
    # Flower's bit: 1 = the site had to clip.
    assert (big.content["metrics"]["norm_bit"], small.content["metrics"]["norm_bit"]) == (1, 0)
    dp.aggregate_train(1, [big, small])
    assert dp.last_clip_fraction == pytest.approx(0.5)
    # 1 of 2 fit under C = the target quantile 0.5: the bound stays put (count noise 1e-3).
    assert dp.clipping_norm == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("update,direction", [(0.01, -1), (10.0, +1)])
def test_adaptive_bound_moves_geometrically_towards_the_target_quantile(update, direction):
    dp = adaptive(sigma=1e-3, clip=1.0, count_stddev=1e-3, lr=0.2)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(4)))
    dp.aggregate_train(1, [site_reply(m, np.full(4, update)) for m in msgs])
    fit = 1.0 if direction < 0 else 0.0  # all fit (bound shrinks) or none does (bound grows)
    assert dp.clipping_norm == pytest.approx(np.exp(-0.2 * (fit - 0.5)), rel=1e-3)
    assert dp.last_round["next-clipping-norm"] == dp.clipping_norm
    again = list(dp.configure_train(2, arrays(0.0, 4), ConfigRecord(), FakeGrid(4)))
    assert again[0].content["config"]["clipping_norm"] == pytest.approx(dp.clipping_norm)


def test_adaptive_noise_pays_for_the_count_and_accounting_charges_the_configured_sigma():
    sigma, clip, sb = 1.0, 0.5, 1.0
    dp = adaptive(sigma=sigma, clip=clip, count_stddev=sb)
    msgs = list(dp.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid(4)))
    replies = [site_reply(m, np.full(D, 1e-9)) for m in msgs[:3]] + [reply_to(msgs[3], None, fail=True)]
    new, _ = dp.aggregate_train(1, replies)
    z_update = (sigma ** -2 - (2 * sb) ** -2) ** -0.5  # 1.155: update + count together cost sigma
    assert dp.update_noise_multiplier() == pytest.approx(z_update)
    assert float(new["w"].numpy().std()) == pytest.approx(z_update * clip / 3, rel=0.03)  # 3 took part
    assert dp.history == [(sigma, 1.0, 1)]


def test_adaptive_refuses_count_noise_that_cannot_pay_for_itself():
    with pytest.raises(ValueError, match="clipped-count-stddev"):
        adaptive(sigma=2.0, count_stddev=0.5)
    from common.config import ConfigError, parse_run_config
    with pytest.raises(ConfigError, match="clipped-count-stddev"):
        parse_run_config({"central-dp.clipping": "adaptive", "central-dp.noise-multiplier": 2.0,
                          "central-dp.clipped-count-stddev": 0.5})
    dp = adaptive(sigma=2.0, count_stddev=0.0)  # automatic: max(sites / 20, sigma)
    dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(10))
    assert dp.count_stddev == 2.0


def test_mod_leaves_fixed_clipping_runs_and_budget_refusals_alone():
    from client.mods import central_dp_clipping_mod

    dp = strategy(sigma=1.0)  # fixed clipping: no bound in the config, the mod does nothing
    msg = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(1)))[0]
    out = central_dp_clipping_mod(msg, None, lambda m, _c: reply_to(m, np.full(4, 10.0)))
    assert np.allclose(out.content["arrays"]["w"].numpy(), 10.0) and "norm_bit" not in out.content["metrics"]
    dp = adaptive()
    msg = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(1)))[0]
    refusal = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 0.0}),
                                          "status": ConfigRecord({"status": "budget-exhausted"})}), reply_to=msg)
    out = central_dp_clipping_mod(msg, None, lambda m, _c: refusal)
    assert not out.has_error() and out.content["status"]["status"] == "budget-exhausted"
