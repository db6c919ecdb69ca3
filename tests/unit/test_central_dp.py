"""User-level DP at the server: clipping, a fixed denominator, noise independent of who replied, accounting."""

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
    return Message(content=RecordDict({"arrays": arrays(update), "metrics": MetricRecord({"weight": n,
                                                                                          "epsilon": 1.0})}),
                   reply_to=msg)


def strategy(inner=None, sigma=1.0, clip=1.0):
    inner = inner or FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                            train_metrics_aggr_fn=aggregate_train_metrics)
    return UserLevelDP(inner, noise_multiplier=sigma, clipping_norm=clip, delta=1e-5, seed=0)


def test_clip_update_scales_whole_update_to_the_bound():
    u = {"a": np.ones(4) * 3.0, "b": np.ones(5) * 4.0}
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(np.sqrt(9 * 4 + 16 * 5))
    assert np.sqrt(sum((v ** 2).sum() for v in clipped.values())) == pytest.approx(1.0)
    small, _ = clip_update({"a": np.array([0.1])}, 1.0)
    assert small["a"][0] == pytest.approx(0.1)


def test_each_update_clipped_and_the_sum_divided_by_the_sites_the_round_was_sent_to():
    dp = strategy(sigma=1e-9, clip=1.0)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(3)))
    big = np.full(4, 100.0)  # norm 200 -> clipped to norm 1 (each entry 0.5)
    replies = [reply_to(msgs[0], big), reply_to(msgs[1], np.full(4, 0.1)), reply_to(msgs[2], None, fail=True)]
    new, metrics = dp.aggregate_train(1, replies)
    w = new["w"].numpy()
    assert np.allclose(w, (0.5 + 0.1) / 3, atol=1e-6)  # m = 3 planned; the crashed site adds zero
    assert metrics["epsilon"] == pytest.approx(1.0)
    assert dp.last_round["denominator"] == 3
    assert "sites" not in dp.last_round and "clip-fraction" not in dp.last_round  # realised counts: not released


def _release(outcome: str, seed: int, d: int = D) -> np.ndarray:
    """One round of 4 sampled sites; site 4 touches only coordinates [0, 10), the others [10, 20)."""
    dp = UserLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                            train_metrics_aggr_fn=aggregate_train_metrics),
                     noise_multiplier=2.0, clipping_norm=0.5, delta=1e-5, seed=seed)
    msgs = list(dp.configure_train(1, arrays(0.0, d), ConfigRecord(), FakeGrid(4)))
    others = np.zeros(d)
    others[10:20] = 0.01
    mine = np.zeros(d)
    mine[:10] = 1.0  # norm 3.2: clipped to 0.5
    replies = [reply_to(m, others) for m in msgs[:3]]
    if outcome == "replied":
        replies.append(reply_to(msgs[3], mine))
    elif outcome == "dropped":
        replies.append(reply_to(msgs[3], None, fail=True))
    # "rejected": the round loop never hands an invalid update to the strategy
    new, _ = dp.aggregate_train(1, replies)
    return new["w"].numpy().astype(np.float64)


def test_neighbouring_federations_get_the_same_noise_whether_a_site_replied_dropped_or_was_rejected():
    # Add/remove one site: on every coordinate that site did not touch, the release's
    # distribution must not depend on whether it took part (the old divide-by-replies
    # mechanism had noise std sigma C / 4 with it and sigma C / 3 without).
    sigma, clip, m = 2.0, 0.5, 4
    untouched = slice(20, None)
    stats = {}
    for outcome in ("replied", "dropped", "rejected"):
        w = _release(outcome, seed=7)
        stats[outcome] = (w[untouched].mean(), w[untouched].std())
        assert w[untouched].std() == pytest.approx(sigma * clip / m, rel=0.03)
        assert abs(w[untouched].mean()) < 4 * sigma * clip / m / np.sqrt(D)
    # Same seed, same noise draw: identical on untouched coordinates, whatever the site did.
    assert stats["replied"] == stats["dropped"] == stats["rejected"]
    # The site's own coordinates move by its clipped update over the fixed m, nothing more.
    diff = _release("replied", seed=7)[:10] - _release("dropped", seed=7)[:10]
    assert np.allclose(diff, (0.5 / np.sqrt(10)) / m, atol=1e-6)
    assert np.linalg.norm(diff) == pytest.approx(clip / m, rel=1e-5)  # sensitivity C of the sum, over m


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


def test_a_round_with_no_valid_reply_is_still_released_and_charged():
    # Skipping it would tell "no site replied" apart from "one did"; it is noise over m.
    dp = strategy(sigma=1.0, clip=0.5)
    msgs = list(dp.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid(2)))
    new, metrics = dp.aggregate_train(1, [reply_to(m, None, fail=True) for m in msgs])
    assert metrics is None and float(new["w"].numpy().std()) == pytest.approx(0.5 / 2, rel=0.03)
    assert dp.history == [(1.0, 1.0, 1)]


def test_state_dict_round_trips_the_accountant_rng_and_bound():
    dp = adaptive(sigma=1.0, clip=0.5, count_stddev=1.0)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(2)))
    dp.aggregate_train(1, [site_reply(m, np.full(4, 3.0)) for m in msgs])
    again = adaptive(sigma=1.0, clip=9.0, count_stddev=1.0)
    again.load_state_dict(dp.state_dict())
    assert again.history == dp.history and again.clipping_norm == dp.clipping_norm
    assert again.rng.normal() == dp.rng.normal()


def test_works_around_a_server_optimiser_and_keeps_its_state():
    inner = FedAdam(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, eta=0.1, weighted_by_key="weight",
                    train_metrics_aggr_fn=aggregate_train_metrics)
    dp = strategy(inner=inner, sigma=1e-9)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(2)))
    new, _ = dp.aggregate_train(1, [reply_to(m, np.full(4, 0.2)) for m in msgs])
    assert inner.m_t is not None  # FedAdam post-processed the private release
    assert np.all(new["w"].numpy() > 0)


# --- adaptive clipping (sites clip with Flower's adaptiveclipping_mod) ------------------


def adaptive(sigma=1.0, clip=1.0, count_stddev=1.0, lr=0.2, target=0.5):
    inner = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
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
    assert dp.last_round["noisy-fit-fraction"] == pytest.approx(0.5, abs=1e-2)
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
    assert float(new["w"].numpy().std()) == pytest.approx(z_update * clip / 4, rel=0.03)  # m = 4 planned
    assert dp.history == [(sigma, 1.0, 1)]
    # The joint release is the Gaussian mechanism with the configured multiplier: the update sum
    # (sensitivity C, noise z_u C) and the centred count (sensitivity 1/2, noise sb) compose to sigma.
    assert (z_update ** -2 + (sb / 0.5) ** -2) ** -0.5 == pytest.approx(sigma)


def _count_release(bits: list[int | None], m: int, sb: float = 1e-6) -> float:
    """The released fraction that fit, for sites whose bits are given (None: dropped), m planned."""
    dp = adaptive(sigma=1e-7, clip=1.0, count_stddev=sb)
    msgs = list(dp.configure_train(1, arrays(0.0, 4), ConfigRecord(), FakeGrid(m)))
    replies = []
    for msg, bit in zip(msgs, bits):
        if bit is None:
            replies.append(reply_to(msg, None, fail=True))
        else:  # bit 1 = fits (norm 0.1 < C), bit 0 = had to be clipped (norm 20 > C)
            replies.append(site_reply(msg, np.full(4, 0.05 if bit else 10.0)))
    dp.aggregate_train(1, replies)
    return dp.last_round["noisy-fit-fraction"]


def test_the_adaptive_count_is_centred_over_the_fixed_denominator_with_sensitivity_one_half():
    m = 4
    base = _count_release([1, 0, 1, None], m)  # a neighbour without the 4th site
    assert base == pytest.approx((0.5 - 0.5 + 0.5) / m + 0.5, abs=1e-4)
    # Adding the 4th site, whatever its bit, moves the released count sum(b_i - 1/2) by exactly 1/2.
    for bit in (0, 1):
        moved = (_count_release([1, 0, 1, bit], m) - base) * m
        assert abs(moved) == pytest.approx(0.5, abs=1e-4)


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
    refusal = Message(content=RecordDict({"metrics": MetricRecord({"weight": 0.0}),
                                          "status": ConfigRecord({"status": "budget-exhausted"})}), reply_to=msg)
    out = central_dp_clipping_mod(msg, None, lambda m, _c: refusal)
    assert not out.has_error() and out.content["status"]["status"] == "budget-exhausted"
