"""A sample-level privacy audit at one site: canaries in one DP-SGD training run.

Steinke, Nasr, Jagielski (NeurIPS 2023), black-box, with the family's own loss as the score:

1. ``m`` canaries are made, far from the site's data so that what the model learns about
   canaries in general helps included and excluded ones alike, while a canary that was
   trained on has its loss lowered much more than the others':
   images (VAE, GAN): distinct images of 4x4 random black/white cells;
   text (LM): windows of ``lm.context + 1`` uniformly random tokens.
2. Each canary is included with probability 1/2, independently and secretly.
3. A *separate, audit-only* copy of the task is trained on the site's data plus the
   included canaries with the site's DP-SGD (same clipping, noise calibration,
   accountant, Poisson sampling) for as many steps as the site's whole run
   (``run.num-rounds`` rounds of local training) unless told otherwise. That model is
   never saved or sent; only the audit's numbers leave this module.
4. Every canary is scored by how much training lowered its loss (loss at the common
   initialisation minus loss after training), the family's own loss as its task defines
   it (``canary_losses`` of the GenerativeTask protocol): VAE, the negative ELBO on fixed
   latent noise draws; GAN, the private discriminator's loss for calling the canary real
   (``softplus(-D(x))``); LM, the mean next-token cross-entropy of the window. Highest
   scores are guessed "in", lowest "out", the rest abstained on.
5. The count of correct guesses becomes a lower bound on epsilon at the stated
   confidence (:func:`common.audit.one_run_audit`), compared with the accountant's
   epsilon for the audit run.

Privacy of the audit itself: the audit model is trained on the site's real records, so
its result is a function of private data. With DP on it is one more run of the site's
DP-SGD, and the result is post-processing of that model (scores use only the model and
the canaries): it goes through ``client/privacy_state.py`` like a training round, priced
before it touches data, refused past the site's budget, charged ahead on the site's
ledger and confirmed afterwards. With DP off the numbers are not private at all.

The dataset given (or built from the config) is never modified: canaries live in a
separate tensor and are joined to it with a ``ConcatDataset`` for the audit run only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset


from client.dp import check_private_modules, make_private
from client.policy import PolicyRefusal, check_request, config_digest, load_policy
from client.privacy_state import (BudgetExceeded, SitePrivacy, dataset_key, ledger_path, legacy_dataset_key,
                                  make_plan)
from client.site_log import record_request
from common import privacy
from common.audit import default_guess_counts, one_run_audit
from common.config import AppConfig, SiteConfig
from common.data.site import site_dataset
from common.tasks import DataSpec, GenerativeTask, build_task, pick_device
from common.train import freeze_except, train_local

log = logging.getLogger(__name__)

CANARY_GRID = 4  # canaries are 4x4 grids of random black/white cells


@dataclass(frozen=True)
class AuditResult:
    method: str
    family: str
    m: int  # canaries with randomised membership
    guesses: int
    correct: int
    confidence: float
    empirical_epsilon: float  # lower bound at `confidence`
    claimed_epsilon: float  # accountant's epsilon for the audit run (inf when DP is off)
    seconds: float
    delta: float
    included: int  # canaries that were trained on (secret until now)
    k_plus: int
    k_minus: int
    steps: int
    noise_multiplier: float  # 0 when DP is off
    dp_enabled: bool
    seed: int

    @property
    def violation(self) -> bool:
        """The measured lower bound exceeds the claim: the DP implementation is broken."""
        return self.empirical_epsilon > self.claimed_epsilon

    def as_dict(self) -> dict:
        return {**asdict(self), "violation": self.violation}


def method(task: GenerativeTask) -> str:
    return f"one-run (Steinke-Nasr-Jagielski 2023), black-box, score = decrease of the {task.canary_score}"


def make_canaries(spec: DataSpec, m: int, generator: torch.Generator, context: int = 0) -> torch.Tensor:
    """m distinct canaries for this kind of data (images, or token windows of ``context + 1``).

    Images: a 4x4 grid of fair-coin cells, blown up to the image size; 16 random bits per
    canary, all different (drawn without replacement from the 2^16 patterns), every
    channel alike. Coarse cells make each canary far easier to memorise than independent
    pixels (the VAE's decoder upsamples from a coarse grid): on digits without DP, 60
    epochs, the in/out score AUC was ~1.0 with cells vs 0.86 with independent pixels.
    Text: uniformly random tokens, unlike any real text. Validity does not depend on
    these choices, only the audit's power.
    """
    if spec.kind == "text":
        if context < 1:
            raise ValueError("text canaries need the LM's context length (lm.context)")
        if m < 1:
            raise ValueError(f"at least one canary, got {m}")
        return torch.randint(0, spec.vocab_size, (m, context + 1), generator=generator)
    cells = CANARY_GRID * CANARY_GRID
    if not 1 <= m <= 2**cells:
        raise ValueError(f"between 1 and {2**cells} canaries, got {m}")
    codes = torch.randperm(2**cells, generator=generator)[:m]
    bits = (codes[:, None] >> torch.arange(cells)) & 1
    grid = bits.view(m, 1, CANARY_GRID, CANARY_GRID).float()
    block = math.ceil(spec.image_size / CANARY_GRID)
    img = grid.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., : spec.image_size, : spec.image_size]
    return img.expand(m, spec.channels, spec.image_size, spec.image_size).contiguous()


def canary_records(spec: DataSpec, canaries: torch.Tensor) -> TensorDataset:
    """Canaries as training records of the site's kind: (image, label 0) or (x, y = x shifted)."""
    if spec.kind == "text":
        return TensorDataset(canaries[:, :-1], canaries[:, 1:])
    return TensorDataset(canaries, torch.zeros(len(canaries), dtype=torch.long))


def canary_losses(task: GenerativeTask, canaries: torch.Tensor, seed: int) -> np.ndarray:
    """Each canary's loss under the task's current weights: the family's own (``task.canary_losses``)."""
    return task.canary_losses(canaries, seed).double().cpu().numpy()


def membership_and_streams(seed: int, m: int) -> tuple[np.ndarray, torch.Generator, int]:
    """(secret membership of the m canaries, generator of the canaries, training seed).

    Three independent streams from one seed: membership is independent of the canaries'
    pixels and of every random draw of training.
    """
    seq_member, seq_canary, seq_train = np.random.SeedSequence(seed).spawn(3)
    included = np.random.default_rng(seq_member).random(m) < 0.5
    canary_gen = torch.Generator().manual_seed(int(seq_canary.generate_state(1)[0]))
    return included, canary_gen, int(seq_train.generate_state(1)[0])


def audit_steps(cfg: AppConfig, num_records: int, epochs: int | None) -> int:
    """Steps of the audit run: ``epochs`` passes, else the site's whole run (all rounds)."""
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        return math.ceil(num_records / cfg.train.batch_size) * epochs
    _, per_round = privacy.steps_per_round(num_records, cfg.train.batch_size, cfg.train.local_epochs,
                                           cfg.train.max_steps)
    return per_round * cfg.run.num_rounds


class AuditRefused(RuntimeError):
    """The audit would take the site past its privacy budget; nothing was trained or spent."""


def run_sample_audit(
    cfg: AppConfig,
    site: SiteConfig,
    *,
    num_canaries: int = 128,
    epochs: int | None = None,
    confidence: float = 0.95,
    seed: int | None = None,
    guess_counts: list[tuple[int, int]] | None = None,
    site_data: tuple[Dataset, DataSpec] | None = None,
) -> AuditResult:
    """Train an audit-only model with canaries and return the one-run lower bound.

    ``site_data`` is the site's ``(dataset, spec)`` (built from the config when None); it
    is not modified. ``seed`` drives the secret membership, the canaries and the audit's
    training randomness (fresh entropy when None; the seed used is in the result).
    ``guess_counts``: (k+, k-) pairs fixed before scoring; the best is kept with a
    Bonferroni correction (default: 5%, 10%, 25%, 50% of m on each side).
    """
    if num_canaries < 2:
        raise ValueError(f"num_canaries must be >= 2, got {num_canaries}")
    path = ledger_path(cfg, site)
    try:
        return _run_sample_audit(cfg, site, num_canaries=num_canaries, epochs=epochs, confidence=confidence,
                                 seed=seed, guess_counts=guess_counts, site_data=site_data, path=path)
    except AuditRefused as err:
        record_request(path, {"run": "audit", "round": 0, "kind": "audit", "config": config_digest(cfg),
                              "decision": "refused", "reason": str(err)[:500]})
        raise
    except Exception as err:
        record_request(path, {"run": "audit", "round": 0, "kind": "audit", "config": config_digest(cfg),
                              "decision": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
        raise


def _run_sample_audit(cfg: AppConfig, site: SiteConfig, *, num_canaries: int, epochs: int | None,
                      confidence: float, seed: int | None, guess_counts: list[tuple[int, int]] | None,
                      site_data: tuple[Dataset, DataSpec] | None, path: str) -> AuditResult:
    policy = load_policy(site.policy_path) if site.policy_path else None
    if policy is not None:  # the site's own rules first: an audit trains on its records
        try:
            check_request(policy, cfg, "audit", site.data_path or cfg.data.path)
        except PolicyRefusal as err:
            raise AuditRefused(str(err)) from None
    start = time.perf_counter()
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    included, canary_gen, train_seed = membership_and_streams(seed, num_canaries)

    data, spec = site_data if site_data is not None else site_dataset(cfg, site)
    canaries = make_canaries(spec, num_canaries, canary_gen, cfg.lm.context)
    inside = torch.from_numpy(np.flatnonzero(included))
    audit_data = ConcatDataset([data, canary_records(spec, canaries[inside])])
    n = len(audit_data)

    device = pick_device(cfg.run.device)
    task = build_task(cfg, spec, device)  # the audit's own model: same initialisation, never saved or sent
    before = canary_losses(task, canaries, seed=train_seed)
    # The audit's result is published with its seed: under DP its noise and Poisson sample
    # come from secret entropy (common.privacy.noise_seed), not from that seed.
    rng_seed = privacy.noise_seed(train_seed) if cfg.privacy.enabled else train_seed
    torch.manual_seed(rng_seed)
    freeze_except(task, cfg.train.trainable_prefixes)  # the parameters the run's sites train
    optimizers = task.make_optimizers()
    loader = DataLoader(audit_data, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(rng_seed))
    steps = audit_steps(cfg, n, epochs)
    p = cfg.privacy
    if p.enabled:
        # The site's own plan for n records, calibrated for the audit's steps, at the site's own delta.
        plan = make_plan(cfg, n, total_steps=steps, delta_records=len(data))
        delta, noise = plan.delta, plan.noise_multiplier
        sp = SitePrivacy(cfg, site, dataset_key(cfg, data), legacy_keys=(legacy_dataset_key(cfg, site),),
                         policy=policy)
        check_private_modules(task, p.grad_sample_mode)  # before the charge
        try:  # priced and charged ahead on the site's ledger, before the audit touches data
            reservation = sp.reserve(plan, steps, line={"run": f"audit-{seed}", "family": cfg.task.family, "round": 0,
                                                   "audit": True}, what="the audit")
        except (BudgetExceeded, PolicyRefusal) as err:
            raise AuditRefused(str(err)) from None
        dp = make_private(task, optimizers, loader, plan=plan, history=[], grad_sample_mode=p.grad_sample_mode)
        loader = dp.loader
    else:
        delta, noise = p.delta or privacy.auto_delta(len(data)), 0.0
    train_local(task, loader, optimizers, steps)
    claimed = privacy.epsilon(dp.charged, delta, p.accountant) if p.enabled else math.inf
    if p.enabled:
        sp.confirm(reservation, dp.charged)

    after = canary_losses(task, canaries, seed=train_seed)
    scores = before - after  # how much training lowered each canary's loss: higher = more likely in
    counts = guess_counts if guess_counts is not None else default_guess_counts(num_canaries)
    best = one_run_audit(scores, included, delta=delta, confidence=confidence, guess_counts=counts)
    result = AuditResult(
        method=method(task), family=cfg.task.family, m=num_canaries, guesses=best["guesses"],
        correct=best["correct"], confidence=confidence,
        empirical_epsilon=float(best["epsilon"]), claimed_epsilon=float(claimed),
        seconds=time.perf_counter() - start, delta=delta, included=int(included.sum()),
        k_plus=best["k_plus"], k_minus=best["k_minus"], steps=steps, noise_multiplier=float(noise),
        dp_enabled=p.enabled, seed=seed,
    )
    log.info("sample audit: %d/%d correct, empirical eps >= %.3f (%.0f%%) vs claimed %.3f, %.1fs",
             result.correct, result.guesses, result.empirical_epsilon, 100 * confidence,
             result.claimed_epsilon, result.seconds)
    if result.violation:
        log.error("privacy audit VIOLATION: empirical epsilon %.3f exceeds the claimed %.3f",
                  result.empirical_epsilon, result.claimed_epsilon)
    record_request(path, {"run": f"audit-{seed}", "round": 0, "kind": "audit", "config": config_digest(cfg),
                          "steps": steps, "epsilon": float(claimed) if p.enabled else None,
                          "decision": "ok", "reason": ""})  # the site's log (client/site_log.py)
    return result
