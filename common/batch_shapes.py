"""Convolutions on a few batch sizes only, so that a long-lived site process stops growing.

torch's CPU convolutions (oneDNN) build a kernel for each layer, direction and input shape,
and keep it in a cache of up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` kernels (1024). DP-SGD's
Poisson sampling gives every step a batch size of its own, so a warm site worker built new
kernels for hundreds of rounds: about 21 kernels and 0.56 MB for every new batch size of the
digits VAE (docs/RESULTS.md, "The warm workers' memory, found"). :func:`pad_conv_batches`
makes each convolution of a module run on a few batch sizes only (:class:`BatchShapes`): the
multiples of :data:`BATCH_MULTIPLE` within about two standard deviations of the expected batch
(``client.dp.make_private`` knows it: sample rate times records), in a coarser step when that
would be more than eight sizes. A batch is padded with zero rows up to the smallest of those
sizes that holds it; a larger one than the largest runs in pieces; the outputs are cut back to
the real rows and joined (:func:`in_pieces`). A Poisson batch of mean 32 then meets 4 shapes,
all within a site's first few rounds, instead of 40 over hundreds.
``client.dp.conv2d_grad_sample`` runs the one per-example gradient that is itself a
convolution over the batch (a layer with a single output channel) the same way, and merf's
fixed feature map (``common/models/merf_features.py``) its function-call convolutions.

Why no gradient, clipping bound or privacy guarantee changes:

* A convolution computes each output row from its own input row only (the batch dimension is
  never mixed; groups and channels are within a row), so neither zero rows nor cutting the
  batch into pieces changes a real row's output: it is that of the unpadded convolution, up to
  the floating-point rounding of a different kernel. The sizes are a function of the expected
  batch and each step's own batch size, which the site knows anyway; nothing of them is sent.
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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The rows a padded batch is a multiple of (what it costs: docs/RESULTS.md, "Convolutions on padded batches").
BATCH_MULTIPLE = 8
PADDED_MODES = ("hooks", "ghost", "bk")  # Opacus grad-sample modes whose hooks see only the real rows
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# How far from the expected batch the planned sizes reach, in standard deviations: a smaller
# batch (down to BatchShapes.small) runs as the smallest size, a larger one in pieces of the largest.
SPREAD = 2.0
# At most this many sizes for the Poisson batch: a wider spread takes a coarser step (a multiple
# of BATCH_MULTIPLE), so that each size stays a few percent of steps and oneDNN's cache of 1024
# kernels (about 21 a size for the digits VAE) never fills.
MAX_SIZES = 8
# A batch this many standard deviations below the expected one is not a Poisson batch of the plan
# (at most about one step in a million is: the exact binomial gives 3e-11 for digits-quick's
# batch, 2e-6 at a sample rate of 0.99): it runs as its own multiple (BatchShapes.small).
SMALL = 5.0


def padded_rows(rows: int, multiple: int = BATCH_MULTIPLE) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return -(-rows // multiple) * multiple


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` rows (``x`` itself when it has them)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


@dataclass(frozen=True)
class BatchShapes:
    """The batch sizes a padded convolution runs on: ``sizes``, multiples of ``multiple`` (empty:
    every multiple). A batch runs as the smallest size that holds it, padded with zero rows; one
    above the largest size runs in pieces of the largest and a last piece of the rest; one of
    fewer than ``small`` rows is not a batch the plan is for (canaries, a held-out batch) and runs
    as its own multiple of ``multiple``.

    Rounding up to a multiple alone leaves the rare sizes of a Poisson batch's tails (a batch of
    mean 32 below 16 or above 48 rows: a few steps in a thousand), each met for the first time
    after hundreds of rounds and building its kernels then; :meth:`around` keeps the sizes
    within about two standard deviations of the expected batch, so that every size is met in a
    few percent of steps or more, i.e. within a site's first few rounds."""

    sizes: tuple[int, ...] = ()
    multiple: int = BATCH_MULTIPLE
    small: int = 0

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.small < 0 or any(n < 1 or n % self.multiple for n in self.sizes) \
                or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"BatchShapes needs multiple >= 1, small >= 0 and sizes that are increasing "
                             f"positive multiples of it; got {self}")

    @classmethod
    def around(cls, sample_rate: float, records: int, fixed_rows: int = 0,
               multiple: int = BATCH_MULTIPLE) -> BatchShapes:
        """The sizes for a Poisson batch of ``records`` sampled at ``sample_rate`` (a binomial
        count: mean q n, variance q (1 - q) n) plus ``fixed_rows`` that every step adds: the
        multiples from the one that holds the mean minus :data:`SPREAD` standard deviations to
        the first that holds the mean plus as many, in steps of ``multiple`` (coarser when that
        would make more than :data:`MAX_SIZES`), and ``fixed_rows`` alone (a GAN's discriminator
        sees its fixed fakes with each real batch, and alone in the generator's steps). ``small``
        is :data:`SMALL` standard deviations below the mean, where a Poisson batch almost never
        is: a batch smaller than that is another's (128 canaries under a full-batch plan of
        2,000 records run as 128 rows, not 2,000)."""
        mean = sample_rate * records + fixed_rows
        sd = math.sqrt(max(sample_rate * (1 - sample_rate) * records, 0.0))
        spread = SPREAD * sd
        low = max(multiple, padded_rows(max(math.floor(mean - spread), 0), multiple))
        high = max(low, math.ceil(mean + spread))
        step = multiple * max(1, math.ceil((high - low) / (multiple * (MAX_SIZES - 1))))
        sizes = set(range(low, high + step, step))
        if fixed_rows:
            sizes.add(padded_rows(fixed_rows, multiple))
        small = max(0, math.floor(mean - SMALL * sd))
        return cls(tuple(sorted(sizes)), multiple, small)

    def pieces(self, rows: int) -> list[tuple[int, int]]:
        """A batch of ``rows`` as (real rows, rows run) per piece, in order; [] for no rows."""
        if not self.sizes or rows < self.small:
            return [(rows, padded_rows(rows, self.multiple))] if rows else []
        out, largest = [], self.sizes[-1]
        while rows > largest:
            out.append((largest, largest))
            rows -= largest
        if rows:
            out.append((rows, next(n for n in self.sizes if n >= rows)))
        return out


def in_pieces(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], shapes: BatchShapes) -> Any:
    """``fn(*inputs)`` for inputs whose rows are examples, run on the shapes ``shapes`` allows:
    each piece's rows padded with zero rows, ``fn``'s results cut back to the real rows and
    joined. ``fn`` must compute each output row from its own input row only and return a tensor,
    a tuple or list of tensors, or a dict of them, each with one row per example."""
    rows = len(inputs[0])
    pieces = shapes.pieces(rows)
    if len(pieces) <= 1 and (not pieces or pieces[0][1] == rows):
        return fn(*inputs)  # an empty batch, or one already of a shape in the plan
    results, start = [], 0
    for real, run in pieces:
        results.append(_cut(fn(*(pad_rows(t[start:start + real], run) for t in inputs)), real))
        start += real
    return _join(results)


def _cut(result: Any, rows: int) -> Any:
    if isinstance(result, torch.Tensor):
        return result[:rows]
    if isinstance(result, dict):
        return {k: _cut(v, rows) for k, v in result.items()}
    return type(result)(_cut(v, rows) for v in result)


def _join(results: list[Any]) -> Any:
    first = results[0]
    if len(results) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, dict):
        return {k: _join([r[k] for r in results]) for k in first}
    return type(first)(_join(list(parts)) for parts in zip(*results, strict=True))


def pad_conv_batches(module: nn.Module, shapes: BatchShapes | None = None) -> int:
    """Make every convolution inside ``module`` run on the batch sizes of ``shapes`` (default:
    multiples of :data:`BATCH_MULTIPLE`).

    Sets an instance ``forward`` on each convolution (:class:`PaddedForward`: the class's own, in
    padded pieces), or gives one already set the new ``shapes``; a submodule with a
    ``batch_shapes`` attribute (merf's feature map, whose convolutions are function calls) gets
    ``shapes`` there. Returns how many layers were padded for the first time."""
    shapes = shapes or BatchShapes()
    padded = 0
    for layer in module.modules():
        if isinstance(vars(layer).get("forward"), PaddedForward):
            layer.forward.shapes = shapes
        elif isinstance(layer, CONVS) and "forward" not in vars(layer):
            layer.forward = PaddedForward(layer, shapes)
            padded += 1
        if isinstance(getattr(layer, "batch_shapes", None), BatchShapes):
            layer.batch_shapes = shapes
    return padded


def shapes_of(layer: nn.Module) -> BatchShapes:
    """The shapes a layer padded by :func:`pad_conv_batches` runs on (the default for another)."""
    forward = vars(layer).get("forward")
    return forward.shapes if isinstance(forward, PaddedForward) else BatchShapes()


class PaddedForward:
    """A convolution's ``forward`` run by :func:`in_pieces` on the shapes ``shapes`` allows.

    An object, not a bound function, so that a padded module can still be copied, pickled and
    saved whole (``copy.deepcopy`` binds the copy's to the copy). An unbatched input (one
    example without a batch dimension, which a convolution accepts) runs as it is. Not for
    ``torch.jit.trace``, which would record one batch's cut (nothing here traces a model).
    Under Opacus' functorch fallback for a layer it has no per-example gradient function for (a
    ConvTranspose in a private module; none has one today) each example would run padded to
    :data:`BATCH_MULTIPLE` rows: right, but that much slower."""

    def __init__(self, layer: nn.Module, shapes: BatchShapes) -> None:
        self.layer = layer
        self.shapes = shapes

    def __call__(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: A002 - torch's name
        layer = self.layer
        forward = type(layer).forward
        if input.dim() != layer.weight.dim():
            return forward(layer, input, *args, **kwargs)
        return in_pieces(lambda x: forward(layer, x, *args, **kwargs), [input], self.shapes)
