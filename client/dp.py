"""Opacus at a site: wrap the task's private module, its optimizer and loader for one DP-SGD run.

The accountant is restored from the site's recorded history with Opacus'
``load_state_dict`` (so it reports the composition over every release so far) and every
step's charge is also kept apart (:attr:`PrivateTraining.charged`): what this run adds,
which ``client/privacy_state.py`` confirms on the site's ledger.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample, convolution2d_backward_as_a_convolution

from common import privacy
from common.batch_shapes import CONVS, PADDED_MODES, BatchShapes, in_pieces, pad_conv_batches, shapes_of
from common.privacy import DPPlan, HistoryEntry
from common.bookkeeping import Bookkeeper
from common.dp_step import is_ghost
from common.tasks import GenerativeTask

log = logging.getLogger(__name__)

# Opacus warnings that say nothing actionable per round; each is documented in the README.
# - secure RNG: noise comes from PyTorch's PRNG (torchcsprng is not installed) - the DP
#   guarantee assumes a cryptographic RNG; README "Privacy" says so.
# - "Optimal order is the largest alpha": the RDP bound could be tighter; what we report is
#   still a valid upper bound on epsilon.
# - full backward hook on inputs that need no grad: how Opacus' hooks see the first layer.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@register_grad_sampler(torch.nn.Conv2d)
def conv2d_grad_sample(layer: torch.nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d (hooks and ghost modes), the faster of Opacus' two ways.

    Opacus' default unfolds the input (im2col) and does one small matrix product per
    example; for a layer with a single output channel (the VAE's last conv, at full
    resolution) that product is all memory traffic, and Opacus' other implementation, the
    weight gradient as one convolution with the batch as groups, becomes a depthwise
    convolution: 10-15x faster on this CPU (batch 64, 32 -> 1 channels at 28x28). For two or
    more output channels the unfold version was as fast or faster, so it stays. Both give
    the same per-sample gradients (tests/contract compares every mode's clipped gradient).
    That convolution's groups are the examples, so it runs on the batch sizes the layer itself
    runs on (common/batch_shapes.py): in padded pieces, each example's gradient from its own
    activations and output gradient only; a zero row's is zero and cut off, and each Poisson
    batch size does not build kernels of its own.
    """
    if (layer.out_channels == 1 and layer.groups == 1 and layer.in_channels > 1 and len(activations[0])
            and not isinstance(layer.padding, str)):  # "same"/"valid" would mean other padding here
        return in_pieces(lambda a, b: convolution2d_backward_as_a_convolution(layer, [a], b),
                         [activations[0], backprops], shapes_of(layer))
    return compute_conv_grad_sample(layer, activations, backprops)


def check_private_modules(task: GenerativeTask, grad_sample_mode: str) -> None:
    """Refuse what Opacus would make private wrongly, before anything is charged.

    A convolution that pads with anything but zeros (``padding_mode`` "reflect", "replicate" or
    "circular" with a non-zero padding), in hooks, ghost or bk mode: Opacus' per-example
    gradient functions (and ours above) pad with zeros whatever the layer does, so every
    example's gradient and norm would be wrong (by up to 19% for "reflect" in a test), and under
    ghost clipping the second pass sums the true gradients with weights from the wrong norms,
    which can exceed the clipping bound. ew and functorch differentiate the layer itself."""
    if resolve_grad_sample_mode(grad_sample_mode, task) not in PADDED_MODES:
        return
    for private in task.private_modules:
        for name, layer in task.modules[private].named_modules():
            if not isinstance(layer, CONVS) or layer.padding_mode == "zeros":
                continue
            if layer.padding == "same" or (not isinstance(layer.padding, str) and any(layer.padding)):
                raise ValueError(f"{task.family}: {private}.{name} ({type(layer).__name__}) has padding_mode="
                                 f"{layer.padding_mode!r}: Opacus computes its per-example gradients as if it "
                                 "padded with zeros; use padding_mode='zeros', or privacy.grad-sample-mode = "
                                 "'functorch' or 'ew', which differentiate the layer itself")


@dataclass
class PrivateTraining:
    """Handles to what Opacus made private for one round."""

    engine: PrivacyEngine
    loader: torch.utils.data.DataLoader
    mode: str = "hooks"  # the Opacus grad-sample mode in use
    clipped: int = 0
    seen: int = 0
    last_norms: torch.Tensor | None = None  # the last step's per-example gradient norms, before clipping
    charged: list[HistoryEntry] = field(default_factory=list)  # this run's own steps, as the accountant charged them

    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant's whole history: the restored one and this run's steps."""
        return [(float(n), float(q), int(s)) for n, q, s in self.engine.accountant.state_dict()["history"]]

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.seen if self.seen else 0.0


def resolve_grad_sample_mode(setting: str, task: GenerativeTask) -> str:
    """``privacy.grad-sample-mode``: ``auto`` is the family's default (the task's
    ``grad_sample_mode`` attribute, the mode measured fastest for it by
    ``simulations/bench_dp.py``; ``hooks`` for a family that names none); any other
    value is used as it is."""
    if setting != "auto":
        return setting
    return getattr(task, "grad_sample_mode", "hooks")


def make_private(
    task: GenerativeTask,
    optimizers: dict[str, torch.optim.Optimizer],
    loader: torch.utils.data.DataLoader,
    *,
    plan: DPPlan,
    history: list[HistoryEntry],
    grad_sample_mode: str,
) -> PrivateTraining:
    """Wrap the task's private module, its optimizer and the loader; restore the accountant.

    A fresh wrapper every round (Opacus hooks cannot be added twice), but the accountant
    is restored from ``history`` (``load_state_dict``), so the epsilon it reports is the
    composition over every release so far.
    """
    grad_sample_mode = resolve_grad_sample_mode(grad_sample_mode, task)
    if len(task.private_modules) != 1:
        raise ValueError(f"{task.family}: exactly one private module is supported, got {task.private_modules}")
    name = task.private_modules[0]
    check_private_modules(task, grad_sample_mode)  # the sites call it before the charge too
    if grad_sample_mode in PADDED_MODES:
        # Convolutions on a few batch sizes around the expected one, padded with zero rows: Poisson
        # batch sizes would each build and cache oneDNN kernels for good (common/batch_shapes.py
        # says why no gradient changes). The GAN's discriminator also sees its fixed fakes.
        pad_conv_batches(task.modules[name], BatchShapes.around(
            plan.sample_rate, len(loader.dataset), getattr(task, "extra_private_rows", 0)))
    engine = PrivacyEngine(accountant=plan.accountant)
    if history:
        engine.accountant.load_state_dict({"history": list(history), "mechanism": engine.accountant.mechanism()})
    # bk (book-keeping, common/bookkeeping.py) uses Opacus' ghost-clipping wrapper and optimizer
    # (the optimizer only adds noise), with the wrapper's hooks replaced by one-pass clipping.
    opacus_mode = "ghost" if grad_sample_mode == "bk" else grad_sample_mode
    wrapped = engine.make_private(
        module=task.modules[name],
        optimizer=optimizers[name],
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=opacus_mode,
    )
    if opacus_mode == "ghost":
        # Opacus also returns a criterion wrapper; the tasks do not need it: they hand their
        # per-example losses to common.dp_step.backward_mean, which runs the same two passes.
        module, optimizer, _criterion, dp_loader = wrapped
    else:
        module, optimizer, dp_loader = wrapped
    if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12:
        # The budget check priced the round at plan.sample_rate; never train at another rate.
        raise RuntimeError(f"Opacus sample rate {dp_loader.sample_rate} differs from the plan's {plan.sample_rate}")
    if grad_sample_mode == "bk":
        module.remove_hooks()
        module.enable_hooks()  # the flag now gates the book-keeping hooks (GAN: off for generator steps)
        module._fedgen_bookkeeper = Bookkeeper(module._module, plan.max_grad_norm, lambda: module.hooks_enabled)
    task.modules[name] = module
    optimizers[name] = optimizer
    handles = PrivateTraining(engine=engine, loader=dp_loader, mode=grad_sample_mode)

    def step_hook(opt) -> None:
        # Count per-sample gradients whose norm exceeded the clipping bound (for operators).
        norms = handles.last_norms = per_sample_norms(module, opt)
        if norms is not None and len(norms):
            handles.clipped += int((norms > plan.max_grad_norm).sum())
            handles.seen += len(norms)
        # Charge the rate the Poisson sampler really uses. Opacus' own hook (replaced here) charges
        # 1 / len(loader), and its loader's len() is int(1 / sample_rate): for 141 of the batch
        # counts below 2,000 (93, 99, 105, 117, 123, ...) float rounding makes that one short, so a
        # site sampling at 1/123 was charged 1/122 and ran out of budget a round early.
        rate = plan.sample_rate * opt.accumulated_iterations
        engine.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=rate)
        handles.charged = privacy.compact([*handles.charged, (float(opt.noise_multiplier), float(rate), 1)])

    optimizer.attach_step_hook(step_hook)
    return handles


def per_sample_norms(module: torch.nn.Module, optimizer) -> torch.Tensor | None:
    """This step's per-example gradient norms (before clipping), or None for an empty batch.

    hooks / ew / functorch keep the per-sample gradients on the parameters; ghost clipping
    and bk never build them all and keep only the norms computed on the (first) backward pass.
    """
    if is_ghost(module):
        norms, module._per_sample_gradient_norms = module._per_sample_gradient_norms, None  # never count twice
        if norms is None:
            # Under ghost clipping the optimizer does not clip: the clipped sum must come from
            # the two-pass backward. Without its norms this step's gradient is unclipped, so
            # the step must not happen (raising here stops it before the parameters move).
            raise RuntimeError("ghost clipping: this step's loss was not back-propagated through "
                               "common.dp_step.backward_mean, so its gradient is not clipped; refusing the step")
        return norms if len(norms) else None
    samples = optimizer.grad_samples
    if not samples or not len(samples[0]):
        return None
    return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
