"""User-level audit with canary clients (server/canaries.py), on synthetic site updates.

The real sites are stand-ins that send random updates; what is audited is the server's
side of user-level DP (clipping, noise scale, accounting), which is what the canaries see.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.audit import gaussian_dp_epsilon
from server.canaries import CanaryClients
from server.central_dp import UserLevelDP
from server.strategy import aggregate_train_metrics
from tests.conftest import FakeGrid

D = 20_000


pytestmark = pytest.mark.usefixtures("flower_identity")



def run(strategy, sites=5, rounds=5, canaries=40, seed=0, site_norm=1.0, trace=None):
    """``rounds`` rounds of ``sites`` random site updates plus the canaries; the audit result."""
    rng = np.random.default_rng(1000 + seed)
    initial = ArrayRecord({"w": Array(np.zeros(D, dtype=np.float32)), "steps": Array(np.zeros(1, dtype=np.int64))})
    c = CanaryClients(initial, canaries, norm=1.0, seed=seed)
    arrays = initial
    for rnd in range(1, rounds + 1):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(sites)))
        good = []
        for m in msgs:
            u = rng.standard_normal(D)
            update = (arrays["w"].numpy() + site_norm * u / np.linalg.norm(u)).astype(np.float32)
            content = RecordDict({"arrays": ArrayRecord({"w": Array(update), "steps": arrays["steps"]}),
                                  "metrics": MetricRecord({"weight": 100.0, "train-loss": 1.0})})
            good.append(Message(content=content, reply_to=m))
        extra = c.replies(arrays, 1.0, good)
        if isinstance(strategy, UserLevelDP):
            strategy.uncounted = {id(m) for m in extra}  # as server/rounds.py does
        arrays, _ = strategy.aggregate_train(rnd, good + extra)
        if trace is not None:
            trace.append(dict(strategy.last_round))
    claimed = strategy.epsilon() if isinstance(strategy, UserLevelDP) else math.inf
    return c, c.estimate(initial, arrays, 1e-5, claimed)


def fedavg():
    return FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, weighted_by_key="weight",
                  train_metrics_aggr_fn=aggregate_train_metrics)


def test_without_user_level_dp_the_canaries_stand_out():
    c, r = run(fedavg())
    assert r.claimed_epsilon == math.inf and not r.violation
    assert r.participations == 5 * r.inserted  # q = 1: every inserted canary, every round
    # Each inserted canary's cosine is many null standard deviations (1/sqrt(d)) away from 0.
    assert r.mean_cos_inserted > 20 / math.sqrt(D)
    assert abs(r.mean_cos_not_inserted) < 4 / math.sqrt(D / r.m)
    assert r.empirical_epsilon > 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_user_level_dp_the_estimate_is_close_below_the_claim(seed):
    sigma, rounds = 1.0, 5
    dp = UserLevelDP(fedavg(), noise_multiplier=sigma, clipping_norm=1.0, delta=1e-5, seed=seed)
    # 1,000 canaries: with ~500 inserted the fitted variance of the unequal-variance estimate is
    # within a few percent, so neither estimate exceeds a correct claim by chance.
    _, r = run(dp, rounds=rounds, seed=seed, canaries=1000)
    assert r.claimed_epsilon == pytest.approx(dp.epsilon()) and math.isfinite(r.claimed_epsilon)
    assert r.empirical_epsilon <= r.claimed_epsilon and r.epsilon_unequal_variances <= r.claimed_epsilon
    assert not r.violation
    # The noise dominates the model change, so the estimate is near the composed Gaussian
    # mechanism's exact epsilon (mu = sqrt(T) / sigma), which the RDP claim must exceed.
    exact = gaussian_dp_epsilon(math.sqrt(rounds) / sigma, 1e-5)
    assert exact < r.claimed_epsilon
    assert 0.5 * exact < r.empirical_epsilon < 1.5 * exact


def test_a_broken_noise_scale_is_caught():
    """Noise 10x too small for the claimed sigma: the audit exceeds the claim (a violation)."""
    class Broken(UserLevelDP):
        def update_noise_multiplier(self):
            return self.noise_multiplier / 10

    _, r = run(Broken(fedavg(), noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, seed=0))
    assert r.violation and r.empirical_epsilon > r.claimed_epsilon


def test_canaries_are_secret_reproducible_and_need_both_kinds():
    initial = ArrayRecord({"w": Array(np.zeros(100, dtype=np.float32))})
    a, b = CanaryClients(initial, 10, 1.0, seed=5), CanaryClients(initial, 10, 1.0, seed=5)
    assert np.array_equal(a.inserted, b.inserted) and np.allclose(a.direction(3), b.direction(3))
    assert 2 <= a.inserted.sum() <= 8
    assert abs(float(a.direction(0) @ a.direction(1))) < 0.5 and np.linalg.norm(a.direction(0)) == pytest.approx(1)
    with pytest.raises(ValueError, match="at least 4"):
        CanaryClients(initial, 3, 1.0, seed=0)


def test_canaries_do_not_steer_the_adaptive_bound():
    """Sites' updates of norm 5 (all clipped at C = 1) vs 40 canaries at norm 1 (all fit):
    counted with the sites, the canaries would pull C down; left out, C grows every round."""
    dp = UserLevelDP(fedavg(), noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, seed=0, adaptive=True,
                     count_stddev=1.0)
    trace = []
    run(dp, rounds=3, site_norm=5.0, trace=trace)
    # Of the 5 real sites none fits: the released fraction is 0 plus the count's noise (sd 1 / 5).
    assert all(abs(t["noisy-fit-fraction"]) < 4 * 1.0 / 5 for t in trace), trace
    bounds = [t["clipping-norm"] for t in trace] + [dp.clipping_norm]
    assert all(later > earlier for earlier, later in zip(bounds, bounds[1:])), bounds


def test_a_violation_is_flagged_on_the_larger_of_the_two_estimates():
    from dataclasses import replace

    _, r = run(UserLevelDP(fedavg(), noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, seed=0), rounds=2)
    equal_only = replace(r, empirical_epsilon=r.claimed_epsilon * 0.5, epsilon_unequal_variances=r.claimed_epsilon * 2)
    assert equal_only.violation and equal_only.estimate == r.claimed_epsilon * 2
    assert equal_only.as_dict()["violation"] is True and equal_only.as_dict()["estimate"] == equal_only.estimate
    fine = replace(r, empirical_epsilon=r.claimed_epsilon * 0.5, epsilon_unequal_variances=r.claimed_epsilon * 0.9)
    assert not fine.violation
