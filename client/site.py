"""One site's work in a round: load its data, train the global model privately, report.

Plain domain code: no Flower Messages here (``client/app.py`` turns Messages into
calls of :func:`train_round` / :func:`evaluate_round`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from client import diagnostics, faults
from client.dp import check_private_modules, make_private
from client.approvals import APPROVED, REJECTED, Approvals
from client.policy import Kind, PolicyRefusal, SitePolicy, check_request, config_digest, load_policy
from client.privacy_state import (BudgetExceeded, LedgerError, SitePrivacy, dataset_key, ledger_path,
                                  legacy_dataset_key, make_plan)
from client.site_log import arrays_digest, record_request
from common import atomic
from common import privacy
from common import records as R
from common.config import AppConfig, SiteConfig, training_settings
from common.data.site import site_dataset
from common.tasks import build_task, pick_device
from common.train import add_proximal_term, freeze_except, train_local

log = logging.getLogger(__name__)

@dataclass
class RoundResult:
    status: str  # "ok" | "budget-exhausted" | "refused-by-policy" | "awaiting-approval"
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    reason: str = ""
    request: str = ""  # the request's digest, when the ledger line of its charge names it


def request_digest(cfg: AppConfig, site: SiteConfig, *, key: str, run_name: str, server_round: int,
                   proximal_mu: float, global_arrays: ArrayRecord) -> str:
    """What decides a round's training at this site: the run, the round, every setting, the records, the model.

    Not the site's own budget or ledger location: they decide whether the site may train,
    not what it computes, and an update already paid for may be sent again under any budget."""
    # Not the server's evaluation settings (eval.*, its held-out data), which never reach a site's
    # training: a run resumed with another evaluation is sent the updates already paid for.
    request = {"run": run_name, "round": server_round, "mu": proximal_mu, "key": key, "cfg": training_settings(cfg),
               "site": site.model_dump(exclude={"privacy_budget", "ledger_path", "unsafe_memory_ledger",
                                                "policy_path"})}
    h = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode())
    for name, arr in global_arrays.items():
        x = arr.numpy()
        h.update(f"{name}|{x.dtype.str}|{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


class SavedReply:
    """The update a site last trained, kept beside its ledger, with the digest of the request.

    A server that dies after the sites trained a round but before it checkpointed that
    round resumes from the previous checkpoint and asks for the same round again, with the
    same model. Training again would charge the site's budget a second time for nothing;
    sending the update it already trained (and paid for) again is post-processing of that
    DP release and costs no privacy. The ledger's line for the round names the request's
    digest and is written (as a pending charge) before training; the file is written after
    training and before the charge is confirmed. An update is sent again only if the ledger
    says it was paid for (pending or confirmed), so an unpaid file is never sent. An
    unreadable file is ignored (the site trains).
    """

    def __init__(self, ledger_path: Path, key: str) -> None:
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = ledger_path.with_name(f"{ledger_path.name}.{tag}.last-reply.pt")

    def load(self, digest: str) -> tuple[ArrayRecord, dict[str, float]] | None:
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
            if saved["digest"] != digest:
                return None
            return ArrayRecord(torch_state_dict=saved["arrays"]), {k: float(v) for k, v in saved["metrics"].items()}
        except Exception as err:  # noqa: BLE001 - any damage means: not usable, train as usual
            log.warning("saved update %s is unreadable (%s); training this round as usual", self.path, err)
            return None

    def save(self, digest: str, arrays: ArrayRecord, metrics: dict[str, float]) -> None:
        # Makes the ledger's folder too: not there yet in round 1.
        atomic.torch_save({"digest": digest, "arrays": arrays.to_torch_state_dict(), "metrics": dict(metrics)},
                          self.path)


def train_round(
    cfg: AppConfig,
    site: SiteConfig,
    global_arrays: ArrayRecord,
    server_round: int,
    state: RecordDict,
    *,
    proximal_mu: float = 0.0,
    run_id: int | str = 0,
    run_name: str = "",
) -> RoundResult:
    """Train one round; with a ledger on disk and a ``run_name``, a round asked again with
    the same model and settings is answered with the saved update (:class:`SavedReply`).
    Every reply says how long the site took (``R.SITE_SECONDS``...).

    The site's policy (``policy-path``, ``client/policy.py``) is read first: a malformed one
    raises (the site fails every request, listing every problem); a request it forbids, or a
    config its operator has not approved, is refused before the data is opened. Every request
    and its outcome goes to the site's hash-chained log beside its ledger (``client/site_log.py``)."""
    start = time.perf_counter()
    path = ledger_path(cfg, site)
    record = {"run": str(run_id), "run_name": run_name, "round": server_round, "kind": "train",
              "config": config_digest(cfg), "model": arrays_digest(global_arrays) if path else ""}
    try:
        policy = load_policy(site.policy_path) if site.policy_path else None
        result = _gate(cfg, site, policy, path, run_name, "train") or _train_round(
            cfg, site, global_arrays, server_round=server_round, state=state, proximal_mu=proximal_mu,
            run_id=run_id, run_name=run_name, policy=policy)
    except Exception as err:
        record_request(path, {**record, "decision": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
        raise
    result.metrics[R.SITE_SECONDS] = time.perf_counter() - start
    record_request(path, {**record, "update": arrays_digest(result.arrays), "request": result.request,
                "steps": result.metrics.get(R.STEPS), "epsilon": result.metrics.get(R.EPSILON),
                "replayed": bool(result.metrics.get(R.REPLAYED)), "decision": result.status, "reason": result.reason})
    return result


def _gate(cfg: AppConfig, site: SiteConfig, policy: SitePolicy | None, path: str, run_name: str,
          kind: Kind) -> RoundResult | None:
    """A refusal by the site's policy or its operator, before any data is opened; None to go on."""
    if policy is None:
        return None
    metrics = {R.PARTITION: float(site.partition_id), R.WEIGHT: 0.0}
    try:
        check_request(policy, cfg, kind, site.data_path or cfg.data.path)
    except PolicyRefusal as err:
        log.warning("site %d: %s", site.partition_id, err)
        return RoundResult(status=R.REFUSED_BY_POLICY, metrics=metrics, reason=str(err))
    if not policy.require_approval:
        return None
    if not path:
        raise LedgerError("the site's policy requires approval, which is recorded beside the ledger: set the node "
                          "config's ledger-path")
    digest = config_digest(cfg)
    p = cfg.privacy
    state = Approvals(path).decide(digest, {
        "run_name": run_name, "run_prefix": cfg.run.name, "family": cfg.task.family, "dataset": cfg.data.dataset,
        "planned_epsilon": (None if not p.enabled else p.target_epsilon if not p.noise_multiplier else None),
        "noise_multiplier": p.noise_multiplier if p.enabled else None, "dp": p.enabled,
        "rounds": cfg.run.num_rounds, "settings": training_settings(cfg)})  # what the digest covers, to read
    if state == APPROVED:
        return None
    if state == REJECTED:
        reason = f"refused by the site's operator: the run config {digest} was rejected; nothing was trained or spent"
        return RoundResult(status=R.REFUSED_BY_POLICY, metrics=metrics, reason=reason)
    reason = (f"awaiting approval of the run config {digest} by the site's operator (`fedgen site approve {digest}` "
              "on the site's machine); nothing was trained or spent")
    log.warning("site %d: %s", site.partition_id, reason)
    return RoundResult(status=R.AWAITING_APPROVAL, metrics=metrics, reason=reason)


def _train_round(
    cfg: AppConfig,
    site: SiteConfig,
    global_arrays: ArrayRecord,
    *,
    server_round: int,
    state: RecordDict,
    proximal_mu: float,
    run_id: int | str,
    run_name: str,
    policy: SitePolicy | None = None,
) -> RoundResult:
    fault = faults.planned_fault(site.partition_id, server_round)
    if fault == "crash":
        raise RuntimeError(f"injected crash ({faults.ENV})")
    device = pick_device(cfg.run.device)
    data, spec = site_dataset(cfg, site)
    n = len(data)
    task = build_task(cfg, spec, device)
    R.load_arrayrecord(task.modules, global_arrays)
    freeze_except(task, cfg.train.trainable_prefixes)  # before the optimizers and Opacus see the parameters
    optimizers = task.make_optimizers()
    # Under DP the Poisson sample (the loader's generator) and the noise (torch's generator)
    # must be secret: seeded from OS entropy (common.privacy.noise_seed), not from the config.
    secret = privacy.noise_seed if cfg.privacy.enabled else int
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.train.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(secret(cfg.run.seed * 1000 + server_round)))
    metrics: dict[str, float] = {R.PARTITION: float(site.partition_id)}
    torch.manual_seed(secret(cfg.run.seed * 1_000_003 + server_round * 101 + site.partition_id))

    if not cfg.privacy.enabled:
        _, steps = privacy.steps_per_round(n, cfg.train.batch_size, cfg.train.local_epochs, cfg.train.max_steps)
        result, wall, cpu = _train(task, loader, optimizers, steps, proximal_mu)
        # Without DP nothing here is private: the exact figures go to the server.
        metrics.update({R.WEIGHT: float(n), R.NUM_EXAMPLES: float(n), R.TRAIN_LOSS: result.mean_loss,
                        R.STEPS: float(result.steps), R.REPLAYED: 0.0, R.TRAIN_SECONDS: wall,
                        R.TRAIN_CPU_SECONDS: cpu})
        return RoundResult(status="ok", metrics=metrics,
                           arrays=_with_fault(R.to_arrayrecord(task.modules), fault, global_arrays))

    plan = make_plan(cfg, n)
    key = dataset_key(cfg, data)
    sp = SitePrivacy(cfg, site, key, state, legacy_keys=(legacy_dataset_key(cfg, site),), policy=policy)
    sp.require_durable()
    # Under DP a reply carries only DP outputs and values that do not depend on the records
    # beyond the plan (README, "What a site sends"): no exact count, loss or clip fraction.
    # (Its epsilon is set on every path below: reached, spent when refused, or spent when replayed.)
    metrics.update({R.BUDGET: sp.budget, R.DELTA: plan.delta, R.NOISE: plan.noise_multiplier,
                    R.SAMPLE_RATE: plan.sample_rate, R.WEIGHT: float(site.public_num_examples or 1)})
    if sp.ledger is None or not run_name:
        return _train_private(cfg, task, data, optimizers, loader, plan=plan, sp=sp, entry=sp.load(), metrics=metrics,
                              fault=fault, global_arrays=global_arrays, proximal_mu=proximal_mu,
                              line={"run": str(run_id), "family": cfg.task.family, "round": server_round})
    key_digest = request_digest(cfg, site, key=key, run_name=run_name, server_round=server_round,
                                proximal_mu=proximal_mu, global_arrays=global_arrays)
    with sp.ledger.training():  # one round at a time on this ledger; a crashed one's charge is taken over
        entry = sp.load()
        spent = privacy.epsilon(entry.history, plan.delta, plan.accountant)
        saved = SavedReply(sp.ledger.path, key)
        paid = any(r.get("request") == key_digest for r in entry.rounds)
        replay = saved.load(key_digest) if paid else None
        if replay is not None:
            arrays, sent = replay
            # A pending line whose update goes out now is settled at its charge: adopt() must never
            # train that request again under the same charge once this update has left.
            sp.settle_sent(key_digest)
            log.info("site %d: round %d of run %s asked again with the same model and settings: sending the "
                     "update already trained and paid for (epsilon stays %.4f)", site.partition_id, server_round,
                     run_name, spent)
            metrics = {**sent, R.EPSILON: spent, R.REPLAYED: 1.0, R.TRAIN_SECONDS: 0.0, R.TRAIN_CPU_SECONDS: 0.0}
            return RoundResult(status="ok", metrics=metrics, arrays=_with_fault(arrays, fault, global_arrays),
                               request=key_digest)
        line = {"run": str(run_id), "family": cfg.task.family, "round": server_round, "request": key_digest}
        return _train_private(cfg, task, data, optimizers, loader, plan=plan, sp=sp, entry=entry, metrics=metrics,
                              fault=fault, global_arrays=global_arrays, line=line, proximal_mu=proximal_mu,
                              saved=saved, adopted=sp.adopt(plan, key_digest) if paid else None)


def _train_private(cfg: AppConfig, task, data, optimizers, loader, *, plan, sp: SitePrivacy, entry, metrics: dict,
                   fault: str | None, global_arrays: ArrayRecord, line: dict, proximal_mu: float,
                   saved: SavedReply | None = None, adopted=None) -> RoundResult:
    """Charge ahead (or take over a dead process's charge), train with DP-SGD, confirm the charge."""
    diag = cfg.privacy.diagnostics == "noised"
    extra = (diagnostics.charge(cfg.privacy.diagnostics_noise, plan.sample_rate),) if diag else ()
    check_private_modules(task, cfg.privacy.grad_sample_mode)  # a model Opacus would get wrong: before the charge
    try:  # charged ahead, before any record is read
        reservation = adopted or sp.reserve(plan, plan.steps_per_round, line=line, extra=extra)
    except BudgetExceeded as err:
        log.warning("site %d: %s", sp.site.partition_id, err)
        metrics.update({R.EPSILON: err.spent, R.BUDGET_EXHAUSTED: 1.0, R.WEIGHT: 0.0})
        return RoundResult(status="budget-exhausted", metrics=metrics, reason=str(err))
    except PolicyRefusal as err:  # a rule on the plan (the noise a calibration picked, the round's epsilon)
        log.warning("site %d: %s", sp.site.partition_id, err)
        metrics.update({R.EPSILON: sp.spent(plan), R.WEIGHT: 0.0})
        return RoundResult(status=R.REFUSED_BY_POLICY, metrics=metrics, reason=str(err))
    dp = make_private(task, optimizers, loader, plan=plan, history=entry.history,
                      grad_sample_mode=cfg.privacy.grad_sample_mode)
    result, wall, cpu = _train(task, dp.loader, optimizers, plan.steps_per_round, proximal_mu, check_loss=False)
    arrays = R.to_arrayrecord(task.modules)
    # Whether the site fails may depend only on the DP output, never on the exact loss: a server
    # that picks the weights could make the loss overflow exactly when a record is there (and a
    # failure reply says so). The update is checked instead; the charge stays (pending) on failure.
    bad = [name for name, arr in arrays.items() if not np.isfinite(arr.numpy()).all()]
    if bad:
        raise FloatingPointError(f"the DP update has non-finite values in {bad[:3]}; lower train.lr")
    metrics.update({R.STEPS: float(plan.steps_per_round), R.REPLAYED: 0.0, R.TRAIN_SECONDS: wall,
                    R.TRAIN_CPU_SECONDS: cpu, R.EPSILON: reservation.would})
    if diag:  # the one loss a DP site may send: noised and charged (client/diagnostics.py)
        metrics[R.TRAIN_LOSS] = diagnostics.noised_mean_loss(task, data, plan.sample_rate, cfg.privacy.diagnostics_noise,
                                                             cfg.privacy.diagnostics_loss_bound)
    if saved is not None:
        saved.save(line["request"], arrays, metrics)  # before the charge is confirmed: see SavedReply
    metrics[R.EPSILON] = sp.confirm(reservation, dp.charged)
    return RoundResult(status="ok", metrics=metrics, arrays=_with_fault(arrays, fault, global_arrays),
                       request=line.get("request", ""))


def _train(task, loader, optimizers, steps: int, proximal_mu: float, *, check_loss: bool = True):
    """The local loop (with FedProx's term when asked); (result, wall seconds, CPU seconds).
    ``check_loss``: fail on a non-finite mean loss (without DP only: under DP the exact loss must
    decide nothing the server learns)."""
    hooks = add_proximal_term(optimizers, task.modules, proximal_mu) if proximal_mu > 0 else []
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(task, loader, optimizers, steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for h in hooks:
        h.remove()
    if check_loss and not math.isfinite(result.mean_loss):
        raise FloatingPointError(f"local training diverged (loss {result.mean_loss}); lower train.lr")
    return result, wall, cpu


def _with_fault(arrays: ArrayRecord, fault: str | None, global_arrays: ArrayRecord) -> ArrayRecord:
    return arrays if fault is None else faults.corrupt(arrays, fault, global_arrays)


def evaluate_round(cfg: AppConfig, site: SiteConfig, global_arrays: ArrayRecord) -> dict[str, Any]:
    """Score the global model on this site's data: exact figures, so only without DP.

    fedgen's server never asks for it (it evaluates on held-out data); a site under DP
    refuses, since the exact loss and count on its records would escape the accounting.
    """
    if cfg.privacy.enabled:
        raise PermissionError("this site trains with DP: it does not release exact evaluation metrics on its "
                              "records (the server evaluates on its own held-out data)")
    path = ledger_path(cfg, site)
    record = {"round": 0, "kind": "evaluate", "config": config_digest(cfg), "model": arrays_digest(global_arrays)}
    try:
        refusal = _gate(cfg, site, load_policy(site.policy_path), path, "", "evaluate") if site.policy_path else None
    except Exception as err:
        record_request(path, {**record, "decision": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
        raise
    if refusal is not None:  # evaluate replies carry metrics only: the refusal is the error reply
        record_request(path, {**record, "decision": refusal.status, "reason": refusal.reason})
        raise PermissionError(refusal.reason)
    data, spec = site_dataset(cfg, site)
    task = build_task(cfg, spec, pick_device(cfg.run.device))
    R.load_arrayrecord(task.modules, global_arrays)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.eval.batch_size)
    metrics = task.evaluate(loader)
    metrics[R.NUM_EXAMPLES] = float(len(data))
    record_request(path, {**record, "decision": "ok", "reason": ""})
    return metrics
