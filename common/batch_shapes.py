"""Convolutions on a few batch sizes only, so that a long-lived site process stops growing.

torch's CPU convolutions (oneDNN) build a kernel for each layer, direction and input shape,
and keep it in a cache of up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` kernels (1024). DP-SGD's
Poisson sampling gives every step a batch size of its own, so a warm site worker built new
kernels for hundreds of rounds: about 21 kernels and 0.56 MB for every new batch size of the
digits VAE (docs/RESULTS.md, "The warm workers' memory, found"). :func:`pad_conv_batches`
makes each convolution of a module run on its batch rounded up to a multiple of
:data:`BATCH_MULTIPLE`: zero rows are appended before the convolution and its output is cut
back to the real rows. A Poisson batch of mean 32 then meets 6-7 shapes instead of 40.

Why no gradient, clipping bound or privacy guarantee changes:

* A convolution computes each output row from its own input row only (the batch dimension is
  never mixed; groups and channels are within a row). The real rows' outputs are those of the
  unpadded convolution, up to the floating-point rounding of a different kernel.
* The padding exists only inside the layer's ``forward``. Module hooks run in ``__call__``,
  around ``forward``: the input and output that Opacus' per-sample gradient hooks (hooks and
  ghost modes) and ``common.bookkeeping``'s hooks (bk) record are the real rows only. Every
  per-example gradient, its norm, the clipping and the clipped sum are computed from them, so
  they are those of the real examples, and the noise (calibrated to the clipping bound and
  the expected batch size) is untouched.
* The zero rows receive a zero output gradient (the backward of the cut), so they add exactly
  zero to autograd's own weight and bias gradients (which ghost mode's second pass puts in
  ``.grad``) and nothing to any real row's input gradient.

Not for Opacus' ``ew`` and ``functorch`` modes: they run the layer itself on expanded weights
or under ``vmap`` to get per-sample gradients, where a padded batch would fail (``ew``: the
expanded weights' batch size must match the input's) or be wasted work (``functorch``).
``client.dp.make_private`` pads only in the other modes; :data:`PADDED_MODES` names them.
"""

from __future__ import annotations

import types

import torch
from torch import nn

BATCH_MULTIPLE = 8  # the rows a padded batch is a multiple of: 8 costs 1-3% of a DP step (RESULTS)
PADDED_MODES = ("hooks", "ghost", "bk")  # Opacus grad-sample modes whose hooks see only the real rows
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def pad_conv_batches(module: nn.Module, multiple: int = BATCH_MULTIPLE) -> int:
    """Make every convolution inside ``module`` run on batches padded to ``multiple`` rows.

    Sets an instance ``forward`` on each convolution (the class's own, on the padded batch);
    calling it again on the same module changes nothing. Returns how many layers were padded."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    padded = 0
    for layer in module.modules():
        if isinstance(layer, _CONVS) and "forward" not in vars(layer):
            layer.forward = types.MethodType(_padded_forward, layer)
            layer.fedgen_batch_multiple = multiple
            padded += 1
    return padded


def padded_rows(rows: int, multiple: int = BATCH_MULTIPLE) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return -(-rows // multiple) * multiple


def _padded_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The class's ``forward`` on ``x`` with zero rows appended; the output's real rows.

    An unbatched input (one example without a batch dimension, which a convolution accepts)
    and a batch that is already a multiple run as they are."""
    forward = type(self).forward
    batched = x.dim() == self.weight.dim()
    rows = len(x) if batched else 0
    target = padded_rows(rows, self.fedgen_batch_multiple)
    if target == rows:
        return forward(self, x, *args, **kwargs)
    zeros = x.new_zeros((target - rows, *x.shape[1:]))
    return forward(self, torch.cat([x, zeros]), *args, **kwargs)[:rows]
