"""A DP site's training loss, released through the Gaussian mechanism (``privacy.diagnostics = "noised"``).

Off by default: a DP site then sends no loss at all. When the operator asks for it, the
site releases, after its round, the mean loss of the trained model on one Poisson batch of
its records:

1. Each record is taken independently with the plan's rate ``q`` (a fresh draw, not the
   training batches).
2. Each taken record contributes the vector ``(min(max(loss_i, 0), L) / L, 1)``: its clipped,
   scaled loss and a count of one. ``L`` = ``privacy.diagnostics-loss-bound``; ``loss_i`` is the
   family's own per-record loss (``GenerativeTask.canary_losses``, the audit's score).
3. Released: the vector sum plus ``N(0, (z sqrt(2))^2)`` on each coordinate,
   ``z`` = ``privacy.diagnostics-noise``; the site sends ``L * S / max(B, 1)`` (post-processing).

Guarantee. Adjacency: add or remove one record (as DP-SGD's). One record moves the sum by a
vector of L2 norm at most ``sqrt(1 + 1) = sqrt(2)``, and the noise is ``z`` times that on
each coordinate: the Gaussian mechanism with multiplier ``z``, on a Poisson sample at rate
``q``. That is exactly one entry ``(z, q, 1)`` of Opacus' accountant, and it is charged so,
ahead, with the round (``client/privacy_state.py``). The model it is computed with is the
round's DP-SGD output; no training batch is reused.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from common.privacy import HistoryEntry
from common.tasks import GenerativeTask


def charge(noise: float, sample_rate: float) -> HistoryEntry:
    """The accountant entry of one release."""
    return (float(noise), float(sample_rate), 1)


def _records(data: Dataset, idx: list[int], kind: str) -> torch.Tensor:
    """The taken records as the task scores them: images, or text windows ``x`` plus the last target."""
    items = [data[i] for i in idx]
    if kind == "text":
        return torch.stack([torch.cat([x, y[-1:]]) for x, y in items])
    return torch.stack([x for x, *_ in items])


@torch.no_grad()
def noised_mean_loss(task: GenerativeTask, data: Dataset, sample_rate: float, noise: float, bound: float) -> float:
    """The released mean loss (see the module's docstring for the mechanism and its guarantee).

    The sample and the noise come from torch's global generator, as Opacus' DP-SGD noise does
    (README, Privacy: the same caveat on its seeding applies)."""
    take = torch.rand(len(data)) < sample_rate
    idx = take.nonzero().flatten().tolist()
    total = 0.0
    if idx:
        losses = task.canary_losses(_records(data, idx, task.spec.kind), seed=int(torch.randint(0, 2**31, (1,))))
        total = float(losses.clamp(0.0, bound).sum()) / bound
    sd = noise * math.sqrt(2.0)
    s = total + float(torch.randn(1)) * sd
    b = len(idx) + float(torch.randn(1)) * sd
    return bound * s / max(b, 1.0)
