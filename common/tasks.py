"""The model-family interface and its name registry.

A *task* bundles the federated modules of one model family with what the shared
training loop, the privacy layer and the server evaluator need to know about them.
It is deliberately small: a family is a plain class that satisfies
:class:`GenerativeTask` and is registered under a name with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from common.config import AppConfig


@dataclass(frozen=True)
class DataSpec:
    """Shape of the data a task is built for (known to sites and server alike)."""

    kind: Literal["image", "text"]
    image_size: int = 0
    channels: int = 1
    num_classes: int | None = None
    vocab_size: int = 0


@runtime_checkable
class GenerativeTask(Protocol):
    """What every model family provides.

    ``modules`` are all federated modules (their names prefix the keys of the one
    ArrayRecord exchanged with the server). ``private_modules`` name the modules that
    see private data: only those are wrapped by Opacus. The DP layer may replace an
    entry of ``modules`` by its wrapped version, so tasks reach their modules through
    ``self.modules[name]``, never through a cached attribute.
    """

    family: str
    spec: DataSpec
    modules: dict[str, nn.Module]
    private_modules: tuple[str, ...]

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per trained module, keyed like ``modules``."""
        ...

    def train_step(
        self, batch: tuple[torch.Tensor, ...], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, float]:
        """One optimisation step on one batch of private data; returns scalar metrics.

        Must call ``step()`` on the private module's optimizer exactly once per batch
        (that is where the privacy accountant is charged).
        """
        ...

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Score the current weights on held-out data (server side)."""
        ...

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> Any:
        """Draw n samples (images as a tensor in [0, 1], or a list of texts)."""
        ...


TaskFactory = Callable[["AppConfig", DataSpec, torch.device], GenerativeTask]

# Built-in families are imported lazily so that parsing a config does not import them.
_BUILTIN: dict[str, str] = {"vae": "common.models.vae:build_task", "lm": "common.models.lm:build_task",
                             "gan": "common.models.gan:build_task"}
_REGISTRY: dict[str, TaskFactory] = {}


def register(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register a factory ``(cfg, spec, device) -> GenerativeTask`` under ``name``."""

    def deco(factory: TaskFactory) -> TaskFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def registered_families() -> set[str]:
    return set(_BUILTIN) | set(_REGISTRY)


def _factory(name: str) -> TaskFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(registered_families())}")
    module_name, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_task(cfg: AppConfig, spec: DataSpec, device: torch.device | None = None) -> GenerativeTask:
    """Build the configured family's task with freshly initialised modules."""
    torch.manual_seed(cfg.run.seed)  # same initial weights on every site and the server
    task = _factory(cfg.task.family)(cfg, spec, device or torch.device("cpu"))
    missing = [m for m in task.private_modules if m not in task.modules]
    if missing:
        raise TypeError(f"task {cfg.task.family!r}: private modules {missing} are not in its modules")
    return task


def pick_device(setting: str) -> torch.device:
    """``auto`` takes CUDA when this machine has it, the CPU otherwise."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device = 'cuda' but this machine has no CUDA device; use 'auto'")
        return torch.device("cuda")
    return torch.device("cpu")


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
