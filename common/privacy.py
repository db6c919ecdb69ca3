"""Differential-privacy arithmetic: calibration and accounting over a site's whole history.

Pure functions over plain data. A site's privacy state is its accountant *history*:
a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly what Opacus'
accountants keep. Composing the history gives the epsilon spent so far; appending the
next round's entry before training gives the epsilon the site *would* reach, which is
how budgets are enforced before any private data is touched.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import warnings
from dataclasses import dataclass

HistoryEntry = tuple[float, float, int]

# The RDP bound could be tighter with higher orders; the epsilon we report stays a valid upper bound.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


@dataclass(frozen=True)
class DPPlan:
    """How one site runs DP-SGD for a whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    accountant: str
    max_grad_norm: float


# Tests and benchmarks only: with this set to 1, DP noise and DP sampling are drawn from seeds
# derived from the public config (run.seed), so anyone who knows the config can reproduce the
# noise and remove it. Never set it for a real run.
INSECURE_REPRODUCIBLE_NOISE = "FEDGEN_INSECURE_REPRODUCIBLE_NOISE"


def noise_seed(public_seed: int) -> int:
    """The seed of a DP mechanism's noise or sampling: fresh OS entropy, secret from everyone.

    A seed derived from the run config (``run.seed``, the round, the partition) would let the
    server, or anyone with the config, regenerate the Gaussian noise and the Poisson sample
    and subtract them: no DP at all. Only with ``FEDGEN_INSECURE_REPRODUCIBLE_NOISE=1``
    (tests, benchmarks) is ``public_seed`` returned, so that their numbers repeat.
    """
    if os.environ.get(INSECURE_REPRODUCIBLE_NOISE) == "1":
        return int(public_seed)
    return secrets.randbits(62)


def auto_delta(num_records: int) -> float:
    """A delta well below 1/N (the usual rule of thumb): 1/(10 N), at most 1e-5."""
    return min(1e-5, 1.0 / (10.0 * num_records))


def check_delta(delta: float, num_records: int) -> None:
    if delta >= 1.0 / num_records:
        raise ValueError(
            f"privacy.delta = {delta:g} is not below 1/N = {1.0 / num_records:g} for this site's "
            f"{num_records} records: such a delta allows leaking whole records; set privacy.delta "
            f"below {1.0 / num_records:g} or to 0 for the automatic value"
        )


def steps_per_round(num_records: int, batch_size: int, local_epochs: int, max_steps: int) -> tuple[float, int]:
    """(Poisson sample rate, optimizer steps per round) for a site with N records.

    Matches Opacus: a loader of ``ceil(N / B)`` batches becomes a Poisson loader with
    sample rate ``1 / ceil(N / B)`` and as many steps per epoch.
    """
    per_epoch = math.ceil(num_records / batch_size)
    sample_rate = 1.0 / per_epoch
    steps = per_epoch * local_epochs
    if max_steps > 0:
        steps = min(steps, max_steps)
    return sample_rate, steps


CALIBRATION_TOLERANCE = 0.005  # a calibrated noise's epsilon is in [target - this, target]


def calibrate_noise(
    target_epsilon: float, delta: float, *, sample_rate: float, total_steps: int, accountant: str,
    tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    """Noise multiplier so that ``total_steps`` steps at ``sample_rate`` reach ``target_epsilon``:
    epsilon of the result in ``[target - tolerance, target]``, by the accountant itself.

    Opacus' ``get_noise_multiplier`` finds it by bisection: 7-38 accountant calls, 0.1-0.25 s
    each for an RDP DP-SGD plan here (0.8-1.8 s of a digits-quick site's first round, measured).
    Here, as fast as it stays exact:

    - log(epsilon) is decreasing and close to linear in log(noise), so secant steps bracket the
      middle of the window and scipy's ``brentq`` closes in on it, to a precision the window
      allows (``_search``);
    - for RDP the search prices each noise with ``_rdp_epsilon_from_order_2``, an upper bound
      of the accountant's epsilon, cheaper (the fractional orders near 1 are most of the
      accountant's time) and equal to it whenever the best order is 2 or more (below epsilon
      16 in a grid of 192 plans: targets 0.5-30, sample rates 0.001-1, 1-1,000 steps); the
      accountant then prices the result once. When the bound was loose (the result lands
      below the window: large targets), the search runs again on the accountant itself,
      from there. PRV's search starts where that bound meets the target (PRV is usually the
      tighter, its noise a little below RDP's; below RDP's floor, about 0.1 at delta 1e-5, it
      starts from noise 1), since PRV's cost and memory grow steeply as the noise falls;
    - the result is returned only if the accountant's own epsilon of it is in the window;
      otherwise Opacus' bisection decides.

    So the guarantee is always the accountant's epsilon of the returned noise (what the ledger
    records), never this search's arithmetic. Call counts: ``tests/unit/test_privacy.py``.
    """
    if not (tolerance > 0 and math.isfinite(target_epsilon) and target_epsilon > tolerance):
        raise ValueError(f"target epsilon {target_epsilon} with tolerance {tolerance}: the noise calibration needs "
                         "a finite target epsilon above a positive tolerance; set privacy.target-epsilon above it")

    def exact(noise: float) -> float:
        return epsilon([(noise, sample_rate, total_steps)], delta, accountant)

    bound = functools.partial(_rdp_epsilon_from_order_2, sample_rate=sample_rate, steps=total_steps, delta=delta)
    if accountant == "rdp":
        found = _search(bound, exact, target_epsilon, tolerance, start=1.0)
        if found.noise is None and found.last is not None:  # the bound was loose there: refine on the accountant
            found = _search(exact, exact, target_epsilon, tolerance, start=found.last)
    else:  # PRV starts where the cheap RDP bound meets the target (none below RDP's floor: noise 1)
        hint = _search(bound, bound, target_epsilon, tolerance, start=1.0)
        found = _search(exact, exact, target_epsilon, tolerance, start=hint.noise or 1.0)
    if found.noise is not None:
        return found.noise

    from opacus.accountants.utils import get_noise_multiplier  # see _epsilon

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
        )
    )


def _rdp_epsilon_from_order_2(noise: float, *, sample_rate: float, steps: int, delta: float) -> float:
    """The RDP accountant's epsilon with its orders below 2 left out: never below the full
    accountant's (epsilon is a minimum over the orders), equal to it whenever the best order is
    2 or more, and cheaper: the series of the fractional orders near 1 is most of the
    accountant's time. A search aid only: no epsilon anyone reads comes from it."""
    from opacus.accountants.analysis import rdp as analysis

    rdp = _rdp_of_one_step(float(noise), float(sample_rate), low=False) * steps
    with warnings.catch_warnings():  # "the smallest alpha is optimal": the full accountant has smaller ones
        warnings.simplefilter("ignore")
        eps, _ = analysis.get_privacy_spent(orders=_rdp_orders(low=False), rdp=rdp, delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf


@functools.lru_cache(maxsize=2)
def _rdp_orders(*, low: bool) -> list[float]:
    """Opacus' RDP orders below 2 (``low``) or from 2 up, in the accountant's own order."""
    from opacus.accountants import RDPAccountant

    return [a for a in RDPAccountant.DEFAULT_ALPHAS if (a < 2) == low]


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise: float, sample_rate: float, *, low: bool):
    """Opacus' RDP of one step of the sampled Gaussian mechanism at its orders below 2 (``low``)
    or from 2 up: a read-only array. The accountant multiplies this very array by the steps, so
    one computation serves every history and every step count with this noise and rate."""
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=_rdp_orders(low=low))
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``, number for number: the same per-order RDP
    (Opacus' ``compute_rdp``, one step's, times the steps), summed over the history in the same
    order, converted by Opacus' own ``get_privacy_spent`` at the same orders. Only the per-step
    RDP is cached (``_rdp_of_one_step``): 0.06-0.13 s each here, and a site prices the same
    noise and rate in its calibration and again at every round. ``tests/unit/test_privacy.py``
    checks the equality against Opacus' accountant."""
    import numpy as np
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum([np.concatenate([_rdp_of_one_step(float(n), float(q), low=True),
                               _rdp_of_one_step(float(n), float(q), low=False)]) * int(s)
               for n, q, s in history])
    eps, _ = analysis.get_privacy_spent(orders=[*_rdp_orders(low=True), *_rdp_orders(low=False)], rdp=rdp,
                                        delta=delta)
    return float(eps)


@dataclass(frozen=True)
class _Found:
    noise: float | None  # in the window by the accountant, or None
    last: float | None  # the search's answer on its own pricing, checked or not (None: no answer)


MIN_SEARCH_NOISE, MAX_SEARCH_NOISE = 1e-3, 1e6  # Opacus' bisection gives up near 1e6 too (MAX_SIGMA)


def _search(price, exact, target_epsilon: float, tolerance: float, *, start: float) -> _Found:
    """A noise whose ``exact`` epsilon is in ``[target - tolerance, target]``, searched from
    ``start`` on ``price`` (``exact`` itself or an upper bound of it)."""
    aim = target_epsilon - tolerance / 2

    def excess(log_noise: float) -> float:  # log(epsilon / aim): close to linear in log(noise)
        eps = price(math.exp(log_noise))
        return math.log(min(max(eps, 1e-12), 1e12) / aim)

    noise = None
    try:
        from scipy.optimize import brentq

        # Bracket the aim: secant steps on (log noise, log epsilon) going 20% past the predicted
        # root (epsilon ~ 1/noise gives the first slope, -1), at most a factor 2 in noise at a
        # time (as bisection, never far below the answer, where PRV costs minutes and gigabytes).
        lowest, highest = math.log(MIN_SEARCH_NOISE), math.log(MAX_SEARCH_NOISE)
        x0 = min(max(math.log(start), lowest), highest)
        f0 = excess(x0)
        x1, f1 = x0, f0
        while f1 and (f0 > 0) == (f1 > 0):
            slope = (f1 - f0) / (x1 - x0) if x1 != x0 else -1.0
            move = min(max(-1.2 * f1 / (slope if slope < 0 else -1.0), -math.log(2)), math.log(2))
            step = min(max(x1 + move, lowest), highest)
            if step == x1:
                raise ArithmeticError(f"no noise multiplier in [{MIN_SEARCH_NOISE}, {MAX_SEARCH_NOISE}] meets it")
            x0, f0 = x1, f1
            x1, f1 = step, excess(step)
        # brentq returns x within xtol + 4 * machine-eps * |x| of the root; the window's upper
        # margin is log(target / aim), about window / 2 in log(noise) units divided by the slope,
        # so xtol = window / 8 keeps the answer inside while |d log eps / d log noise| <= 4
        # (1.2-3.7 measured in the plans tested); a steeper one is tried again tighter.
        window = math.log(target_epsilon / (target_epsilon - tolerance))
        for xtol in (window / 8, window / 256):
            noise = math.exp(brentq(excess, min(x0, x1), max(x0, x1), xtol=xtol) if f1 else x1)
            if target_epsilon - tolerance <= exact(noise) <= target_epsilon:
                return _Found(noise, noise)
    except (ValueError, ArithmeticError, RuntimeError, MemoryError):
        pass  # an accountant that cannot price some noise in the search: the caller's next way
    return _Found(None, noise)


def epsilon(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of every entry in the history (0 for an empty one).

    Never called per training step (the step hook only appends to the accountant's
    history); a site calls it three times a round (spent, would-be, reached). One call
    costs about 10 ms (RDP, one entry) to 50 ms (PRV, or several entries) on a CPU, and
    the would-be figure of a round is the reached one, as is the next round's spent one:
    hence the cache (the result is a pure function of history, delta and accountant).
    """
    if not history:
        return 0.0
    key = tuple((float(n), float(q), int(s)) for n, q, s in history)
    return _epsilon(key, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # Imported here: importing opacus costs seconds (it pulls in torch.distributed and
    # scipy.stats), and a ServerApp without user-level DP never calls into it.
    if accountant == "rdp":
        eps = _rdp_epsilon(history, delta)
    else:
        from opacus.accountants import create_accountant

        acc = create_accountant(accountant)
        acc.load_state_dict({"history": list(history), "mechanism": acc.mechanism()})
        eps = acc.get_epsilon(delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf


def compact(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Merge consecutive entries with the same noise and sample rate (same composition)."""
    out: list[HistoryEntry] = []
    for n, q, s in history:
        if out and out[-1][0] == n and out[-1][1] == q:
            out[-1] = (n, q, out[-1][2] + s)
        else:
            out.append((n, q, s))
    return out
