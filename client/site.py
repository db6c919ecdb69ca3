"""One site's work in a round: load its data, train the global model privately, report.

Plain domain code: no Flower Messages here (``client/app.py`` turns Messages into
calls of :func:`train_round` / :func:`evaluate_round`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client import faults
from client.dp import Ledger, LedgerEntry, make_private
from common import atomic
from common import privacy
from common import records as R
from common.config import RESUME_ONLY_RUN_FIELDS, AppConfig, SiteConfig, site_budget
from common.data.site import site_dataset
from common.tasks import build_task, pick_device
from common.train import add_proximal_term, train_local

log = logging.getLogger(__name__)

STATE_KEY = "fedgen-privacy"


@dataclass
class RoundResult:
    status: str  # "ok" | "budget-exhausted"
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    reason: str = ""


def dataset_key(cfg: AppConfig, site: SiteConfig) -> str:
    """Identity of the records this site spends privacy on (independent of the model)."""
    d = cfg.data
    if site.data_path:
        return f"{d.dataset}|{site.data_path}"
    key = (f"{d.dataset}|{d.path or 'default'}|{d.partitioner}|alpha={d.dirichlet_alpha}|seed={cfg.run.seed}"
           f"|partition={site.partition_id}/{d.num_partitions or site.num_partitions}")
    if d.dataset == "shakespeare":  # these settings decide which roles a partition holds
        key += f"|heldout={d.heldout_plays}|min-chars={d.min_chars}"
    return key


@functools.lru_cache(maxsize=64)
def _calibrated_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return privacy.calibrate_noise(target, delta, q, steps, accountant)


def make_plan(cfg: AppConfig, num_records: int) -> privacy.DPPlan:
    p = cfg.privacy
    q, steps = privacy.steps_per_round(num_records, cfg.train.batch_size, cfg.train.local_epochs, cfg.train.max_steps)
    delta = p.delta or privacy.auto_delta(num_records)
    privacy.check_delta(delta, num_records)
    noise = p.noise_multiplier or _calibrated_noise(p.target_epsilon, delta, q, steps * cfg.run.num_rounds, p.accountant)
    return privacy.DPPlan(noise, q, steps, delta, p.accountant, p.max_grad_norm)


def request_digest(cfg: AppConfig, site: SiteConfig, key: str, run_name: str, server_round: int,
                   proximal_mu: float, global_arrays: ArrayRecord) -> str:
    """What decides a round's training at this site: the run, the round, every setting, the records, the model.

    Not the site's own budget or ledger location: they decide whether the site may train,
    not what it computes, and an update already paid for may be sent again under any budget."""
    settings = cfg.model_dump()
    for name in RESUME_ONLY_RUN_FIELDS:
        settings["run"].pop(name, None)
    request = {"run": run_name, "round": server_round, "mu": proximal_mu, "key": key, "cfg": settings,
               "site": site.model_dump(exclude={"privacy_budget", "ledger_path"})}
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
    DP release and costs no privacy. The file is written before the ledger records the
    charge, and the ledger's line for the round names the request's digest: an update is
    sent again only if the ledger says it was paid for (a crash between the two writes
    leaves an unpaid file, which is never sent). An unreadable file is ignored (the site trains).
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


class PrivacyState:
    """The site's accountant history: the ledger file when configured, else Context.state (never both)."""

    def __init__(self, state: RecordDict, site: SiteConfig, key: str, ledger_dir: str = "") -> None:
        self.state, self.key = state, key
        path = site.ledger_path or (
            str(Path(ledger_dir) / f"partition-{site.partition_id}-of-{site.num_partitions}.json") if ledger_dir else ""
        )
        self.ledger = Ledger(path) if path else None

    def load(self) -> LedgerEntry:
        if self.ledger is not None:
            return self.ledger.load(self.key)
        rec = self.state.get(STATE_KEY)
        if rec is None or self.key not in rec:
            return LedgerEntry()
        raw = json.loads(rec[self.key])
        raw["history"] = [tuple(h) for h in raw["history"]]
        return LedgerEntry(**raw)

    def save(self, entry: LedgerEntry) -> None:
        if self.ledger is not None:
            # The ledger is the authority (load() never reads Context.state when there is
            # one); no copy in Context.state, which the simulation keeps in memory for every
            # node, idle or not: with 1,000 simulated sites the state of idle sites stays on disk.
            self.ledger.save(self.key, entry)
            return
        rec = self.state.get(STATE_KEY) or ConfigRecord()
        rec[self.key] = json.dumps({**entry.__dict__, "history": [list(h) for h in entry.history]})
        self.state[STATE_KEY] = rec


def train_round(
    cfg: AppConfig,
    site: SiteConfig,
    global_arrays: ArrayRecord,
    server_round: int,
    state: RecordDict,
    proximal_mu: float = 0.0,
    run_id: int | str = 0,
    run_name: str = "",
) -> RoundResult:
    """Train one round; with a ledger on disk and a ``run_name``, a round asked again with
    the same model and settings is answered with the saved update (:class:`SavedReply`).
    Every reply says how long the site took (``R.SITE_SECONDS``...)."""
    start = time.perf_counter()
    result = _train_round(cfg, site, global_arrays, server_round, state, proximal_mu, run_id, run_name)
    result.metrics[R.SITE_SECONDS] = time.perf_counter() - start
    return result


def _train_round(
    cfg: AppConfig,
    site: SiteConfig,
    global_arrays: ArrayRecord,
    server_round: int,
    state: RecordDict,
    proximal_mu: float,
    run_id: int | str,
    run_name: str,
) -> RoundResult:
    fault = faults.planned_fault(site.partition_id, server_round)
    if fault == "crash":
        raise RuntimeError(f"injected crash ({faults.ENV})")
    device = pick_device(cfg.run.device)
    data, spec = site_dataset(cfg, site)
    n = len(data)
    task = build_task(cfg, spec, device)
    R.load_arrayrecord(task.modules, global_arrays)
    optimizers = task.make_optimizers()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + server_round))
    metrics: dict[str, float] = {R.PARTITION: float(site.partition_id)}
    torch.manual_seed(cfg.run.seed * 1_000_003 + server_round * 101 + site.partition_id)

    saved: SavedReply | None = None
    digest = ""
    if cfg.privacy.enabled:
        plan = make_plan(cfg, n)
        budget = site_budget(cfg, site)
        pstate = PrivacyState(state, site, dataset_key(cfg, site), cfg.privacy.ledger_dir)
        entry = pstate.load()
        spent = privacy.epsilon(entry.history, plan.delta, plan.accountant)
        would = privacy.epsilon(privacy.compact([*entry.history, (plan.noise_multiplier, plan.sample_rate,
                                                                  plan.steps_per_round)]),
                                plan.delta, plan.accountant)
        metrics.update({R.EPSILON: spent, R.BUDGET: budget, R.DELTA: plan.delta, R.NOISE: plan.noise_multiplier,
                        R.SAMPLE_RATE: plan.sample_rate})
        if pstate.ledger is not None and run_name:
            saved = SavedReply(pstate.ledger.path, pstate.key)
            digest = request_digest(cfg, site, pstate.key, run_name, server_round, proximal_mu, global_arrays)
            paid = any(r.get("request") == digest for r in entry.rounds)
            replay = saved.load(digest) if paid else None
            if replay is not None:
                arrays, sent = replay
                log.info("site %d: round %d of run %s asked again with the same model and settings: sending the "
                         "update already trained and paid for (epsilon stays %.4f)", site.partition_id, server_round,
                         run_name, spent)
                metrics = {**sent, R.EPSILON: spent, R.REPLAYED: 1.0, R.TRAIN_SECONDS: 0.0,
                           R.TRAIN_CPU_SECONDS: 0.0}
                return RoundResult(status="ok", metrics=metrics, arrays=_with_fault(arrays, fault, global_arrays))
        if would > budget * (1 + 1e-9):
            reason = (f"budget-exhausted: this round would raise epsilon from {spent:.4f} to {would:.4f}, "
                      f"above the site's budget {budget:g} (delta {plan.delta:g}); nothing was trained or spent")
            log.warning("site %d: %s", site.partition_id, reason)
            metrics[R.BUDGET_EXHAUSTED] = 1.0
            metrics[R.NUM_EXAMPLES] = 0.0
            return RoundResult(status="budget-exhausted", metrics=metrics, reason=reason)
        dp = make_private(task, optimizers, loader, plan, entry.history, cfg.privacy.grad_sample_mode)
        loader = dp.loader
        steps = plan.steps_per_round
    else:
        dp = None
        q, steps = privacy.steps_per_round(n, cfg.train.batch_size, cfg.train.local_epochs, cfg.train.max_steps)

    hooks = add_proximal_term(optimizers, task.modules, proximal_mu) if proximal_mu > 0 else []
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(task, loader, optimizers, steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for h in hooks:
        h.remove()
    if not math.isfinite(result.mean_loss):
        raise FloatingPointError(f"local training diverged (loss {result.mean_loss}); lower train.lr")

    # REPLAYED in every reply: Flower aggregates metrics only when all replies have the same keys.
    metrics.update({R.NUM_EXAMPLES: float(n), R.TRAIN_LOSS: result.mean_loss, R.STEPS: float(result.steps),
                    R.REPLAYED: 0.0, R.TRAIN_SECONDS: wall, R.TRAIN_CPU_SECONDS: cpu})
    arrays = R.to_arrayrecord(task.modules)
    if dp is not None:
        history = privacy.compact(dp.history)
        eps = privacy.epsilon(history, plan.delta, plan.accountant)
        entry.history, entry.delta, entry.epsilon = history, plan.delta, eps
        entry.budget, entry.accountant = budget, plan.accountant
        metrics.update({R.EPSILON: eps, R.CLIP_FRACTION: dp.clip_fraction})
        line = {"run": str(run_id), "family": cfg.task.family, "round": server_round,
                "steps": result.steps, "noise": plan.noise_multiplier, "sample_rate": plan.sample_rate}
        if saved is not None:
            saved.save(digest, arrays, metrics)  # before the charge is recorded: see SavedReply
            line["request"] = digest
        entry.rounds.append(line)
        pstate.save(entry)
    return RoundResult(status="ok", metrics=metrics, arrays=_with_fault(arrays, fault, global_arrays))


def _with_fault(arrays: ArrayRecord, fault: str | None, global_arrays: ArrayRecord) -> ArrayRecord:
    return arrays if fault is None else faults.corrupt(arrays, fault, global_arrays)


def evaluate_round(cfg: AppConfig, site: SiteConfig, global_arrays: ArrayRecord) -> dict[str, Any]:
    """Score the global model on this site's data (not private: off unless the operator enables it)."""
    data, spec = site_dataset(cfg, site)
    task = build_task(cfg, spec, pick_device(cfg.run.device))
    R.load_arrayrecord(task.modules, global_arrays)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.eval.batch_size)
    metrics = task.evaluate(loader)
    metrics[R.NUM_EXAMPLES] = float(len(data))
    return metrics
