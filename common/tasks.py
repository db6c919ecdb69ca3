"""The model-family interface and how a family's name finds its code.

A *task* bundles the federated modules of one model family with what the shared
training loop, the privacy layer and the server evaluator need to know about them.
It is deliberately small: a family is a plain class that satisfies
:class:`GenerativeTask`, built by ``build_task(cfg, spec, device)`` in
``common/models/<family>.py``; its name is one of :data:`common.config.Family`.
How a private step runs its backward pass under Opacus is in :mod:`common.dp_step`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import nn

from common.config import Family

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

    num_classes: int  # classes ``sample`` can be conditioned on; 0 for an unconditional family

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> Any:
        """Draw n samples (images as a tensor in [0, 1], or a list of texts); the same seed (and
        labels) give the same samples. ``labels``, n class ids below ``num_classes``, choose the
        classes of a class-conditional family (None: its own choice); an unconditional family
        refuses them (ValueError), as a conditional one refuses labels of the wrong shape or range."""
        ...

    canary_score: str  # what :meth:`canary_losses` measures, in words (the audit's method string)

    # Optional, not part of the protocol check: ``server_update() -> dict[str, float]``, the
    # family's own training at the server after each round's aggregation (server/evaluation.py),
    # on the aggregated weights only (post-processing: it never sees private data). merf trains
    # its generator there.
    # Optional too: ``extra_private_rows: int``, the rows the private module sees in every private
    # step besides the Poisson batch (the GAN's fixed fakes; 0 when absent): its convolutions'
    # batch sizes are planned around them (client.dp.make_private, common/batch_shapes.py).

    @torch.no_grad()
    def canary_losses(self, canaries: torch.Tensor, seed: int) -> torch.Tensor:
        """Each canary record's loss under the current weights, the family's own loss (float64,
        shape ``(m,)``); the same ``seed`` gives the same randomness before and after training.
        The sample-level audit (``client/audit.py``) scores a canary by how much training lowered it."""
        ...


def sample_labels(labels: torch.Tensor | None, n: int, num_classes: int, family: str) -> torch.Tensor | None:
    """The ``labels`` given to a family's ``sample(n, seed, labels)``, checked: None, or n class
    ids below ``num_classes`` (a LongTensor); an unconditional family (``num_classes`` 0) takes none."""
    if labels is None:
        return None
    if not num_classes:
        raise ValueError(f"the {family} model is unconditional: sample() takes no labels")
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"sample({n}, ...) needs {n} integer class labels, got a {labels.dtype} tensor "
                         f"of shape {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels.long()


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


TaskFactory = Callable[["AppConfig", DataSpec, torch.device], GenerativeTask]


def registered_families() -> set[str]:
    """The family names a run config accepts (``task.family``, :data:`common.config.Family`)."""
    return set(get_args(Family))


def _factory(name: str) -> TaskFactory:
    # Imported only when a task is built, so that parsing a config does not import the models.
    if name not in registered_families():
        raise KeyError(f"unknown model family {name!r}; known: {sorted(registered_families())}")
    module_name = f"common.models.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ImportError(f"model family {name!r} is declared in common.config.Family but "
                          f"common/models/{name}.py does not exist; add it with a build_task(cfg, spec, device)") from err
    factory = getattr(module, "build_task", None)
    if factory is None:
        raise TypeError(f"common/models/{name}.py has no build_task(cfg, spec, device) for family {name!r}")
    return factory


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
