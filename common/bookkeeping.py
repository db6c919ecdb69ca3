"""Per-example clipping in one backward pass ("book-keeping", ``privacy.grad-sample-mode = "bk"``).

Opacus' ghost clipping needs two backward passes: one for each example's gradient norm,
one more of the re-weighted losses ``sum_i c_i * loss_i`` for the clipped sum. The clipped
sum can instead be built from what the first pass already has (Bu et al. 2023, "Differentially
private optimization on large model at small cost"): for a layer ``y = f(x; W)`` the
gradient of example ``i`` is a function of its input ``x_i`` and of the gradient ``g_i`` of the
loss with respect to its output, and for the layers below that function is linear in ``g_i``,
so ``sum_i c_i grad_i(W) = grad(W)`` evaluated at the backprops ``c_i g_i``:

* ``nn.Linear``: ``sum_i c_i g_i^T x_i`` is one matrix product; the norms come from the
  Gram matrices of ``g_i`` and ``x_i`` over positions (ghost norms) or from the per-example
  product, whichever is cheaper for the layer's shape.
* ``nn.Embedding``: the clipped sum is one ``index_add``; an example's squared norm is
  ``sum_{s,t} [id_s = id_t] <g_s, g_t>`` (rows that share an id add up before the norm).
* every other layer Opacus has a grad sampler for (``Conv2d``, ``LayerNorm``, ``GroupNorm``):
  its per-example gradients are built (Opacus' samplers, so exactly hooks mode's), normed and
  summed with the weights ``c_i``.

The one backward pass asks autograd only for the gradients with respect to each layer's
*output* (``torch.autograd.grad(sum_i loss_i, outputs)``), so autograd never computes the
unclipped weight gradients at all. What reaches ``.grad`` is exactly
``sum_i min(1, C / ||grad_i||) grad_i``, the same as Opacus' ghost clipping (contract tests
compare every mode with hooks mode); the optimizer (Opacus' ghost optimizer) then only adds
the noise and divides by the expected batch size, and the accountant is charged per step as
in every mode.

Refused, with an error, because the per-example norm would be wrong: a parameter held by a
layer type this module does not know, a parameter that is not directly held by a leaf module,
a parameter shared by two layers, and a layer that runs twice in one step.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

# Layers whose clipped sum is computed directly from (input, backprop) without per-example gradients.
_DIRECT = (nn.Linear, nn.Embedding)
# Layers of one tensor input and one tensor output whose per-example gradients Opacus' samplers build.
_SAMPLED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
            nn.InstanceNorm3d, nn.RMSNorm)


class Bookkeeper:
    """Forward hooks on every trainable leaf layer of ``module``, and :meth:`backward`."""

    def __init__(self, module: nn.Module, max_grad_norm: float, enabled=lambda: True) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self.enabled = enabled
        self.layers: list[nn.Module] = []
        owner: dict[int, str] = {}
        for name, layer in module.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if next(layer.children(), None) is not None:
                raise ValueError(f"grad-sample-mode bk: {name or 'the model'} ({type(layer).__name__}) holds "
                                 "parameters directly and has sub-layers; use hooks or ghost")
            kind = type(layer)
            if not (kind in _DIRECT or (kind in _SAMPLED and kind in GradSampleModule.GRAD_SAMPLERS)):
                raise ValueError(f"grad-sample-mode bk: no per-example gradient for {name} "
                                 f"({type(layer).__name__}); use hooks, ew or ghost")
            for p in own:
                if id(p) in owner:
                    raise ValueError(f"grad-sample-mode bk: parameter shared by {owner[id(p)]} and {name} "
                                     "(tied weights); use hooks")
                owner[id(p)] = name
            self.layers.append(layer)
        self._names = {id(layer): name for name, layer in module.named_modules()}
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.enabled() or not torch.is_grad_enabled() or not output.requires_grad:
            return
        self._records.append((layer, inputs[0].detach(), output))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = []

    def backward(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Leave ``sum_i min(1, C / ||grad_i||) grad_i`` in every parameter's ``.grad``; return the norms."""
        records, self._records = self._records, []
        seen: set[int] = set()
        for layer, _, _ in records:
            if id(layer) in seen:
                raise ValueError(f"grad-sample-mode bk: layer {self._names.get(id(layer))} ran twice in one "
                                 "step, so its per-example gradient is a sum over calls; use hooks")
            seen.add(id(layer))
        n = len(per_example_loss)
        backprops = torch.autograd.grad(per_example_loss.sum(), [out for _, _, out in records], allow_unused=True)

        sq = torch.zeros(n, dtype=torch.float64, device=per_example_loss.device)
        pending = []  # (layer, activation, backprop, per-example grads or None)
        for (layer, act, out), g in zip(records, backprops):
            if g is None:
                g = torch.zeros_like(out)  # the layer's output did not reach the loss
            if len(act) != n or len(g) != n:  # rows must be examples, or norms would mix them
                raise ValueError(f"grad-sample-mode bk: layer {self._names.get(id(layer))} saw a batch of "
                                 f"{len(act)} rows for {n} per-example losses; use hooks")
            if isinstance(layer, nn.Linear):
                sq += _linear_sq_norms(layer, act, g)
                pending.append((layer, act, g, None))
            elif isinstance(layer, nn.Embedding):
                sq += _embedding_sq_norms(layer, act, g)
                pending.append((layer, act, g, None))
            else:
                samples = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [act], g)
                for p, gs in samples.items():
                    if p.requires_grad:
                        sq += torch.linalg.vector_norm(gs.reshape(n, -1), dim=1).to(torch.float64) ** 2
                pending.append((layer, act, g, samples))
        norms = sq.sqrt().to(per_example_loss.dtype)
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' ghost clipping factor

        done: set[int] = set()
        for layer, act, g, samples in pending:
            if isinstance(layer, nn.Linear):
                o, i = layer.out_features, layer.in_features
                g3, a3 = g.reshape(n, -1, o), act.reshape(n, -1, i).to(g.dtype)
                if layer.weight.requires_grad:  # re-weight whichever side is smaller, then one product
                    c = coef.view(n, 1, 1)
                    left, right = (g3, a3 * c) if i < o else (g3 * c, a3)
                    layer.weight.grad = left.reshape(-1, o).t() @ right.reshape(-1, i)
                if layer.bias is not None and layer.bias.requires_grad:
                    layer.bias.grad = coef @ g3.sum(1)
            elif isinstance(layer, nn.Embedding):
                d = layer.embedding_dim
                gc = g.reshape(n, -1, d) * coef.view(n, 1, 1)
                grad = torch.zeros_like(layer.weight)
                grad.index_add_(0, act.reshape(-1), gc.reshape(-1, d))
                if layer.padding_idx is not None:
                    grad[layer.padding_idx] = 0  # as nn.Embedding's own backward
                layer.weight.grad = grad
            else:
                for p, gs in samples.items():
                    if p.requires_grad:
                        p.grad = torch.einsum("n,n...->...", coef.to(gs.dtype), gs)
            done.update(id(p) for p in layer.parameters(recurse=False))
        for layer in self.layers:  # a layer that did not run this step: its clipped sum is zero
            for p in layer.parameters(recurse=False):
                if p.requires_grad and id(p) not in done:
                    p.grad = torch.zeros_like(p)
        return norms


def _linear_sq_norms(layer: nn.Linear, act: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's squared gradient norm for a Linear layer (weight and bias), in float64."""
    n, o, i = len(g), layer.out_features, layer.in_features
    a3, g3 = act.reshape(n, -1, i).to(g.dtype), g.reshape(n, -1, o)
    t = a3.shape[1]
    sq = torch.zeros(n, dtype=torch.float64, device=g.device)
    if layer.weight.requires_grad:
        if t == 1:
            w = g3.pow(2).sum((1, 2)) * a3.pow(2).sum((1, 2))
        elif t * (i + o) < i * o:  # ghost norm: <g g^T, a a^T> over positions, cheaper than the product
            w = (torch.bmm(g3, g3.transpose(1, 2)) * torch.bmm(a3, a3.transpose(1, 2))).sum((1, 2)).clamp(min=0)
        else:
            w = torch.bmm(g3.transpose(1, 2), a3).pow(2).sum((1, 2))
        sq += w.to(torch.float64)
    if layer.bias is not None and layer.bias.requires_grad:
        sq += g3.sum(1).pow(2).sum(1).to(torch.float64)
    return sq


def _embedding_sq_norms(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's squared gradient norm for an Embedding: positions with the same id share a row."""
    n, d = len(g), layer.embedding_dim
    ids2, g3 = ids.reshape(n, -1), g.reshape(n, -1, d)
    same = ids2.unsqueeze(2) == ids2.unsqueeze(1)
    if layer.padding_idx is not None:  # the padding row gets no gradient
        keep = ids2 != layer.padding_idx
        same &= keep.unsqueeze(2) & keep.unsqueeze(1)
    gram = torch.bmm(g3, g3.transpose(1, 2))
    return (gram * same).sum((1, 2)).clamp(min=0).to(torch.float64)
