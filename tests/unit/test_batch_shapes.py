"""common/batch_shapes.py: convolutions run on padded batches and give the unpadded results."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.conv import convolution2d_backward_as_a_convolution as as_a_convolution
from torch import nn

import client.dp
from client.dp import make_private
from common import privacy
from common.batch_shapes import (BATCH_MULTIPLE, MAX_SIZES, BatchShapes, in_pieces, pad_conv_batches, padded_rows,
                                 shapes_of)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
        self.line = nn.Conv1d(3, 2, 3)
        self.head = nn.Linear(2 * 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.conv(x)), output_size=(len(x), 3, 8, 8))
        return self.head(self.line(h.mean(2)).flatten(1))


def conv_sizes(monkeypatch) -> list[int]:
    """Record the batch size every convolution class's own forward is called with."""
    seen: list[int] = []
    for conv in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d):
        def recorded(self, x, *args, _forward=conv.forward, **kwargs):
            seen.append(len(x))
            return _forward(self, x, *args, **kwargs)
        monkeypatch.setattr(conv, "forward", recorded)
    return seen


def test_padded_rows():
    assert [padded_rows(n) for n in (0, 1, 7, 8, 9, 16, 17)] == [0, 8, 8, 8, 16, 16, 24]
    assert padded_rows(5, 4) == 8 and padded_rows(5, 1) == 5


def test_the_sizes_around_a_poisson_batch():
    digits = BatchShapes.around(32 / 479, 479)  # digits-quick: mean 32, sd 5.5
    assert digits.sizes == (24, 32, 40, 48)
    gan = BatchShapes.around(32 / 479, 479, fixed_rows=32)  # the discriminator's reals and fakes; fakes alone
    assert gan.sizes == (32, 56, 64, 72, 80)
    assert BatchShapes.around(1.0, 500).sizes == (504,)  # every record, every step: one size
    assert BatchShapes.around(0.01, 100).sizes == (8,)  # a batch of about one row
    for q, n in [(0.01, 5000), (0.1, 479), (0.3, 100), (64 / 60000, 60000), (0.1, 60000), (0.5, 100000)]:
        sizes = BatchShapes.around(q, n).sizes
        mean, sd = q * n, (q * (1 - q) * n) ** 0.5
        step = sizes[1] - sizes[0]
        # From the size that holds mean - 2 sd rows (the rarer smaller batches run as it) to the
        # first that holds mean + 2 sd (the rarer larger ones run in pieces), in even steps of 8
        # rows, or of a multiple of 8 that keeps them to 8 sizes when the spread is wide.
        low, high = math.floor(mean - 2 * sd), math.ceil(mean + 2 * sd)  # in whole rows
        assert sizes[0] - 8 < low <= sizes[0] and sizes[-1] - step < high <= sizes[-1]
        assert sizes == tuple(range(sizes[0], sizes[-1] + 1, step)) and step % 8 == 0
        assert len(sizes) <= MAX_SIZES and (step == 8 or len(sizes) >= MAX_SIZES - 1)
        # Below mean - 5 sd a batch is not the plan's (a Poisson batch is, once in millions of steps).
        assert BatchShapes.around(q, n).small == max(0, math.floor(mean - 5 * sd))
    assert BatchShapes.around(0.1, 60000).sizes[1] - BatchShapes.around(0.1, 60000).sizes[0] == 48
    assert (digits.small, gan.small, BatchShapes.around(1.0, 2000).small) == (4, 36, 2000)
    # A Poisson batch far below the mean still runs as a planned size; the GAN's fakes alone too.
    assert digits.pieces(12) == [(12, 24)] and digits.pieces(5) == [(5, 24)] and gan.pieces(32) == [(32, 32)]


def test_pieces_hold_every_row_in_the_planned_sizes():
    shapes = BatchShapes((24, 32, 40, 48), small=5)
    assert shapes.pieces(0) == [] and shapes.pieces(5) == [(5, 24)] and shapes.pieces(33) == [(33, 40)]
    assert shapes.pieces(48) == [(48, 48)] and shapes.pieces(50) == [(48, 48), (2, 24)]
    assert shapes.pieces(97) == [(48, 48), (48, 48), (1, 24)]
    for rows in range(5, 200):
        pieces = shapes.pieces(rows)
        assert sum(real for real, _ in pieces) == rows
        assert all(run in shapes.sizes and real <= run for real, run in pieces)
    assert BatchShapes().pieces(13) == [(13, 16)]  # no sizes: every multiple, one piece
    # A batch below ``small`` (canaries scored under a full-batch plan) is not the plan's: its own
    # multiple, not 2,000 rows.
    full = BatchShapes.around(1.0, 2000)
    assert full.pieces(128) == [(128, 128)] and full.pieces(1995) == [(1995, 2000)]
    assert full.pieces(2000) == [(2000, 2000)] and shapes.pieces(4) == [(4, 8)] and shapes.pieces(1) == [(1, 8)]
    for bad in [(16, 8), (8, 8), (12,), (0,)]:
        with pytest.raises(ValueError, match="increasing positive multiples"):
            BatchShapes(bad)
    with pytest.raises(ValueError, match="small >= 0"):
        BatchShapes((8,), small=-1)


def test_in_pieces_runs_each_piece_padded_and_joins_the_real_rows():
    shapes = BatchShapes((8,))
    x, y = torch.randn(13, 3), torch.randn(13, 2)
    seen = []

    def fn(a, b):
        seen.append(len(a))
        return a * 2, {"sum": a.sum(1) + b.sum(1)}

    doubled, sums = in_pieces(fn, [x, y], shapes)
    assert seen == [8, 8] and torch.equal(doubled, x * 2)
    assert torch.allclose(sums["sum"], x.sum(1) + y.sum(1))
    assert in_pieces(fn, [x[:8], y[:8]], shapes)[0].shape == (8, 3) and seen[-1] == 8  # one piece as it is
    assert in_pieces(lambda a: a + 1, [x[:0]], shapes).shape == (0, 3)  # an empty batch runs as it is


@pytest.mark.parametrize("shapes", [BatchShapes(), BatchShapes((8,)), BatchShapes((16, 24))])
@pytest.mark.parametrize("rows", [1, 5, 8, 13, 30])
def test_padded_layers_give_the_unpadded_outputs_and_gradients(rows, shapes, monkeypatch):
    torch.manual_seed(0)
    plain = Net()
    padded = copy.deepcopy(plain)
    assert pad_conv_batches(padded, shapes) == 3 and pad_conv_batches(padded, shapes) == 0  # once only
    seen = conv_sizes(monkeypatch)
    x = torch.randn(rows, 2, 4, 4)
    grads = []
    for net in (plain, padded):
        xi = x.clone().requires_grad_()
        out = net(xi)
        assert out.shape == (rows, 1)
        (out.squeeze(1) * torch.arange(1.0, rows + 1)).sum().backward()  # each row its own weight
        grads.append((out.detach(), xi.grad, [p.grad for p in net.parameters()]))
    unpadded, padded_sizes = seen[:3], seen[3:]
    runs = [run for _, run in shapes.pieces(rows)]
    assert unpadded == [rows] * 3 and padded_sizes == runs * 3
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(gx_a, gx_b, atol=1e-6)  # no input gradient reaches a real row from the padding
    for a, b in zip(gp_a, gp_b):  # the zero rows add nothing to autograd's weight gradients
        assert torch.allclose(a, b, atol=1e-5)


def test_a_padded_module_takes_a_new_plan(monkeypatch):
    net = Net()
    assert pad_conv_batches(net, BatchShapes((8,))) == 3
    assert pad_conv_batches(net, BatchShapes((16, 24))) == 0  # the same layers, the new sizes
    assert shapes_of(net.conv) == BatchShapes((16, 24)) and shapes_of(nn.Conv2d(1, 1, 1)) == BatchShapes()
    seen = conv_sizes(monkeypatch)
    net(torch.randn(30, 2, 4, 4))
    assert seen == [24, 16] * 3


def test_the_per_example_convolution_runs_on_its_layers_sizes(monkeypatch):
    """client.dp.conv2d_grad_sample (a one-output-channel layer: the weight gradient as one
    convolution with the examples as groups) runs in the pieces of its layer's plan and gives
    Opacus' per-example gradients."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 1, 3, padding=1)
    pad_conv_batches(layer, BatchShapes((8, 16)))
    activations, backprops = torch.randn(30, 4, 6, 6), torch.randn(30, 1, 6, 6)
    seen = []

    def recorded(layer, activations, backprops):
        seen.append(len(activations[0]))
        return as_a_convolution(layer, activations, backprops)

    monkeypatch.setattr(client.dp, "convolution2d_backward_as_a_convolution", recorded)
    grads = client.dp.conv2d_grad_sample(layer, [activations], backprops)
    assert seen == [16, 16]  # 16 rows, then 14 padded to 16
    reference = compute_conv_grad_sample(layer, [activations], backprops)
    for param in (layer.weight, layer.bias):
        assert grads[param].shape == (30, *param.shape)
        assert torch.allclose(grads[param], reference[param], atol=1e-5)


def test_unbatched_input_and_a_copy(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    pad_conv_batches(conv)
    seen = conv_sizes(monkeypatch)
    one = torch.randn(2, 5, 5)  # one example, no batch dimension: runs as it is
    assert conv(one).shape == (3, 3, 3) and seen == [2]
    twin = copy.deepcopy(conv)  # the copy's forward is bound to the copy, not to the original
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    assert twin(torch.randn(3, 2, 5, 5)).abs().sum() == 0 and seen[-1] == BATCH_MULTIPLE
    assert conv(torch.randn(3, 2, 5, 5)).abs().sum() > 0


def test_a_padded_module_is_saved_whole_and_takes_its_input_by_name(monkeypatch):
    torch.manual_seed(0)
    net = Net()
    pad_conv_batches(net)
    x = torch.randn(5, 2, 4, 4)
    again = pickle.loads(pickle.dumps(net))
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    seen = conv_sizes(monkeypatch)
    for other in (again, loaded):
        assert other.conv.forward.layer is other.conv  # bound to the copy
        assert torch.allclose(other(x), net(x))
    assert seen == [BATCH_MULTIPLE] * 12  # four forward passes, three convolutions each
    assert net.conv(input=x).shape == (5, 4, 4, 4)


def module_task(module: nn.Module):
    class Task:
        family = "test"
        private_modules = ["net"]

        def __init__(self) -> None:
            self.modules = {"net": module}

    return Task()


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "ew"])
def test_a_convolution_that_does_not_pad_with_zeros_is_refused_where_opacus_would_get_it_wrong(mode):
    """Opacus' per-example gradient functions pad with zeros whatever the layer's padding_mode:
    refused in the modes that use them (hooks, ghost, bk); ew differentiates the layer itself."""
    task = module_task(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                     nn.Linear(32, 1)))
    data = torch.utils.data.TensorDataset(torch.randn(20, 1, 4, 4))
    plan = privacy.DPPlan(1.0, 0.25, 4, 1e-5, "rdp", 1.0)
    optimizers = {"net": torch.optim.SGD(task.modules["net"].parameters(), lr=0.1)}
    call = lambda: make_private(task, optimizers, torch.utils.data.DataLoader(data, batch_size=5),  # noqa: E731
                                plan=plan, history=[], grad_sample_mode=mode)
    if mode == "ew":
        call()
    else:
        with pytest.raises(ValueError, match="test: net.0 .*padding_mode='reflect'.*use padding_mode='zeros'"):
            call()
    unpadded = module_task(nn.Sequential(nn.Conv2d(1, 2, 1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 1)))
    optimizers = {"net": torch.optim.SGD(unpadded.modules["net"].parameters(), lr=0.1)}
    make_private(unpadded, optimizers, torch.utils.data.DataLoader(data, batch_size=5), plan=plan, history=[],
                 grad_sample_mode=mode)  # no padding at all: nothing to get wrong


def test_make_private_pads_only_in_the_modes_whose_hooks_see_the_real_rows():
    class Task:
        family = "test"
        private_modules = ["net"]

        def __init__(self) -> None:
            self.modules = {"net": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1))}

    data = torch.utils.data.TensorDataset(torch.randn(20, 1, 4, 4))
    plan = privacy.DPPlan(1.0, 0.25, 4, 1e-5, "rdp", 1.0)
    for mode, pads in [("hooks", True), ("ghost", True), ("bk", True), ("ew", False), ("functorch", False)]:
        task = Task()
        conv = task.modules["net"][0]
        optimizers = {"net": torch.optim.SGD(task.modules["net"].parameters(), lr=0.1)}
        make_private(task, optimizers, torch.utils.data.DataLoader(data, batch_size=5), plan=plan, history=[],
                     grad_sample_mode=mode)
        assert ("forward" in vars(conv)) == pads, mode
