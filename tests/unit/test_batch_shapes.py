"""common/batch_shapes.py: convolutions run on padded batches and give the unpadded results."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from client.dp import make_private
from common import privacy
from common.batch_shapes import BATCH_MULTIPLE, pad_conv_batches, padded_rows


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


@pytest.mark.parametrize("rows", [1, 5, 8, 13])
def test_padded_layers_give_the_unpadded_outputs_and_gradients(rows, monkeypatch):
    torch.manual_seed(0)
    plain = Net()
    padded = copy.deepcopy(plain)
    assert pad_conv_batches(padded) == 3 and pad_conv_batches(padded) == 0  # once only
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
    assert unpadded == [rows] * 3 and padded_sizes == [padded_rows(rows)] * 3
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(gx_a, gx_b, atol=1e-6)  # no input gradient reaches a real row from the padding
    for a, b in zip(gp_a, gp_b):  # the zero rows add nothing to autograd's weight gradients
        assert torch.allclose(a, b, atol=1e-5)


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
