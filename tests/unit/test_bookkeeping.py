"""One-pass per-example clipping (common/bookkeeping.py) against per-example gradients built one
example at a time with plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import client.dp  # noqa: F401  (registers the project's Conv2d grad sampler, as a site does)
from common.bookkeeping import Bookkeeper


class Mixed(nn.Module):
    """Every layer kind the book-keeping supports; sequence-shaped Linear inputs and an
    Embedding with repeated ids and a padding row."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 6, padding_idx=0)
        self.seq = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.out = nn.Linear(4 * 4 * 4 + 5, 1, bias=True)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.ln(torch.tanh(self.seq(self.tok(ids)))).mean(1)  # (B, 5)
        c = torch.relu(self.gn(self.conv(img))).flatten(1)  # (B, 64)
        return self.out(torch.cat([c, h], 1)).squeeze(1)


def per_example_losses(model: nn.Module, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    return (model(ids, img) - 0.3) ** 2


def reference(model: nn.Module, ids, img, clip: float):
    """Clipped sum and norms from one backward per example."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(ids)):
        loss = per_example_losses(model, ids[i : i + 1], img[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        c = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += c * g
    return total, torch.stack(norms)


def test_clipped_sum_and_norms_match_one_example_at_a_time():
    torch.manual_seed(0)
    model = Mixed()
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 4, 5], [6, 1, 6, 2], [2, 5, 0, 1]])
    img = torch.randn(5, 1, 8, 8)
    ref_sum, ref_norms = reference(model, ids, img, clip=1e9)
    clip = float(ref_norms.median())  # some examples clipped, some not
    ref_sum, ref_norms = reference(model, ids, img, clip=clip)

    bk = Bookkeeper(model, clip)
    norms = bk.backward(per_example_losses(model, ids, img))
    assert torch.allclose(norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert 0 < int((norms > clip).sum()) < len(norms)
    for (name, p), ref in zip(model.named_parameters(), ref_sum):
        assert p.grad is not None, name
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-6), name
    assert torch.count_nonzero(model.tok.weight.grad[0]) == 0  # the padding row gets nothing


def test_a_layer_that_did_not_run_gets_a_zero_sum():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    bk = Bookkeeper(model, 1.0)
    x = torch.randn(4, 3)
    bk.backward(model["a"](x).squeeze(1) ** 2)
    assert torch.count_nonzero(model["b"].weight.grad) == 0 and model["a"].weight.grad.abs().sum() > 0


def test_refuses_what_it_cannot_clip_exactly():
    lin = nn.Linear(3, 3)
    tied = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 3))
    tied[2].weight = lin.weight
    with pytest.raises(ValueError, match="tied weights"):
        Bookkeeper(tied, 1.0)
    with pytest.raises(ValueError, match="no per-example gradient"):
        Bookkeeper(nn.Sequential(nn.ConvTranspose2d(1, 1, 2)), 1.0)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 1)

    with pytest.raises(ValueError, match="holds parameters directly"):
        Bookkeeper(Holder(), 1.0)

    for layer in (nn.RNN(3, 3), nn.EmbeddingBag(5, 3)):  # several inputs or outputs: Opacus has samplers, bk has not
        with pytest.raises(ValueError, match="no per-example gradient"):
            Bookkeeper(nn.Sequential(layer), 1.0)

    flat = nn.Linear(3, 1)
    bk = Bookkeeper(flat, 1.0)
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="rows for 2 per-example losses"):
        bk.backward(flat(x.reshape(8, 3)).reshape(2, 4).sum(1))  # the layer saw positions as rows

    twice = nn.Linear(3, 3)
    bk = Bookkeeper(twice, 1.0)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="ran twice"):
        bk.backward(twice(twice(x)).sum(1))


def test_records_nothing_when_disabled_or_without_grad():
    model = nn.Linear(3, 1)
    on = {"v": False}
    bk = Bookkeeper(model, 1.0, enabled=lambda: on["v"])
    model(torch.randn(2, 3))
    on["v"] = True
    with torch.no_grad():
        model(torch.randn(2, 3))
    assert bk._records == []
    bk.remove()
    model(torch.randn(2, 3))
    assert bk._records == []
