"""Pretraining on public data, without privacy: the start a federation fine-tunes privately.

The federation's sites train with DP-SGD from whatever model the server sends in round 1.
Starting from a model already trained on *public* data (``data.public-plays``: whole
Shakespeare plays that no site holds and the server never scores, ``common.data.site.
public_dataset``) costs no privacy (no site's record is read) and leaves the private rounds
only the adaptation to the sites' text: far fewer noisy steps for the same quality (Li et al.
2022; Yu et al. 2022). :func:`pretrain` runs the same model-agnostic local loop as a site
(``common.train.train_local``), without Opacus, at the server side, and writes a fedgen model
file (``server.run_model.save_model``: weights, resolved config, data shape, tokenizer): the
run config's ``task.init-from`` names it, and the server checks it fits before round 1.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from common import records as R
from common.config import AppConfig, parse_run_config
from common.data.site import eval_dataset, public_dataset
from common.tasks import build_task, pick_device
from common.train import train_local
from server.init_model import pretraining_provenance
from server.run_model import save_model

log = logging.getLogger(__name__)


def pretrain(cfg: AppConfig, steps: int, out: Path) -> dict[str, float]:
    """Train ``steps`` batches of ``train.batch-size`` public windows at ``train.lr`` from fresh
    weights (``run.seed``), score the result on the server's held-out text, write it to ``out``;
    its metrics (held-out ones, and the CPU seconds)."""
    if steps < 1:
        raise ValueError(f"pretraining needs at least 1 step, got {steps}")
    device = pick_device(cfg.run.device)
    data, spec = public_dataset(cfg)
    task = build_task(cfg, spec, device)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))
    log.info("pretraining the %s model on %d public windows (%d plays): %d steps of %d", cfg.task.family,
             len(data), cfg.data.public_plays, steps, cfg.train.batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(task, loader, task.make_optimizers(), steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    held_out, _ = eval_dataset(cfg)
    metrics = task.evaluate(torch.utils.data.DataLoader(held_out, batch_size=cfg.eval.batch_size))
    metrics.update({"pretrain-steps": float(result.steps), "pretrain-loss": result.mean_loss,
                    "pretrain-seconds": wall, "pretrain-cpu-seconds": cpu, "public-windows": float(len(data))})
    state = R.state_dict_of(task.modules)
    bad = R.non_finite(state)
    if bad:
        raise FloatingPointError(f"pretraining diverged: {bad[:3]} are not finite; lower --lr")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved as what it is: trained without DP, on these public plays (server.init_model checks
    # both before a run may start from it).
    saved_cfg = parse_run_config({**cfg.to_flat(), "privacy.enabled": False, "central-dp.enabled": False})
    save_model(out, state, saved_cfg, spec, extra=pretraining_provenance(cfg))
    log.info("pretrained model written to %s: %s", out, {k: round(v, 4) for k, v in metrics.items()})
    return metrics
