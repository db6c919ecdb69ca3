"""Private mean embeddings (DP-MERF, Harder et al. 2021), released with one DP-SGD step.

Each site releases, per class, the sum of a fixed feature map over its records, with
Gaussian noise; the server averages the releases and trains a generator whose samples'
mean features match them, for as long as it likes: post-processing of a DP output, no
further privacy cost.

How the release is a DP-SGD step (so that Opacus clips, noises and accounts for it, and the
ledger, budget refusal and audits treat it like any other family's training):

- the private module is :class:`Release`: a frozen, data-independent feature map ``phi``
  (:class:`common.models.merf_features.Features`) and one trainable matrix ``theta``
  (classes x (features + 1)), zero at round 1. A record (x, y) has the loss ``-<theta[y], psi(x)>`` with
  ``psi(x) = [sqrt(1 - a^2) phi(x), a]``, ``||phi(x)|| = 1``; its gradient is ``-psi(x)`` in row
  y and zero elsewhere, so its norm is at most 1 (1 unless a feature block is all zero)
  whatever ``theta`` is.
- Adjacency: add/remove one record at a site (the sample-level DP every family has).
  Sensitivity: Opacus clips each record's gradient to ``privacy.max-grad-norm`` = C (a no-op at
  C >= 1), so the noised sum changes by at most C between neighbours whatever the features
  are; Opacus adds N(0, (z C)^2) per entry: the Gaussian mechanism,
  subsampled at ``q`` (q = 1 with ``train.batch-size`` >= the site's records: one full-batch
  step, the plain Gaussian mechanism). Accounted by Opacus' accountant as (z, q, steps) like
  any DP-SGD step; nothing else about the records leaves the site.
- Denominator: Opacus divides the noised sum by the expected batch size ``q * n`` and SGD at
  learning rate 1 adds it to ``theta``. The server never needs ``n``: the count coordinate
  ``a`` is accumulated the same way, so ``theta[y, :-1] / theta[y, -1]`` (times a /
  sqrt(1 - a^2)) is the class-y mean of ``phi``, whatever the scale (post-processing).

Features are never those of the Inception network the evaluator scores with (that would
game FID): the pixels plus a convolutional network drawn from ``merf.feature-seed``, kept
random or (``merf.features = "public-mnist"``) trained to classify public MNIST digits, each
block normalised so that their concatenation has norm 1. The sensitivity argument above holds
for any fixed map; the map must not depend on any site's records, and neither choice does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.config import AppConfig
from common.dp_step import backward_mean, empty_batch_grads, unwrap
from common.models.gan import GANConfig, Generator
from common.models.merf_features import Features, fit_to_public_digits
from common.tasks import DataSpec, evaluating, sample_labels

log = logging.getLogger(__name__)

#: Weight ``a`` of the count coordinate in ``psi``: the release carries each class's (noised)
#: share of records beside its feature sum; a^2 = 1% of a record's squared norm.
COUNT_WEIGHT = 0.1

EVAL_PER_CLASS = 50  # generated images per class in evaluate()'s feature-distance


class Release(nn.Module):
    """The private module: ``theta`` (classes x (dim + 1)) scores ``psi(x)`` per class."""

    def __init__(self, features: Features, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.theta = nn.Linear(features.dim + 1, num_classes, bias=False)
        nn.init.zeros_(self.theta.weight)

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.features(x)
        count = torch.full((len(x), 1), COUNT_WEIGHT, dtype=phi.dtype, device=phi.device)
        return torch.cat([phi * math.sqrt(1 - COUNT_WEIGHT**2), count], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta(self.psi(x))

    @torch.no_grad()
    def class_means(self, min_share: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-class mean of phi (C, dim), class shares (C,)) read from ``theta``: post-processing.

        A class whose noised count is below ``min_share`` of all records keeps that floor (its
        mean is then mostly noise; its share in sampling is the floor)."""
        w = self.theta.weight
        counts = w[:, -1] / COUNT_WEIGHT
        total = counts.clamp(min=0).sum().clamp(min=1e-12)
        counts = counts.clamp(min=min_share * total)
        means = w[:, :-1] / math.sqrt(1 - COUNT_WEIGHT**2) / counts[:, None]
        return means, counts / counts.sum()


@dataclass(frozen=True)
class ServerTraining:
    """The generator's training at the server, after each round's aggregation."""

    steps: int
    per_class: int
    lr: float
    unbiased: bool = False
    schedule: str = "constant"  # "constant": ``lr`` throughout; "cosine": annealed to 0 over ``steps``


class MERFTask:
    """Modules: ``release`` (private: the sites' noised feature sums) and ``generator`` (the
    server trains it on the aggregated release; the sites never touch it)."""

    family = "merf"
    private_modules = ("release",)
    server_modules = ("generator",)  # trained by server_update(), never at a site
    # Hooks mode keeps a per-record copy of theta's gradient (classes x dim floats); ghost
    # clipping only its norm: a full-batch release of thousands of records fits in memory.
    grad_sample_mode = "ghost"
    canary_score = "negative class-0 score of the released feature sum, -<theta_0, psi(x)>"

    def __init__(self, cfg: AppConfig, spec: DataSpec, device: torch.device) -> None:
        if spec.kind != "image":
            raise ValueError("the merf family needs image data; set data.dataset to an image dataset")
        m = cfg.merf
        self.spec, self.device = spec, device
        self.num_classes = spec.num_classes or 0  # unlabelled images: one class, unconditional sampling
        features = Features(spec.channels, spec.image_size, m.feature_seed, squares=m.second_moments)
        if m.features == "public-mnist":
            fit_to_public_digits(features, m.feature_seed, cfg.eval.cache_dir)
        self.latent_dim = m.latent_dim
        gen_cfg = GANConfig(image_size=spec.image_size, channels=spec.channels, latent_dim=m.latent_dim,
                            width=m.width, num_classes=self.num_classes)
        self.modules: dict[str, nn.Module] = {
            "release": Release(features, max(self.num_classes, 1)).to(device),
            "generator": Generator(gen_cfg).to(device),
        }
        self.server = ServerTraining(m.generator_steps, m.generator_per_class, m.generator_lr, m.unbiased_match,
                                     m.generator_schedule)
        self.seed = cfg.run.seed

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # Learning rate 1, no momentum: one step adds the noised mean of psi to theta (module doc).
        return {"release": torch.optim.SGD([unwrap(self.modules["release"]).theta.weight], lr=1.0)}

    def train_step(self, batch: tuple[torch.Tensor, ...], optimizers: dict[str, torch.optim.Optimizer]
                   ) -> dict[str, float]:
        opt = optimizers["release"]
        opt.zero_grad(set_to_none=True)
        x = batch[0].to(self.device)
        if not len(x):
            empty_batch_grads(self.modules["release"], opt)
            opt.step()
            return {"train-loss": 0.0, "batch-size": 0.0}
        y = batch[1].to(self.device).long() if self.num_classes else torch.zeros(len(x), dtype=torch.long,
                                                                                device=self.device)
        scores = self.modules["release"](x)
        per_example = -scores.gather(1, y[:, None]).squeeze(1)
        backward_mean(self.modules["release"], opt, per_example)
        opt.step()
        return {"train-loss": float(per_example.detach().mean()), "batch-size": float(len(x))}

    # ----------------------------------------------------------------- at the server

    def _generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.modules["generator"](z, y if self.num_classes else None)

    def server_update(self) -> dict[str, float]:
        """Train the generator to match the released class means (post-processing); its metrics."""
        return self.train_generator()

    def train_generator(self, after_step: Callable[[int], None] | None = None) -> dict[str, float]:
        """``server_update``'s training, ``after_step(steps_done)`` called after every step (a
        benchmark's snapshots: ``simulations.bench_merf_curve``); the generator is left in train
        mode whatever the callback does with it."""
        release = unwrap(self.modules["release"])
        if not bool(release.theta.weight.any()):
            return {}  # nothing released yet (round 0)
        means, _ = release.class_means()
        gen = self.modules["generator"]
        opt = torch.optim.Adam(gen.parameters(), lr=self.server.lr)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(self.server.steps, 1))
                 if self.server.schedule == "cosine" else None)
        classes = means.shape[0]
        y = torch.arange(classes, device=self.device).repeat_interleave(self.server.per_class)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        loss = torch.zeros(())
        gen.train()
        start = time.time()
        for step in range(self.server.steps):
            z = torch.randn(len(y), self.latent_dim, generator=g).to(self.device)
            phi = release.features(self._generate(z, y))
            got = torch.zeros_like(means).index_add(0, y, phi) / self.server.per_class
            loss = ((got - means) ** 2).sum()
            if self.server.unbiased:
                loss = loss - self._variance_term(phi, got, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if (step + 1) % 500 == 0 or step + 1 == self.server.steps:
                log.info("merf generator step %d/%d: feature match %.4g (%.0fs)", step + 1, self.server.steps,
                         float(loss.detach()), time.time() - start)
            if after_step is not None:
                after_step(step + 1)
                gen.train()
        return {"generator-match": float(loss.detach())}

    def _variance_term(self, phi: torch.Tensor, got: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the batch estimate ``||got - mean||^2`` adds to the squared distance between the
        generator's expected class features and the release, in expectation: each class's
        ``trace(Cov phi) / B`` (B = ``per_class`` samples), estimated without bias by
        ``sum_i ||phi_i - got||^2 / (B (B - 1))``. Subtracted, the loss is the unbiased estimate
        (MMD^2's, up to the release's constant), and minimising it no longer pays the generator
        for shrinking its samples' spread: with ``||phi|| = 1`` the plain loss's minimum has
        ``||E phi|| = ||mean|| B / (B - 1)``, samples closer together than the real ones."""
        b = self.server.per_class
        return ((phi - got[y]) ** 2).sum() / (b * (b - 1))

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """How far the generator's mean features are from the held-out images' (no private data)."""
        release = unwrap(self.modules["release"])
        classes = release.theta.weight.shape[0]
        sums = torch.zeros(classes, release.features.dim)
        counts = torch.zeros(classes)
        for batch in loader:
            x = batch[0].to(self.device)
            y = batch[1].long() if self.num_classes and len(batch) > 1 else torch.zeros(len(x), dtype=torch.long)
            sums.index_add_(0, y, release.features(x).cpu())
            counts += torch.bincount(y, minlength=classes).float()
        real = sums / counts.clamp(min=1)[:, None]
        y = torch.arange(classes).repeat_interleave(EVAL_PER_CLASS)
        fake_images = self.sample(len(y), 0, y if self.num_classes else None).to(self.device)
        fake = torch.zeros_like(real).index_add(0, y, release.features(fake_images).cpu()) / EVAL_PER_CLASS
        return {"feature-distance": float(((fake - real)[counts > 0] ** 2).sum())}

    @torch.no_grad()
    def canary_losses(self, canaries: torch.Tensor, seed: int) -> torch.Tensor:
        """Each canary's loss as a class-0 record, ``-<theta_0, psi(x)>`` (deterministic)."""
        with evaluating(unwrap(self.modules["release"])) as release:
            return (-release(canaries.to(self.device))[:, 0]).double().cpu()

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images in [0, 1]; the same seed gives the same images. When conditional, of the classes
        ``labels`` (default: classes in turn, ``arange(n) % num_classes``)."""
        labels = sample_labels(labels, n, self.num_classes, self.family)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g).to(self.device)
        y = None
        if self.num_classes:
            y = labels.to(self.device) if labels is not None else torch.arange(n, device=self.device) % self.num_classes
        with evaluating(self.modules["generator"]):
            out = self._generate(z, y).clamp(0, 1)
        return out.cpu()


def build_task(cfg: AppConfig, spec: DataSpec, device: torch.device) -> MERFTask:
    return MERFTask(cfg, spec, device)
