"""Empirical privacy audits: the statistics, as pure functions over plain numbers.

An accountant's epsilon is an *upper* bound that holds only if the code is right. An
audit measures a *lower* bound (or an estimate) on the trained model itself. A lower
bound above the claimed epsilon means the DP implementation is broken.

Sample level (one site, one training run): Steinke, Nasr, Jagielski, "Privacy Auditing
with One (1) Training Run", NeurIPS 2023. ``m`` canaries, each included independently
with probability 1/2; after training the auditor guesses "in" / "out" for some of them
and abstains on the rest. Their main theorem: if training is (eps, delta)-DP with
respect to each canary, ``r`` is the number of guesses and ``W`` the number of correct
ones, then for every ``v``

    P[W >= v]  <=  f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v)       :=  P[Binomial(r, e^eps / (1 + e^eps)) >= v].

(with delta = 0 this is: W is stochastically dominated by Binomial(r, e^eps/(1+e^eps)).)
The right-hand side is a p-value for the hypothesis "training is (eps, delta)-DP";
every eps whose p-value is at most ``1 - confidence`` is rejected, and the largest
rejected eps is the lower bound. Since (eps, delta)-DP implies (eps', delta)-DP for
eps' >= eps, rejecting eps also rejects every smaller value, so the bound is valid at
the stated confidence whatever value the bisection lands on, provided it is rejected.

User level (the federation): Andrew et al., "One-shot Empirical Privacy Estimation for
Federated Learning", ICLR 2024. Canary clients send updates in secret random
directions; the cosines between the model's total change and the directions of
inserted vs never-inserted canaries are fitted with Gaussians, and the estimate is the
epsilon (at the given delta) of that pair of Gaussians, computed exactly: the privacy
loss between two Gaussians is quadratic in the observation, so the hockey-stick
divergence has a closed form in normal CDFs; epsilon is the smallest value at which
both directions of the divergence are at most delta. With equal variances this is the
Gaussian mechanism with mu = |mu_in - mu_out| / s:
``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.
Unlike the sample-level bound this is an *estimate*, not a bound with a confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

EPS_TOL = 1e-7  # absolute precision of the bisections on epsilon
EPS_MAX = 1e4  # beyond this an estimate is reported as infinite


# --------------------------------------------------------------------------------------
# Sample level: one-run audit (Steinke, Nasr, Jagielski 2023)
# --------------------------------------------------------------------------------------


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need 0 <= correct ({num_correct}) <= guesses ({num_guesses}) <= canaries ({num_canaries})"
        )


def one_run_p_value(num_guesses: int, num_correct: int, num_canaries: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[>= num_correct correct guesses] if training were (epsilon, delta)-DP.

    ``f(v) + 2 m delta max_i (f(v-i) - f(v)) / i`` with ``f(v) = P[Binomial(r, q) >= v]``,
    ``q = e^eps / (1 + e^eps)``. Only ``i <= v`` matter: for ``i >= v``, ``f(v-i) = 1`` and
    the ratio ``(1 - f(v)) / i`` decreases in ``i``.
    """
    _check_counts(num_guesses, num_correct, num_canaries)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    r, v = int(num_guesses), int(num_correct)
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[B >= v]
    if delta == 0:
        return min(tail, 1.0)
    # (f(v-i) - f(v)) = P[v-i <= B <= v-1] = sum of the pmf at v-1, v-2, ..., v-i.
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    ratio = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2.0 * num_canaries * delta * ratio, 1.0)


def one_run_epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
    *,
    num_canaries: int | None = None,
) -> float:
    """Largest epsilon rejected at ``confidence`` by ``num_correct`` correct out of ``num_guesses``.

    ``num_canaries`` is ``m``, the number of canaries whose membership was randomised
    (guessed or not); the delta term grows with it. It defaults to ``num_guesses``,
    which is right only when every canary was guessed: pass it whenever the guesser
    abstained, or the bound is too high when ``delta > 0``.

    Returns 0 when even epsilon = 0 cannot be rejected.
    """
    m = num_guesses if num_canaries is None else int(num_canaries)
    _check_counts(num_guesses, num_correct, m)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_guesses, num_correct, m, eps, delta) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # terminates: the p-value tends to 1 as eps grows (B -> r >= v)
        lo, hi = hi, 2.0 * hi
        if hi > EPS_MAX:
            return math.inf
    while hi - lo > EPS_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo  # always a rejected value


def guess_membership(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 (abstain) else.

    Scores: higher = more likely a member (e.g. minus the loss). Ties are broken by index.
    """
    scores = np.asarray(scores, dtype=float)
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k+ ({k_plus}) + k- ({k_minus}) <= m ({m}), both >= 0")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(m, dtype=int)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[m - k_minus:]] = -1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses) for guesses in {-1, 0, +1} and membership booleans."""
    guesses = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    made = guesses != 0
    return int(made.sum()), int((guesses[made] == truth[made]).sum())


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """Candidate (k+, k-): symmetric, 5%, 10%, 25% and 50% of the canaries on each side."""
    ks = sorted({max(1, round(f * m)) for f in (0.05, 0.1, 0.25, 0.5)})
    return [(k, k) for k in ks if 2 * k <= m]


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """The one-run lower bound from canary scores, best over pre-set (k+, k-) choices.

    Trying several guess counts and keeping the best is a multiple test: each is run at
    ``1 - (1 - confidence) / len(guess_counts)`` (Bonferroni), so the maximum holds at
    ``confidence``. The candidates must be chosen before looking at the scores.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and membership must be 1-D arrays of the same length")
    m = len(scores)
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not counts:
        raise ValueError(f"no guess counts to try for m = {m} canaries")
    per_test = 1.0 - (1.0 - confidence) / len(counts)
    best = {"epsilon": -1.0}
    for k_plus, k_minus in counts:
        guesses, correct = count_correct(guess_membership(scores, k_plus, k_minus), included)
        eps = one_run_epsilon_lower_bound(guesses, correct, delta, per_test, num_canaries=m)
        if eps > best["epsilon"]:
            best = {"epsilon": eps, "guesses": guesses, "correct": correct, "k_plus": k_plus, "k_minus": k_minus}
    return best


# --------------------------------------------------------------------------------------
# User level: one-shot estimate (Andrew et al. 2024)
# --------------------------------------------------------------------------------------


def gaussian_dp_delta(epsilon: float, mu: float) -> float:
    """delta(eps) of mu-GDP (the Gaussian mechanism with sensitivity/sigma = mu)."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a, b = -epsilon / mu + mu / 2, -epsilon / mu - mu / 2
    # Phi(a) - e^eps Phi(b), the second term in log space (e^eps overflows long before it matters).
    return max(0.0, float(stats.norm.cdf(a) - math.exp(epsilon + stats.norm.logcdf(b))))


def _log_mass(lo: float, hi: float, mean: float, std: float) -> float:
    """log P[lo < Y < hi] for Y ~ N(mean, std^2), accurate in either tail."""
    z_lo, z_hi = (lo - mean) / std, (hi - mean) / std
    if z_lo >= z_hi:
        return -math.inf
    if z_lo > 0:  # right tail: difference of survival functions
        a, b = stats.norm.logsf(z_lo), stats.norm.logsf(z_hi)
    else:
        a, b = stats.norm.logcdf(z_hi), stats.norm.logcdf(z_lo)
    if b == -math.inf:
        return float(a)
    return float(a + math.log1p(-math.exp(min(b - a, 0.0)))) if a > b else -math.inf


def _log_hockey_stick(m1: float, s1: float, m2: float, s2: float, epsilon: float) -> float:
    """log of sup_A P[A] - e^eps Q[A] for P = N(m1, s1^2), Q = N(m2, s2^2) (-inf when 0).

    The sup is attained at A = {y : L(y) > eps}, L = log p/q = a y^2 + b y + c.
    """
    a = 0.5 * (1.0 / s2**2 - 1.0 / s1**2)
    b = m1 / s1**2 - m2 / s2**2
    c = 0.5 * (m2**2 / s2**2 - m1**2 / s1**2) + math.log(s2 / s1)
    if a == 0.0:
        if b == 0.0:
            return -math.inf  # identical distributions
        t = (epsilon - c) / b
        pieces = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4.0 * a * (c - epsilon)
        if disc <= 0.0:
            # a > 0 would make L > eps everywhere (impossible for eps >= 0); a < 0: A is empty.
            return -math.inf
        # Roots without cancellation (a may be tiny when the variances nearly agree).
        half = -0.5 * (b + math.copysign(math.sqrt(disc), b))
        far = half / a
        near = (c - epsilon) / half if half != 0.0 else far
        r1, r2 = sorted((near, far))
        pieces = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    log_p = special.logsumexp([_log_mass(lo, hi, m1, s1) for lo, hi in pieces])
    log_q = special.logsumexp([_log_mass(lo, hi, m2, s2) for lo, hi in pieces])
    if not math.isfinite(log_p):
        return -math.inf
    gap = epsilon + log_q - log_p
    if gap >= 0.0:
        return -math.inf
    return float(log_p + math.log1p(-math.exp(gap)))


def epsilon_two_gaussians(mu1: float, std1: float, mu2: float, std2: float, delta: float) -> float:
    """Smallest eps >= 0 with both hockey-stick divergences of the two Gaussians <= delta."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (std1 > 0 and std2 > 0 and math.isfinite(std1) and math.isfinite(std2)):
        raise ValueError(f"standard deviations must be positive and finite, got {std1}, {std2}")
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(_log_hockey_stick(mu1, std1, mu2, std2, eps),
                   _log_hockey_stick(mu2, std2, mu1, std1, eps)) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:  # the divergence decreases in eps
        lo, hi = hi, 2.0 * hi
        if hi > EPS_MAX:
            return math.inf
    while hi - lo > EPS_TOL:
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi  # the divergence at hi is <= delta


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """eps of mu-GDP at delta (equal-variance case of :func:`epsilon_two_gaussians`)."""
    if mu <= 0:
        return 0.0
    return epsilon_two_gaussians(0.0, 1.0, float(mu), 1.0, delta)


def one_shot_epsilon_estimate(
    cos_inserted: np.ndarray,
    cos_not_inserted: np.ndarray,
    delta: float,
    *,
    null_dim: int | None = None,
    equal_variances: bool = False,
) -> float:
    """Andrew et al.'s estimate: eps at ``delta`` of N(mu_in, s_in^2) vs N(mu_out, s_out^2).

    Means and (ddof=1) standard deviations are fitted to the two cosine samples. With
    ``null_dim = d`` the never-inserted side is instead the distribution the paper
    derives for cosines with independent random directions in d dimensions, N(0, 1/d).

    At small delta the exact epsilon of two Gaussians with *different* variances is
    driven by the far tails, so sampling error in the two fitted standard deviations
    alone inflates it (two fits of one distribution from 200 samples each can give
    eps ~ 1-4 at delta = 1e-5). Use many canaries, the theoretical null, or
    ``equal_variances=True``: one pooled standard deviation, i.e. the Gaussian
    mechanism with mu = |mu_in - mu_out| / s_pooled.
    """
    cin = np.asarray(cos_inserted, dtype=float).ravel()
    if len(cin) < 2:
        raise ValueError("need at least two inserted canaries to fit a Gaussian")
    mu_in, s_in = float(cin.mean()), float(cin.std(ddof=1))
    if null_dim is not None:
        if null_dim < 1:
            raise ValueError(f"null_dim must be >= 1, got {null_dim}")
        mu_out, s_out = 0.0, 1.0 / math.sqrt(null_dim)
    else:
        cout = np.asarray(cos_not_inserted, dtype=float).ravel()
        if len(cout) < 2:
            raise ValueError("need at least two never-inserted canaries to fit a Gaussian")
        mu_out, s_out = float(cout.mean()), float(cout.std(ddof=1))
    if s_in == 0 or s_out == 0:
        raise ValueError("a cosine sample has zero spread: cannot fit a Gaussian to it")
    if equal_variances:
        if null_dim is not None:
            s_in = s_out  # the null's variance is known exactly
        else:
            n_in, n_out = len(cin), len(cout)
            s_in = s_out = math.sqrt(((n_in - 1) * s_in**2 + (n_out - 1) * s_out**2) / (n_in + n_out - 2))
    return epsilon_two_gaussians(mu_in, s_in, mu_out, s_out, delta)
