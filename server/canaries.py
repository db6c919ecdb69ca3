"""User-level audit of a federation: canary clients, in one training run.

After Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning"
(ICLR 2024). ``m`` canary clients are added to the federation at the server. Canary
``i`` owns a secret direction ``u_i``, uniform on the unit sphere of the model's float
parameters, and whenever it takes part in a round its "update" is ``c * u_i`` (``c`` =
``audit.canary-norm``, by default the central-DP clipping norm, so clipping leaves it
as it is). Each canary is *inserted* with probability 1/2, secretly; an inserted canary
takes part in a round with the real sites' sampling rate (sampled / connected), a
never-inserted one never does.

After the last round the auditor looks only at the released models: ``Delta`` = final
global model - initial model, and the cosine of ``Delta`` with every canary direction.
For a never-inserted canary ``u_i`` is independent of ``Delta``, so its cosine follows the
null distribution of a random direction in ``d`` dimensions (mean 0, variance 1/d, very
nearly Gaussian for our d); for an inserted one the cosine is shifted by what the
canary put in. The estimate is the epsilon (at ``delta``) between N(0, 1/d) and the
Gaussian of the inserted cosines with the same variance, i.e. the Gaussian mechanism with
``mu = mean(cos_inserted) * sqrt(d)`` (:func:`common.audit.one_shot_epsilon_estimate`).
With user-level DP of noise multiplier ``sigma`` over T rounds with every canary taking
part, each cosine is about ``sqrt(T) / (sigma sqrt(d))`` when the noise dominates Delta,
so mu is about ``sqrt(T) / sigma``: exactly the composed Gaussian mechanism, the tightest
claim an accountant can make; real sites' updates in Delta only lower it. The estimate
from the never-inserted canaries' own cosines (fitted, not theoretical) and the estimate
with the inserted cosines' own variance are reported too.

This is an *estimate*, not a bound with a confidence (the paper's point: one run, no
retraining). What it audits is the server side: clipping, the noise and its scale, the
sampling, and the accounting that produced the claimed user-level epsilon.

Canaries change the model, so an audit run is its own run: the server writes neither a
final model nor checkpoints for it and it cannot be resumed (``server/job.py``); the
sites' data is never touched (canaries live only at the server).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flwr.supercore.differential_privacy import KEY_NORM_BIT

from common import records as R

log = logging.getLogger(__name__)

METHOD = "one-shot canary clients (Andrew et al. 2024), cosine of the final model change"


@dataclass(frozen=True)
class UserAuditResult:
    method: str
    m: int  # canary clients with randomised membership
    inserted: int
    dim: int  # float parameters the directions live in
    participations: int  # canary updates that entered an aggregation, over all rounds
    empirical_epsilon: float  # the estimate (theoretical null, equal variances)
    epsilon_fitted_null: float  # the same with the never-inserted canaries' fitted Gaussian
    epsilon_unequal_variances: float  # inserted cosines' own variance vs the theoretical null
    claimed_epsilon: float  # the user-level accountant's epsilon (inf without central DP)
    delta: float
    mean_cos_inserted: float
    mean_cos_not_inserted: float
    std_cos_not_inserted: float
    canary_norm: float
    seed: int
    seconds: float

    @property
    def estimate(self) -> float:
        """The larger of the two theoretical-null estimates (equal and unequal variances)."""
        return max(self.empirical_epsilon, self.epsilon_unequal_variances)

    @property
    def violation(self) -> bool:
        """Either estimate above the claim: the mechanism leaks more than the accountant says."""
        return self.estimate > self.claimed_epsilon

    def as_dict(self) -> dict:
        return {**asdict(self), "estimate": self.estimate, "violation": self.violation, "level": "user",
                "confidence": None}


class CanaryClients:
    """The canaries of one audit run: secret directions and membership, all from ``seed``."""

    def __init__(self, global_arrays: ArrayRecord, m: int, norm: float, seed: int) -> None:
        if m < 4:
            raise ValueError(f"audit.user-canaries must be at least 4 (two of each kind, expected), got {m}")
        if norm <= 0:
            raise ValueError(f"the canary norm must be positive, got {norm}")
        self.m, self.norm, self.seed = m, float(norm), int(seed)
        self.keys = [k for k, a in global_arrays.items() if np.issubdtype(a.numpy().dtype, np.floating)]
        self.shapes = {k: global_arrays[k].numpy().shape for k in self.keys}
        self.dim = int(sum(int(np.prod(s)) for s in self.shapes.values()))
        seq_member, seq_sample, seq_dirs = np.random.SeedSequence(self.seed).spawn(3)
        self.inserted = np.random.default_rng(seq_member).random(m) < 0.5
        if self.inserted.sum() < 2 or (~self.inserted).sum() < 2:
            # Membership is redrawn from the same seed stream until both sides have two:
            # independent of everything the run does, so the audit stays valid.
            rng = np.random.default_rng(seq_member)
            while self.inserted.sum() < 2 or (~self.inserted).sum() < 2:
                self.inserted = rng.random(m) < 0.5
        self._sampler = np.random.default_rng(seq_sample)
        self._dir_seeds = seq_dirs.generate_state(m)
        self.participations = 0
        self.seconds = 0.0  # the audit's own cost: making canary updates and the estimate

    def direction(self, i: int) -> np.ndarray:
        """Canary i's unit direction, flat over the float keys (recomputed: O(d) memory per canary)."""
        v = np.random.default_rng(int(self._dir_seeds[i])).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def _unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for k in self.keys:
            size = int(np.prod(self.shapes[k]))
            out[k] = flat[at:at + size].reshape(self.shapes[k])
            at += size
        return out

    def replies(self, global_arrays: ArrayRecord, sample_rate: float, like: list[Message]) -> list[Message]:
        """This round's canary updates: each inserted canary takes part with ``sample_rate``.

        ``like`` are the round's valid real replies (possibly none). A canary weighs like a
        typical site (``weight`` = their mean) and carries a copy of the first one's metric
        keys, since Flower's strategies require every reply's MetricRecord to have the same
        keys; the round's train metrics are computed from the real replies alone.
        """
        metrics = [next(iter(m.content.metric_records.values())) for m in like]
        template = dict(metrics[0]) if metrics else {}
        template[R.WEIGHT] = sum(float(m[R.WEIGHT]) for m in metrics) / len(metrics) if metrics else 1.0
        if KEY_NORM_BIT in template:
            template[KEY_NORM_BIT] = 0  # a canary's update is made at its norm: it never clipped it
        t0 = time.perf_counter()
        takes_part = [i for i in np.flatnonzero(self.inserted) if self._sampler.random() < sample_rate]
        base = {k: a.numpy() for k, a in global_arrays.items()}  # decoded once, not once per canary
        msgs = []
        for i in takes_part:
            step = self._unflatten(self.norm * self.direction(i))
            arrays = {k: Array(np.asarray(ref + step[k], dtype=ref.dtype) if k in step else ref)
                      for k, ref in base.items()}
            content = RecordDict({R.ARRAYS: ArrayRecord(arrays), R.METRICS: MetricRecord(dict(template))})
            msgs.append(Message(content=content, dst_node_id=0, message_type="train"))
        self.participations += len(msgs)
        self.seconds += time.perf_counter() - t0
        return msgs

    def _flat_change(self, initial: ArrayRecord, final: ArrayRecord) -> np.ndarray:
        return np.concatenate([(final[k].numpy().astype(np.float64) - initial[k].numpy().astype(np.float64)).ravel()
                               for k in self.keys])

    def estimate(self, initial: ArrayRecord, final: ArrayRecord, delta: float, claimed: float) -> UserAuditResult:
        t0 = time.perf_counter()
        change = self._flat_change(initial, final)
        norm = float(np.linalg.norm(change))
        if norm == 0.0:
            raise ValueError("the model did not change: nothing to audit (no round was aggregated)")
        cos = np.array([float(change @ self.direction(i)) / norm for i in range(self.m)])
        cin, cout = cos[self.inserted], cos[~self.inserted]
        from common.audit import one_shot_epsilon_estimate  # scipy.stats: only an audit run pays its import

        eps = one_shot_epsilon_estimate(cin, cout, delta, null_dim=self.dim, equal_variances=True)
        eps_fitted = one_shot_epsilon_estimate(cin, cout, delta, equal_variances=True)
        eps_unequal = one_shot_epsilon_estimate(cin, cout, delta, null_dim=self.dim)
        result = UserAuditResult(
            method=METHOD, m=self.m, inserted=int(self.inserted.sum()), dim=self.dim,
            participations=self.participations, empirical_epsilon=float(eps), epsilon_fitted_null=float(eps_fitted),
            epsilon_unequal_variances=float(eps_unequal), claimed_epsilon=float(claimed), delta=float(delta),
            mean_cos_inserted=float(cin.mean()), mean_cos_not_inserted=float(cout.mean()),
            std_cos_not_inserted=float(cout.std(ddof=1)), canary_norm=self.norm, seed=self.seed,
            seconds=self.seconds + time.perf_counter() - t0,
        )
        log.info("user-level audit: %d canaries (%d inserted, %d updates), mean cos %.4g vs %.4g (null sd %.4g): "
                 "estimated epsilon %.3f (equal variances) and %.3f (unequal) vs claimed %.3f", self.m, result.inserted,
                 self.participations, result.mean_cos_inserted, result.mean_cos_not_inserted, 1 / math.sqrt(self.dim),
                 result.empirical_epsilon, result.epsilon_unequal_variances, result.claimed_epsilon)
        if result.violation:
            log.error("privacy audit VIOLATION: estimated user-level epsilon %.3f exceeds the claimed %.3f",
                      result.estimate, result.claimed_epsilon)
        return result
