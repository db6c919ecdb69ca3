"""A DCGAN-style GAN whose discriminator alone is trained with DP-SGD.

Only the discriminator sees private data, so it is the task's one private module.
The generator learns from the private discriminator's output on fake samples only,
which is post-processing of a DP release: it costs no privacy.

How a call of :meth:`GANTask.train_step` keeps the accounting exact:

* discriminator step: one forward pass on ``[real batch; B fake images]`` with
  per-example losses, one ``backward``, one ``step()`` of the discriminator's optimizer
  (where Opacus clips, noises and charges the accountant: exactly once per call).
  ``B = train.batch-size`` is fixed, never the (Poisson, data-dependent) real batch
  size, so adding or removing one record changes the clipped sum by at most one
  clipped gradient: the sensitivity the accountant assumes.
* generator step(s): Opacus' hooks on the discriminator are switched off and the
  backward pass only reaches the generator's parameters (``inputs=``), so the
  discriminator holds no per-sample gradients afterwards (a stale one would make the
  next private step fail with Opacus' misleading "Poisson sampling is not compatible
  with grad accumulation") and its privatised gradient is left as the step released it.

GroupNorm everywhere (per-example normalisation is what per-sample clipping needs in
the discriminator; in the generator it also keeps ``sample(n, seed)`` independent of n
and leaves no integer running-stat buffers for the strategies to average).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import AppConfig
from common.models import norm_groups
from common.dp_step import backward_mean, unwrap
from common.tasks import DataSpec, evaluating, sample_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GANConfig:
    image_size: int
    channels: int = 1
    latent_dim: int = 64
    width: int = 32
    num_classes: int = 0  # > 0: class-conditional

    @property
    def stages(self) -> int:
        """Stride-2 (up/down)sampling stages: two for 16 px and up (28x28), one for tiny images (8x8)."""
        return 2 if self.image_size >= 16 else 1


class Generator(nn.Module):
    """z (+ one-hot class) -> Linear -> ``stages`` x ConvTranspose(4, 2, 1) -> 3x3 conv -> tanh."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.width * 2**cfg.stages
        self.base = math.ceil(cfg.image_size / 2**cfg.stages)
        self.ch0 = ch
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, ch * self.base * self.base)
        layers: list[nn.Module] = [nn.GroupNorm(norm_groups(ch), ch), nn.ReLU()]
        for _ in range(cfg.stages):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1),
                       nn.GroupNorm(norm_groups(ch // 2), ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.Conv2d(ch, cfg.channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1], (N, C, S, S)."""
        if self.cfg.num_classes:
            if y is None:
                raise ValueError("a conditional generator needs class labels")
            z = torch.cat([z, F.one_hot(y, self.cfg.num_classes).to(z.dtype)], dim=1)
        h = self.fc(z).view(-1, self.ch0, self.base, self.base)
        x = self.net(h)
        s, full = self.cfg.image_size, x.shape[-1]
        if full != s:  # sizes not divisible by 2**stages: centre crop
            o = (full - s) // 2
            x = x[..., o : o + s, o : o + s]
        return (x + 1) * 0.5


class Discriminator(nn.Module):
    """Two convs (both stride 2 for >= 16 px; stride 1 then 2 for tiny images), GroupNorm,
    LeakyReLU, a linear real/fake logit and, when conditional, a projection term."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, s = cfg.width, cfg.image_size
        if cfg.stages == 2:
            first = nn.Conv2d(cfg.channels, w, 4, stride=2, padding=1)
            s //= 2
        else:
            first = nn.Conv2d(cfg.channels, w, 3, stride=1, padding=1)
        s //= 2
        self.features = nn.Sequential(
            first,
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
            nn.GroupNorm(norm_groups(2 * w), 2 * w),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        dim = 2 * w * s * s
        self.head = nn.Linear(dim, 1)
        self.embed = nn.Embedding(cfg.num_classes, dim) if cfg.num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Real/fake logits (N,) for images in [0, 1]."""
        h = self.features(x * 2 - 1)
        out = self.head(h).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional discriminator needs class labels")
            # (N, 1) indices: Opacus' expanded-weights mode needs a batch dimension besides the index one
            out = out + (self.embed(y.unsqueeze(1)).squeeze(1) * h).sum(1)
        return out


@contextlib.contextmanager
def opacus_hooks_off(module: nn.Module) -> Iterator[nn.Module]:
    """The plain module, with the Opacus wrapper's per-sample-gradient hooks disabled meanwhile."""
    if not hasattr(module, "disable_hooks"):
        yield unwrap(module)
        return
    module.disable_hooks()
    try:
        yield unwrap(module)
    finally:
        module.enable_hooks()


class GANTask:
    """The GAN family: ``generator`` and ``discriminator``; only the discriminator is private."""

    family = "gan"
    private_modules = ("discriminator",)
    # privacy.grad-sample-mode = "auto" (simulations/bench_dp.py, docs/RESULTS.md#dp-overhead): bk
    # (common/bookkeeping.py), fastest for the discriminator here (every mode works: only it is wrapped).
    grad_sample_mode = "bk"

    def __init__(self, cfg: AppConfig, spec: DataSpec, device: torch.device) -> None:
        if spec.kind != "image":
            raise ValueError("the gan family needs image data; set data.dataset to an image dataset")
        g = cfg.gan
        if g.conditional and not spec.num_classes:
            raise ValueError("gan.conditional = true needs labelled data (digits, fashion-mnist); this data has "
                             "no class labels: set gan.conditional = false")
        self.spec, self.device = spec, device
        self.conditional = g.conditional
        self.num_classes = (spec.num_classes or 0) if g.conditional else 0
        self.fake_batch = cfg.train.batch_size  # fixed, data-independent (see module doc)
        self.extra_private_rows = self.fake_batch  # the rows each private step adds (common/batch_shapes.py)
        self.d_every, self.g_repeats = g.d_steps_per_g_step, g.g_steps_per_d_step
        self.lr_g, self.lr_d, self.beta1 = g.lr_generator, g.lr_discriminator, g.beta1
        self.optimizer_name = cfg.train.optimizer
        self.gcfg = GANConfig(spec.image_size, spec.channels, g.latent_dim, g.width, self.num_classes)
        self.modules: dict[str, nn.Module] = {
            "generator": Generator(self.gcfg).to(device),
            "discriminator": Discriminator(self.gcfg).to(device),
        }
        self._calls = 0

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        def make(module: nn.Module, lr: float) -> torch.optim.Optimizer:
            if self.optimizer_name == "adam":
                return torch.optim.Adam(module.parameters(), lr=lr, betas=(self.beta1, 0.999))
            return torch.optim.SGD(module.parameters(), lr=lr)

        return {"generator": make(self.modules["generator"], self.lr_g),
                "discriminator": make(self.modules["discriminator"], self.lr_d)}

    def _latents(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.gcfg.latent_dim, generator=generator).to(self.device)
        if not self.num_classes:
            return z, None
        if generator is None:
            y = torch.randint(0, self.num_classes, (n,))
        else:  # deterministic samples: classes in turn
            y = torch.arange(n) % self.num_classes
        return z, y.to(self.device)

    def train_step(
        self, batch: tuple[torch.Tensor, ...], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, float]:
        real = batch[0].to(self.device)
        labels = batch[1].to(self.device) if self.num_classes else None
        gen, disc = self.modules["generator"], self.modules["discriminator"]
        opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]

        # Discriminator: the one private step of this call.
        with torch.no_grad():
            z, y_fake = self._latents(self.fake_batch)
            fake = gen(z, y_fake)
        x = torch.cat([real, fake])
        y = torch.cat([labels, y_fake]) if labels is not None and y_fake is not None else None
        target = torch.cat([torch.ones(len(real), device=self.device), torch.zeros(len(fake), device=self.device)])
        opt_d.zero_grad(set_to_none=True)
        d_losses = F.binary_cross_entropy_with_logits(disc(x, y), target, reduction="none")  # one per row
        backward_mean(disc, opt_d, d_losses)
        opt_d.step()
        d_loss = d_losses.detach().mean()

        # Generator: from the private discriminator's output on fakes only (no privacy cost).
        self._calls += 1
        g_loss = float("nan")
        if self._calls % self.d_every == 0:
            for _ in range(self.g_repeats):
                g_loss = self._generator_step(gen, disc, opt_g)
        metrics = {"train-loss": float(d_loss.detach()), "batch-size": float(len(real))}
        if not math.isnan(g_loss):
            metrics["gen-loss"] = g_loss
        return metrics

    def _generator_step(self, gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer) -> float:
        opt_g.zero_grad(set_to_none=True)
        z, y = self._latents(self.fake_batch)
        fake = gen(z, y)
        with opacus_hooks_off(disc) as plain_disc:
            logits = plain_disc(fake, y)
            loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # non-saturating
            params = [p for p in gen.parameters() if p.requires_grad]
            torch.autograd.backward(loss, inputs=params)  # never touches the discriminator's grads
        opt_g.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Discriminator losses/accuracies on held-out reals and as many fakes (fixed seed)."""
        gen, disc = unwrap(self.modules["generator"]), unwrap(self.modules["discriminator"])
        gen.eval()
        disc.eval()
        g = torch.Generator().manual_seed(0)
        d_real = d_fake = acc_real = acc_fake = 0.0
        n = 0
        for batch in loader:
            real = batch[0].to(self.device)
            labels = batch[1].to(self.device) if self.num_classes else None
            z, y = self._latents(len(real), g)
            lr, lf = disc(real, labels), disc(gen(z, y), y)
            d_real += float(F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr), reduction="sum"))
            d_fake += float(F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf), reduction="sum"))
            acc_real += float((lr > 0).sum())
            acc_fake += float((lf < 0).sum())
            n += len(real)
        gen.train()
        disc.train()
        return {
            "disc-loss": (d_real + d_fake) / (2 * n),
            "disc-acc-real": acc_real / n,
            "disc-acc-fake": acc_fake / n,
            "eval-n": float(n),
        }

    canary_score = "discriminator loss for 'real'"

    @torch.no_grad()
    def canary_losses(self, canaries: torch.Tensor, seed: int) -> torch.Tensor:
        """The private discriminator's loss for calling each canary real, ``softplus(-D(x))`` (label 0 when conditional)."""
        with evaluating(unwrap(self.modules["discriminator"])) as disc:
            x = canaries.to(self.device)
            labels = torch.zeros(len(x), dtype=torch.long, device=self.device) if self.num_classes else None
            return F.softplus(-disc(x, labels).reshape(len(x))).double().cpu()

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images in [0, 1]; the same seed gives the same latents. When conditional, of the
        classes ``labels`` (default: classes in turn, ``arange(n) % num_classes``)."""
        labels = sample_labels(labels, n, self.num_classes, self.family)
        gen = unwrap(self.modules["generator"])
        gen.eval()
        z, y = self._latents(n, torch.Generator().manual_seed(seed))
        if labels is not None:
            y = labels.to(self.device)
        out = gen(z, y).clamp(0, 1)
        gen.train()
        return out.cpu()


def build_task(cfg: AppConfig, spec: DataSpec, device: torch.device) -> GANTask:
    return GANTask(cfg, spec, device)
