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


def freeze_except(task: GenerativeTask, prefixes: tuple[str, ...]) -> list[str]:
    """Train only the parameters whose name ``<module>.<parameter path>`` (e.g. ``lm.blocks.1.mlp.0.weight``)
    starts with one of ``prefixes`` (``train.trainable``; empty: train everything). The others
    get ``requires_grad = False``: their gradient is never computed, clipped or noised (Opacus
    skips them), and they leave the round at the global model's values. The trained names, sorted.

    Privacy does not depend on the choice: DP-SGD's guarantee is per step, for the clipped
    gradient of whatever parameters are trained (the noise is calibrated to the clipping
    bound, not to the number of coordinates), so the plan and the ledger's charge are the
    same; fewer coordinates only mean less noise in total. A prefix that names no parameter is
    refused (ValueError listing the module's top-level names): a typo must not train nothing."""
    named = _named_parameters(task)
    trained = check_trainable(task, prefixes)
    if prefixes:
        for name, p in named.items():
            p.requires_grad_(name in trained)
    return trained


def _named_parameters(task: GenerativeTask) -> dict[str, nn.Parameter]:
    return {f"{m}.{n}": p for m, module in task.modules.items() for n, p in unwrap(module).named_parameters()}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def check_trainable(task: GenerativeTask, prefixes: tuple[str, ...]) -> list[str]:
    """The parameter names ``prefixes`` select (all when empty), sorted; ValueError for a prefix
    that selects nothing. Changes nothing (the server checks the config with it before round 1)."""
    named = _named_parameters(task)
    unknown = [pre for pre in prefixes if not any(_matches(name, pre) for name in named)]
    if unknown:
        tops = sorted({".".join(name.split(".")[:2]) for name in named})
        raise ValueError(f"train.trainable = {','.join(prefixes)!r}: {unknown} match no parameter of the "
                         f"{task.family} model; its parameter names start with {tops}")
    trained = sorted(name for name in named if not prefixes or any(_matches(name, pre) for pre in prefixes))
    idle = [m for m in task.private_modules if not any(name.startswith(f"{m}.") for name in trained)]
    if idle:  # DP-SGD would clip and noise nothing: Opacus fails in the backward pass, after the charge
        raise ValueError(f"train.trainable = {','.join(prefixes)!r} trains nothing of the private module(s) {idle} "
                         f"(the ones DP-SGD trains at the sites); add a prefix under {idle[0]}.")
    return trained


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
