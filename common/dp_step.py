"""How one private step runs under Opacus, whatever the model family.

A family's ``train_step`` reaches its modules through these helpers so that the step is right
in every ``privacy.grad-sample-mode``: :func:`unwrap` (the plain module under Opacus' wrapper),
:func:`is_ghost` (is it a ghost-clipping wrapper), :func:`backward_mean` (the backward pass of a
batch of per-example losses, as the mode needs it) and :func:`empty_batch_grads` (an empty
Poisson batch still takes a noised step). The wrapping itself is ``client.dp``'s.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under an Opacus ``GradSampleModule`` wrapper (or itself)."""
    return getattr(module, "_module", module)


def is_ghost(module: nn.Module) -> bool:
    """True for an Opacus ghost-clipping wrapper (``privacy.grad-sample-mode`` ``ghost``, or ``bk``,
    which reuses the wrapper and its optimizer)."""
    return hasattr(module, "get_clipping_coef")


def backward_mean(module: nn.Module, optimizer: torch.optim.Optimizer, per_example_loss: torch.Tensor) -> None:
    """Backward pass of ``per_example_loss.mean()``, done the way the module's DP mode needs it.

    Every private step goes through here. For the plain module and Opacus' hooks, ew and
    functorch modes this is ``per_example_loss.mean().backward()``. Under ghost clipping
    Opacus never materialises the per-sample gradients: a first backward gives each
    example's gradient norm (from activations and backprops), a second backward of
    ``sum_i c_i * loss_i`` (``c_i = min(1, C / norm_i)``) leaves the sum of clipped
    per-example gradients in ``.grad``; the optimizer then only adds noise and divides by
    the expected batch size. That needs one loss per example, hence this signature. Under
    ``bk`` (common/bookkeeping.py) one backward pass gives both the norms and the clipped sum.
    """
    if per_example_loss.dim() != 1:
        raise ValueError(f"one loss per example expected, got shape {tuple(per_example_loss.shape)}")
    if not is_ghost(module):
        per_example_loss.mean().backward()
        return
    bookkeeper = getattr(module, "_fedgen_bookkeeper", None)
    if bookkeeper is not None:  # privacy.grad-sample-mode = "bk": the clipped sum in one pass
        module.per_sample_gradient_norms = bookkeeper.backward(per_example_loss)
        return
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    DPTensorFastGradientClipping(module, optimizer, per_example_loss, loss_reduction="mean").backward()


def empty_batch_grads(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero gradients for an empty Poisson batch (rare), so the DP step still runs and adds noise.

    Opacus' ew and functorch modes cannot run a forward pass on 0 examples, so the task skips
    it and calls this instead: zero per-sample gradients (hooks, ew, functorch) or a zero
    clipped sum in ``.grad`` (ghost). A non-private optimizer gets nothing (no step taken).
    """
    if not hasattr(optimizer, "original_optimizer"):
        return
    for p in optimizer.params:
        if is_ghost(module):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    if is_ghost(module):
        module.per_sample_gradient_norms = torch.zeros(0)  # no examples: nothing to clip (client.dp checks)
