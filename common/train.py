"""The one local training loop, shared by every model family.

The loop knows nothing about the model: it draws batches, hands each to the task's
``train_step`` and stops after exactly the planned number of steps (the privacy plan
counts on that number). FedProx's proximal term is applied here, as a gradient term
added right before the inner optimizer's update: after Opacus has clipped and noised
the data gradient, so it is data-independent post-processing and costs no privacy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from common.dp_step import unwrap
from common.tasks import GenerativeTask

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps: int
    examples: int
    mean_loss: float


def add_proximal_term(
    optimizers: dict[str, torch.optim.Optimizer], modules: dict[str, nn.Module], mu: float
) -> list[torch.utils.hooks.RemovableHandle]:
    """FedProx: before every update, grad += mu * (w - w_global) for every trained module.

    ``w_global`` is the module's weights when this is called (the global model). The
    hook sits on the inner optimizer (under Opacus' DPOptimizer when DP is on) so it
    sees the final, privatised gradient.
    """
    handles = []
    for name, opt in optimizers.items():
        params = [p for p in unwrap(modules[name]).parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params]

        def hook(_opt, _args, _kwargs, params=params, anchors=anchors) -> None:
            with torch.no_grad():
                for p, a in zip(params, anchors):
                    if p.grad is not None:
                        p.grad.add_(p - a, alpha=mu)

        inner = getattr(opt, "original_optimizer", opt)
        handles.append(inner.register_step_pre_hook(hook))
    return handles


def train_local(
    task: GenerativeTask,
    loader: torch.utils.data.DataLoader,
    optimizers: dict[str, torch.optim.Optimizer],
    steps: int,
) -> LoopResult:
    """Run exactly ``steps`` calls of ``task.train_step`` over (repeated) passes of ``loader``."""
    for m in task.modules.values():
        m.train()
    done = examples = 0
    loss_sum = 0.0
    while done < steps:
        drew = False
        for batch in loader:
            drew = True
            metrics = task.train_step(batch, optimizers)
            n = int(metrics.get("batch-size", len(batch[0])))
            loss_sum += metrics["train-loss"] * n
            examples += n
            done += 1
            if done == steps:
                break
        if not drew:
            raise ValueError("the site's data loader is empty: no training data at this site")
    mean = loss_sum / examples if examples else float("nan")
    log.debug("local training: %d steps, %d examples, loss %.4f", done, examples, mean)
    return LoopResult(steps=done, examples=examples, mean_loss=mean)
