"""Convolutions on a few batch sizes only, so that a long-lived site process stops growing.

torch's CPU convolutions (oneDNN) build a kernel for each layer, direction and input shape,
and keep it in a cache of up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` kernels (1024). DP-SGD's
Poisson sampling gives every step a batch size of its own, so a warm site worker built new
kernels for hundreds of rounds: about 21 kernels and 0.56 MB for every new batch size of the
digits VAE (docs/RESULTS.md, "The warm workers' memory, found"). :func:`pad_conv_batches`
makes each convolution of a module run on its batch rounded up to a multiple of
:data:`BATCH_MULTIPLE`: zero rows are appended before the convolution and its output is cut
back to the real rows. A Poisson batch of mean 32 then meets 6-7 shapes instead of 40.
``client.dp.conv2d_grad_sample`` pads the one per-example gradient that is itself a
convolution over the batch (a layer with a single output channel) the same way, and merf's
fixed feature map (``common/models/merf_features.py``) its function-call convolutions.

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

import torch
from torch import nn

# The rows a padded batch is a multiple of (what it costs: docs/RESULTS.md, "Convolutions on padded batches").
BATCH_MULTIPLE = 8
PADDED_MODES = ("hooks", "ghost", "bk")  # Opacus grad-sample modes whose hooks see only the real rows
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def pad_conv_batches(module: nn.Module, multiple: int = BATCH_MULTIPLE) -> int:
    """Make every convolution inside ``module`` run on batches padded to ``multiple`` rows.

    Sets an instance ``forward`` on each convolution (:class:`PaddedForward`: the class's own,
    on the padded batch); calling it again on the same module changes nothing. Returns how
    many layers were padded."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    padded = 0
    for layer in module.modules():
        if isinstance(layer, CONVS) and "forward" not in vars(layer):
            layer.forward = PaddedForward(layer, multiple)
            padded += 1
    return padded


def padded_rows(rows: int, multiple: int = BATCH_MULTIPLE) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return -(-rows // multiple) * multiple


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` rows (``x`` itself when it has them)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


class PaddedForward:
    """A convolution's ``forward`` on its batch padded with zero rows; the output's real rows.

    An object, not a bound function, so that a padded module can still be copied, pickled and
    saved whole (``copy.deepcopy`` binds the copy's to the copy). An unbatched input (one
    example without a batch dimension, which a convolution accepts) and a batch that is already
    a multiple run as they are. Not for ``torch.jit.trace``, which would record one batch's cut
    (nothing here traces a model). Under Opacus' functorch fallback for a layer it has no
    per-example gradient function for (a ConvTranspose in a private module; none has one
    today) each example would run padded to ``multiple`` rows: right, but that much slower."""

    def __init__(self, layer: nn.Module, multiple: int) -> None:
        self.layer = layer
        self.multiple = multiple

    def __call__(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: A002 - torch's name
        layer = self.layer
        forward = type(layer).forward
        rows = len(input) if input.dim() == layer.weight.dim() else 0
        target = padded_rows(rows, self.multiple)
        if target == rows:
            return forward(layer, input, *args, **kwargs)
        return forward(layer, pad_rows(input, target), *args, **kwargs)[:rows]
