"""One federated job on the server: run folder, store, strategy, rounds, final model (``server.run_model``)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from common import privacy
from common.config import AppConfig, ConfigError
from server.canaries import CanaryClients
from server.central_dp import UserLevelDP
from server.checkpoints import Checkpointer, config_differences, restore_strategy_state
from server.evaluation import Evaluator
from server.round_records import RoundRecorder, known_epsilons
from server.trackers import LiveTrackers
from server.rounds import Outcome, run_rounds
from server.run_model import FINAL_MODEL, save_model
from server.runs_index import resolve_run
from server.store import RunStore, StoreError
from server.strategy import build_strategy

log = logging.getLogger(__name__)


def new_run_id(cfg: AppConfig, flwr_run_id: int | str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.run.name or ("audit" if cfg.audit.user_canaries else "")
    prefix = f"{name}-" if name else ""
    return f"{prefix}{stamp}-{flwr_run_id}"


def canary_clients(cfg: AppConfig, initial) -> CanaryClients:
    a = cfg.audit
    seed = a.user_seed or a.seed or int(np.random.SeedSequence().entropy % (2**63))  # secret unless fixed
    return CanaryClients(initial, a.user_canaries, a.canary_norm or cfg.central_dp.clipping_norm, seed)


def _resume_target(runs_dir: Path, ref: str) -> Path:
    try:
        return resolve_run(runs_dir, ref)
    except StoreError as err:
        raise ConfigError([f"run.resume = {ref!r}: {err}"]) from None


def run_job(grid: Grid, cfg: AppConfig, flwr_run_id: int | str) -> Outcome:
    # Flower samples sites with Python's random. Under user-level DP the sample must be secret
    # (the accountant's amplification assumes it): fresh entropy, not run.seed.
    random.seed(privacy.noise_seed(cfg.run.seed) if cfg.central_dp.enabled else cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    runs_dir = Path(cfg.run.runs_dir).resolve()
    strategy = build_strategy(cfg)
    start_round, arrays, known_epsilon = 1, None, None
    if cfg.run.resume:
        run_dir = _resume_target(runs_dir, cfg.run.resume)
        checkpointer = Checkpointer(run_dir, cfg.run.keep_checkpoints)
        ckpt = checkpointer.latest()
        if ckpt is None:
            raise ConfigError([f"run.resume = {cfg.run.resume!r}: {run_dir} has no usable checkpoint"])
        diffs = config_differences(ckpt.config, cfg.to_flat())
        if diffs and not cfg.run.resume_force:
            raise ConfigError([f"the config differs from the checkpoint's ({ckpt.path.name}); "
                               "use the same settings or set run.resume-force = true:", *diffs])
        restore_strategy_state(strategy, ckpt.strategy)
        start_round, arrays = ckpt.round + 1, ckpt.arrays
        store = RunStore.open(run_dir, readonly=False)
        recorded = store.rounds()
        known_epsilon = known_epsilons(recorded)
        if isinstance(strategy, UserLevelDP):
            # Rounds released after the checkpoint (recorded, their model evaluated) were spent
            # even though the resumed run trains them again: they stay in the user-level history.
            for rec in recorded:
                if rec["round"] > ckpt.round and rec.get("user_dp"):
                    strategy.charge(rec["user_dp"]["sample-rate"])
                    log.info("round %d was released after the checkpoint: its user-level charge is kept",
                             rec["round"])
        store.set_status("running", f"resumed from round {ckpt.round} by flwr run {flwr_run_id}")
        log.info("resuming run %s from %s (round %d done)%s", run_dir.name, ckpt.path.name, ckpt.round,
                 f"; config differs (forced): {diffs}" if diffs else "")
    else:
        run_id = new_run_id(cfg, flwr_run_id)
        store = RunStore.create(runs_dir, run_id, config=cfg.to_flat(), model=cfg.task.family,
                                strategy=cfg.strategy.name, num_rounds=cfg.run.num_rounds)
        run_dir = store.run_dir
        checkpointer = Checkpointer(run_dir, cfg.run.keep_checkpoints)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flat(), indent=1, sort_keys=True))
    log.info("run %s: %s on %s, %d rounds, strategy %s, DP %s; records in %s", run_dir.name, cfg.task.family,
             cfg.data.dataset, cfg.run.num_rounds, cfg.strategy.name,
             f"on (target epsilon {cfg.privacy.target_epsilon:g})" if cfg.privacy.enabled else "OFF", run_dir)
    try:
        evaluator = Evaluator(cfg)
        canaries = None
        if cfg.audit.user_canaries:
            arrays = evaluator.initial_arrays()
            canaries = canary_clients(cfg, arrays)

        def checkpoint(rnd: int, arrs) -> None:
            checkpointer.save(rnd, arrs, strategy, cfg, evaluator.spec)

        live = None
        if cfg.run.tensorboard_dir or cfg.run.mlflow_uri:  # the trackers ML engineers use (server/trackers.py)
            live = LiveTrackers(run_dir, cfg.to_flat(), cfg.run.tensorboard_dir, cfg.run.mlflow_uri,
                                cfg.run.mlflow_experiment, start_round=start_round)
        ended = "failed"
        try:
            outcome = run_rounds(grid, cfg, strategy, evaluator,
                                 RoundRecorder(run_dir, store, cfg.run.num_rounds, also=live), run_dir,
                                 arrays=arrays, start_round=start_round, on_round_end=None if canaries else checkpoint,
                                 canaries=canaries, known_epsilon=known_epsilon)
            ended = outcome.status
        finally:
            if live is not None:
                live.close(ended)
        if canaries is None:
            save_model(run_dir / FINAL_MODEL, outcome.arrays.to_torch_state_dict(), cfg, evaluator.spec)
        elif outcome.rounds_done:
            # The canaries are in this model: it is audited and dropped, never saved for use.
            claimed = strategy.epsilon() if isinstance(strategy, UserLevelDP) else math.inf
            result = canaries.estimate(arrays, outcome.arrays, cfg.central_dp.delta, claimed)
            store.record_audit(result.as_dict())
        store.set_status(outcome.status, outcome.reason or None)
    except BaseException as err:
        store.set_status("failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        store.close()
    log.info("run %s %s after %d round(s)%s; %s", run_dir.name, outcome.status, outcome.rounds_done,
             f" ({outcome.reason})" if outcome.reason else "",
             "an audit run: no model saved" if cfg.audit.user_canaries else f"final model: {run_dir / FINAL_MODEL}")
    return outcome
