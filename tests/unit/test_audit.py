"""Empirical privacy audits: the one-run lower bound, the one-shot estimate, a real site audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import tomllib

from client.audit import AuditResult, canary_records, make_canaries, membership_and_streams, run_sample_audit
from common import audit as A
from common import privacy
from common.config import parse_node_config
from common.data.site import site_dataset
from simulations.launch import ROOT
from tests.conftest import quick_config

# ----------------------------------------------------------------------------------------
# One-run lower bound (Steinke, Nasr, Jagielski 2023): values computed by hand
# ----------------------------------------------------------------------------------------


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_all_correct_without_delta_solves_p_to_the_r_equals_beta():
    # delta = 0, r = v = 20, beta = 0.05: P[Binom(20, p) >= 20] = p^20 = 0.05
    # -> p = 0.05^(1/20) = exp(-2.9957323 / 20) = 0.8608917, eps = ln(p / (1 - p)) = 1.822716.
    assert A.one_run_epsilon_lower_bound(20, 20, 0.0, 0.95) == pytest.approx(1.822716, abs=1e-5)
    assert A.one_run_epsilon_lower_bound(20, 20, 0.0, 0.95) == pytest.approx(logit(0.05 ** (1 / 20)), abs=1e-6)
    # r = v = 100: p = 0.05^(1/100) = 0.9704869, eps = 3.492965.
    assert A.one_run_epsilon_lower_bound(100, 100, 0.0) == pytest.approx(3.492965, abs=1e-5)


def test_small_cases_by_hand():
    # r = v = 1, beta = 0.8: P[Binom(1, p) >= 1] = p = 0.8 -> eps = ln 4.
    assert A.one_run_epsilon_lower_bound(1, 1, 0.0, confidence=0.2) == pytest.approx(math.log(4), abs=1e-6)
    # r = v = 2, beta = 0.64: p^2 = 0.64 -> p = 0.8 -> eps = ln 4.
    assert A.one_run_epsilon_lower_bound(2, 2, 0.0, confidence=0.36) == pytest.approx(math.log(4), abs=1e-6)
    # With delta: r = v = 1, m = 10, delta = 0.01. The only i is 1: (f(0) - f(1)) / 1 = 1 - p, so the
    # p-value is p + 2 m delta (1 - p) = p + 0.2 (1 - p) = 0.8 -> p = 0.75 -> eps = ln 3.
    assert A.one_run_epsilon_lower_bound(1, 1, 0.01, confidence=0.2, num_canaries=10) == pytest.approx(
        math.log(3), abs=1e-6)
    # One correct guess out of one never rejects eps = 0 at 95%: P[Binom(1, 1/2) >= 1] = 0.5 > 0.05.
    assert A.one_run_epsilon_lower_bound(1, 1, 0.0) == 0.0


def test_p_value_by_hand():
    # r = 3, v = 2, eps = 0 (p = 1/2): f(2) = P[B >= 2] = 4/8.
    assert A.one_run_p_value(3, 2, 3, 0.0, 0.0) == pytest.approx(0.5)
    # delta term: i = 1: P[B = 1] / 1 = 3/8; i = 2: P[B <= 1] / 2 = (4/8) / 2 = 1/4 -> max 3/8.
    # p-value = 1/2 + 2 * 3 * 0.01 * 3/8 = 0.5225.
    assert A.one_run_p_value(3, 2, 3, 0.0, 0.01) == pytest.approx(0.5225)
    assert A.one_run_p_value(3, 0, 3, 5.0, 0.0) == 1.0


def test_half_correct_gives_zero_and_a_bit_more_gives_a_little():
    assert A.one_run_epsilon_lower_bound(100, 50, 1e-5) == 0.0
    assert A.one_run_epsilon_lower_bound(1000, 500, 0.0) == 0.0
    # 550 / 1000 correct: about p = 0.55 - 1.645 * 0.0157 = 0.524 -> eps ~ logit(0.524) = 0.097.
    assert 0.05 < A.one_run_epsilon_lower_bound(1000, 550, 0.0) < 0.15


def test_invalid_counts_are_rejected():
    with pytest.raises(ValueError):
        A.one_run_epsilon_lower_bound(10, 11, 0.0)
    with pytest.raises(ValueError):
        A.one_run_epsilon_lower_bound(10, 5, 0.0, num_canaries=9)
    with pytest.raises(ValueError):
        A.one_run_epsilon_lower_bound(10, 5, 0.0, confidence=1.0)


counts = st.integers(1, 60).flatmap(
    lambda r: st.tuples(st.just(r), st.integers(0, r), st.integers(r, 2 * r)))
deltas = st.sampled_from([0.0, 1e-6, 1e-5, 1e-4, 1e-3])
confidences = st.floats(0.5, 0.99)
TOL = 1e-6  # bisection precision


@settings(max_examples=60, deadline=None)
@given(counts, deltas, confidences)
def test_bound_is_rejected_at_its_confidence_and_nonnegative(c, delta, conf):
    r, v, m = c
    eps = A.one_run_epsilon_lower_bound(r, v, delta, conf, num_canaries=m)
    assert eps >= 0
    if eps > 0:
        assert A.one_run_p_value(r, v, m, eps, delta) <= 1 - conf


@settings(max_examples=60, deadline=None)
@given(counts, deltas, confidences)
def test_bound_grows_with_correct_guesses(c, delta, conf):
    r, v, m = c
    if v < r:
        lo = A.one_run_epsilon_lower_bound(r, v, delta, conf, num_canaries=m)
        hi = A.one_run_epsilon_lower_bound(r, v + 1, delta, conf, num_canaries=m)
        assert hi >= lo - TOL


@settings(max_examples=60, deadline=None)
@given(counts, deltas, confidences, confidences)
def test_bound_shrinks_with_confidence_delta_wrong_guesses_and_canaries(c, delta, c1, c2):
    r, v, m = c
    lo_conf, hi_conf = sorted((c1, c2))
    bound = A.one_run_epsilon_lower_bound(r, v, delta, lo_conf, num_canaries=m)
    assert A.one_run_epsilon_lower_bound(r, v, delta, hi_conf, num_canaries=m) <= bound + TOL
    assert A.one_run_epsilon_lower_bound(r, v, 2 * delta + 1e-6, lo_conf, num_canaries=m) <= bound + TOL
    assert A.one_run_epsilon_lower_bound(r, v, 0.0, lo_conf, num_canaries=m) >= bound - TOL
    assert A.one_run_epsilon_lower_bound(r + 1, v, delta, lo_conf, num_canaries=m + 1) <= bound + TOL
    assert A.one_run_epsilon_lower_bound(r, v, delta, lo_conf, num_canaries=m + 10) <= bound + TOL


def test_guessing_and_counting():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2])
    guesses = A.guess_membership(scores, k_plus=2, k_minus=1)
    assert guesses.tolist() == [1, -1, 0, 1, 0]
    included = np.array([True, False, True, False, False])
    assert A.count_correct(guesses, included) == (3, 2)  # 0.9 in (right), 0.8 in (wrong), 0.1 out (right)
    assert A.default_guess_counts(128) == [(6, 6), (13, 13), (32, 32), (64, 64)]


def test_audit_from_scores_corrects_for_trying_several_guess_counts():
    included = np.arange(40) % 2 == 0
    scores = np.where(included, 1.0, 0.0) + np.arange(40) * 1e-3  # perfect separation
    best = A.one_run_audit(scores, included, delta=0.0, confidence=0.95, guess_counts=[(20, 20)])
    assert best["correct"] == best["guesses"] == 40
    assert best["epsilon"] == pytest.approx(logit(0.05 ** (1 / 40)), abs=1e-6)
    # Two candidates: each at beta / 2 = 0.025 (Bonferroni); the best one is the full guess.
    two = A.one_run_audit(scores, included, delta=0.0, confidence=0.95, guess_counts=[(5, 5), (20, 20)])
    assert two["epsilon"] == pytest.approx(logit(0.025 ** (1 / 40)), abs=1e-6)


# ----------------------------------------------------------------------------------------
# One-shot estimate (Andrew et al. 2024)
# ----------------------------------------------------------------------------------------


def exact_sample(mean: float, std: float, n: int, seed: int) -> np.ndarray:
    """n values whose sample mean and (ddof=1) std are exactly `mean` and `std`."""
    z = np.random.default_rng(seed).standard_normal(n)
    return mean + std * (z - z.mean()) / z.std(ddof=1)


def test_gaussian_dp_delta_by_hand():
    # mu = 1, eps = 1: Phi(-1/1 + 1/2) - e Phi(-1 - 1/2) = Phi(-0.5) - e Phi(-1.5)
    #                = 0.3085375 - 2.7182818 * 0.0668072 = 0.3085375 - 0.1816012 = 0.1269364.
    assert A.gaussian_dp_delta(1.0, 1.0) == pytest.approx(0.1269367, abs=1e-6)
    # mu = 2, eps = 3: Phi(-0.5) - e^3 Phi(-2.5) = 0.3085375 - 20.085537 * 0.0062097 = 0.1838131.
    assert A.gaussian_dp_delta(3.0, 2.0) == pytest.approx(0.1838131, abs=1e-6)


def test_equal_variances_match_the_gaussian_mechanism():
    # |mu_in - mu_out| / s = 0.05 / 0.05 = 1 -> eps at delta = 0.1269367 is 1 (hand value above).
    cin, cout = exact_sample(0.05, 0.05, 200, 1), exact_sample(0.0, 0.05, 300, 2)
    assert A.one_shot_epsilon_estimate(cin, cout, 0.12693674) == pytest.approx(1.0, abs=1e-5)
    # mu = 2 -> eps = 3 at delta = 0.1838131.
    cin = exact_sample(0.1, 0.05, 200, 3)
    assert A.one_shot_epsilon_estimate(cin, cout, 0.18381308) == pytest.approx(3.0, abs=1e-5)
    # And the closed form inverts exactly at a small delta.
    eps = A.gaussian_dp_epsilon(1.0, 1e-5)
    assert A.gaussian_dp_delta(eps, 1.0) == pytest.approx(1e-5, rel=1e-4)


def test_identical_samples_give_zero_and_separated_ones_a_large_estimate():
    c = exact_sample(0.0, 0.03, 100, 4)
    assert A.one_shot_epsilon_estimate(c, c, 1e-5) == 0.0
    # Two fits of the same distribution: small, smaller with a pooled variance (no tail mismatch).
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 0.03, 2000), rng.normal(0, 0.03, 2000)
    assert A.one_shot_epsilon_estimate(a, b, 1e-5) < 1.0
    assert A.one_shot_epsilon_estimate(a, b, 1e-5, equal_variances=True) < 0.3
    # mu = 0.5 / 0.03 ~ 17: far apart.
    assert A.one_shot_epsilon_estimate(exact_sample(0.5, 0.03, 100, 6), c, 1e-5) > 20


def test_unequal_variances_match_a_numerical_hockey_stick_and_are_symmetric():
    m_in, s_in, m_out, s_out, delta = 0.3, 0.5, 0.0, 1.0, 1e-3
    eps = A.epsilon_two_gaussians(m_in, s_in, m_out, s_out, delta)
    y = np.linspace(-40, 40, 800_001)

    def divergence(m1, s1, m2, s2, e):
        return np.trapezoid(np.maximum(0, stats.norm.pdf(y, m1, s1) - math.exp(e) * stats.norm.pdf(y, m2, s2)), y)

    both = max(divergence(m_in, s_in, m_out, s_out, eps), divergence(m_out, s_out, m_in, s_in, eps))
    assert both == pytest.approx(delta, rel=1e-3)
    assert A.epsilon_two_gaussians(m_out, s_out, m_in, s_in, delta) == pytest.approx(eps, abs=1e-6)
    cin, cout = exact_sample(m_in, s_in, 50, 7), exact_sample(m_out, s_out, 50, 8)
    assert A.one_shot_epsilon_estimate(cin, cout, delta) == pytest.approx(eps, abs=1e-5)
    assert A.one_shot_epsilon_estimate(cout, cin, delta) == pytest.approx(eps, abs=1e-5)


def test_pooled_variances_are_the_gaussian_mechanism():
    # s_in = 0.04 (n = 101), s_out = 0.03 (n = 101): pooled s = sqrt((0.04^2 + 0.03^2) / 2) = 0.0353553;
    # mu = 0.0707107 / 0.0353553 = 2.
    cin, cout = exact_sample(0.0707107, 0.04, 101, 10), exact_sample(0.0, 0.03, 101, 11)
    assert A.one_shot_epsilon_estimate(cin, cout, 1e-5, equal_variances=True) == pytest.approx(
        A.gaussian_dp_epsilon(2.0, 1e-5), abs=1e-4)


def test_theoretical_null_in_d_dimensions():
    # Inserted cosines N(mu, 1/d) vs the null N(0, 1/d): the Gaussian mechanism with mu * sqrt(d).
    d = 10_000
    cin = exact_sample(0.02, 0.01, 100, 9)
    assert A.one_shot_epsilon_estimate(cin, np.array([]), 1e-5, null_dim=d) == pytest.approx(
        A.gaussian_dp_epsilon(2.0, 1e-5), abs=1e-5)


# ----------------------------------------------------------------------------------------
# A real audit at one site (VAE on digits)
# ----------------------------------------------------------------------------------------

# One torch thread per test: the session fixture in tests/conftest.py.


SITE = parse_node_config({"partition-id": 0, "num-partitions": 10, "unsafe-memory-ledger": True,
                         "privacy-budget": 1e6})  # in memory; the audit alone is priced here  # ~144 records: short epochs


def audit_cfg(**o):
    return quick_config(**{"vae.width": 16, **o})


def test_canaries_are_distinct_coarse_binary_images():
    _, spec = site_dataset(audit_cfg(), SITE)
    c = make_canaries(spec, 300, torch.Generator().manual_seed(0))
    assert c.shape == (300, 1, 8, 8)
    assert set(c.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(x.flatten().tolist()) for x in c}) == 300
    assert torch.equal(c[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3), c)  # 2x2 cells


def test_audit_never_touches_the_sites_dataset():
    cfg = audit_cfg(**{"privacy.enabled": False})
    data, spec = site_dataset(cfg, SITE)
    images, labels, n = data.tensors[0].clone(), data.tensors[1].clone(), len(data)
    result = run_sample_audit(cfg, SITE, num_canaries=32, epochs=1, seed=3, site_data=(data, spec))
    assert len(data) == n and torch.equal(data.tensors[0], images) and torch.equal(data.tensors[1], labels)
    fresh, _ = site_dataset(cfg, SITE)
    assert len(fresh) == n and torch.equal(fresh.tensors[0], images)
    included, canary_gen, _ = membership_and_streams(3, 32)
    canaries = make_canaries(spec, 32, canary_gen)
    assert result.included == int(included.sum()) > 0
    flat = images.flatten(1)
    assert not any(bool((flat == c.flatten()).all(dim=1).any()) for c in canaries)


@pytest.mark.slow  # 700 steps: ~9 s, more on a busy machine
def test_without_dp_the_audit_catches_memorisation():
    cfg = audit_cfg(**{"privacy.enabled": False})
    r = run_sample_audit(cfg, SITE, num_canaries=128, epochs=60, seed=0)
    assert isinstance(r, AuditResult)
    assert r.claimed_epsilon == math.inf and not r.dp_enabled and r.noise_multiplier == 0.0
    assert r.correct >= 0.9 * r.guesses and r.guesses >= 26
    assert r.empirical_epsilon > 1.5


@pytest.mark.parametrize("seed", [0, 1, 2])  # ~4 s each
def test_with_dp_the_bound_stays_below_the_claimed_epsilon(seed):
    cfg = audit_cfg(**{"privacy.noise-multiplier": 1.0})
    r = run_sample_audit(cfg, SITE, num_canaries=64, epochs=10, seed=seed)
    assert r.dp_enabled and r.noise_multiplier == 1.0
    n = len(site_dataset(cfg, SITE)[0]) + r.included
    q = 1 / math.ceil(n / cfg.train.batch_size)
    assert r.steps == 10 * math.ceil(n / cfg.train.batch_size)
    assert r.claimed_epsilon == pytest.approx(privacy.epsilon([(1.0, q, r.steps)], r.delta))
    assert 0.0 <= r.empirical_epsilon <= r.claimed_epsilon
    assert not r.violation


# --- the GAN and the LM: their own canaries and scores -------------------------------


def lm_cfg(**o):
    raw = tomllib.loads((ROOT / "simulations" / "lm-quick.toml").read_text())
    return quick_config(**{**raw, **o})


def gan_cfg(**o):
    return quick_config(**{"task.family": "gan", "gan.width": 16, "gan.latent-dim": 16, **o})


LM_SITE = parse_node_config({"partition-id": 0, "num-partitions": 100, "unsafe-memory-ledger": True,
                            "privacy-budget": 1e6})  # ~1,000 windows of 32 characters


def test_text_canaries_are_random_token_windows_joined_as_records():
    cfg = lm_cfg()
    _, spec = site_dataset(cfg, LM_SITE)
    c = make_canaries(spec, 50, torch.Generator().manual_seed(0), cfg.lm.context)
    assert c.shape == (50, cfg.lm.context + 1) and c.dtype == torch.long
    assert int(c.min()) >= 0 and int(c.max()) < spec.vocab_size
    assert len({tuple(x.tolist()) for x in c}) == 50
    x, y = canary_records(spec, c)[3]
    assert torch.equal(x, c[3, :-1]) and torch.equal(y, c[3, 1:])
    with pytest.raises(ValueError, match="lm.context"):
        make_canaries(spec, 5, torch.Generator())


@pytest.mark.slow  # ~3,400 steps of a tiny LM: ~10-20 s
def test_without_dp_the_lm_audit_catches_memorised_canary_text():
    r = run_sample_audit(lm_cfg(**{"privacy.enabled": False}), LM_SITE, num_canaries=64, epochs=30, seed=0)
    assert r.family == "lm" and "cross-entropy" in r.method and r.claimed_epsilon == math.inf
    assert r.correct >= 0.95 * r.guesses and r.empirical_epsilon > 2.0


@pytest.mark.parametrize("make,site,epochs", [(lm_cfg, LM_SITE, 3), (gan_cfg, SITE, 10)], ids=["lm", "gan"])
def test_with_dp_the_gan_and_lm_bounds_stay_below_the_claim(make, site, epochs):
    cfg = make(**{"privacy.noise-multiplier": 1.0})
    for seed in (0, 1):
        r = run_sample_audit(cfg, site, num_canaries=64, epochs=epochs, seed=seed)
        assert r.family == cfg.task.family and r.dp_enabled and math.isfinite(r.claimed_epsilon)
        assert 0.0 <= r.empirical_epsilon <= r.claimed_epsilon and not r.violation


def test_an_audit_is_priced_on_the_sites_ledger_charged_there_and_refused_past_the_budget(tmp_path):
    from client.audit import AuditRefused
    from tests.conftest import site_entry

    cfg = audit_cfg(**{"privacy.noise-multiplier": 1.0})
    site = parse_node_config({"partition-id": 0, "num-partitions": 10, "ledger-path": str(tmp_path / "l.json"),
                              "privacy-budget": 100.0})
    r = run_sample_audit(cfg, site, num_canaries=16, epochs=2, seed=0)
    entry = site_entry(cfg, site)
    assert entry.epsilon == pytest.approx(r.claimed_epsilon) and entry.rounds[-1]["audit"] is True
    assert entry.rounds[-1]["state"] == "confirmed"
    assert sum(s for _, _, s in entry.history) == r.steps
    before = (tmp_path / "l.json").read_bytes()
    tight = site.model_copy(update={"privacy_budget": entry.epsilon * 1.01})
    with pytest.raises(AuditRefused, match="budget-exhausted"):
        run_sample_audit(cfg, tight, num_canaries=16, epochs=2, seed=1)
    assert (tmp_path / "l.json").read_bytes() == before  # nothing spent
